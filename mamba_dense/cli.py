"""`mamba-dense`: LightningCLI over our tasks and datamodules.

Examples:
    mamba-dense fit --config configs/demo/shapes.yaml
    mamba-dense test --config configs/ade20k/upernet_vmamba_tiny_512x512_160k.yaml --ckpt_path runs/ade20k/.../last.ckpt
    mamba-dense predict --config configs/demo/shapes.yaml --ckpt_path <ckpt> --model.init_args.predict_dir out/

Models and datamodules are given by class_path (subclass mode), so any LightningModule or
LightningDataModule importable by its dotted path works (`mamba_dense.tasks.SemanticSegmentationTask`,
`mamba_dense.datamodules.ade20k.ShapesDataModule`, ...); classes already imported also resolve by
their short names. Imports come from `lightning.pytorch` only.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import mamba_dense.datamodules  # noqa: F401  (classes imported here resolve by short name)
import mamba_dense.tasks  # noqa: F401
from mamba_dense.convert import CheckpointMismatchError, CorruptCheckpointError, read_checkpoint, unreadable_error
from mamba_dense.datamodules._common import DataError
from mamba_dense.tasks._encoder import ConfigError
from mamba_dense.tasks.guards import (
    AtomicCheckpointIO,
    CheckpointNotFoundError,
    NonFiniteGuard,
    OutOfMemoryGuard,
)
from mamba_dense.tasks.resume import ExactResume, newest_last_checkpoint
from mamba_dense.tasks.sync_bn import NoHostSyncBatchNorm

mamba_dense.datamodules.load_all()


class MambaDenseCLI(LightningCLI):
    """LightningCLI with our defaults: configs overwrite their saved copy in the log directory, every run
    has a `NonFiniteGuard`, an `OutOfMemoryGuard` and an `ExactResume` (on top of the configured
    callbacks) and writes checkpoints with `AtomicCheckpointIO` unless the config gives its own
    CheckpointIO plugin. `trainer.sync_batchnorm: true` uses `NoHostSyncBatchNorm` (PyTorch's
    SyncBatchNorm without its host sync per layer) unless the config gives a LayerSync plugin.
    `fit --ckpt_path last` resumes from the newest `last*.ckpt` of any earlier run in the same log
    folder (Lightning alone looks only in the new run's empty version folder); validate / test /
    predict with `--ckpt_path last` evaluate that checkpoint (`best`: the best one it recorded), or
    stop when there is none (`_parse_ckpt_path`)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        plugins = trainer.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        extra = []
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            extra.append(AtomicCheckpointIO())
        if trainer.get("sync_batchnorm") and not any(isinstance(p, LayerSync) for p in plugins):
            extra.append(NoHostSyncBatchNorm())
        if extra:
            kwargs.setdefault("plugins", [*plugins, *extra])
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """LightningCLI's, except that an error raised while building the model or the datamodule comes
        out as itself: jsonargparse wraps it in a "Does not validate against any of the Union subtypes"
        error, which buries the message (file, field, fix) in the middle of ~80 lines."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = err.__cause__
            if cause is None or "Union subtypes" not in str(err):
                raise
            while cause.__cause__ is not None and "Union subtypes" in str(cause):
                cause = cause.__cause__
            raise cause from None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyperparameters of `--ckpt_path` while parsing (and Lightning loads it
        again later); a missing or unreadable file stops here with the path and the fix, instead of a
        late FileNotFoundError or torch's "PytorchStreamReader failed" without a file name.

        `last` / `best` are resolved here, from the configured log folders, so that the model is built from
        that checkpoint's saved hyperparameters as for an explicit path (resolved after the model was built,
        a run whose fit had other model arguments on the command line failed the architecture check)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt in ("last", "best"):
            trainer_cfg = self.config[sub].get("trainer")
            path = _resolve_keyword(ckpt, trainer_cfg)
            if path is not None:
                rank_zero_info(f"Resuming from the newest last checkpoint: {path}" if (sub, ckpt) == ("fit", "last")
                               else f"{sub} with the {ckpt} checkpoint: {path}")
                self.config[sub]["ckpt_path"] = ckpt = path
            elif sub != "fit":  # (fit with no earlier run: Lightning warns and starts fresh)
                _keyword_not_found(sub, ckpt, trainer_cfg)
        if isinstance(ckpt, str) and ckpt not in _CKPT_KEYWORDS and not ckpt.startswith("registry"):
            if "://" not in ckpt and not os.path.isfile(ckpt):
                raise CheckpointNotFoundError(
                    f"--ckpt_path {ckpt}: no such file. Fix: give a checkpoint written by `mamba-dense fit`, "
                    "e.g. runs/<name>/lightning_logs/version_<n>/checkpoints/last.ckpt"
                    + (", or `last` to resume the newest run" if sub == "fit" else "")
                )
        model = self.config[sub].get("model") if sub else None
        given = dict(model.get("init_args") or {}) if model is not None else {}
        configured = model.get("class_path") if model is not None else None
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            clear = unreadable_error(ckpt, err)
            if clear is None:
                raise
            raise clear from err
        model = self.config[sub].get("model") if sub else None
        saved = model.get("class_path") if model is not None else None
        # LightningCLI would build the checkpoint's class (dotted paths may differ: compare the class names)
        if configured and saved and str(saved).rsplit(".", 1)[-1] != str(configured).rsplit(".", 1)[-1]:
            raise CheckpointMismatchError(
                f"--ckpt_path {ckpt} holds a {saved.rsplit('.', 1)[-1]} but the config builds a "
                f"{configured.rsplit('.', 1)[-1]} ({configured}). Fix: give the config this checkpoint was trained "
                "with, or a checkpoint of this config's task")
        _warn_overridden(given, model, ckpt)
        init = model.get("init_args") if model is not None else None
        if isinstance(ckpt, str) and os.path.isfile(ckpt) and init is not None and init.get("encoder_weights"):
            # the checkpoint holds every weight: loading the pretraining file first is wasted, and fails on a
            # machine without it (older checkpoints saved its path among their hyperparameters)
            rank_zero_info(f"--ckpt_path {ckpt}: encoder_weights={init['encoder_weights']!r} is not loaded "
                           "(the checkpoint replaces every weight)")
            init["encoder_weights"] = None


def _configured_checkpoint_dirs(trainer_cfg: Any) -> list[str]:
    """Where the configured run's checkpoints go, from the trainer config alone (no Trainer yet, and no
    fast_dev_run DummyLogger), as `find_last_checkpoint` finds them on a Trainer: per ModelCheckpoint its
    `dirpath`, else the first logger's version folders `<save_dir>/<name>/*/checkpoints` (Lightning's default
    logger: `<default_root_dir>/lightning_logs`), or `<default_root_dir>/checkpoints` without a logger; with no
    ModelCheckpoint configured, Lightning's default one (none with `enable_checkpointing: false`)."""
    def get(ns: Any, key: str, default: Any = None) -> Any:
        return ns.get(key, default) if hasattr(ns, "get") else default

    def path(p: Any) -> str:
        return os.path.expanduser(os.fspath(p))

    root = path(get(trainer_cfg, "default_root_dir") or os.getcwd())
    callbacks = get(trainer_cfg, "callbacks") or []
    callbacks = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    checkpoints = [get(cb, "init_args") for cb in callbacks if str(get(cb, "class_path", "")).endswith("ModelCheckpoint")]
    if not checkpoints:
        if get(trainer_cfg, "enable_checkpointing") is False:
            return []
        checkpoints = [None]  # Lightning's default ModelCheckpoint: no dirpath
    dirs = [path(get(args, "dirpath")) for args in checkpoints if get(args, "dirpath")]
    if all(get(args, "dirpath") for args in checkpoints):
        return dirs
    logger = get(trainer_cfg, "logger")
    logger = logger[0] if isinstance(logger, (list, tuple)) and logger else logger
    if logger is False or (isinstance(logger, (list, tuple)) and not logger):
        return dirs + [os.path.join(root, "checkpoints")]
    args = get(logger, "init_args")
    save_dir = path(get(args, "save_dir") or root)
    name = get(args, "name", "lightning_logs") if args is not None else "lightning_logs"
    parts = [glob.escape(save_dir)] + ([glob.escape(str(name))] if name else [])
    return dirs + glob.glob(os.path.join(*parts, "*", "checkpoints"))


