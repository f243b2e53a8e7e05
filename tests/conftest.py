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

import contextlib  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def exclusive_gpu_memory():
    """One test at a time among those that need tens of GiB of GPU memory, across the xdist workers (a file
    lock): two of them side by side ran an 80 GiB GPU out of memory, and then every other worker's CUDA calls
    failed too (H100 host, `-n 8`). Frees the cached blocks afterwards for the other workers."""
    if not torch.cuda.is_available():
        yield
        return
    import fcntl

    with open(os.path.join(tempfile.gettempdir(), "mamba_dense_tests_gpu_memory.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)
