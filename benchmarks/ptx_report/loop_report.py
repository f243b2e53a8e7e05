"""SASS instructions per step inside the scan kernels' tile loops (no GPU needed).

ptx_report.py counts a whole kernel's static instructions; most of a launch's time is spent in the
loop over tiles, whose length this measures. For each kernel kind below it compiles the kernel for
an H100 target (``GPUTarget("cuda", 90, 32)``) the way a launch at the benchmark shapes specializes
it (pointers and the ints L, S, Dm, batch, n_tiles divisible by 16, N = 1 a constexpr), finds every
loop in ``nvdisasm -g`` (a branch back to an earlier label), and prints per loop its instructions per
step (the loop's length / T), its opcodes and, with ``--lines N``, the N source lines with the most
instructions in it (the innermost source line: a helper's own line, not its caller's).

Kinds (N = 1, bf16 inputs, the policy's flags for whole tiles: EVEN_S, and EVEN_D in the backward):
    f1  forward phase 1 (chunk-end states from a zero start), T 32, channel blocks of 32
    f0  forward output pass merging a reversed route pair in place (MODE 5, REPS 2), T 32, blocks of 32
    b1  backward phase 1 (chunk-start dh), T 16, blocks of 32
    b0  backward gradient pass with the pair dx merge (DXMODE 5, REPS 2), T 16, blocks of 32
A kernel with REPS 2 has two loops: the inner one (listed first) is the tile loop.

Usage:
    python benchmarks/ptx_report/loop_report.py [--kinds f1,f0,b1,b0] [--lines 12] [--bd 32] [--stages 1]

Run it with the Triton a GPU will use (benchmarks/RESULTS.md, session 19: Triton 3.6 and 3.8 compile
the same source to loops of different lengths, e.g. the backward's gradient pass 89.7 against 76.3
instructions per step), for example on the GPU machine from the repo root.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ptx_report as pr  # noqa: E402

INT_DIV16 = ("Dm", "L", "S", "batch", "n_tiles")

_LABEL = re.compile(r"^(\.L_x_\d+):")
_FILE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def compile_kernel(fn, ptrs: dict, constexprs: dict, warps: int = 1):
    """triton.compile of fn with the given constexprs (the others at their defaults), pointer types
    ptrs (each 16-byte aligned), N = 1 as a constexpr and the ints of INT_DIV16 divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, cx, attrs = pr.signature(fn, constexprs, ptrs, N=1, ints16=INT_DIV16)
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def loops(cubin: bytes) -> list[tuple[int, Counter, Counter]]:
    """(length, Counter of opcodes, Counter of (file, line)) of every loop of the cubin, innermost first
    (shortest first)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(pr._nv_bin() / "nvdisasm"), "-g", "-c", f.name], capture_output=True, text=True,
                             check=True).stdout
    ins, labels, pending, cur = [], {}, [], None
    for line in out.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _FILE_LINE.search(line)
        if m:
            cur = (os.path.basename(m.group(1)), int(m.group(2)))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lb in pending:
                labels[lb] = addr
            pending = []
            ins.append((addr, m.group(2), cur, m.group(3)))
    found = []
    for addr, op, _, rest in ins:
        t = re.search(r"(\.L_x_\d+)", rest) if op.startswith("BRA") else None
        if t and labels.get(t.group(1), addr) < addr:
            body = [(o, ln) for a, o, ln, _ in ins if labels[t.group(1)] <= a <= addr]
            found.append((len(body), Counter(o for o, _ in body), Counter(ln for _, ln in body)))
    return sorted(found, key=lambda r: r[0])


def kinds(bd: int, stages: int) -> dict:
    import triton.language as tl

    import mamba_dense.kernels.triton_scan as ts

    fwd_ptrs = dict(pr.FWD_PTRS, route_ptr="*i32")
    bwd_ptrs = dict(pr.BWD_PTRS, route_ptr="*i32")
    flags = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, NP=1, CT=tl.float32, X_PER_ROUTE=False, FAST_EXP=True,
                 BD=bd, STAGES=stages)
    fwd = dict(flags, T=32, SUB=2, PREFETCH=False, EVEN_S=True)
    bwd = dict(flags, T=16, INTERP=False, DY_PER_ROUTE=False, PREV_EARLY=True, EVEN_S=True, EVEN_D=True)
    return {
        "f1": (ts._fwd_kernel, fwd_ptrs, dict(fwd, MODE=0, PHASE=1, HAS_H0=False, STORE_STATES=False), 32),
        "f0": (ts._fwd_kernel, fwd_ptrs, dict(fwd, MODE=5, PHASE=0, HAS_H0=True, STORE_STATES=True, REPS=2), 32),
        "b1": (ts._bwd_kernel, bwd_ptrs, dict(bwd, DXMODE=4, PHASE=1, HAS_G0=False, REPS=1), 16),
        "b0": (ts._bwd_kernel, bwd_ptrs, dict(bwd, DXMODE=5, PHASE=0, HAS_G0=True, REPS=2), 16),
    }


def main():
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="f1,f0,b1,b0")
    ap.add_argument("--lines", type=int, default=0, help="also list the N source lines with the most instructions")
    ap.add_argument("--bd", type=int, default=32, help="channel block")
    ap.add_argument("--stages", type=int, default=1, help="the tile loops' num_stages (STAGES)")
    args = ap.parse_args()

    table = kinds(args.bd, args.stages)
    src_lines = Path(pr._import_scan().__file__).read_text().splitlines()
    print(f"triton {triton.__version__}")
    for kind in args.kinds.split(","):
        fn, ptrs, cx, T = table[kind]
        ck = compile_kernel(fn, ptrs, cx)
        print(f"== {kind}")
        for n, ops, lines in loops(ck.asm["cubin"]):
            print(f"loop of {n} instructions: {n / T:.1f} per step")
            print("   " + ", ".join(f"{k} {v}" for k, v in ops.most_common(24)))
            for (f, ln), v in lines.most_common(args.lines):
                text = src_lines[ln - 1].strip()[:90] if f == "triton_scan.py" else ""
                print(f"   {v:5d}  {f}:{ln}  {text}")


if __name__ == "__main__":
    main()
