"""Test-session set-up shared by every test folder."""

import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter. The flag must be set before the
# kernels module is imported (triton.jit reads it when the kernels are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (pyproject's addopts run the suite on up to 4 worker processes), the workers
# share the cores: each takes its part of them for torch's intra-op threads, and the programs the
# tests start (CLI runs) inherit that through OMP_NUM_THREADS. A thread count set by the caller wins.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# Test helpers shared across folders (e.g. the step-by-step scan oracle) live next to this file.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
