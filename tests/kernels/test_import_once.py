"""The kernels folder must never be imported a second time as a top-level ``kernels`` package.

With a checkout root on ``sys.path`` (benchmarks/_bootstrap.py, ``python -c`` from the root) a
probe for a top-level ``kernels`` module (the name of Hugging Face's kernel-hub package) found this
folder and ran it again; its second ``torch.library.custom_op("mamba_dense::scan_fwd")`` made
torch.library drop the first registration, and the first module's op then read freed memory
(H100: an intermittent ``ValueError: vector::reserve`` in the scan call, or a segfault).
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from torch._library import custom_ops
import mamba_dense.kernels as k

registered = custom_ops.OPDEF_TO_LIB["mamba_dense::scan_fwd"]
try:
    import kernels  # what a probe for a top-level "kernels" package does
    print("imported")
except ImportError as e:
    print("ImportError:", e)
assert not [m for m in sys.modules if m.split(".")[0] == "kernels"], [m for m in sys.modules if "kernels" in m]
assert custom_ops.OPDEF_TO_LIB["mamba_dense::scan_fwd"] is registered, "scan_fwd was registered again"
assert k._op.scan_fwd._lib is registered
# the op still dispatches (meta tensors: its fake implementation)
x = torch.empty(1, 6, 4, device="meta")
route = torch.empty(2, 6, dtype=torch.long, device="meta")
y, _ = torch.ops.mamba_dense.scan_fwd(
    x, torch.empty(1, 6, 2, 4, device="meta"), torch.empty(2, 4, 3, device="meta"),
    torch.empty(1, 6, 2, 3, device="meta"), torch.empty(1, 6, 2, 3, device="meta"), None, None, route,
    False, True, torch.float32, False)
assert y.shape == (1, 6, 4)
print("ok")
"""


def test_kernels_folder_refuses_a_second_import_as_top_level_kernels():
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ImportError:" in r.stdout and "mamba_dense.kernels" in r.stdout, r.stdout
    assert r.stdout.strip().endswith("ok")
