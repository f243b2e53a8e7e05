"""Volumetric segmentation task: 3D encoder + UNet decoder, patch training, sliding-window
inference, per-case Dice/HD95 and NIfTI + PNG-montage outputs."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageDraw

from mamba_dense._geometry import restore_original_space
from mamba_dense.encoders.volumetric import create_volumetric_encoder
from mamba_dense.heads.unet3d import UNet3DDecoder

from ._encoder import ConfigError, load_encoder_weights
from .callbacks import is_sampler_padding, local_log_dir
from ._losses import cross_entropy
from ._optim import param_groups, warmup_poly
from .metrics3d import MetricRow, score_case, summarize, summary_table, write_csv
from .sliding_window3d import sliding_window_inference_3d
from .visualize import overlay, palette

__all__ = ["VolumetricSegmentationTask", "render_montage", "write_nifti_like"]

# runtime options (evaluation settings, compilation, memory format): kept out of the checkpoint's
# hyperparameters so that `test`/`predict` can change them on the command line (LightningCLI lets
# saved hyperparameters win otherwise)
# Not saved with the hyperparameters (see tasks/semantic.py): settings of one run, and encoder_weights.
RUNTIME_OPTIONS = ("sw_overlap", "sw_batch_size", "tta_mirror_axes", "sw_buffer_device", "val_hd95",
                   "predict_dir", "results_dir", "montage", "compile_mode", "channels_last", "encoder_weights")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
_ITEM_DIMS = {"spacing": 1, "common_shape": 1, "original_shape": 1, "affine": 2, "ornt": 2}  # unbatched dims


class VolumetricSegmentationTask(pl.LightningModule):
    """3D encoder (SegMamba or VMamba-3D) + UNet decoder, Dice + cross-entropy, sliding-window eval.

    Training batches (``MedicalDecathlonDataModule``): "image" (B, C, *patch) float, "label"
    (B, *patch) int64. Validation/test/predict batches hold one whole volume plus its geometry
    ("spacing", "affine", "ornt", "common_shape", "path", "name"); the volume is segmented with
    Gaussian-weighted sliding windows of ``patch_size``.

    Outputs are softmax classes, or, with ``regions``, one sigmoid channel per region (nnU-Net's
    region-based training, e.g. BraTS whole tumour / tumour core / enhancing tumour). Region
    predictions are painted back to labels in region order: region i paints the smallest label of
    region i that no later region contains (WT {1,2,3} -> 1, TC {2,3} -> 2, ET {3} -> 3).

    Metrics are computed per structure (foreground class, or region) on the grid of the batch
    (the datamodule's orientation and target spacing) with its voxel spacing: Dice, and HD95 in
    mm; the empty-mask rule is ``metrics3d.EMPTY_RULE``. ``test`` writes ``test_per_case.csv``,
    ``test_summary.csv`` and prints the summary table. ``predict`` writes ``<name>.nii.gz``
    (labels on the input's voxel grid, with its affine and header) and ``<name>_montage.png``.

    Args:
        num_classes: label classes in the data, background included (MSD BrainTumour: 4).
        encoder: "segmamba_tiny" or "vmamba3d_tiny".
        in_channels: image channels (modalities).
        patch_size: training patch and inference window (D, H, W).
        encoder_kwargs: extra encoder arguments (e.g. {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}).
        encoder_weights: local checkpoint of the encoder (SegMamba's official keys are converted; a task
            checkpoint of ours gives its encoder part), loaded strictly.
        decoder_channels: decoder widths at strides 1, 2, 4, 8 (default 32 + the encoder's first three).
        deep_supervision: extra losses at strides 2 and 4 (nnU-Net's weights 1, 1/2, 1/4, normalized).
        regions: label sets, one sigmoid output each (None: softmax over ``num_classes``).
        region_names: names of the regions in tables and CSVs.
        class_names: class names (default: the datamodule's).
        ce_weight, dice_weight: loss = ce_weight * CE (BCE for regions) + dice_weight * soft Dice
            (batch Dice over foreground classes / all regions).
        optimizer: "adamw" (param groups without decay on norms, biases, A_logs, Ds) or "sgd"
            (nnU-Net: Nesterov momentum 0.99, weight decay 3e-5 on all parameters).
        lr: None = 1e-4 (AdamW) or 1e-2 (SGD). weight_decay: None = 1e-5 (AdamW) or 3e-5 (SGD).
        momentum, nesterov: SGD settings. betas: AdamW betas.
        warmup_iters: linear warmup steps (from 1e-3 x lr); poly_power: poly decay exponent (0.9).
        sw_overlap, sw_batch_size: sliding window overlap (0.5) and windows per forward.
        tta_mirror_axes: spatial axes to mirror at inference (e.g. [0, 1, 2]); None: no TTA.
        sw_buffer_device: "auto" (GPU if the logits fit, else CPU), "cpu", or a device.
        val_hd95: compute HD95 at validation too (test always does).
        predict_dir: where ``predict`` writes (default: <log dir>/predictions).
        results_dir: where ``test`` writes its CSVs (default: the log dir).
        montage: write PNG montages at ``predict``.
        compile_mode: None (eager), or a ``torch.compile`` mode for the training forward: "default",
            "reduce-overhead" (the step replayed as CUDA graphs: no per-kernel launch cost) or
            "max-autotune". The first training step at each patch shape runs eagerly (it caches the
            scan routes as device tensors, which the compiled graph then reads); evaluation and
            prediction stay eager (whole volumes, other shapes). The model compiles as one graph:
            the scan, route conv and instance norm kernels are opaque custom ops.
        channels_last: keep the model's convolution weights, its input and (SegMamba) the encoder's
            maps in ``torch.channels_last_3d`` (NDHWC): cuDNN then convolves without converting
            layouts. Same numbers; faster for segmamba_tiny on an H100, slower for vmamba3d_tiny
            (cuDNN transforms around its depthwise 3D convolutions; see ``benchmarks/RESULTS.md``).
            The logits come back contiguous (NCDHW) either way.

    Example:
        >>> task = VolumetricSegmentationTask(3, encoder_kwargs=dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1)),
        ...                                   decoder_channels=(8, 8, 16, 16), patch_size=(16, 16, 16))
        >>> task(torch.randn(1, 1, 20, 18, 16)).shape
        torch.Size([1, 3, 20, 18, 16])
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "segmamba_tiny",
        in_channels: int = 1,
        patch_size: tuple[int, int, int] = (128, 128, 128),
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_weights: str | None = None,
        decoder_channels: list[int] | None = None,
        deep_supervision: bool = False,
        regions: list[list[int]] | None = None,
        region_names: list[str] | None = None,
        class_names: list[str] | None = None,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float | None = None,
        weight_decay: float | None = None,
        momentum: float = 0.99,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_iters: int = 0,
        poly_power: float = 0.9,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 2,
        tta_mirror_axes: list[int] | None = None,
        sw_buffer_device: str = "auto",
        val_hd95: bool = False,
        predict_dir: str | None = None,
        results_dir: str | None = None,
        montage: bool = True,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(RUNTIME_OPTIONS))
        self.sw_overlap, self.sw_batch_size, self.tta_mirror_axes = sw_overlap, sw_batch_size, tta_mirror_axes
        self.sw_buffer_device, self.val_hd95, self.montage = sw_buffer_device, val_hd95, montage
        self._predict_dir, self._results_dir = predict_dir, results_dir
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too: >= 2, got {num_classes}")
        if num_classes > 256:
            raise ValueError(f"num_classes={num_classes}: predicted label maps are written as uint8 NIfTI (classes "
                             "0..255). Fix: at most 256 classes")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be None or one of {list(COMPILE_MODES)}, got {compile_mode!r}")
        self.compile_mode = compile_mode
        self._compiled_forward: Any = None  # torch.compile(self.forward), built after the first eager step
        self._eager_shapes: set[tuple] = set()
        if len(patch_size) != 3:
            raise ValueError(f"patch_size is (D, H, W), got {patch_size}")
        if regions is not None:
            regions = [sorted({int(v) for v in r}) for r in regions]
            bad = [r for r in regions if not r or min(r) < 1 or max(r) >= num_classes]
            if bad:
                raise ValueError(f"regions {bad}: each must list foreground labels in 1..{num_classes - 1}")
            if region_names is not None and len(region_names) != len(regions):
                raise ValueError(f"{len(region_names)} region_names for {len(regions)} regions")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.regions = regions
        self.out_channels = len(regions) if regions else num_classes
        self.encoder = create_volumetric_encoder(encoder, in_chans=in_channels, **(encoder_kwargs or {}))
        if encoder_weights is not None:  # the 2D tasks' loader: strict, errors name the file and the fix
            load_encoder_weights(self.encoder, encoder_weights, encoder)
        channels = [f["num_chs"] for f in self.encoder.feature_info]
        self.decoder = UNet3DDecoder(channels, self.out_channels, in_channels, decoder_channels, deep_supervision)
        self.channels_last = channels_last
        if channels_last:
            if hasattr(self.encoder, "channels_last"):  # SegMamba: its maps, not only the weights
                self.encoder.channels_last = True
            self.to(memory_format=torch.channels_last_3d)
        self._rows: dict[str, list[MetricRow]] = {"val": [], "test": []}
        self._seen = 0  # evaluation cases of this epoch on this rank (see callbacks.is_sampler_padding)
        self.summary: dict[str, dict[str, dict[str, float]]] = {}

    # ------------------------------------------------------------------ model

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C, D, H, W) -> logits (B, K, D, H, W); a list (full resolution first) with deep
        supervision in training."""
        if not self.channels_last:
            return self.decoder(image, self.encoder(image))
        image = image.contiguous(memory_format=torch.channels_last_3d)
        out = self.decoder(image, self.encoder(image))
        # the logits go back to the standard contiguous layout (one copy of the small K-channel
        # output), which is what losses and metrics over the class axis expect. H100, session 11:
        # the benchmark's Dice + CE (benchmarks/volumes.py) on (2, 4, 128^3) bf16 logits, forward +
        # backward, 4.21 ms on NDHWC logits, 1.67 ms with this copy, 1.60 ms on NCDHW ones.
        return [o.contiguous() for o in out] if isinstance(out, list) else out.contiguous()

    def sliding_window(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-volume logits (B, K, D, H, W) fp32 by Gaussian-weighted sliding windows."""
        return sliding_window_inference_3d(
            self, image, self.hparams.patch_size, overlap=self.sw_overlap, sw_batch_size=self.sw_batch_size,
            mirror_axes=self.tta_mirror_axes, device=image.device, buffer_device=self.sw_buffer_device,
        )

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, D, H, W) logits of one volume -> probabilities (sigmoid for regions, else softmax)."""
        return torch.sigmoid(logits) if self.regions else torch.softmax(logits, dim=0)

    # ------------------------------------------------------------------ structures and labels

    def class_names(self) -> list[str]:
        names = self.hparams.class_names
        if names is None and self._trainer is not None:
            names = getattr(self.trainer.datamodule, "class_names", None)
        if names is None or len(names) != self.hparams.num_classes:
            names = ["background", *(f"class_{k}" for k in range(1, self.hparams.num_classes))]
        return list(names)

    def structure_names(self) -> list[str]:
        """Names of the scored structures: the foreground classes, or the regions."""
        if self.regions:
            if self.hparams.region_names:
                return list(self.hparams.region_names)
            return ["region_" + "+".join(str(v) for v in r) for r in self.regions]
        return self.class_names()[1:]

    def region_labels(self) -> list[int]:
        """Label painted by each region (nnU-Net's regions_class_order, derived from the sets)."""
        out = []
        for i, r in enumerate(self.regions or []):
            later = set().union(*self.regions[i + 1 :]) if i + 1 < len(self.regions) else set()
            own = sorted(set(r) - later)
            out.append(own[0] if own else r[0])
        return out

    def target_masks(self, label: torch.Tensor) -> torch.Tensor:
        """(D, H, W) labels -> (S, D, H, W) bool, one mask per structure."""
        if self.regions:
            return torch.stack([torch.isin(label, torch.tensor(r, device=label.device)) for r in self.regions])
        return torch.stack([label == k for k in range(1, self.hparams.num_classes)])

    def prediction_masks(self, probs: torch.Tensor) -> torch.Tensor:
        """(K, D, H, W) probabilities -> (S, D, H, W) bool.

        With regions, the masks are those of the label map that ``to_labels`` paints (and the
        predict step writes), as nnU-Net and the BraTS tools score the exported file: where the
        sigmoid outputs are not nested (TC above 0.5 where WT is not), the raw ``probs > 0.5``
        masks would score a different segmentation from the one saved."""
        if self.regions:
            return self.target_masks(self.to_labels(probs).long())
        classes = probs.argmax(0)
        return torch.stack([classes == k for k in range(1, self.hparams.num_classes)])

    def to_labels(self, probs: torch.Tensor) -> torch.Tensor:
        """(K, D, H, W) probabilities -> (D, H, W) uint8 label map."""
        if not self.regions:
            return probs.argmax(0).to(torch.uint8)
        out = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
        for p, lab in zip(probs, self.region_labels()):
            out[p > 0.5] = lab
        return out

    # ------------------------------------------------------------------ loss

    def _targets(self, label: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) labels -> (B, K, D, H, W) float targets (one-hot classes or region masks)."""
        if self.regions:
            return torch.stack([torch.isin(label, torch.tensor(r, device=label.device)) for r in self.regions],
                               dim=1).float()
        return F.one_hot(label, self.hparams.num_classes).permute(0, 4, 1, 2, 3).float()

    def _loss(self, logits: torch.Tensor, label: torch.Tensor, stride: int = 1) -> torch.Tensor:
        logits = logits.float()
        if tuple(label.shape[1:]) != tuple(logits.shape[2:]):  # deep supervision: downsampled labels
            label = _downsample_labels(label, tuple(logits.shape[2:]), stride)
        target = self._targets(label)
        if self.regions:
            ce = F.binary_cross_entropy_with_logits(logits, target)
            probs, first = torch.sigmoid(logits), 0
        else:
            ce = cross_entropy(logits, label)
            probs, first = torch.softmax(logits, dim=1), 1  # Dice over the foreground classes
        dims = (0, 2, 3, 4)  # batch Dice: sums over the batch and the volume
        inter = (probs * target).sum(dims)[first:]
        denom = (probs.sum(dims) + target.sum(dims))[first:]
        dice = (2 * inter + 1e-5) / (denom + 1e-5).clamp_min(1e-8)
        return self.hparams.ce_weight * ce + self.hparams.dice_weight * (1 - dice.mean())

    @staticmethod
    def ds_weights(n: int) -> list[float]:
        """Deep supervision weights, full resolution first: 1/2^i normalized (nnU-Net)."""
        w = [0.5**i for i in range(n)]
        return [v / sum(w) for v in w]

    _compile_backend = "inductor"  # the tests trace with "aot_eager" (Dynamo + AOTAutograd, no code generation)

    def _train_forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``self(image)``, through ``torch.compile`` when ``compile_mode`` is set (after one eager step
        per input shape, which caches the routes the graph reads as device tensors)."""
        if self.compile_mode is None:
            return self(image)
        key = (tuple(image.shape), image.dtype, str(image.device))
        if key not in self._eager_shapes:
            self._eager_shapes.add(key)
            return self(image)
        if self._compiled_forward is None:
            # a compiled bound method, not a wrapped module: no second copy of the parameters in the
            # module tree or the checkpoint
            mode = None if self._compile_backend != "inductor" else self.compile_mode  # modes are Inductor's
            self._compiled_forward = torch.compile(self.forward, backend=self._compile_backend, mode=mode,
                                                   dynamic=False)
        return self._compiled_forward(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image, label = batch["image"], batch["label"].long()
        out = self._train_forward(image)
        outs = out if isinstance(out, list) else [out]
        # deep supervision outputs, full resolution first, at strides 1, 2, 4
        loss = sum(w * self._loss(o, label, 2**i) for i, (w, o) in enumerate(zip(self.ds_weights(len(outs)), outs)))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(image))
        return loss

    # ------------------------------------------------------------------ evaluation

    @staticmethod
    def _item(batch: dict[str, Any], key: str, default: Any = None) -> Any:
        """Entry ``key`` of the single item of a collated batch (lists and batched arrays unwrapped)."""
        v = batch.get(key, default)
        if isinstance(v, (list, tuple)):
            return v[0]
        if isinstance(v, (torch.Tensor, np.ndarray)) and key in _ITEM_DIMS and v.ndim > _ITEM_DIMS[key]:
            return v[0]
        return v


    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        image = batch["image"]
        if image.shape[0] != 1:
            raise ValueError(f"{stage} batches hold one whole volume (batch size 1), got {image.shape[0]}")
        logits = self.sliding_window(image)
        label = batch["label"][0].long().to(logits.device)
        probs = self.probabilities(logits[0])
        spacing = self._item(batch, "spacing")
        spacing = [float(s) for s in spacing] if spacing is not None else [1.0, 1.0, 1.0]
        # without names, the case's index in the dataset (a rank's k-th case is case rank + k * world)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        name = str(self._item(batch, "name", f"case_{rank + self._seen * world:04d}"))
        hd95 = stage == "test" or self.val_hd95
        rows = score_case(name, self.prediction_masks(probs), self.target_masks(label), self.structure_names(),
                          spacing, hd95=hd95)
        padding = self._trainer is not None and is_sampler_padding(self.trainer, self._seen)
        self._seen += 1
        if not padding:  # a repeat added by DistributedSampler: scored once, on the rank that owns it
            self._rows[stage].extend(rows)
        self.log(f"{stage}/loss", self._loss(logits, label[None]), batch_size=1)
        return {"rows": rows}

    def on_validation_epoch_start(self) -> None:
        self._seen = 0  # evaluation cases of this epoch on this rank (see callbacks.is_sampler_padding)

    def on_test_epoch_start(self) -> None:
        self._seen = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def _gather(self, rows: list[MetricRow]) -> list[MetricRow]:
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return rows
        parts: list[list[MetricRow]] = [None] * self.trainer.world_size  # type: ignore[list-item]
        torch.distributed.all_gather_object(parts, rows)
        return [r for p in parts for r in p]

    def _epoch_end(self, stage: str) -> dict[str, dict[str, float]] | None:
        rows, self._rows[stage] = self._gather(self._rows[stage]), []
        if not rows:
            return None
        summary = summarize(rows)
        self.summary[stage] = summary
        means = [s["dice_mean"] for s in summary.values()]
        self.log(f"{stage}/dice", float(np.mean(means)), prog_bar=True, sync_dist=False, rank_zero_only=True)
        for name, s in summary.items():
            self.log(f"{stage}/dice_{name}", s["dice_mean"], rank_zero_only=True)
            if np.isfinite(s["hd95_mean"]):
                self.log(f"{stage}/hd95_{name}", s["hd95_mean"], rank_zero_only=True)
        hds = [s["hd95_mean"] for s in summary.values() if np.isfinite(s["hd95_mean"])]
        if hds:
            self.log(f"{stage}/hd95", float(np.mean(hds)), rank_zero_only=True)
        if stage == "test" and self.trainer.is_global_zero:
            out = self.results_dir()
            write_csv(rows, os.path.join(out, "test_per_case.csv"))
            _write_summary_csv(summary, os.path.join(out, "test_summary.csv"))
            rank_zero_info(f"Per-structure results (test, {len({r.case for r in rows})} cases; per-case CSV in "
                           f"{out}):\n" + summary_table(summary))
        return summary

    def on_validation_epoch_end(self) -> None:
        summary = self._epoch_end("val")
        if summary and not self.trainer.sanity_checking:
            dice = ", ".join(f"{n} {100 * s['dice_mean']:.1f}" for n, s in summary.items())
            rank_zero_info(f"epoch {self.current_epoch} step {self.global_step}: val Dice % {dice}")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def results_dir(self) -> str:
        if self._results_dir:
            return self._results_dir
        return local_log_dir(self.trainer)  # called on rank 0 only: not the collective trainer.log_dir

    # ------------------------------------------------------------------ predict

    def predict_dir(self) -> str:
        if self._predict_dir:
            return self._predict_dir
        return os.path.join(getattr(self, "_predict_root", None) or local_log_dir(self.trainer), "predictions")

    def on_predict_start(self) -> None:
        # once, on every rank: trainer.log_dir is a collective, and ranks run different numbers of predict steps
        self._predict_root = self.trainer.log_dir or self.trainer.default_root_dir

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, str]:
        """Segment one volume; write ``<name>.nii.gz`` on the input's grid (its affine and header)
        and ``<name>_montage.png``. Returns the written paths."""
        image = batch["image"]
        if image.shape[0] != 1:
            raise ValueError(f"predict batches hold one whole volume (batch size 1), got {image.shape[0]}")
        probs = self.probabilities(self.sliding_window(image)[0])
        grid_labels = self.to_labels(probs)
        name = str(self._item(batch, "name", f"case_{batch_idx:04d}"))
        out_dir = self.predict_dir()
        paths: dict[str, str] = {}
        common = self._item(batch, "common_shape")
        if "affine" in batch and common is not None:
            common = [int(s) for s in common]
            if list(probs.shape[1:]) != common:  # resampled by the datamodule: back to the file's spacing
                probs = F.interpolate(probs[None], size=common, mode="trilinear", align_corners=False)[0]
            labels = self.to_labels(probs)
            geom = {k: self._item(batch, k) for k in ("affine", "ornt", "common_shape")}
            source = self._item(batch, "path")
            paths["nifti"] = write_nifti_like(labels, geom, os.path.join(out_dir, f"{name}.nii.gz"), source)
        else:
            rank_zero_warn("predict batch without geometry (affine/ornt/common_shape): no NIfTI written")
        if self.montage:
            dm = self.trainer.datamodule if self._trainer is not None else None
            spacing = self._item(batch, "spacing")
            png = render_montage(
                image[0, 0].float().cpu().numpy(), grid_labels.cpu().numpy(),
                [float(s) for s in spacing] if spacing is not None else (1.0, 1.0, 1.0),
                self.class_names(), title=name, orientation=getattr(dm, "orientation", "RAS"),
            )
            paths["montage"] = os.path.join(out_dir, f"{name}_montage.png")
            os.makedirs(out_dir, exist_ok=True)
            Image.fromarray(png).save(paths["montage"])
        return paths

    # ------------------------------------------------------------------ optimization

    def setup(self, stage: str) -> None:
        if (self._trainer is not None and stage == "fit" and "bf16" in str(self.trainer.precision)
                and self.trainer.strategy.root_device.type == "cpu"):
            # NOTE: PyTorch's CPU bf16 conv3d weight gradient returns NaN from finite inputs on small maps
            # (a (2, 16, 2, 2, 2) input in 4 of 20 runs, torch 2.14): the loss turns NaN within a few steps
            rank_zero_warn("bf16 training of 3D models on the CPU: PyTorch's bf16 Conv3d weight gradient gives NaN "
                           "on small feature maps there (the loss turns NaN within a few steps); use precision 32 on "
                           "the CPU (bf16-mixed is fine on a GPU)")
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        hp = self.hparams
        for attr, mine in (("num_classes", hp.num_classes), ("in_channels", hp.in_channels)):
            theirs = getattr(dm, attr, None)
            if isinstance(theirs, int) and theirs != mine:
                raise ConfigError(f"model.{attr}={mine} but the datamodule has {attr}={theirs}; set both to the "
                                 "same value (dataset.json 'labels' / 'modality')")
        dm_patch = getattr(dm, "patch_size", None)
        if dm_patch is not None and tuple(dm_patch) != tuple(hp.patch_size):
            rank_zero_warn(f"datamodule patch_size {tuple(dm_patch)} differs from model.patch_size "
                           f"{tuple(hp.patch_size)} (the sliding-window size); usually they are equal")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "sgd":
            lr = hp.lr if hp.lr is not None else 1e-2
            wd = hp.weight_decay if hp.weight_decay is not None else 3e-5
            opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=hp.momentum,
                                                         nesterov=hp.nesterov, weight_decay=wd)
        else:
            lr = hp.lr if hp.lr is not None else 1e-4
            wd = hp.weight_decay if hp.weight_decay is not None else 1e-5
            opt = torch.optim.AdamW(param_groups(self, wd), lr=lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        if not np.isfinite(total):
            raise ValueError("Set trainer.max_steps or trainer.max_epochs: the poly schedule needs a finite length.")
        schedule = partial(warmup_poly, total_steps=int(total), warmup_iters=hp.warmup_iters, warmup_ratio=1e-3,
                           power=hp.poly_power, min_lr_ratio=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _downsample_labels(label: torch.Tensor, size: tuple[int, ...], stride: int | None = None) -> torch.Tensor:
    """(B, *S) labels -> (B, *size): every k-th voxel where ``size`` is ceil(S / k) (a stride-k
    output's voxel j sits on input voxel k * j: 9 -> 5 takes 0, 2, 4, 6, 8, where nearest
    interpolation took 0, 1, 3, 5, 7), nearest interpolation otherwise.

    ``stride``: the output's known stride k (deep supervision: 2, 4). Without it k is inferred per
    axis as ceil(S / size), which is ambiguous for short axes (9 -> 3 is stride 4, not 3)."""
    if stride is not None:
        steps = [stride] * len(size)
    else:
        steps = [-(-s // o) for s, o in zip(label.shape[1:], size)]
    if all(-(-s // k) == o for s, k, o in zip(label.shape[1:], steps, size)):
        return label[(slice(None), *(slice(None, None, k) for k in steps))]
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _write_summary_csv(summary: dict[str, dict[str, float]], path: str) -> None:
    import csv

    with open(path, "w", newline="") as f:
        keys = ["dice_mean", "dice_std", "hd95_mean", "hd95_std", "cases", "gt_empty"]
        w = csv.writer(f)
        w.writerow(["structure", *keys])
        for name, s in summary.items():
            w.writerow([name, *(s[k] for k in keys)])


# --------------------------------------------------------------------------------------------- outputs


def write_nifti_like(labels: torch.Tensor | np.ndarray, geom: dict[str, Any], path: str,
                     source: str | None = None) -> str:
    """Write a (D, H, W) label map (on the common grid before resampling, ``geom["common_shape"]``)
    as NIfTI on the file's voxel grid, with the source image's affine and header (data type uint8,
    no intensity scaling); without ``source`` only the affine of ``geom`` is used.

    Returns:
        the written path.
    """
    out = restore_original_space(labels, geom).astype(np.uint8)
    affine = geom["affine"]
    affine = np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine, np.float64)
    header = None
    if source is not None and os.path.isfile(source):
        src = nib.load(source)
        header = nib.Nifti1Header.from_header(src.header)
        header.set_data_dtype(np.uint8)
        header["cal_min"], header["cal_max"] = 0, float(out.max(initial=0))
        header["descrip"] = b"mamba-dense segmentation"
        header.set_intent("none")  # a label map, whatever the source's intent (vector, ...)
        if not np.allclose(src.affine, affine, atol=1e-4):
            warnings.warn(f"{source}: affine differs from the batch geometry; writing the batch's", stacklevel=2)
    img = nib.Nifti1Image(out, affine, header=header)
    img.header.set_slope_inter(None, None)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    nib.save(img, path)
    return path


def _panel(img2d: np.ndarray, lab2d: np.ndarray, row_mm: float, col_mm: float, pix_mm: float,
           lo: float, hi: float, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale and overlay RGB panels resampled to square pixels of ``pix_mm``."""
    h = max(1, int(round(img2d.shape[0] * row_mm / pix_mm)))
    w = max(1, int(round(img2d.shape[1] * col_mm / pix_mm)))
    gray = np.clip((img2d - lo) / max(hi - lo, 1e-6), 0, 1)
    gray = np.asarray(Image.fromarray((gray * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(lab2d.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.int64)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    return rgb, overlay(rgb, lab, alpha=0.45, ignore_index=0, colors=colors)


def render_montage(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], class_names: Sequence[str],
                   title: str = "", orientation: str = "RAS", panel_px: int = 320) -> np.ndarray:
    """Axial, coronal and sagittal slices of a volume, plain (top) and with the label overlay
    (bottom), through the centroid of the labelled voxels (the centre when none).

    Args:
        image: (D, H, W) one image channel. labels: (D, H, W) class map on the same grid.
        spacing: voxel size (mm) along D, H, W; panels are drawn with square pixels.
        class_names: legend names by label (0 = background, not drawn).
        title: printed above the panels.
        orientation: the volume's axis codes (x, y, z). For "RAS" the panels follow the
            radiological convention (patient's right on the image left, anterior and superior
            up); otherwise they show the array axes as stored.
        panel_px: longest side of a panel in pixels.

    Returns:
        (H, W, 3) uint8 image.
    """
    d, h, w = labels.shape
    fg = np.argwhere(labels > 0)
    cz, cy, cx = (fg.mean(0).round().astype(int) if len(fg) else np.array([d // 2, h // 2, w // 2]))
    sz, sy, sx = (float(s) for s in spacing)
    ras = orientation.upper() == "RAS"
    views = [  # (name, image slice, label slice, row mm, col mm): rows/cols flipped for display when RAS
        (f"axial z={cz}", image[cz], labels[cz], sy, sx),
        (f"coronal y={cy}", image[:, cy], labels[:, cy], sz, sx),
        (f"sagittal x={cx}", image[:, :, cx], labels[:, :, cx], sz, sy),
    ]
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    extent = max(d * sz, h * sy, w * sx)
    pix = extent / panel_px
    colors = palette(256)
    colors[1:7] = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    tops, bottoms = [], []
    for _, im, lab, rmm, cmm in views:
        if ras:  # anterior / superior up, patient's right on the left (radiological)
            im, lab = im[::-1, ::-1], lab[::-1, ::-1]
        top, bottom = _panel(np.ascontiguousarray(im), np.ascontiguousarray(lab), rmm, cmm, pix, lo, hi, colors)
        tops.append(top)
        bottoms.append(bottom)
    gap, head, foot = 4, 22, 22
    width = sum(t.shape[1] for t in tops) + gap * (len(tops) + 1)
    height = head + 2 * max(t.shape[0] for t in tops) + 3 * gap + foot
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title + ("" if ras else f"  (array axes, orientation {orientation})"), fill=(255, 255, 255))
    x = gap
    row_h = max(t.shape[0] for t in tops)
    for (name, *_), top, bottom in zip(views, tops, bottoms):
        canvas.paste(Image.fromarray(top), (x, head + gap))
        canvas.paste(Image.fromarray(bottom), (x, head + 2 * gap + row_h))
        draw.text((x + 3, head + gap + 2), name, fill=(255, 255, 0))
        x += top.shape[1] + gap
    x, y = gap, height - foot + 4
    present = sorted(int(v) for v in np.unique(labels) if v > 0)
    for k in present:
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in colors[k]))
        text = class_names[k] if k < len(class_names) else str(k)
        draw.text((x + 14, y), text, fill=(255, 255, 255))
        x += 24 + 7 * len(text)
    if not present:
        draw.text((x, y), "no foreground predicted", fill=(255, 255, 255))
    return np.asarray(canvas)
