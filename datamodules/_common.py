"""Machinery shared by the datamodules: reading files with clear errors, listing, loaders.

Every reader here opens files read-only; nothing in a dataset directory is ever written.
Errors name the file, the field and the fix (``DataError``), instead of surfacing a
traceback from inside PIL, pycocotools or nibabel.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ._sampling import ResumableLoader, ResumableSampler, reindex

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptFileError",
    "DataError",
    "SkipsCorrupt",
    "check_choice",
    "default_cache_dir",
    "report_skipped",
    "list_files",
    "make_loader",
    "read_json",
    "read_label_png",
    "read_rgb",
    "WorkerSeeded",
]

# ImageNet statistics for images scaled to [0, 1] (== mmseg's 123.675/58.395 etc. on 0..255).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Bad data on disk: the message names the file, the field and the fix."""

    def __init__(self, path: str | os.PathLike, field: str | None = None, problem: str = "", fix: str = "") -> None:
        if field is None:  # one ready message: how a DataLoader worker re-raises it in the main process
            self.path, self.field = "", ""
            super().__init__(str(path))
            return
        self.path, self.field = str(path), field
        super().__init__(f"{path}: {field}: {problem}. Fix: {fix}")


class CorruptFileError(DataError):
    """A file that exists but cannot be decoded (truncated download, wrong format)."""


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming the argument."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}. Fix: `{name}`")
    return value


def check_sizes(name: str, value: Any, n: int | None, example: str) -> tuple[int, ...]:
    """``value`` (an int, repeated, or ``n`` of them; ``n=None``: one or more) as positive ints,
    else a ValueError naming the argument."""
    single = isinstance(value, int) and not isinstance(value, bool)
    vals = (value,) * (n or 1) if single else value
    try:
        out = tuple(int(v) for v in vals)
        ok = len(out) == n if n else len(out) >= 1
        ok = ok and all(o == v and o >= 1 and not isinstance(v, bool) for o, v in zip(out, vals))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        what = "one or more positive integers" if n is None else "a positive integer" if n == 1 else \
            f"{n} positive integers"
        raise ValueError(f"{name}={value!r}: expected {what}. Fix: e.g. {name}={example}")
    return out


