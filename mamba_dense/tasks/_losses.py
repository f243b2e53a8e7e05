"""Losses whose reduction order is fixed, so that two runs give bit-identical values on a GPU too."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`F.cross_entropy(logits, target, ignore_index=ignore_index)` (the mean over non-ignored elements),
    reduced deterministically.

    NOTE: on CUDA, the built-in mean of (B, C, *spatial) logits goes through nll_loss2d, which sums with
    float atomics: the value changes in its last bits from run to run, and
    `torch.use_deterministic_algorithms(True)` (`--trainer.deterministic true`) refuses it. Per-element
    losses (ignored ones are 0) summed with `sum()` are deterministic; the gradient is the same.
    """
    per_element = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    return per_element.sum() / (target != ignore_index).sum()  # 0 / 0 = NaN when all are ignored, as F's
