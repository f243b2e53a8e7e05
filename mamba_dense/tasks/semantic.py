"""Semantic segmentation task: encoder + UPerNet / semantic FPN (+ auxiliary FCN), ADE20K recipe."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from mamba_dense.heads import FCNHead, FPNHead, UPerNetHead

from ._encoder import CheckedCheckpointLoading, ConfigError, Encoder, check_checkpoint_fits, check_ranges
from ._losses import cross_entropy
from ._optim import param_groups, warmup_poly
from ._upsample_ce import upsampled_cross_entropy
from .inference import resize_logits, sliding_window_inference
from .metrics import per_class_table, segmentation_scores
from .callbacks import is_sampler_padding, local_log_dir
from .visualize import IMAGENET_MEAN, IMAGENET_STD, overlay, palette, save_label_png, save_rgb_png, to_uint8_image

HEADS: dict[str, type[nn.Module]] = {"upernet": UPerNetHead, "fpn": FPNHead}
# Not saved with the hyperparameters: settings of one run, and encoder_weights, which only seeds a fresh run
# (a checkpoint's state dict replaces those weights; a saved path made every later load need that file).
RUNTIME_OPTIONS = ("inference_mode", "window_size", "window_stride", "window_blend", "predict_dir", "encoder_weights")


def _build(cls: type[nn.Module], what: str, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        return cls(*args, **kwargs)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("in_channels", "num_classes")]
        raise ValueError(f"{what}: {err}. {cls.__name__} accepts {accepted}.") from err


class SemanticSegmentationTask(CheckedCheckpointLoading, pl.LightningModule):
    """Encoder + UPerNet or semantic-FPN decoder trained with cross-entropy (ADE20K recipe).

    Batches are dicts: "image" (B, 3, H, W) normalized float, "mask" (B, H, W) int64 with
    `ignore_index` for unlabeled pixels and padding, optional "name" (B,) file stems, "size" (B, 2):
    the (h, w) of each image before batch padding, and "orig_size" (B, 2): its (H, W) before the
    datamodule resized it (as `ADE20KDataModule` gives). Evaluation runs image by image on the valid
    region, so scores do not depend on the evaluation batch size; `predict` writes at "orig_size".

    Args:
        num_classes: number of classes (150 for ADE20K with reduce_zero_label).
        encoder: timm name of the encoder ("vmamba_tiny", "localvmamba_tiny", "himamba_tiny",
            or any timm model with features_only, e.g. "resnet18").
        head: "upernet" (PSP + FPN fusion, 512 channels) or "fpn" (semantic FPN).
        encoder_weights: local path to encoder weights (state dict or official checkpoint).
        encoder_kwargs: extra encoder arguments (e.g. {"dims": 32, "depths": [1, 1, 2, 1]}).
        encoder_out_indices: feature indices to use; default the stride 4/8/16/32 maps.
        drop_path_rate: encoder stochastic depth (None: encoder default).
        head_kwargs: extra head arguments (UPerNetHead: channels, pool_scales, norm, dropout;
            FPNHead: pyramid_channels, segmentation_channels, dropout, merge_policy).
        aux_head: add the auxiliary FCN head on the stride-16 map (training only).
        aux_weight: its loss weight (0.4).
        ignore_index: label ignored by loss and metrics.
        dice_weight: weight of an added Dice loss (0 = cross-entropy only).
        avg_non_ignore: average the cross-entropy over the non-ignored pixels only (True) or over
            all pixels of the batch, ignored ones counting 0 (False, mmseg's ``CrossEntropyLoss``
            default, which the published ADE20K results used). Either way a batch whose pixels
            are all ignored gives a loss of 0 and no gradient.
        lr, weight_decay, betas: AdamW (6e-5, 0.01, (0.9, 0.999)); no decay on norms, biases,
            A_logs, Ds and position embeddings.
        warmup_iters, warmup_ratio: linear warmup (1500 iterations from 1e-6 x lr).
        poly_power, min_lr: poly decay over all training steps.
        inference_mode: "whole" image or "slide" window at evaluation and prediction.
        window_size, window_stride, window_blend: sliding-window settings ("mean" or "gaussian").
        size_divisor: inputs are zero-padded to a multiple of this inside `forward`.
        class_names: names for the per-class table (else the datamodule's `class_names`).
        image_mean, image_std: the data's normalization, to draw overlays (default: the
            datamodule's `mean`/`std`, else ImageNet's).
        predict_dir: where `predict` writes PNGs (default: <log dir>/predictions).
        grad_checkpointing: recompute the encoder's blocks in backward instead of keeping their
            activations (less memory, about one more encoder forward per step).

    Example:
        >>> task = SemanticSegmentationTask(num_classes=4, encoder="resnet18", head="fpn")
        >>> task(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 4, 64, 64])
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "vmamba_tiny",
        head: Literal["upernet", "fpn"] = "upernet",
        encoder_weights: str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_out_indices: list[int] | None = None,
        drop_path_rate: float | None = None,
        head_kwargs: dict[str, Any] | None = None,
        aux_head: bool = True,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        dice_weight: float = 0.0,
        avg_non_ignore: bool = False,
        lr: float = 6e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6,
        poly_power: float = 1.0,
        min_lr: float = 0.0,
        inference_mode: Literal["whole", "slide"] = "whole",
        window_size: int | tuple[int, int] = 512,
        window_stride: int | tuple[int, int] = 341,
        window_blend: Literal["mean", "gaussian"] = "mean",
        size_divisor: int = 32,
        class_names: list[str] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        predict_dir: str | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # NOTE: evaluation-time options stay out of the checkpoint's hyperparameters: LightningCLI
        # lets checkpoint hyperparameters override the command line, and these must stay settable
        # at `test`/`predict` time (e.g. --model.init_args.inference_mode=slide).
        self.save_hyperparameters(ignore=list(RUNTIME_OPTIONS))
        self.inference_mode, self.window_size, self.window_stride = inference_mode, window_size, window_stride
        self.window_blend, self._predict_dir = window_blend, predict_dir
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if head not in HEADS:
            raise ValueError(f"Unknown head {head!r}; expected one of {sorted(HEADS)}.")
        if inference_mode not in ("whole", "slide"):
            raise ValueError(f"inference_mode must be 'whole' or 'slide', got {inference_mode!r}.")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class index (num_classes={num_classes}); use 255.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}.")
        check_ranges(lr=(lr, 0.0, None, False), min_lr=(min_lr, 0.0, None, True),
                     size_divisor=(size_divisor, 1, None, True), dice_weight=(dice_weight, 0.0, None, True),
                     drop_path_rate=(drop_path_rate, 0.0, 1.0, True), aux_weight=(aux_weight, 0.0, None, True))

        self.encoder = Encoder(
            encoder,
            weights=encoder_weights,
            drop_path_rate=drop_path_rate,
            out_indices=encoder_out_indices,
            **(encoder_kwargs or {}),
        )
        if grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        channels = self.encoder.channels
        self.decode_head = _build(HEADS[head], f"head_kwargs for head={head!r}", channels, num_classes, **(head_kwargs or {}))
        self.aux_head = None
        if aux_head:
            if len(channels) < 3:
                raise ValueError("aux_head needs a stride-16 map (the third encoder feature).")
            norm = (head_kwargs or {}).get("norm", "batchnorm") if head == "upernet" else "batchnorm"
            self.aux_head = FCNHead(channels[2], num_classes, norm=norm)
        self.dice = DiceLoss(mode="multiclass", ignore_index=ignore_index) if dice_weight > 0 else None
        metric = partial(MulticlassJaccardIndex, num_classes, average="macro", ignore_index=ignore_index, validate_args=False)
        self.val_iou = metric()
        self.test_iou = metric()
        self.scores: dict[str, dict[str, torch.Tensor]] = {}
        self._predicted: dict[str, str] = {}  # output stem -> input name, this predict run
        self._predict_root: str | None = None  # the run folder, resolved on every rank in on_predict_start
        self._seen = 0  # evaluation samples of this epoch on this rank (see callbacks.is_sampler_padding)

    # ------------------------------------------------------------------ model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes, H, W) of the main head."""
        return self._logits(images, with_aux=False)[0]

    def _head_logits(
        self, images: torch.Tensor, with_aux: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Logits at the heads' own resolution and the padded input size they belong to: the input is
        padded to ``size_divisor``; resizing the logits to that size and keeping the top-left (H, W)
        gives the full-resolution logits of the (H, W) input."""
        h, w = images.shape[-2:]
        d = self.hparams.size_divisor
        x = F.pad(images, (0, (-w) % d, 0, (-h) % d)) if (h % d or w % d) else images
        feats = self.encoder(x)
        aux = self.aux_head(feats[2]) if with_aux and self.aux_head is not None else None
        return self.decode_head(feats), aux, tuple(x.shape[-2:])

    def _logits(self, images: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, w = images.shape[-2:]
        logits, aux, size = self._head_logits(images, with_aux)
        logits = resize_logits(logits, size)[..., :h, :w]
        if aux is not None:
            aux = resize_logits(aux, size)[..., :h, :w]
        return logits, aux

    def inference(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation/prediction with the configured whole / sliding-window mode."""
        if self.inference_mode == "slide":
            return sliding_window_inference(
                self.forward, images, self.hparams.num_classes, self.window_size, self.window_stride, self.window_blend
            )
        return self.forward(images)

    # ------------------------------------------------------------------ steps

    def _check_mask(self, mask: torch.Tensor) -> None:
        hp = self.hparams
        bad = (mask != hp.ignore_index) & ((mask < 0) | (mask >= hp.num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"mask holds label {int(mask[bad].max())} outside [0, {hp.num_classes}) and != ignore_index="
                f"{hp.ignore_index}. Check num_classes (ADE20K: 150 with reduce_zero_label=True)."
            )

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Loss of (B, K, h, w) logits against a (B, H, W) mask: the logits are resized (bilinear,
        ``align_corners=False``) to ``out_size`` (default: the mask's size) and the top-left (H, W)
        compared. Without the Dice term the resize is fused into the cross-entropy
        (``upsampled_cross_entropy``: same value and gradient, no full-resolution logits on a GPU)."""
        ignore, avg = self.hparams.ignore_index, self.hparams.avg_non_ignore
        if avg and not bool((mask != ignore).any()):  # nothing to learn from (mmseg: 0 / (0 + eps) = 0)
            return logits.sum() * 0.0
        if self.dice is None:
            return upsampled_cross_entropy(logits, mask, out_size, ignore_index=ignore, check_target=False,
                                           avg_non_ignore=avg)
        H, W = mask.shape[-2:]
        logits = resize_logits(logits, out_size or (H, W))[..., :H, :W]
        ce = cross_entropy(logits, mask, ignore_index=ignore, avg_non_ignore=avg)
        return ce + self.hparams.dice_weight * self.dice(logits, mask)

    def training_loss(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(total, main-head loss, weighted auxiliary loss or None) of one training batch."""
        self._check_mask(masks)
        if masks.shape[-2:] == images.shape[-2:]:
            logits, aux, size = self._head_logits(images, with_aux=True)
        else:  # masks at another size: full-resolution logits, then resized to the mask
            (logits, aux), size = self._logits(images, with_aux=True), None
        loss = self._loss(logits, masks, size)
        if aux is None:
            return loss, loss, None
        aux_loss = self.hparams.aux_weight * self._loss(aux, masks, size)
        return loss + aux_loss, loss, aux_loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, masks = batch["image"], batch["mask"].long()
        loss, loss_ce, aux_loss = self.training_loss(images, masks)
        self.log("train/loss_ce", loss_ce, batch_size=len(images))
        if aux_loss is not None:
            self.log("train/loss_aux", aux_loss, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    @staticmethod
    def valid_sizes(batch: dict[str, Any]) -> list[tuple[int, int]]:
        """(h, w) of each image before batch padding: batch["size"], else the full size."""
        images = batch["image"]
        sizes = batch.get("size")
        if sizes is None:
            return [tuple(images.shape[-2:])] * len(images)
        return [(int(s[0]), int(s[1])) for s in sizes]

    def _eval_step(self, batch: dict[str, Any], metric: MulticlassJaccardIndex, prefix: str) -> dict[str, Any]:
        images, masks = batch["image"], batch["mask"].long()
        self._check_mask(masks)
        preds, losses = [], []
        original = bool(batch.get("mask_is_original"))
        for i, (h, w) in enumerate(self.valid_sizes(batch)):
            logits = self.inference(images[i : i + 1, :, :h, :w])
            mask = masks[i : i + 1]
            if original:  # the label as on disk: logits resized back to it (mmseg's protocol)
                mask = mask[..., : int(batch["orig_size"][i][0]), : int(batch["orig_size"][i][1])]
            elif mask.shape[-2:] == images.shape[-2:]:
                mask = mask[..., :h, :w]  # padded alike; else the mask is at its own (original) size
            logits = resize_logits(logits, mask.shape[-2:])
            pred = logits.argmax(1)
            padding = self._trainer is not None and is_sampler_padding(self.trainer, self._seen)
            self._seen += 1
            if not padding:  # a repeat added by DistributedSampler: scored once, on the rank that owns it
                metric.update(pred, mask)
                if bool((mask != self.hparams.ignore_index).any()):
                    losses.append(cross_entropy(logits, mask, ignore_index=self.hparams.ignore_index,
                                                avg_non_ignore=self.hparams.avg_non_ignore))
            preds.append(pred[0])
        if losses:
            # weighted by the images that have a loss (not the unlabelled ones, nor the sampler's repeats), so the
            # epoch mean does not depend on the evaluation batch size
            self.log(f"{prefix}/loss", torch.stack(losses).mean(), batch_size=len(losses))
        return {"preds": preds}

    def on_validation_epoch_start(self) -> None:
        self._seen = 0

    def on_test_epoch_start(self) -> None:
        self._seen = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.val_iou, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.test_iou, "test")

    def _epoch_scores(self, metric: MulticlassJaccardIndex, prefix: str) -> dict[str, torch.Tensor] | None:
        if not metric.update_called:
            return None
        miou = metric.compute()
        with metric.sync_context():
            confmat = metric.confmat.clone()
        metric.reset()
        scores = segmentation_scores(confmat)
        self.log(f"{prefix}/mIoU", miou, prog_bar=True)
        self.log(f"{prefix}/mAcc", scores["mAcc"].float())
        self.log(f"{prefix}/aAcc", scores["aAcc"].float())
        self.scores[prefix] = scores
        return scores

    def on_validation_epoch_end(self) -> None:
        scores = self._epoch_scores(self.val_iou, "val")
        if scores is not None and not self.trainer.sanity_checking:
            rank_zero_info(
                f"epoch {self.current_epoch} step {self.global_step}: val mIoU {100 * float(scores['mIoU']):.2f} "
                f"mAcc {100 * float(scores['mAcc']):.2f} aAcc {100 * float(scores['aAcc']):.2f}"
            )

    def on_test_epoch_end(self) -> None:
        scores = self._epoch_scores(self.test_iou, "test")
        if scores is not None:
            rank_zero_info("Per-class results (test):\n" + per_class_table(scores, self.class_names()))

    # ------------------------------------------------------------------ predict and overlays

    def class_names(self) -> list[str] | None:
        names = self.hparams.class_names
        if names is None and self._trainer is not None:
            names = getattr(self.trainer.datamodule, "class_names", None)
        if names is not None and len(names) != self.hparams.num_classes:
            return None
        return list(names) if names is not None else None

    def _norm_stats(self) -> tuple[Sequence[float], Sequence[float]]:
        dm = self.trainer.datamodule if self._trainer is not None else None
        mean = self.hparams.image_mean or getattr(dm, "mean", None) or IMAGENET_MEAN
        std = self.hparams.image_std or getattr(dm, "std", None) or IMAGENET_STD
        return mean, std

    def _palette(self) -> list | None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        colors = getattr(dm, "palette", None)
        return list(colors) if colors is not None and len(colors) >= self.hparams.num_classes else None

    def predict_dir(self) -> str:
        if self._predict_dir:
            return self._predict_dir
        return os.path.join(self._predict_root or local_log_dir(self.trainer), "predictions")

    def on_predict_start(self) -> None:
        self._predicted = {}
        # once, on every rank: trainer.log_dir is a collective, and ranks run different numbers of predict steps
        self._predict_root = self.trainer.log_dir or self.trainer.default_root_dir

    def _claim_stem(self, name: str) -> str:
        """Output stem of an input, unique within this predict run. Names are file stems already:
        "scan.001" keeps its dots (stripping a suffix again sent scan.001, scan.002, ... to one file);
        two inputs with one stem raise instead of silently overwriting each other."""
        stem = os.path.basename(name)
        if stem in self._predicted:
            raise ValueError(
                f"predict: inputs {self._predicted[stem]!r} and {name!r} would both be written to labels/{stem}.png. "
                "Fix: give every input a distinct file name (batch['name'])."
            )
        self._predicted[stem] = name
        return stem

    def predict_step(self, batch: dict[str, Any] | torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Writes `labels/<name>.png` (palette label map) and `overlays/<name>.png` at each image's
        original size: the logits of the unpadded image are resized (bilinear) to batch["orig_size"]
        before the argmax, as mmseg does, so the labels line up with the input file and its annotation.
        The label values are the dataset's own: class k is written as k + 1 when the datamodule reads its
        annotations with `reduce_zero_label` (ADE20K: 1..150 as in its annotation PNGs, 0 "other" never
        predicted; mmseg's submission format), else k.

        Returns the written label-map paths.
        """
        if isinstance(batch, torch.Tensor):
            batch = {"image": batch}
        images = batch["image"]
        names = batch.get("name")
        if not names:  # NOTE: batch_idx restarts per dataloader and per rank
            rank = f"rank{self.global_rank}_" if self._trainer is not None and self.trainer.world_size > 1 else ""
            loader = f"dl{dataloader_idx}_" if dataloader_idx else ""
            names = [f"{rank}{loader}{batch_idx:06d}_{i}" for i in range(len(images))]
        orig_sizes = batch.get("orig_size")
        out_dir, colors = self.predict_dir(), self._palette()
        dm = self.trainer.datamodule if self._trainer is not None else None
        offset = 1 if getattr(dm, "reduce_zero_label", False) else 0
        file_colors = None if offset == 0 else [(0, 0, 0), *(colors if colors is not None else palette(256)[: 256 - offset])]
        paths = []
        for i, (h, w) in enumerate(self.valid_sizes(batch)):
            image = images[i : i + 1, :, :h, :w]  # padding cropped off before any resize
            logits = self.inference(image)
            size = (int(orig_sizes[i][0]), int(orig_sizes[i][1])) if orig_sizes is not None else (h, w)
            if size != (h, w):  # one image at a time: never a batch of full-resolution logits
                logits = resize_logits(logits, size)
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            pred = logits.argmax(1)[0].cpu().numpy().astype(np.int64)
            stem = self._claim_stem(str(names[i]))
            label_path = os.path.join(out_dir, "labels", f"{stem}.png")
            save_label_png(pred + offset, label_path, colors if offset == 0 else file_colors)
            rgb = to_uint8_image(image[0], *self._norm_stats())
            save_rgb_png(overlay(rgb, pred, ignore_index=self.hparams.ignore_index, colors=colors),
                         os.path.join(out_dir, "overlays", f"{stem}.png"))
            paths.append(label_path)
        return paths

    def render_overlays(self, batch: dict[str, Any], outputs: dict[str, Any], max_images: int) -> list[tuple[str, np.ndarray]]:
        """(name, image | ground truth | prediction) strips for the overlay-logging callback."""
        images, masks = batch["image"], batch["mask"]
        names = batch.get("name") or [str(i) for i in range(len(images))]
        strips = []
        sizes = self.valid_sizes(batch)
        for i, pred in enumerate(outputs["preds"][:max_images]):
            h, w = pred.shape  # the mask's size: the image's, or the original one
            rgb = to_uint8_image(images[i, :, : sizes[i][0], : sizes[i][1]], *self._norm_stats())
            if rgb.shape[:2] != (h, w):
                rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
            mask = masks[i, :h, :w].cpu().numpy()
            if mask.shape != rgb.shape[:2]:
                continue  # mask at original size: no side-by-side overlay
            kw = dict(ignore_index=self.hparams.ignore_index, colors=self._palette())
            strip = np.concatenate([rgb, overlay(rgb, mask, **kw), overlay(rgb, pred.cpu().numpy(), **kw)], axis=1)
            strips.append((os.path.basename(str(names[i])), strip))  # names are stems: keep their dots
        return strips

    # ------------------------------------------------------------------ optimization

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, ("encoder", "encoder_kwargs", "head", "head_kwargs", "aux_head", "num_classes"))

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        dm_classes = getattr(dm, "num_classes", None)
        if isinstance(dm_classes, int) and dm_classes != self.hparams.num_classes:
            raise ConfigError(
                f"model.num_classes={self.hparams.num_classes} but the datamodule has num_classes={dm_classes}; "
                "set both to the same value."
            )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        if not np.isfinite(total):
            raise ValueError("Set trainer.max_steps or trainer.max_epochs: the poly schedule needs a finite length.")
        total = int(total)
        if hp.warmup_iters >= total:
            rank_zero_warn(f"warmup_iters={hp.warmup_iters} >= training steps {total}: the LR never reaches lr={hp.lr}.")
        schedule = partial(
            warmup_poly,
            total_steps=total,
            warmup_iters=hp.warmup_iters,
            warmup_ratio=hp.warmup_ratio,
            power=hp.poly_power,
            min_lr_ratio=hp.min_lr / hp.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