def _resolve_keyword(keyword: str, trainer_cfg: Any) -> str | None:
    """`last`: the newest last*.ckpt of the configured log folders; `best`: the best checkpoint it recorded."""
    last = newest_last_checkpoint(_configured_checkpoint_dirs(trainer_cfg))
    if last is None or keyword == "last":
        return last
    return _best_recorded_in(last)


def _keyword_not_found(sub: str, keyword: str, trainer_cfg: Any) -> None:
    """Raise CheckpointNotFoundError for validate / test / predict `--ckpt_path last|best` that name no file.
    NOTE: Lightning alone finds no `last` in a new process and goes on with the untrained weights (a warning
    only), and refuses `best` (known only to the process that ran fit)."""
    root = os.path.expanduser(os.fspath(trainer_cfg.get("default_root_dir") or os.getcwd()))
    fix = ("Fix: give the checkpoint's path, e.g. runs/<name>/lightning_logs/version_<n>/checkpoints/last.ckpt, "
           "or the same trainer.default_root_dir as the fit run")
    last = newest_last_checkpoint(_configured_checkpoint_dirs(trainer_cfg))
    if last is None:
        raise CheckpointNotFoundError(
            f"--ckpt_path {keyword}: no last*.ckpt in the runs under {root}, so `{sub}` would use untrained "
            f"weights. {fix}"
        )
    raise CheckpointNotFoundError(
        f"--ckpt_path best: {last} records no best checkpoint that still exists (a ModelCheckpoint with a "
        f"`monitor` writes one). {fix}"
    )


