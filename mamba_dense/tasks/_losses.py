"""Losses whose reduction order is fixed, so that two runs give bit-identical values on a GPU too."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over non-ignored elements of (B, C, *spatial) logits, one sample at a time.

    Saves only the logits in their own dtype (bf16 under autocast) and recomputes the softmax in
    backward, one sample at a time in fp32: no (B, C, *spatial) fp32 log-softmax is kept between
    forward and backward (for 150 classes at 512 x 512 that is 150 MiB per image and head, 4.7 GiB
    for a batch of 16 with UPerNet's auxiliary head). Every reduction is a plain `sum()` in a fixed
    order and the gradient is elementwise (no scatter, no atomics): deterministic on a GPU.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, avg_non_ignore: bool = True
                ) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32 if logits.dtype != torch.float64 else torch.float64)
        count = target.new_zeros((), dtype=torch.long)
        for lf, t in zip(logits, target):  # lf (C, *S), t (*S)
            lf = lf.to(total.dtype)
            valid = t != ignore_index
            picked = lf.gather(0, torch.where(valid, t, 0).unsqueeze(0)).squeeze(0)
            total = total + torch.where(valid, torch.logsumexp(lf, 0) - picked, 0).sum()
            count = count + valid.sum()
        if not avg_non_ignore:  # mmseg's default: the mean over every element, ignored ones counting 0
            count = count.new_tensor(target.numel())
        ctx.save_for_backward(logits, target, count)
        ctx.ignore_index = ignore_index
        return total / count  # 0 / 0 = NaN when every element is ignored, as F.cross_entropy's

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target, count = ctx.saved_tensors
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        scale = grad.to(cdt) / count
        out = torch.empty_like(logits)
        classes = torch.arange(logits.shape[1], device=logits.device).view(-1, *([1] * (logits.dim() - 2)))
        for i, (lf, t) in enumerate(zip(logits, target)):
            g = torch.softmax(lf.to(cdt), 0)  # one fp32 sample alive at a time
            g.sub_((classes == t.unsqueeze(0)).to(cdt))  # minus the one-hot target (elementwise, no scatter)
            g.mul_(scale).masked_fill_((t == ctx.ignore_index).unsqueeze(0), 0)
            out[i] = g
        return out, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  avg_non_ignore: bool = True) -> torch.Tensor:
    """`F.cross_entropy(logits, target, ignore_index=ignore_index)` (the mean over non-ignored elements),
    deterministic and light on memory. ``avg_non_ignore=False``: the sum over non-ignored elements
    divided by all elements (mmseg's ``CrossEntropyLoss`` default; 0, not NaN, when every element
    is ignored).

    NOTE: on CUDA, the built-in mean of (B, C, *spatial) logits goes through nll_loss2d, which sums with
    float atomics: the value changes in its last bits from run to run, and
    `torch.use_deterministic_algorithms(True)` (`--trainer.deterministic true`) refuses it. It also
    keeps an fp32 log-softmax of the full-resolution logits for backward. `_CrossEntropy` sums per
    sample with `sum()` and recomputes the softmax in backward (values and gradients equal F's).
    """
    if logits.dim() < 2 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"cross_entropy: logits (B, C, *S) and target (B, *S) expected, got {tuple(logits.shape)} and {tuple(target.shape)}")
    with torch.autocast(logits.device.type, enabled=False):
        return _CrossEntropy.apply(logits, target, ignore_index, avg_non_ignore)
