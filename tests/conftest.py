"""Test-session set-up shared by every test folder."""

import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter. The flag must be set before the
# kernels module is imported (triton.jit reads it when the kernels are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test helpers shared across folders (e.g. the step-by-step scan oracle) live next to this file.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