def _best_recorded_in(last: str) -> str | None:
    """The best checkpoint that a monitoring ModelCheckpoint recorded in checkpoint ``last`` (its
    path as recorded, else the same file name beside ``last``), or None."""
    state = read_checkpoint(last, weights_only=False).get("callbacks") or {}
    for cb in state.values():
        best = cb.get("best_model_path") if isinstance(cb, dict) and cb.get("monitor") else None
        if best:
            for cand in (best, os.path.join(os.path.dirname(last), os.path.basename(best))):
                if os.path.isfile(cand):
                    return cand
    return None


def _warn_overridden(given: dict, model: Any, ckpt: str) -> None:
    """LightningCLI builds the model from the hyperparameters saved in `--ckpt_path`, over the config and
    the command line: name the given model arguments that it drops (a different head, encoder_kwargs...)."""
    saved = {}
    if model is not None:  # the saved values land in init_args (or in dict_kwargs with a saved class path)
        saved = {**dict(model.get("init_args") or {}), **dict(model.get("dict_kwargs") or {})}
    dropped = sorted(k for k, v in given.items()
                     if k in saved and k != "encoder_weights" and _plain(saved[k]) != _plain(v))
    # (encoder_weights: _parse_ckpt_path drops it for checkpoint runs, whatever was given)
    if dropped:
        rank_zero_warn(
            f"--ckpt_path {ckpt}: the model is built from the checkpoint's saved hyperparameters, so these "
            f"given model arguments are not used: {', '.join(f'{k}={_plain(given[k])!r} (checkpoint: {_plain(saved[k])!r})' for k in dropped)}. "
            "To train another architecture from these weights, start a new run (fit without --ckpt_path) "
            "with --model.init_args.encoder_weights <ckpt>."
        )


def _plain(v: Any) -> Any:
    """A config value as plain Python (jsonargparse Namespaces and tuples -> dicts and lists)."""
    if hasattr(v, "as_dict"):
        v = v.as_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


_CKPT_KEYWORDS = ("last", "best", "hpc")
# Bad input whose message names the file, the field and the fix: the console script prints the message
# alone (no traceback); build_cli (in-process use) raises them.
# FileNotFoundError: a data root or file that is not there (the datamodules' messages name it and the fix)
_USER_ERRORS = (DataError, CheckpointMismatchError, CheckpointNotFoundError, CorruptCheckpointError, ConfigError,
                FileNotFoundError)


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> MambaDenseCLI:
    """The CLI, parsed from `args` (default sys.argv) and run unless `run=False`; for in-process use."""
    return MambaDenseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # appended to the configured callbacks
        trainer_defaults={"callbacks": [NonFiniteGuard(), OutOfMemoryGuard(), ExactResume()]},
        args=list(args) if args is not None else None,
        run=run,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `mamba-dense` console script."""
    try:
        build_cli(args)
    except _USER_ERRORS as err:
        print(f"mamba-dense: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
