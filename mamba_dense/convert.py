"""Official checkpoints -> our encoders, from a local file (nothing is downloaded).

Supported releases (each through its family's filter, which owns the key mapping):

=====================================  =====================================================
release                                converted by
=====================================  =====================================================
VMamba vssm1 T/S/B (v2, ``VSSM`` and    :func:`mamba_dense.encoders.vmamba.checkpoint_filter_fn`:
``Backbone_VSSM``/mmseg), VMamba v0     stem / downsample indices, flat (K*D, N) ``A_logs`` and
(incl. legacy ``ln_1`` names)           (K*D,) ``Ds`` -> (K, D, N) / (K, D), Linear2d weights
                                        saved as (out, in, 1, 1) 1x1 convs -> (out, in),
                                        ``outnorm{i}`` -> ``feature_norms.{i}``
LocalVMamba T/S (``local_vssm_*``)      the same filter; ``op.multi_scan.attn`` -> ``op.attn``
Vim T/S, Mamba(R) T/S/B                 :func:`mamba_dense.encoders.vim.checkpoint_filter_fn`:
                                        forward / backward (``*_b``) mixer tensors stacked into
                                        route-indexed parameters, middle class token split out of
                                        ``pos_embed``, registers, ``fpn1..4`` -> ``pyramid``
SegMamba (whole model or encoder)       :func:`mamba_dense.encoders.volumetric.segmamba_checkpoint_filter`
=====================================  =====================================================

:func:`load_encoder_weights` is strict: after conversion every tensor of the encoder must come
from the file and every tensor of the file must land in the encoder, with equal shapes. The only
exceptions are by design and are listed in the returned :class:`LoadReport`:

- *initialized*: dense-only modules that classification checkpoints cannot contain
  (``feature_norms.*`` of the hierarchical encoders, Vim's ``pyramid.*``), and the classifier
  modules (``head``, final ``norm``, ``neck``) that backbone-only checkpoints (mmseg / mmdet) do not
  contain, stay at their init, but only when the file has none of that module's tensors;
- *ignored*: tensors of modules the encoder was built without or pruned away (the classifier
  ``head``, final ``norm``, Mamba(R)'s ``neck``/``norm_neck`` of a headless or ``features_only``
  encoder, blocks/stages after the last requested feature), the decoder of a whole segmentor
  checkpoint, and anything matching the caller's ``ignore`` patterns;
- *adapted*: the first conv of an encoder built with another number of input channels
  (``in_chans``), fitted as timm's loader fits it (``adapt_input_conv``).

Everything else raises :class:`CheckpointMismatchError`, naming the keys.

Example:
    >>> import mamba_dense, mamba_dense.convert as convert  # doctest: +SKIP
    >>> m = mamba_dense.create_encoder("vmamba_tiny", num_classes=0)  # doctest: +SKIP
    >>> convert.load_encoder_weights(m, "vssm1_tiny_0230s_ckpt_epoch_264.pth")  # doctest: +SKIP
    LoadReport(loaded=..., initialized=[], ignored=['classifier.head.bias', ...])
"""

from __future__ import annotations

import fnmatch
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

__all__ = [
    "LoadReport",
    "CheckpointMismatchError",
    "read_checkpoint",
    "convert_state_dict",
    "load_encoder_weights",
    "CorruptCheckpointError",
    "unreadable_error",
]

# Top-level modules a headless / features-only encoder may lack; checkpoint tensors for them are
# ignored (not an error) when the encoder has no such parameters.
_HEAD_MODULES = ("head", "norm", "neck", "norm_neck", "classifier")
# Dense-only modules classification checkpoints cannot contain.
_DENSE_ONLY = ("feature_norms", "pyramid")


class CheckpointMismatchError(ValueError):
    """The converted checkpoint does not fit the encoder (missing / unexpected keys or shapes)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that torch cannot read (not a checkpoint, truncated, corrupted); the message names it."""


