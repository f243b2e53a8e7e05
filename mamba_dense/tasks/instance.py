"""Instance segmentation task: torchvision Mask R-CNN on our encoder + FPN, COCO 1x recipe."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pycocotools is only needed when COCO evaluation runs
    from pycocotools.coco import COCO
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mamba_dense.heads import EncoderFPN, build_mask_rcnn, make_transform

from ._encoder import CheckedCheckpointLoading, ConfigError, Encoder, check_checkpoint_fits
from ._optim import param_groups, warmup_step
from .callbacks import is_sampler_padding, local_log_dir
from .metrics import COCOEvaluator
from .visualize import IMAGENET_MEAN, IMAGENET_STD, draw_instances, save_rgb_png, to_uint8_image


def _gather(items: list) -> list:
    """All ranks' lists concatenated (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


class InstanceSegmentationTask(CheckedCheckpointLoading, pl.LightningModule):
    """Mask R-CNN (torchvision) with our encoder + FPN backbone; COCO box and mask AP via COCOeval.

    Batches are `(images, targets)`: a list of (3, H, W) float images in [0, 1] and a list of
    dicts with "boxes" (N, 4) xyxy, "labels" (N,) in 1..num_classes, "masks" (N, H, W),
    "image_id" and "iscrowd". Images are normalized and resized exactly once: the model follows
    the datamodule's `maskrcnn_transform_kwargs()` (our COCO datamodules say whether they resized
    already) unless `resize_min_size`/`image_mean`/... are given. Crowd boxes are dropped in training
    (they are "ignore" regions in COCOeval). Evaluation uses the datamodule's `coco_gt(split)`
    and `label_to_cat_id` when it has them (predictions are rescaled to the original image
    size), else ground truth built from the targets.

    Args:
        num_classes: object classes without background (80 for COCO).
        encoder, encoder_weights, encoder_kwargs, encoder_out_indices, drop_path_rate: as in
            `SemanticSegmentationTask`.
        fpn_channels: FPN width (256).
        resize_min_size, resize_max_size: torchvision's resize inside the model (a list = multi-scale
            training). None: the datamodule's `maskrcnn_transform_kwargs()` decide, else input sizes
            are kept. (Named apart from the datamodule's `max_size`: Lightning refuses to log a
            model and a datamodule hyperparameter of one name with different values.)
        image_mean, image_std: normalization of [0, 1] images inside the model; None: the
            datamodule's, else ImageNet's. Give [0, 0, 0] / [1, 1, 1] if the data are normalized.
        maskrcnn_kwargs: further torchvision `MaskRCNN` arguments (box_score_thresh, ...).
        lr, weight_decay, betas: AdamW (1e-4, 0.05); no decay on norms, biases, A_logs, Ds.
        warmup_iters, warmup_ratio: linear warmup (500 iterations from 0.001 x lr).
        lr_milestones, lr_gamma: step decay at these epochs (1x: 8 and 11 of 12).
        mask_threshold: threshold on mask probabilities for RLEs.
        class_names: names for overlays, label k -> class_names[k - 1] (default: the datamodule's).
        predict_dir: where `predict` writes (default: <log dir>/predictions).
        predict_score_thresh: minimum score drawn in prediction overlays.
        grad_checkpointing: recompute the encoder's blocks in backward instead of keeping their
            activations (less memory, about one more encoder forward per step).
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "vmamba_tiny",
        encoder_weights: str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_out_indices: list[int] | None = None,
        drop_path_rate: float | None = None,
        fpn_channels: int = 256,
        resize_min_size: int | list[int] | None = None,
        resize_max_size: int | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        maskrcnn_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_iters: int = 500,
        warmup_ratio: float = 1e-3,
        lr_milestones: list[int] = [8, 11],  # noqa: B006  (hyperparameter, never mutated)
        lr_gamma: float = 0.1,
        mask_threshold: float = 0.5,
        class_names: list[str] | None = None,
        predict_dir: str | None = None,
        predict_score_thresh: float = 0.3,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # NOTE: output options stay out of the checkpoint (LightningCLI lets checkpoint
        # hyperparameters override the command line at `predict` time).
        # encoder_weights only seeds a fresh run (see tasks/semantic.py RUNTIME_OPTIONS)
        self.save_hyperparameters(ignore=["predict_dir", "predict_score_thresh", "encoder_weights"])
        self._predict_dir, self.predict_score_thresh = predict_dir, predict_score_thresh
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        body = Encoder(
            encoder,
            weights=encoder_weights,
            drop_path_rate=drop_path_rate,
            out_indices=encoder_out_indices,
            **(encoder_kwargs or {}),
        )
        if grad_checkpointing:
            body.set_grad_checkpointing(True)
        moved = {"min_size": "resize_min_size", "max_size": "resize_max_size", "image_mean": "image_mean",
                 "image_std": "image_std"}
        clash = sorted(set(maskrcnn_kwargs or {}) & set(moved))
        if clash:
            raise ValueError(f"maskrcnn_kwargs {clash}: the task sets torchvision's resize and normalization itself; "
                             f"give them as the task's {[moved[k] for k in clash]} instead.")
        backbone = EncoderFPN(body, body.channels, fpn_channels)
        try:
            self.model = build_mask_rcnn(backbone, num_classes, **(maskrcnn_kwargs or {}))
        except TypeError as err:
            raise ValueError(f"maskrcnn_kwargs: {err} (see torchvision.models.detection.MaskRCNN).") from err
        self.model.transform = self._transform(None)
        self.evaluator = COCOEvaluator(mask_threshold=mask_threshold)
        self._gt: COCO | None = None
        self._predictions: list[dict] = []
        self.coco_metrics: dict[str, float] = {}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """List of (3, H, W) images in [0, 1] -> torchvision detections (boxes, labels, scores, masks)."""
        return self.model(list(images))

    # ------------------------------------------------------------------ sizes and checks

    def _transform(self, datamodule: Any) -> GeneralizedRCNNTransform:
        """Resize/normalization: the datamodule's `maskrcnn_transform_kwargs()`, overridden by our arguments."""
        hp = self.hparams
        dm_kw = datamodule.maskrcnn_transform_kwargs() if hasattr(datamodule, "maskrcnn_transform_kwargs") else {}
        mean = hp.image_mean if hp.image_mean is not None else dm_kw.get("image_mean", IMAGENET_MEAN)
        std = hp.image_std if hp.image_std is not None else dm_kw.get("image_std", IMAGENET_STD)
        if hp.resize_min_size is not None:
            return make_transform(hp.resize_min_size, hp.resize_max_size, mean, std)
        return make_transform(
            dm_kw.get("min_size"), hp.resize_max_size or dm_kw.get("max_size"), mean, std, bool(dm_kw.get("_skip_resize", False))
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, ("encoder", "encoder_kwargs", "fpn_channels", "num_classes"))

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        dm_classes = getattr(dm, "num_classes", None)
        if isinstance(dm_classes, int) and dm_classes != self.hparams.num_classes:
            raise ConfigError(
                f"model.num_classes={self.hparams.num_classes} but the datamodule has {dm_classes} categories; "
                "set model num_classes to the number of categories (background excluded)."
            )
        self.model.transform = self._transform(dm)

    def _check_images(self, images: Sequence[torch.Tensor]) -> None:
        if not len(images):
            return
        t = self.model.transform
        if list(t.image_std) == [1.0, 1.0, 1.0] and list(t.image_mean) == [0.0, 0.0, 0.0]:
            return  # the datamodule normalizes; nothing to check
        lo = min(float(im.min()) for im in images)
        hi = max(float(im.max()) for im in images)
        if lo < -0.01 or hi > 1.01:
            raise ValueError(
                f"images span [{lo:.2f}, {hi:.2f}] but the model normalizes [0, 1] images itself; "
                "if the datamodule already normalizes, set image_mean: [0, 0, 0] and image_std: [1, 1, 1]."
            )

    def _train_target(self, target: dict[str, torch.Tensor], image: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes = target["boxes"].float()
        masks = target["masks"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target boxes must be (N, 4) (x1, y1, x2, y2) in pixels, got shape {tuple(boxes.shape)}.")
        if masks.dim() != 3 or masks.shape[0] != boxes.shape[0] or tuple(masks.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"target masks must be (N, H, W) with one mask per box at the image's size: boxes {tuple(boxes.shape)}, "
                f"image {tuple(image.shape)}, masks {tuple(masks.shape)}; resize masks with their image."
            )
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if "iscrowd" in target:
            keep &= torch.as_tensor(target["iscrowd"], device=boxes.device) == 0
        labels = target["labels"].long()[keep]
        if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > self.hparams.num_classes):
            raise ValueError(
                f"target labels must lie in 1..num_classes={self.hparams.num_classes} (0 is torchvision's background); "
                f"got {sorted(set(labels.tolist()))[:10]}."
            )
        masks = masks[keep]  # (indexing first: one copy of the kept masks)
        # 0/1, bool, 0/255 and soft masks alike: torchvision's mask loss wants 0/1 uint8
        if masks.is_floating_point():
            masks = (masks >= 0.5).to(torch.uint8)
        elif masks.dtype == torch.uint8:
            masks = masks.clamp_(max=1)
        else:
            masks = (masks != 0).to(torch.uint8)
        return {"boxes": boxes[keep], "labels": labels, "masks": masks}

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: tuple[list, list], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if batch_idx == 0:
            self._check_images(images)
        losses = self.model(list(images), [self._train_target(t, im) for t, im in zip(targets, images)])
        loss = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def _split(self, stage: str) -> str:
        return "test" if stage == "test" else "val"

    def _coco_gt(self, stage: str) -> COCO | None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        fn = getattr(dm, "coco_gt", None)
        gt = fn(self._split(stage)) if callable(fn) else None
        if gt is not None and getattr(gt, "image_info_only", False):
            raise ValueError(f"the {self._split(stage)} annotation file of the datamodule lists images only (no "
                             "'annotations'): there is nothing to evaluate against. Fix: use it for predict only, and "
                             "an instances_*.json file with annotations for validate/test")
        return gt

    def _label_to_cat_id(self) -> dict[int, int] | None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        mapping = getattr(dm, "label_to_cat_id", None)
        if callable(mapping):
            mapping = mapping()
        return dict(mapping) if mapping is not None else None

    def _start_eval(self, stage: str) -> None:
        self._gt = self._coco_gt(stage)
        self.evaluator = COCOEvaluator(self._label_to_cat_id(), mask_threshold=self.hparams.mask_threshold)
        self._seen = 0  # evaluation images of this epoch on this rank (see callbacks.is_sampler_padding)

    def _eval_step(self, batch: tuple[list, list], batch_idx: int) -> dict[str, Any]:
        images, targets = batch
        if batch_idx == 0:
            self._check_images(images)
        detections = self.model(list(images))
        for image, det, target in zip(images, detections, targets):
            padding = self._trainer is not None and is_sampler_padding(self.trainer, self._seen)
            self._seen += 1
            if padding:  # a repeat added by DistributedSampler: evaluated once, on the rank that owns it
                continue
            image_id = int(target["image_id"])
            size = tuple(image.shape[-2:])
            if self._gt is not None:
                info = self._gt.imgs.get(image_id)
                if info is None:
                    raise KeyError(f"image_id {image_id} is not in the datamodule's coco_gt.")
                out_size = (int(info["height"]), int(info["width"]))
                self.evaluator.add_predictions(image_id, det, out_size, size)
            else:
                self.evaluator.add_predictions(image_id, det)
                self.evaluator.add_ground_truth(image_id, target, size)
        return {"detections": detections}

    def _end_eval(self, prefix: str) -> None:
        ev = self.evaluator
        ev.results, ev.image_ids = _gather(ev.results), _gather(ev.image_ids)
        ev._gt_anns = _gather(ev._gt_anns)
        ev._gt_images = {k: v for part in _gather([ev._gt_images]) for k, v in part.items()}
        if self._gt is None:  # annotation ids must be unique after gathering
            for i, ann in enumerate(ev._gt_anns, start=1):
                ann["id"] = i
        if not ev.image_ids:
            return
        metrics, summary = ev.evaluate(self._gt)
        self.coco_metrics = metrics
        for name, value in metrics.items():  # every rank evaluated the gathered results: same values
            self.log(f"{prefix}/{name}", value, prog_bar=name in ("bbox_AP", "segm_AP"))
        if not self.trainer.sanity_checking:
            rank_zero_info(
                f"epoch {self.current_epoch}: {prefix} box AP {100 * metrics['bbox_AP']:.1f} "
                f"mask AP {100 * metrics['segm_AP']:.1f}\n{summary}"
            )

    def on_validation_epoch_start(self) -> None:
        self._start_eval("validate")

    def validation_step(self, batch: tuple[list, list], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch: tuple[list, list], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # ------------------------------------------------------------------ predict and overlays

    def predict_dir(self) -> str:
        if self._predict_dir:
            return self._predict_dir
        return os.path.join(getattr(self, "_predict_root", None) or local_log_dir(self.trainer), "predictions")

    def on_predict_start(self) -> None:
        # once, on every rank: trainer.log_dir is a collective, and ranks run different numbers of predict steps
        self._predict_root = self.trainer.log_dir or self.trainer.default_root_dir

    def on_predict_epoch_start(self) -> None:
        self._predictions = []
        self._predict_seen = 0  # images of this rank so far: ids of image-only batches
        self._predict_coder = COCOEvaluator(self._label_to_cat_id(), mask_threshold=self.hparams.mask_threshold)

    def predict_step(self, batch: Any, batch_idx: int) -> list[str]:
        """Writes `overlays/<image_id>.png`; COCO results go to `coco_results.json` at the end.

        Batches are `(images, targets)` (targets give image ids and original sizes) or images only
        (ids: each image's index in the dataset, for an unshuffled loader, under DDP's
        DistributedSampler too). Overlays are drawn at the original size when targets give one.
        """
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], (list, tuple)):
            images, targets = batch
        else:
            images, targets = batch, None
        detections = self.model(list(images))
        out_dir = self.predict_dir()
        paths = []
        world, rank = self.trainer.world_size, self.trainer.global_rank
        for i, (image, det) in enumerate(zip(images, detections)):
            if targets is not None:
                image_id = int(targets[i]["image_id"])
            else:  # DistributedSampler (no shuffle) gives rank r the dataset's items r, r + world, ...
                image_id = self._predict_seen * world + rank
            self._predict_seen += 1
            orig = targets[i].get("orig_size") if targets is not None else None
            out_size = tuple(int(v) for v in orig) if orig is not None else None  # undo a datamodule resize
            in_size = tuple(image.shape[-2:])
            self._predictions.extend(self._predict_coder.to_results(image_id, det, out_size, in_size))
            keep = det["scores"] >= self.predict_score_thresh
            boxes, masks = det["boxes"][keep], det["masks"][keep] if "masks" in det else None
            if out_size is not None and out_size != in_size:  # draw on the image at its size on disk
                image = F.interpolate(image[None].float(), size=out_size, mode="bilinear", align_corners=False)[0]
                boxes = boxes * boxes.new_tensor([out_size[1] / in_size[1], out_size[0] / in_size[0]] * 2)
                if masks is not None:
                    masks = F.interpolate(masks.float(), size=out_size, mode="bilinear", align_corners=False)
            masks = masks[:, 0] > self.hparams.mask_threshold if masks is not None else None
            names = self.hparams.class_names or getattr(self.trainer.datamodule, "class_names", None)
            drawn = draw_instances(
                to_uint8_image(image, None, None),
                boxes,
                det["labels"][keep],
                masks,
                det["scores"][keep],
                class_names=[None, *names] if names else None,
            )
            path = os.path.join(out_dir, "overlays", f"{image_id}.png")
            save_rgb_png(drawn, path)
            paths.append(path)
        return paths

    def on_predict_epoch_end(self) -> None:
        results = _gather(self._predictions)
        if self.trainer.is_global_zero:
            path = os.path.join(self.predict_dir(), "coco_results.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(results, f)
            rank_zero_info(f"wrote {len(results)} detections to {path}")

    def render_overlays(self, batch: tuple[list, list], outputs: dict[str, Any], max_images: int) -> list[tuple[str, np.ndarray]]:
        """(name, ground truth | prediction) strips for the overlay-logging callback."""
        images, targets = batch
        strips = []
        for image, det, target in list(zip(images, outputs["detections"], targets))[:max_images]:
            rgb = to_uint8_image(image, None, None)
            gt = draw_instances(rgb, target["boxes"], target["labels"], target["masks"].bool())
            keep = det["scores"] >= self.predict_score_thresh
            pred = draw_instances(
                rgb, det["boxes"][keep], det["labels"][keep], det["masks"][keep, 0] > self.hparams.mask_threshold, det["scores"][keep]
            )
            strips.append((str(int(target["image_id"])), np.concatenate([gt, pred], axis=1)))
        return strips

    # ------------------------------------------------------------------ optimization

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        if self.trainer.train_dataloader is None:
            # NOTE: not estimated_stepping_batches: with max_epochs=-1 (max_steps only) it returns
            # max_steps without loading the train dataloader, whose length the milestones need
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("lr_milestones are in epochs: the train dataloader needs a length (an iterable "
                             "dataset without __len__ has none). Fix: use a map-style dataset")
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        milestones = [m * steps_per_epoch for m in hp.lr_milestones]
        schedule = partial(
            warmup_step, milestones=milestones, gamma=hp.lr_gamma, warmup_iters=hp.warmup_iters, warmup_ratio=hp.warmup_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
