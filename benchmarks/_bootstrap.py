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


def save_results(out, filename: str, payload: dict) -> None:
    """Write ``payload`` plus the run's facts (GPU, torch, triton, date, command) as JSON to out/filename."""
    import json
    import time

    import torch
    import triton

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), cmd=" ".join(sys.argv))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / filename).write_text(json.dumps({"info": info, **payload}, indent=1, default=str))