@dataclass
class LoadReport:
    """What :func:`load_encoder_weights` did.

    Attributes:
        loaded: encoder tensors copied from the file.
        initialized: encoder tensors of dense-only / classifier modules the file has none of
            (kept at init).
        ignored: file tensors (our names after conversion; raw names for a segmentor's decoder)
            the encoder has no place for by design.
        adapted: loaded tensors changed to fit: the first conv of an encoder with another number of
            input channels (timm's ``adapt_input_conv``: summed for 1 channel, else repeated and scaled).
    """

    loaded: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        def short(xs: list[str]) -> str:
            return repr(xs) if len(xs) <= 4 else f"[{len(xs)} keys: {', '.join(map(repr, xs[:3]))}, ...]"

        adapted = f", adapted={short(self.adapted)}" if self.adapted else ""
        return (
            f"LoadReport(loaded={short(self.loaded)}, initialized={short(self.initialized)}, "
            f"ignored={short(self.ignored)}{adapted})"
        )


def read_checkpoint(path: str | os.PathLike, weights_only: bool | None = None) -> Mapping[str, Any]:
    """``torch.load`` a local checkpoint on the CPU.

    Args:
        weights_only: True: tensors and plain containers only (raises ``pickle.UnpicklingError`` for
            files that also pickle their training config, as the official VMamba / Vim releases do);
            False: full unpickling (only for files you trust); None (default): try True, and fall back
            to False with a warning naming the file, for a torch archive or pickle only.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CorruptCheckpointError: (a ``ValueError``) the file is not a checkpoint (text, an HTML page, a
            Git LFS pointer) or a truncated / corrupted one. Only a zip archive or a pickle stream (by
            its first bytes) is ever loaded with weights_only=False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is not a file; weights load from a local checkpoint path only")
    try:
        return _torch_load(path, weights_only=weights_only is not False)
    except pickle.UnpicklingError as err:  # weights_only=True refused a torch archive / pickle stream
        # NOTE: official training checkpoints pickle their config objects next to the tensors.
        names = sorted(set(_UNSAFE_GLOBAL.findall(str(err))))
        what = f"{', '.join(names)} objects" if names else "objects (or pickle opcodes) that weights_only=True refuses"
        if weights_only:
            raise pickle.UnpicklingError(
                f"{path}: pickles {what} next to its tensors (official training checkpoints pickle their "
                "config), which weights_only=True refuses. Fix: pass weights_only=None or False if you trust the file."
            ) from err
        warnings.warn(
            f"{path}: pickles {what} next to its tensors (official training checkpoints pickle their "
            "config); loading it with weights_only=False. Pass weights_only=True to refuse such files.",
            stacklevel=3,
        )
    return _torch_load(path, weights_only=False)


# torch.load's weights_only refusal of a pickled class (torch < 2.4: "Unsupported class X")
_UNSAFE_GLOBAL = re.compile(r"(?:GLOBAL|Unsupported class) ([\w.]+)")
# torch.load's RuntimeErrors for a file that is no (complete) torch archive; others pass through
_UNREADABLE = ("PytorchStreamReader", "zip archive", "inline_container", "magic number", "corrupt")


def _torch_load(path: str, weights_only: bool) -> Any:
    """``torch.load`` on the CPU. A file that is not a checkpoint, or a truncated / corrupted one, raises
    CorruptCheckpointError naming it; weights_only=True refusing a torch archive or a pickle stream
    re-raises torch's ``pickle.UnpicklingError``. Garbage fails with the same UnpicklingError, so the
    file's first bytes tell the two apart: nothing but a real archive / pickle is ever fully unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and weights_only and _is_archive_or_pickle(path):
            raise
        clear = unreadable_error(path, err)
        if clear is None:
            raise
        raise clear from err


