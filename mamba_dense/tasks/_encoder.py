"""Encoders by timm name, reduced to the stride 4/8/16/32 maps that the heads read."""

from __future__ import annotations

import contextvars
import os
import pickle
from collections.abc import Sequence
from typing import Any

import timm
import torch
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch import nn

import mamba_dense.encoders  # noqa: F401  (registers vmamba_tiny, localvmamba_tiny, ... in timm)
from mamba_dense import convert
from mamba_dense.encoders import list_encoders

REDUCTIONS = (4, 8, 16, 32)


class Encoder(nn.Module):
    """`timm.create_model(name, features_only=True)` returning the maps at strides 4, 8, 16, 32.

    Args:
        name: any timm model name with `features_only` support (ours or timm's, e.g. "resnet18").
        weights: path to a local state dict, official checkpoint or task checkpoint of ours (the
            encoder part of a `mamba-dense fit` last.ckpt); nothing is downloaded.
        drop_path_rate: stochastic depth rate; None keeps the encoder default.
        out_indices: feature indices to return; None picks those at strides 4/8/16/32.
        **kwargs: further encoder constructor arguments (e.g. dims, depths).

    Attributes:
        channels: channels of the returned maps; reductions: their strides.
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        drop_path_rate: float | None = None,
        out_indices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.name = name
        if not timm.is_model(name):
            ours = list_encoders(spatial_dims=2)
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
            raise ValueError(
                f"Unknown encoder {name!r} (not registered in timm). Our encoders: {ours}; "
                f"similar timm names: {close}; any other timm model with features_only support works too."
            )
        kw: dict[str, Any] = dict(features_only=True, pretrained=False, **kwargs)
        if drop_path_rate is not None:
            kw["drop_path_rate"] = drop_path_rate
        if out_indices is not None:
            kw["out_indices"] = tuple(out_indices)
        ours = name in list_encoders()
        try:
            if weights is not None and not ours:  # timm's own model: timm's loader, checked (_timm_weights)
                self.model = _timm_weights(name, kw, weights)
            else:
                self.model = timm.create_model(name, **kw)
        except TypeError as err:
            raise ValueError(f"Encoder {name!r} rejected its arguments {sorted(kwargs)}: {err}") from err
        reductions = list(self.model.feature_info.reduction())
        channels = list(self.model.feature_info.channels())
        if out_indices is None:
            missing = [r for r in REDUCTIONS if r not in reductions]
            if missing:
                raise ValueError(
                    f"Encoder {name!r} has feature reductions {reductions}; the heads need {list(REDUCTIONS)} "
                    f"(missing {missing}). Pass encoder_out_indices explicitly if the strides differ."
                )
            self.select = [reductions.index(r) for r in REDUCTIONS]
        else:
            self.select = list(range(len(reductions)))
        self.channels = [channels[i] for i in self.select]
        self.reductions = [reductions[i] for i in self.select]
        if weights is not None and ours:
            load_encoder_weights(self.model, weights, name)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the encoder's blocks (recomputed in backward: less memory,
        about one more forward of compute). Our encoders and timm's implement it."""
        for m in self.model.modules():
            if m is not self.model and hasattr(m, "set_grad_checkpointing"):
                m.set_grad_checkpointing(enable)
                return
        flags = [m for m in self.model.modules() if isinstance(getattr(m, "grad_checkpointing", None), bool)]
        if not flags:
            raise ValueError(
                f"Encoder {self.name!r} does not support activation checkpointing (no set_grad_checkpointing / "
                "grad_checkpointing in its modules); set grad_checkpointing: false."
            )
        for m in flags:
            m.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model(x)
        return [feats[i] for i in self.select]


def _check_weights_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"encoder_weights={path!r} is not a file (weights load from a local path only). "
            "To evaluate a trained checkpoint without the pretraining file, set encoder_weights: null."
        )


