"""Optimizer recipes of the papers: AdamW param groups without decay, warmup + poly / step decay."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

# Leaf names (last component) and substrings of parameters that get no weight decay, besides
# every 1-D parameter (norm weights, biases, Ds) and every parameter flagged ``_no_weight_decay`` (Mamba's
# convention). A_logs: the SSM state matrices of VMamba.
NO_DECAY_LEAVES = {"A_logs", "A_log", "Ds", "D", "dt_bias", "cls_token", "registers", "register_tokens"}
NO_DECAY_SUBSTRINGS = ("pos_embed", "absolute_pos_embed", "relative_position_bias_table")


def _declared_no_decay(model: nn.Module) -> set[str]:
    """Names listed by modules' timm-style `no_weight_decay()`, made absolute."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            try:
                declared = fn()
            except Exception:  # noqa: BLE001  (a foreign hook must not break training)
                continue
            names.update(f"{prefix}.{n}" if prefix else n for n in declared)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and norms/biases/A_logs/Ds/position embeddings without decay."""
    declared = _declared_no_decay(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            p.ndim <= 1
            or leaf in NO_DECAY_LEAVES
            or any(s in name for s in NO_DECAY_SUBSTRINGS)
            or name in declared
            or getattr(p, "_no_weight_decay", False)  # Mamba's flag (A_log, D; our per-route biases)
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_factor(step: int, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv linear warmup: from `warmup_ratio` to 1 over `warmup_iters` steps."""
    if warmup_iters <= 0 or step >= warmup_iters:
        return 1.0
    return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)


def warmup_poly(
    step: int, total_steps: int, warmup_iters: int, warmup_ratio: float, power: float, min_lr_ratio: float
) -> float:
    """LR multiplier: poly decay over all `total_steps` (mmcv), scaled by the linear warmup."""
    progress = min(step, total_steps) / max(total_steps, 1)
    poly = (1.0 - progress) ** power * (1.0 - min_lr_ratio) + min_lr_ratio
    return poly * warmup_factor(step, warmup_iters, warmup_ratio)


def warmup_step(
    step: int, milestones: Sequence[int], gamma: float, warmup_iters: int, warmup_ratio: float
) -> float:
    """LR multiplier: step decay by `gamma` at each milestone step, scaled by the linear warmup."""
    passed = sum(step >= m for m in milestones)
    return math.pow(gamma, passed) * warmup_factor(step, warmup_iters, warmup_ratio)
