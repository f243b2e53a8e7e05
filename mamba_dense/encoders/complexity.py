"""Parameter and FLOP counts of the encoders, in the convention of the VMamba / LocalMamba papers.

FLOPs are multiply-accumulates (MACs, "FLOPs" in those papers, fvcore's convention): every matmul,
linear and convolution as counted by :class:`torch.utils.flop_counter.FlopCounterMode` (which
reports 2 per MAC, halved here), plus the selective scan, which no op counter sees inside the
custom operator, by the analytic cost of VMamba's ``flops_selective_scan_fn``: 9 * L * D * N per
route (discretisation, state update and readout) + L * D for the skip term. Norms, activations and
other elementwise ops are not counted (about 1-2% of the total for these models).

Everything runs on the meta device: no memory, no compute, any model size.

Example:
    >>> params, macs = model_complexity("vmamba_tiny", (3, 224, 224))
    >>> round(params / 1e6, 1), round(macs / 1e9, 1)
    (30.2, 4.9)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["model_complexity", "scan_macs"]


def scan_macs(batch: int, num_routes: int, steps: int, channels: int, d_state: int) -> int:
    """Analytic cost of one selective-scan call: per route and step 9 * D * N + D (VMamba's formula)."""
    return batch * num_routes * steps * channels * (9 * d_state + 1)


def _scan_formula(x, dt, A, B, C, D, dt_bias, route, *args, out_shape=None, **kwargs) -> int:
    # shapes only (FlopCounterMode passes shapes); FlopCounterMode halves nothing, so report 2 * MACs
    K, S = route
    channels, d_state = A[1], A[2]
    return 2 * scan_macs(x[0], K, S, channels, d_state)


@torch.no_grad()
def model_complexity(
    model: nn.Module | str, input_size: Sequence[int] = (3, 224, 224), features: bool = False, **kwargs: Any
) -> tuple[int, int]:
    """(parameters, MACs) of one forward pass of a batch of 1.

    Args:
        model: a module, or a registered encoder name (built on the meta device with ``kwargs``).
        input_size: (C, H, W) for images, (C, D, H, W) for volumes.
        features: count ``forward_intermediates(x, intermediates_only=True)`` (the dense features,
            e.g. through Vim's pyramid) instead of ``forward`` (the classifier).

    Returns:
        (number of parameters, multiply-accumulates incl. the analytic scan term).
    """
    if isinstance(model, str):
        from ._registry import create_encoder

        with torch.device("meta"):
            model = create_encoder(model, **kwargs)
    device = next(model.parameters()).device
    x = torch.empty(1, *input_size, device="meta" if device.type == "meta" else device)
    from mamba_dense.kernels import _op  # noqa: F401  (registers the op)

    from mamba_dense.layers import ssm as _ssm

    scan = torch.ops.mamba_dense.scan_fwd
    # dt = dt_proj(low-rank features) runs as one block-diagonal product (see layers.ssm.lowrank_dt);
    # count only its R MACs per output, as the papers do
    _ssm._BLOCK_DIAG_EXCESS = excess = []
    try:
        with FlopCounterMode(display=False, custom_mapping={scan: _scan_formula}) as counter:
            if features:
                model.forward_intermediates(x, intermediates_only=True)
            else:
                model(x)
    finally:
        _ssm._BLOCK_DIAG_EXCESS = None
    params = sum(p.numel() for p in model.parameters())
    return params, counter.get_total_flops() // 2 - sum(excess)