def _timm_weights(name: str, kw: dict[str, Any], path: str) -> nn.Module:
    """timm's own model (e.g. resnet18) built features-only with the weights of a local file, loaded by timm
    (its reader, filter, in_chans adaptation and classifier removal). The keys that timm's loader only logs
    (it loads features-only models with strict=False) are refused: a missing or unexpected key raises
    CheckpointMismatchError naming the file, as does a file timm cannot read."""
    import logging

    _check_weights_file(path)
    records: dict[str, list[str]] = {"Missing keys": [], "Unexpected keys": []}

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            for what in records:
                if msg.startswith(what + " ("):
                    records[what] += msg[len(what) + 2:].split(")", 1)[0].split(", ")

    # NOTE: timm logs the keys at INFO; they are kept here and not passed on to the application's handlers
    # (not thread-safe: the logger is shared)
    logger, handler = logging.getLogger("timm.models._builder"), _Keep(logging.INFO)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        model = timm.create_model(name, **dict(kw, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))))
    except Exception as err:  # noqa: BLE001  (timm's reader and load_state_dict: named below)
        clear = convert.unreadable_error(path, err)
        if clear is not None:
            raise clear from err
        if isinstance(err, (RuntimeError, pickle.UnpicklingError)):
            raise convert.CheckpointMismatchError(
                f"encoder_weights={path!r} could not be loaded into timm's {name!r}: {err}. Fix: pass a state_dict "
                f"of this timm model saved with torch.save(model.state_dict(), path).") from err
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    # a features-only model's cfg names no classifier any more; the registered cfg does
    head = timm.models.get_pretrained_cfg_value(name, "classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    # the classifier is dropped by design (features-only)
    records["Missing keys"] = [k for k in records["Missing keys"] if not k.startswith(tuple(f"{h}." for h in head))]
    bad = {what: keys for what, keys in records.items() if keys}
    if bad:
        raise convert.CheckpointMismatchError(
            f"encoder_weights={path!r} does not fit timm's {name!r}: "
            + "; ".join(f"{len(v)} {k.lower()} {v[:8]}" for k, v in bad.items())
            + ". Fix: pass a checkpoint of this timm model (its state_dict), or build it with the arguments the file "
            "was trained with.")
    return model


def load_encoder_weights(model: nn.Module, path: str, name: str) -> convert.LoadReport:
    """Load the local checkpoint `path` into a task's encoder `model` (named `name`), strictly.

    `mamba_dense.convert.load_encoder_weights` does it for the 2D tasks (`model` is timm's features-only
    wrapper) and the 3D one alike: official key names -> ours through the family's filter (SegMamba's
    included), the encoder part of a task checkpoint of ours (`mamba-dense fit`'s last.ckpt), a training
    config pickled next to the tensors loaded with a warning. A file that is not a checkpoint, a
    truncated one, or one that does not fit raises an error naming the file and the fix.
    """
    _check_weights_file(path)
    try:
        return convert.load_encoder_weights(model, path)
    except convert.CheckpointMismatchError as err:
        if path in str(err):
            raise
        raise convert.CheckpointMismatchError(f"encoder_weights={path!r} (encoder {name!r}): {err}") from err


class ConfigError(ValueError):
    """A task setting that cannot work, or that disagrees with the datamodule: the message names the key and
    the fix (the `mamba-dense` command prints it without a traceback)."""


def check_ranges(**values: tuple[Any, float, float | None, bool]) -> None:
    """``name=(value, low, high, low_inclusive)``: ValueError naming ``model.init_args.<name>`` unless
    low <(=) value < high (high None: no upper bound); a value of None is left alone (the default)."""
    for name, (v, lo, hi, inclusive) in values.items():
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= lo if inclusive else v > lo)
        ok = ok and (hi is None or v < hi)
        if not ok:
            need = f"{'>=' if inclusive else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
            raise ConfigError(f"model.init_args.{name}={v!r}: must be a number {need}.")


# load_from_checkpoint's strict flag and hyper-parameter overrides, for check_checkpoint_fits (Lightning calls
# on_load_checkpoint with neither, after it has written the overrides into the checkpoint's hyper-parameters)
_LOADING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("mamba_dense_loading", default=None)


class CheckedCheckpointLoading:
    """Mixin (before ``pl.LightningModule``) for tasks whose ``on_load_checkpoint`` calls
    :func:`check_checkpoint_fits`: ``load_from_checkpoint`` tells it the ``strict`` flag and the overrides."""

    @_restricted_classmethod  # as Lightning's: calling it on an instance is an error, not a silent new model
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any) -> Any:
        overrides = {k: v for k, v in kwargs.items() if k != "weights_only"}
        token = _LOADING.set({"strict": strict, "overrides": overrides})
        try:
            return super().load_from_checkpoint(  # type: ignore[misc]
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs)
        finally:
            _LOADING.reset(token)


def check_checkpoint_fits(module: nn.Module, checkpoint: dict[str, Any], settings: Sequence[str]) -> None:
    """Raise if a Lightning `checkpoint` holds another architecture than `module` (call from `on_load_checkpoint`).

    Lists the missing, unexpected and reshaped keys and, for the hyperparameters named in
    `settings` (e.g. encoder, head), the checkpoint's values next to the model's, or the overrides given to
    ``load_from_checkpoint``. A non-strict load (``load_from_checkpoint(..., strict=False)``, or
    ``strict_loading = False``) only refuses reshaped keys, which no load can place.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        return
    loading = _LOADING.get() or {}
    strict = loading.get("strict")
    if strict is None:
        strict = getattr(module, "strict_loading", True)
    own = module.state_dict()
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    reshaped = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or reshaped):
        return
    saved = checkpoint.get("hyper_parameters", {})
    ours = getattr(module, "hparams", {})
    differ = {k: (saved.get(k), ours.get(k)) for k in settings if saved.get(k) != ours.get(k)}
    overrides = loading.get("overrides") or {}
    raise convert.CheckpointMismatchError(
        f"The checkpoint holds another architecture than this {type(module).__name__}"
        + (f" (checkpoint vs model: {differ})" if differ else "")
        + (f" (overridden in load_from_checkpoint: {overrides})" if overrides else "")
        + f": {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}, "
        f"{len(reshaped)} reshaped {reshaped[:5]}. Build the model with the checkpoint's settings, e.g. "
        f"{type(module).__name__}.load_from_checkpoint(path) without overrides"
        + ("." if not strict else ", or pass strict=False to leave missing / unexpected keys out.")
    )
