"""Make ``mamba_dense`` importable from a plain checkout (GPU machines without an install).

``kernels/`` and ``datamodules/`` install as ``mamba_dense.kernels`` / ``mamba_dense.datamodules``
through a package-dir mapping; without an install, adding the repo root to the package's search
path gives the same names.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mamba_dense  # noqa: E402

try:
    import mamba_dense.kernels  # noqa: F401
except ImportError:
    mamba_dense.__path__.append(str(ROOT))
    import mamba_dense.kernels  # noqa: F401