def _is_archive_or_pickle(path: str) -> bool:
    """True for a zip archive (torch.save's format) or a pickle stream (its legacy format), by the first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def unreadable_error(path: str | os.PathLike, err: BaseException) -> CorruptCheckpointError | None:
    """The CorruptCheckpointError naming ``path`` when torch.load's error ``err`` says the file is not a
    (complete) checkpoint, else None. A cut zip fails in the reader (RuntimeError "PytorchStreamReader
    failed ...", or OSError EINVAL seeking past its end), other files in unpickling."""
    if isinstance(err, RuntimeError) and not any(s in str(err) for s in _UNREADABLE):
        return None
    if not isinstance(err, (pickle.UnpicklingError, EOFError, RuntimeError, OSError)) or not os.path.isfile(path):
        return None
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(16)
    size = os.path.getsize(path)
    if not _is_archive_or_pickle(path):
        return CorruptCheckpointError(
            f"{path} is not a PyTorch checkpoint: it starts with {head!r} ({size} bytes), not with a zip archive "
            "or a pickle (a text file, an HTML page or a Git LFS pointer saved in place of the weights?). "
            "Fix: check the path, or download the checkpoint file itself again."
        )
    text = str(err).split("WeightsUnpickler error:", 1)[-1]  # torch's weights_only preamble says nothing here
    reason = next((line.strip() for line in text.splitlines() if line.strip()), "unexpected end of file")
    reason = re.sub(r"^\[enforce fail at [^\]]*\][ .]*", "", reason).split(". ")[0]  # miniz / c10 preambles
    return CorruptCheckpointError(
        f"{path} is not a readable PyTorch checkpoint ({size} bytes; torch.load: {type(err).__name__}: {reason}): "
        "the file is truncated, corrupted or not written by torch.save. Fix: check the path, or download or copy "
        "the file again and compare its size with the original's."
    )


def _encoder_of(model: nn.Module) -> nn.Module:
    from mamba_dense.encoders.artifacts import _unwrap_encoder

    return _unwrap_encoder(model)


def _filter_for(enc: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The family's converter for ``enc`` (without filling anything from the model)."""
    from mamba_dense.encoders import himamba, vim, vmamba, volumetric

    if isinstance(enc, vim.Vim):
        return lambda sd: vim.checkpoint_filter_fn(sd, enc, fill_missing=False)
    if isinstance(enc, himamba.HiMamba):  # no official release: our own state dicts only
        return dict
    if isinstance(enc, vmamba.VMamba):  # VMamba v2 / v0 and LocalVMamba
        return lambda sd: vmamba.checkpoint_filter_fn(sd, enc, fill_missing=False)
    if isinstance(enc, volumetric.SegMambaEncoder):
        return volumetric.segmamba_checkpoint_filter
    return dict


def checkpoint_mapping(checkpoint: Any, path: str | os.PathLike | None = None) -> Mapping[str, Any]:
    """What ``torch.load`` returned, as the mapping the converters read: a whole pickled module
    (``torch.save(model)``) gives its state dict; anything else that is not a dict raises
    CheckpointMismatchError naming the file."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping):
        where = f"{os.fspath(path)}: " if path is not None else ""
        raise CheckpointMismatchError(
            f"{where}the file holds a {type(checkpoint).__name__}, not a state dict (a dict of tensors, or a training "
            "checkpoint with one under 'model' / 'state_dict'). Fix: save model.state_dict() (torch.save(model."
            "state_dict(), path)) and load that file"
        )
    return checkpoint


def convert_state_dict(model: nn.Module, checkpoint: Mapping[str, Any], path: str | os.PathLike | None = None,
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official (or our own) checkpoint contents -> tensors under ``model``'s names.

    Args:
        model: one of our encoders, or a timm / smp wrapper of one.
        checkpoint: what ``torch.load`` returned (wrappers such as ``{"model": ...}`` allowed).
        path: the file it came from, for error messages.

    Returns:
        (converted state dict, raw names of the file's tensors that belong to no encoder: the
        decoder of a segmentor checkpoint). Nothing is filled in from the model.
    """
    from mamba_dense.encoders._builder import unwrap_checkpoint

    enc = _encoder_of(model)
    sd, left_out = unwrap_checkpoint(checkpoint_mapping(checkpoint, path))
    if any(k.startswith("vit.") for k in sd):  # SegMamba's whole model: encoder under "vit."
        left_out += sorted(k for k in sd if not k.startswith("vit."))
        sd = {k: v for k, v in sd.items() if k.startswith("vit.")}
    where = f"{path}: " if path is not None else ""
    try:
        return _filter_for(enc)(sd), left_out
    except CheckpointMismatchError:
        raise
    except ValueError as err:  # a family filter's own message (e.g. SegMamba's missing scan directions)
        raise CheckpointMismatchError(f"{where}{err}") from None
    except KeyError as err:  # a tensor the family's conversion needs (e.g. Vim's pos_embed)
        found = f"{len(sd)} tensors, e.g. {sorted(sd)[:4]}" if sd else "no tensors"
        raise CheckpointMismatchError(
            f"{where}not a {type(enc).__name__} checkpoint: it lacks {err.args[0]!r}, which the conversion needs "
            f"(the file holds {found}). Fix: pass the official checkpoint of this model family"
        ) from None


def _pruned(key: str, enc: nn.Module) -> bool:
    """True for a key of a block / stage that the encoder no longer has (features-only pruning)."""
    top, _, rest = key.partition(".")
    seq = getattr(enc, top, None) if top in ("blocks", "stages") else None
    idx = rest.split(".", 1)[0]
    return isinstance(seq, nn.ModuleList | nn.Sequential) and idx.isdigit() and int(idx) >= len(seq)


def _match(enc: nn.Module, converted: dict[str, torch.Tensor], left_out: list[str], path, ignore: Sequence[str] = (),
           adapt: Sequence[str] = (), skip_hint: str = "pass ignore=[...]") -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """load_encoder_weights' check: the report and the tensors to load, or CheckpointMismatchError.
    adapt: keys whose file tensor may differ in shape because the loader adapts it afterwards (timm:
    the first conv for in_chans != 3, the classifier for another number of classes); they pass unchecked."""
    own = enc.state_dict()
    own_tops = {k.split(".", 1)[0] for k in own}
    report = LoadReport(ignored=list(left_out))

    unexpected, mismatched, to_load, in_file = [], [], {}, set()  # in_file: present, but mismatched
    for k, v in converted.items():
        top = k.split(".", 1)[0]
        if any(fnmatch.fnmatchcase(k, p) for p in ignore):
            report.ignored.append(k)
        elif k in own:
            if tuple(v.shape) != tuple(own[k].shape) and k not in adapt:
                mismatched.append(f"{k}: file {tuple(v.shape)} vs encoder {tuple(own[k].shape)}")
                in_file.add(k)
            else:
                to_load[k] = v
        elif (top in _HEAD_MODULES and top not in own_tops) or _pruned(k, enc):
            report.ignored.append(k)
        else:
            unexpected.append(k)
    missing = []
    file_tops = {k.split(".", 1)[0] for k in converted}
    for k in own:
        if k in to_load or k in in_file:  # a mismatched key is reported once, as a mismatch
            continue
        top = k.split(".", 1)[0]
        if top in _DENSE_ONLY + _HEAD_MODULES and top not in file_tops:
            report.initialized.append(k)
        elif k.endswith("num_batches_tracked"):  # BatchNorm counter, absent from older files
            report.initialized.append(k)
        else:
            missing.append(k)
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (("missing keys (in the encoder, not in the file)", missing),
                           ("unexpected keys (in the file, not in the encoder)", unexpected),
                           ("shape mismatches", mismatched)):
            keys = sorted(keys)
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{len(keys)} {what}: {keys[:8]}{more}")
        raise CheckpointMismatchError(
            f"{os.fspath(path)} does not fit {type(enc).__name__}: " + "; ".join(parts)
            + ". Check the variant and its size arguments (dims, depths, embed_dim, num_registers, "
            f"cls_token) against the checkpoint, or {skip_hint} for tensors to leave out on purpose."
        )
    return report, to_load


def load_encoder_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    ignore: Sequence[str] = (),
    weights_only: bool | None = None,
) -> LoadReport:
    """Load an official (or our own) checkpoint file into an encoder, strictly.

    Args:
        model: one of our encoders (``mamba_dense.create_encoder``), or the timm ``features_only``
            / smp wrapper of one; the weights go into the encoder inside.
        path: local checkpoint file.
        ignore: glob patterns (our names, after conversion) of file tensors to leave out on
            purpose, e.g. ``("cls_token", "cls_pos_embed")`` to load Vim weights into an encoder
            built with ``cls_token=False``.
        weights_only: see :func:`read_checkpoint`.

    Returns:
        a :class:`LoadReport`.

    Raises:
        CheckpointMismatchError: missing / unexpected keys or shape mismatches outside the cases
            listed in the module docstring; the message lists them.
    """
    enc = _encoder_of(model)
    converted, left_out = convert_state_dict(enc, read_checkpoint(path, weights_only), path)
    adapted = _adapt_first_conv(enc, converted)
    report, to_load = _match(enc, converted, left_out, path, ignore)
    report.adapted = adapted
    result = enc.load_state_dict(to_load, strict=False)
    # NOTE: BatchNorm fills a missing num_batches_tracked itself, so it is not in missing_keys.
    assert not result.unexpected_keys and set(result.missing_keys) <= set(report.initialized), result
    report.loaded = sorted(to_load)
    report.initialized.sort()
    report.ignored.sort()
    return report


def _adapt_first_conv(enc: nn.Module, converted: dict[str, torch.Tensor]) -> list[str]:
    """Fit the file's first conv (``pretrained_cfg["first_conv"]``) to an encoder built with another number of
    input channels, in place, as timm's loader does (``timm.models.adapt_input_conv``); the adapted keys."""
    from timm.models import adapt_input_conv

    cfg = getattr(enc, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    own = enc.state_dict()
    out = []
    for name in (first,) if isinstance(first, str) else (first or ()):
        key = f"{name}.weight"
        w, mine = converted.get(key), own.get(key)
        # NOTE: 3-channel (RGB) files only, as timm's loader; other mismatches stay shape errors (_match)
        if (w is not None and mine is not None and w.dim() == mine.dim() == 4 and w.shape[1] == 3
                and mine.shape[1] != 3 and w.shape[0] == mine.shape[0] and w.shape[2:] == mine.shape[2:]):
            converted[key] = adapt_input_conv(int(mine.shape[1]), w)
            out.append(key)
    return out


# What timm's cfg holds instead of a checkpoint's tensors (encoders._builder.pretrained_filter): the filter
# reads the named file itself
FILE_PLACEHOLDER = "__mamba_dense_checkpoint_file__"


def checked_filter(path: str | os.PathLike) -> Callable[[Mapping[str, Any], nn.Module], dict[str, torch.Tensor]]:
    """A timm ``pretrained_filter_fn`` as strict as :func:`load_encoder_weights`.

    timm loads a features-only model's weights with ``strict=False`` (its head differs from the
    checkpoint's), so a checkpoint of another model loaded with nothing but a log line. This filter
    converts the file's tensors, raises :class:`CheckpointMismatchError` naming ``path`` where
    load_encoder_weights would, and returns what timm should load: the converted tensors plus the
    model's own values for the modules that stay at their init by design. The first conv (timm adapts
    it to ``in_chans``) and the classifier (timm drops it for another number of classes) pass unchecked.
    """

    def fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        if isinstance(state_dict, Mapping) and FILE_PLACEHOLDER in state_dict:
            state_dict = read_checkpoint(path)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        names = [cfg.get("first_conv"), cfg.get("classifier")]
        names = [n for v in names for n in ((v,) if isinstance(v, str) else (v or ()))]
        adapt = [f"{n}.{p}" for n in names for p in ("weight", "bias")]
        converted, left_out = convert_state_dict(model, state_dict, path)
        # NOTE: timm drops the classifier when the model's class count differs from the cfg's; the cfg (the
        # model's own dict, which timm's loader reads after this filter) then states the file's count, so a
        # head of the model's size loads and another is dropped.
        heads = [converted[f"{c}.weight"] for c in (cfg.get("classifier"),) if isinstance(c, str) and f"{c}.weight" in converted]
        if heads and isinstance(cfg, dict) and heads[0].dim() >= 1:
            cfg["num_classes"] = int(heads[0].shape[0])
        report, to_load = _match(_encoder_of(model), converted, left_out, path, adapt=adapt, skip_hint=(
            "load the file with mamba_dense.convert.load_encoder_weights(model, path, ignore=[...])"))
        own = model.state_dict()
        to_load.update({k: own[k] for k in report.initialized})
        return to_load

    return fn

