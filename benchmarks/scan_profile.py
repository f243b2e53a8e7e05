"""One forward + backward of a benchmark shape, for profiling under ncu.

To run: ncu --set basic python benchmarks/scan_profile.py S1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401

import torch  # noqa: E402

from scan import SHAPES, make_inputs  # noqa: E402
from mamba_dense.kernels import routes, selective_scan  # noqa: E402

want = sys.argv[1] if len(sys.argv) > 1 else "S1"
name, batch, L, K, D, N, rdesc = next(s for s in SHAPES if s[0].startswith(want))
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
route = getattr(routes, rdesc[0])(*rdesc[1:]).to(dev)
x, dt, A, B, C, Dp, bias = make_inputs(batch, L, K, D, N, torch.bfloat16, dev, gen)
ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, Dp, bias)]
for _ in range(2):
    y = selective_scan(*ins, route=route)
    torch.autograd.grad(y, ins, torch.ones_like(y))
torch.cuda.synchronize()
print("done", name)