def check_number(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False,
                 example: str = "") -> float:
    """``value`` as a float in [lo, hi] ((lo, hi] with ``lo_open``), else a ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        span = (f"a number {'>' if lo_open else '>='} {lo:g}" if hi == math.inf
                else f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        raise ValueError(f"{name}={value!r}: expected {span}. Fix: e.g. {name}={example}")
    return float(value)


_log = logging.getLogger("mamba_dense.datamodules")


def report_skipped(what: str, skipped: dict[str, list[Any]], routine: Sequence[str] = ()) -> None:
    """Log how many items of ``what`` were skipped, by reason, with a few examples; also a
    warning unless every reason is ``routine`` (expected in clean data, e.g. COCO's tiny boxes)."""
    counts = {k: len(v) for k, v in skipped.items() if v}
    if not counts:
        return
    detail = "; ".join(f"{n} {k.replace('_', ' ')} (e.g. {skipped[k][:2]})" for k, n in counts.items())
    msg = f"{what}: skipped {sum(counts.values())} item(s): {detail}"
    if set(counts) <= set(routine):
        _log.info(msg)
        return
    _log.warning(msg)
    warnings.warn(msg, stacklevel=3)


def default_cache_dir() -> Path:
    """``$MAMBA_DENSE_CACHE``, else ``$XDG_CACHE_HOME/mamba_dense``, else ``~/.cache/mamba_dense``."""
    if os.environ.get("MAMBA_DENSE_CACHE"):
        return Path(os.environ["MAMBA_DENSE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mamba_dense"


def is_junk(name: str) -> bool:
    """macOS AppleDouble files (``._x``), hidden files and editor leftovers."""
    return name.startswith(".") or name.endswith("~")


def list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Sorted files in ``folder`` whose name ends with one of ``suffixes``, junk skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: folder not found. Fix: check `root` and the dataset layout "
            f"(expected this folder to hold the {'/'.join(suffixes)} files)"
        )
    lowered = tuple(s.lower() for s in suffixes)
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not is_junk(p.name) and p.name.lower().endswith(lowered)
    )


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; missing or malformed files raise with the fix spelled out."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found. Fix: check `root` and the file name")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            path, f"line {e.lineno} column {e.colno}", f"malformed JSON ({e.msg})",
            f"repair or re-extract the {what}",
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(path, "encoding", f"not UTF-8 text ({e.reason})", f"re-extract the {what}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of > 4300 digits, arrays nested 10^5 deep
        raise DataError(path, "structure", f"unreadable JSON ({type(e).__name__}: {str(e)[:120]})",
                        f"repair or re-extract the {what}") from None


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for paths the OS cannot even look up (too long, invalid)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found. Fix: restore it or remove its entry")
    try:
        img = Image.open(path)
        img.load()  # decode now so a truncated file fails here, with its name
    except Image.DecompressionBombError as e:  # raised from the header, before any pixel is allocated
        raise CorruptFileError(
            path, "image size (header)", f"refused before decoding ({e})",
            "re-extract or re-download this file; if the image really is that large, raise "
            "PIL.Image.MAX_IMAGE_PIXELS",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptFileError(
            path, "pixel data", f"cannot decode the image ({e})",
            "re-extract or re-download this file, or remove it and its label",
        ) from None
    return img


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8. Grayscale, palette, RGBA and CMYK files are converted; EXIF is ignored
    (annotations of ADE20K and COCO refer to the stored pixel grid)."""
    img = _open_image(path)
    if img.mode == "I;16" or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        arr = (255.0 * arr / max(arr.max(), 1.0)).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_label_png(path: Path) -> np.ndarray:
    """(H, W) uint8/uint16 class-index map from a single-channel (L, P, I;16) PNG."""
    img = _open_image(path)
    if img.mode in ("L", "P", "I;16", "I"):
        arr = np.asarray(img)
        if arr.dtype.kind == "i" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(path, "pixel values", "outside 0..65535", "store class indices as 8 or 16 bit")
        return arr.astype(np.uint8 if arr.size == 0 or arr.max() < 256 else np.int64)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            return arr[..., 0].copy()
        raise DataError(
            path, "image mode", f"{img.mode} colour label (expected one channel of class indices)",
            "convert the colour-coded map to an 8-bit L or P PNG of class indices",
        )
    raise DataError(path, "image mode", f"unsupported label mode {img.mode!r}", "save labels as 8-bit L PNGs")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader with the settings every datamodule here uses.

    ``shuffle=True`` (training) gives a ``ResumableLoader`` over a ``ResumableSampler``: the epoch's
    order and each sample's augmentation seed follow from (``seed_everything`` seed, epoch, index),
    and a run resumed from a mid-epoch checkpoint continues the epoch where it stopped (see
    ``_sampling``). ``pin_memory=None`` pins when CUDA is available; ``persistent_workers=None`` keeps
    workers alive between epochs whenever there are workers; ``prefetch_factor`` (batches loaded ahead
    per worker, PyTorch default 2) applies only with workers.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: expected >= 0. Fix: `num_workers`")
    extra: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    cls = DataLoader
    if shuffle:
        cls, extra["sampler"] = ResumableLoader, ResumableSampler(dataset, shuffle=True)
    # NOTE: the loader's own generator (it seeds the workers) keeps iterator creation from drawing on
    # torch's global RNG, so a resumed run's dropout/drop-path draws line up with the original's
    generator = torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)))
    return cls(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=(num_workers > 0) if persistent_workers is None else (persistent_workers and num_workers > 0),
        generator=generator,
        **extra,
    )


def check_outside(path: Path, root: Path, what: str) -> None:
    """Refuse a cache/output folder inside a dataset folder (datasets stay read-only)."""
    p, r = path.resolve(), root.resolve()
    if p == r or r in p.parents:
        raise ValueError(
            f"{what}={path} lies inside the dataset folder {root}; dataset folders are never written. "
            f"Fix: choose a {what} outside {root}"
        )


def check_span(name: str, value: Any, lo_open: bool, example: str, what: str = "") -> tuple[float, float]:
    """``value`` as (low, high) with 0 < low <= high (0 <= low with ``lo_open=False``), else a
    ValueError naming the argument."""
    try:
        rr = tuple(value)
    except TypeError:
        rr = ()
    ok = len(rr) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              and (v > 0 if lo_open else v >= 0) for v in rr) and rr[0] <= rr[1]
    if not ok:
        raise ValueError(f"{name}={value!r}: expected (low, high) {what}with 0 {'<' if lo_open else '<='} low <= high. "
                         f"Fix: e.g. {name}={example}")
    return float(rr[0]), float(rr[1])


def seed_pipeline(transform: Any, seed: int) -> None:
    """Seed an albumentations pipeline so that each transform draws from its own stream.

    NOTE: albumentations' ``Compose.set_random_seed`` (2.0) hands every child the compose's seed,
    so all children make the same draws: with ADE20K's pipeline the flip happened exactly when the
    rescale ratio was small, and the photometric steps fired together with the flip. Each child
    gets a seed derived from (seed, its position) instead, recursively."""
    transform.set_random_seed(int(seed))
    children = getattr(transform, "transforms", None)
    if children:
        states = np.random.SeedSequence(int(seed)).generate_state(len(children))
        for child, state in zip(children, states):
            if hasattr(child, "set_random_seed"):
                seed_pipeline(child, int(state))


class WorkerSeeded:
    """Mixin for datasets with random augmentation. ``rng(index)`` reseeds the augmentation for an
    index that carries its own seed (``SeededIndex``, from the training loaders of ``make_loader``), so
    the sample's augmentation depends on (seed, epoch, index) only; for a plain index it seeds once per
    DataLoader worker (from the worker's seed) or, in the main process, from ``torch.initial_seed()``,
    so workers never repeat each other's augmentations, ``lightning.seed_everything`` makes runs
    repeatable, and loading never draws from torch's global generator (which dropout uses)."""

    _seed_key: tuple[Any, ...] | None = None
    _rng: np.random.Generator

    def _seeded_transforms(self) -> list[Any]:
        return []

    def _reseed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        for t in self._seeded_transforms():
            seed_pipeline(t, seed)

    def rng(self, index: Any = None) -> np.random.Generator:
        sample_seed = getattr(index, "seed", None)
        if sample_seed is not None:
            self._seed_key = None  # a later plain index reseeds per worker again
            self._reseed(sample_seed)
            return self._rng
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else (info.id, info.seed))
        if key != self._seed_key:
            seed = info.seed if info is not None else torch.initial_seed()
            seed %= 2**32
            self._seed_key = key
            self._reseed(seed)
        return self._rng


class SkipsCorrupt:
    """Mixin: ``on_corrupt="skip"`` replaces an undecodable item by the next readable one, with a
    warning naming the file, and counts it in ``corrupt`` (per process: each DataLoader worker
    keeps its own list and warns on its own stderr); ``"error"`` raises ``CorruptFileError``,
    which a DataLoader worker re-raises in the main process with the file name.
    ``check_files()`` decodes every item up front so the count is known at setup."""

    on_corrupt: str = "error"
    corrupt: list[str]

    def _get_item(self, index: int) -> Any:
        raise NotImplementedError

    def _note_corrupt(self, err: CorruptFileError) -> None:
        if err.path not in self.corrupt:
            self.corrupt.append(err.path)
            warnings.warn(f"{err} [skipped: on_corrupt='skip'; {len(self.corrupt)} corrupt file(s) skipped in "
                          f"process {os.getpid()}]", stacklevel=3)

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        for k in range(n):
            try:
                return self._get_item(index if k == 0 else reindex(index, (index + k) % n))
            except CorruptFileError as e:
                if self.on_corrupt != "skip":
                    raise
                self._note_corrupt(e)
        raise DataError(f"{type(self).__name__}", "every item", "no readable file left (all corrupt)",
                        "re-extract the dataset")
