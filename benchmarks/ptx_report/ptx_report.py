"""Ahead-of-time register / spill / instruction report for the Triton scan kernels (no GPU needed).

Compiles ``_fwd_kernel`` and ``_bwd_kernel`` of kernels/triton_scan.py for an H100 target
(``GPUTarget("cuda", 90, 32)``) with ``triton.compile(ASTSource(...))``, runs the ptxas bundled
with Triton on the PTX with ``-v`` (same flags Triton itself uses: ``-lineinfo -v
--regAllocOptLevel=2 --gpu-name=sm_90a``) to read registers / spills / stack, and disassembles the
cubin with the bundled ``cuobjdump -sass`` to count instructions. All instruction counts are
STATIC counts (instructions in the code, not executed instructions).

Launch the kernels are compiled for: the main (non-chunked, buffer-merge) launch of scan_fwd /
scan_bwd, bf16 activations:

    forward : MODE=0 PHASE=0 HAS_H0=False STORE_STATES=True HAS_D HAS_BIAS SOFTPLUS X_PER_ROUTE=False CT=fp32,
              SUB = T // 16 for N=1 (a state saved every 16 steps), 1 otherwise; PREFETCH for N=1
    backward: DXMODE=0 PHASE=0 HAS_G0=False DY_PER_ROUTE=False, same flags

Pointers: x, dt, B, C, dy, out, dx and ddt (= empty_like(dt)) are bf16; route is int64; A, D,
dt_bias, states and all accumulators / partial-gradient buffers are fp32.

Integer arguments (``--spec``):
    runtime (default): what the Triton launcher would specialize independently of the problem
        shape: every pointer carries ``tt.divisibility=16`` (torch allocations are 16-B aligned)
        and N is specialized like the launcher does for its value (N == 1 -> constexpr 1,
        N == 16 -> i32 with divisibility 16). All other ints are plain i32 (their hints depend on
        the problem shape).
    plain: every int is a plain i32 and no pointer/int carries a divisibility hint.

Usage:
    python benchmarks/ptx_report/ptx_report.py              # full sweep -> ptx_report.txt / .csv
    python benchmarks/ptx_report/ptx_report.py --spec plain --out ptx_report_plain
    python benchmarks/ptx_report/ptx_report.py --quick      # default configs only
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _import_scan():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _bootstrap  # noqa: F401  (mamba_dense importable without an install)
    import mamba_dense.kernels.triton_scan as ts

    return ts


def _nv_bin() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# --------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------

FWD_PTRS = dict(
    x_ptr="*bf16", dt_ptr="*bf16", A_ptr="*fp32", B_ptr="*bf16", C_ptr="*bf16", D_ptr="*fp32",
    bias_ptr="*fp32", route_ptr="*i64", out_ptr="*bf16", acc_ptr="*fp32", states_ptr="*fp32",
    dsum_ptr="*fp32",
)
BWD_PTRS = dict(
    x_ptr="*bf16", dt_ptr="*bf16", A_ptr="*fp32", B_ptr="*bf16", C_ptr="*bf16", D_ptr="*fp32",
    bias_ptr="*fp32", route_ptr="*i64", states_ptr="*fp32", dy_ptr="*bf16", dx_ptr="*bf16",
    dxacc_ptr="*fp32", ddt_ptr="*bf16", dB_ptr="*fp32", dC_ptr="*fp32", dA_ptr="*fp32",
    dD_ptr="*fp32", dbias_ptr="*fp32", g_ptr="*fp32", gsum_ptr="*fp32",
)


def signature(fn, constexprs: dict, ptrs: dict, *, hints: bool = True, N: int | None = None, ints16=()):
    """(signature, constexprs, attrs) of an ASTSource for fn: the constexprs given, fn's other constexprs
    at their defaults (left out, they would compile as i32 arguments), the pointers typed by ptrs and
    the other arguments plain i32. With hints, what the launcher specializes: pointers 16-byte aligned,
    N == 1 a constexpr and a multiple of 16 divisible by 16, and the ints named in ints16 divisible by 16
    (shape-dependent: loop_report.py names the ones its benchmark shapes give)."""
    cx = dict(constexprs)
    for p in fn.params:
        if p.is_constexpr and p.name not in cx and p.has_default:
            cx[p.name] = p.default
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in cx:
            sig[a] = "constexpr"
        elif a in ptrs:
            sig[a] = ptrs[a]
            if hints:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif hints and a == "N" and N == 1:
            sig[a] = "constexpr"
            cx[a] = 1
        else:
            sig[a] = "i32"
            if hints and ((a == "N" and N is not None and N % 16 == 0) or a in ints16):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


def build_source(kernel: str, N: int, T: int, BD: int, NP: int, spec: str):
    import triton.language as tl
    from triton.compiler import ASTSource

    ts = _import_scan()
    flags = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, T=T, BD=BD, NP=NP, CT=tl.float32, X_PER_ROUTE=False,
                 FAST_EXP=True)  # as triton_scan._fast_exp picks on a GPU
    if kernel == "fwd":
        fn, ptrs = ts._fwd_kernel, FWD_PTRS
        # states saved every 16 steps for N=1 (the backward's tiles, triton_scan._config), every tile otherwise
        sub = max(1, T // 16) if N == 1 else 1
        # the one-pass N=1 forward gathers its next tile ahead (triton_scan._fwd_prefetch)
        cx = dict(MODE=0, PHASE=0, HAS_H0=False, STORE_STATES=True, SUB=sub, PREFETCH=N == 1, REPS=1, **flags)
    else:
        fn, ptrs = ts._bwd_kernel, BWD_PTRS
        cx = dict(DXMODE=0, PHASE=0, HAS_G0=False, DY_PER_ROUTE=False, INTERP=False, REPS=1, PREV_EARLY=False, **flags)
    sig, cx, attrs = signature(fn, cx, ptrs, hints=spec == "runtime", N=N)
    missing = set(cx) - set(fn.arg_names)
    assert not missing, missing
    return ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), fn


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "stack_B": re.compile(r"(\d+) bytes stack frame"),
    "spill_st_B": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld_B": re.compile(r"(\d+) bytes spill loads"),
    "regs": re.compile(r"Used (\d+) registers"),
    "barriers": re.compile(r"used (\d+) barriers"),
    "static_smem_B": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict:
    out = {}
    for k, r in _PTXAS_RE.items():
        m = r.search(log)
        out[k] = int(m.group(1)) if m else 0
    return out


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_opcodes(sass: str) -> Counter:
    c = Counter()
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            c[m.group(1)] += 1
    return c


def _prefix_count(ops: Counter, *names: str) -> int:
    """Instructions whose opcode is one of ``names`` or starts with one of them plus a '.' modifier."""
    return sum(v for k, v in ops.items() if any(k == n or k.startswith(n + ".") for n in names))


def sass_counts(ops: Counter) -> dict:
    pre = functools.partial(_prefix_count, ops)
    return dict(
        sass_total=sum(ops.values()),
        sass_LDL=pre("LDL"), sass_STL=pre("STL"),
        sass_SHFL=pre("SHFL"), sass_BAR=pre("BAR"),
        sass_EX2=sum(v for k, v in ops.items() if k.startswith("MUFU.EX2")),
        sass_MUFU=pre("MUFU"),
        sass_LDS=pre("LDS"), sass_STS=pre("STS"), sass_LDSM=pre("LDSM"), sass_STSM=pre("STSM"),
        sass_LDG=pre("LDG"), sass_STG=pre("STG"),
        sass_FFMA=pre("FFMA"), sass_FMUL=pre("FMUL"), sass_FADD=pre("FADD"),
        sass_FSEL=pre("FSEL"), sass_FSETP=pre("FSETP"),
    )


_PTX_PRED = re.compile(r"^@!?%\w+\s+")


def ptx_opcodes(ptx: str) -> Counter:
    c = Counter()
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".", "{", "}", "$")) or s.endswith(":"):
            continue
        s = _PTX_PRED.sub("", s)
        m = re.match(r"([a-z][a-z0-9_.]*)", s)
        if m:
            c[m.group(1)] += 1
    return c


def ptx_counts(ops: Counter) -> dict:
    pre = functools.partial(_prefix_count, ops)
    def fam(op, ty=".f32"):
        return sum(v for k, v in ops.items() if k.split(".")[0] == op and k.endswith(ty))

    return dict(
        ptx_total=sum(ops.values()),
        ptx_ld_local=pre("ld.local"), ptx_st_local=pre("st.local"),
        ptx_shfl=pre("shfl"), ptx_bar_sync=pre("bar.sync", "barrier.sync"), ptx_bar_warp_sync=pre("bar.warp.sync"),
        ptx_ex2=pre("ex2"),
        ptx_ld_shared=pre("ld.shared"), ptx_st_shared=pre("st.shared"),
        ptx_ldmatrix=pre("ldmatrix"), ptx_stmatrix=pre("stmatrix"),
        ptx_ld_global=pre("ld.global"), ptx_st_global=pre("st.global"),
        ptx_fma_f32=fam("fma"), ptx_mul_f32=fam("mul"), ptx_add_f32=fam("add"), ptx_sub_f32=fam("sub"),
        ptx_selp_f32=fam("selp"),
    )


def _reverse_scan_line() -> int:
    """Source line of the backward's reverse tl.associative_scan in triton_scan.py."""
    ts = _import_scan()
    for i, line in enumerate(Path(ts.__file__).read_text().splitlines(), 1):
        if "associative_scan" in line and "reverse=True" in line:
            return i
    return -1


def ptx_shfl_by_line(ptx: str) -> Counter:
    """PTX shfl instructions per triton_scan.py source line (from .loc; inlined code counts at the call site)."""
    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, flags=re.MULTILINE))  # listed after the code
    cur, c = None, Counter()
    for line in ptx.splitlines():
        m = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)\s+\d+(.*)", line)
        if m:
            fid, ln, rest = m.groups()
            sites = [ln] if files.get(fid, "").endswith("triton_scan.py") else []
            sites += [b for a, b in re.findall(r"inlined_at (\d+) (\d+)", rest) if files.get(a, "").endswith("triton_scan.py")]
            if sites:
                cur = int(sites[-1])
            continue
        if "shfl." in line:
            c[cur] += 1
    return c


# --------------------------------------------------------------------------------------------
# one config
# --------------------------------------------------------------------------------------------


def run_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    kernel, N, T, BD, NP, w, spec = (job[k] for k in ("kernel", "N", "T", "BD", "NP", "warps", "spec"))
    t0 = time.time()
    src, _ = build_source(kernel, N, T, BD, NP, spec)
    opts = {"num_warps": w}
    if job.get("maxnreg"):
        opts["maxnreg"] = job["maxnreg"]
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = ck.asm["ptx"]
    bin_dir = _nv_bin()
    row = dict(job)
    row["elem_per_thr"] = T * NP * BD // (32 * w)  # elements of one [T, NP, BD] tensor per thread
    row["smem_B"] = int(ck.metadata.shared)  # Triton's dynamic shared memory (scratch for scan/reduce)
    with tempfile.TemporaryDirectory() as td:
        p_ptx, p_bin = os.path.join(td, "k.ptx"), os.path.join(td, "k.cubin")
        Path(p_ptx).write_text(ptx)
        cmd = [str(bin_dir / "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", p_ptx, "-o", p_bin]
        if job.get("maxnreg"):
            cmd.insert(1, f"--maxrregcount={job['maxnreg']}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed for {job}: {r.stderr[-2000:]}")
        row.update(parse_ptxas(r.stdout + r.stderr))
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", p_bin], capture_output=True, text=True, check=True).stdout
    # cross-check: the cubin Triton built itself should have the same SASS
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass_tr = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    sops = sass_opcodes(sass)
    row["sass_same_as_triton"] = sops == sass_opcodes(sass_tr)
    row.update(sass_counts(sops))
    row.update(ptx_counts(ptx_opcodes(ptx)))
    row["ptx_shfl_revscan"] = ptx_shfl_by_line(ptx)[_reverse_scan_line()] if kernel == "bwd" else 0
    row["compile_s"] = round(time.time() - t0, 2)
    if job.get("keep_ptx"):
        row["_ptx"] = ptx
        row["_sass_ops"] = dict(sops)
        row["_ptx_ops"] = dict(ptx_opcodes(ptx))
    return row


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------

# triton_scan._config's defaults (N=1 forward and backward take blocks of 32 on chunk-parallel launches)
DEFAULTS = {("fwd", 16): (8, 16, 1), ("bwd", 16): (8, 8, 1), ("fwd", 1): (32, 16, 1), ("bwd", 1): (16, 16, 1)}


def jobs(spec: str, quick: bool):
    out = []
    for kernel in ("fwd", "bwd"):
        grids = [
            (16, 16, (4, 8, 16), (4, 8, 16, 32), (1, 2, 4)),
            (1, 1, (16, 32, 64), (16, 32, 64), (1, 2, 4)),
        ]
        for N, NP, Ts, BDs, Ws in grids:
            for T, BD, w in itertools.product(Ts, BDs, Ws):
                if quick and (T, BD, w) != DEFAULTS[(kernel, N)]:
                    continue
                out.append(dict(kernel=kernel, N=N, NP=NP, T=T, BD=BD, warps=w, spec=spec,
                                keep_ptx=(kernel, N, T, BD, w) == ("bwd", 16, 8, 8, 1)))
    return out


COLS = [
    ("kernel", "kernel", "{}"), ("maxnreg", "cap", "{}"), ("N", "N", "{}"), ("T", "T", "{}"), ("BD", "BD", "{}"), ("warps", "w", "{}"),
    ("elem_per_thr", "el/thr", "{}"), ("regs", "regs", "{}"), ("spill_st_B", "spillSt", "{}"),
    ("spill_ld_B", "spillLd", "{}"), ("stack_B", "stack", "{}"), ("smem_B", "smem", "{}"),
    ("sass_LDL", "LDL", "{}"), ("sass_STL", "STL", "{}"), ("sass_SHFL", "SHFL", "{}"),
    ("ptx_shfl_revscan", "rsSHFL", "{}"), ("sass_BAR", "BAR", "{}"),
    ("sass_EX2", "EX2", "{}"), ("sass_LDS", "LDS", "{}"), ("sass_STS", "STS", "{}"),
    ("sass_LDSM", "LDSM", "{}"), ("sass_STSM", "STSM", "{}"), ("sass_LDG", "LDG", "{}"),
    ("sass_STG", "STG", "{}"), ("sass_FFMA", "FFMA", "{}"), ("sass_FMUL", "FMUL", "{}"), ("sass_FADD", "FADD", "{}"),
    ("sass_total", "SASS", "{}"),
]


def format_table(rows) -> str:
    cells = [[h for _, h, _ in COLS]]
    for r in rows:
        mark = "*" if DEFAULTS[(r["kernel"], r["N"])] == (r["T"], r["BD"], r["warps"]) else ""
        c = [f.format(r[k]) for k, _, f in COLS]
        c[0] += mark
        cells.append(c)
    wid = [max(len(row[i]) for row in cells) for i in range(len(COLS))]
    lines = ["  ".join(v.rjust(wid[i]) for i, v in enumerate(row)) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def ranking(rows) -> str:
    """Per (kernel, N): the configs with spills, and the spill-free ones ranked by static SHFL + shared-memory ops."""
    out = []
    for kernel in ("fwd", "bwd"):
        for N in (16, 1):
            rs = [r for r in rows if r["kernel"] == kernel and r["N"] == N]
            if not rs:
                continue
            shm = lambda r: r["sass_LDS"] + r["sass_STS"] + r["sass_LDSM"] + r["sass_STSM"]
            ok = [r for r in rs if r["spill_st_B"] == 0 and r["spill_ld_B"] == 0 and r["stack_B"] == 0]
            bad = [r for r in rs if r not in ok]
            raw = lambda r: r["sass_SHFL"] + shm(r)
            norm = lambda r: raw(r) * r["warps"] / (r["T"] * r["BD"])
            cfg = lambda r: f"T{r['T']}/BD{r['BD']}/w{r['warps']}"
            out.append(f"{kernel} N={N}: {len(ok)}/{len(rs)} spill-free; spilling or stack: "
                       + (", ".join(f"{cfg(r)} ({r['spill_st_B']}/{r['spill_ld_B']} B)" for r in bad) or "none"))
            out.append("  spill-free, fewest static SHFL + shared-memory (LDS+STS+LDSM+STSM): "
                       + (", ".join(f"{cfg(r)} {raw(r)} ({r['sass_SHFL']} shfl + {shm(r)} smem)"
                                   for r in sorted(ok, key=lambda r: (raw(r), r["sass_total"]))[:6]) or "none"))
            out.append("  same count * warps / (T*BD): "
                       + (", ".join(f"{cfg(r)} {norm(r):.2f}" for r in sorted(ok, key=norm)[:6]) or "none"))
    return "\n" + "\n".join(out) + "\n"


def mix_summary(row) -> str:
    s, p = row["_sass_ops"], row["_ptx_ops"]
    top_s = ", ".join(f"{k} {v}" for k, v in Counter(s).most_common(15))
    top_p = ", ".join(f"{k} {v}" for k, v in Counter(p).most_common(15))
    keys = ["ptx_fma_f32", "ptx_mul_f32", "ptx_add_f32", "ptx_sub_f32", "ptx_ex2", "ptx_shfl", "ptx_shfl_revscan",
            "ptx_ld_shared", "ptx_st_shared", "ptx_ldmatrix", "ptx_stmatrix", "ptx_ld_global", "ptx_st_global", "ptx_ld_local", "ptx_st_local", "ptx_bar_sync",
            "ptx_bar_warp_sync", "ptx_total"]
    skeys = ["sass_FFMA", "sass_FMUL", "sass_FADD", "sass_EX2", "sass_MUFU", "sass_SHFL", "sass_LDS", "sass_STS",
             "sass_LDSM", "sass_STSM",
             "sass_LDG", "sass_STG", "sass_LDL", "sass_STL", "sass_BAR", "sass_FSEL", "sass_FSETP", "sass_total"]
    return "\n".join([
        "PTX  : " + ", ".join(f"{k[4:]}={row[k]}" for k in keys),
        "SASS : " + ", ".join(f"{k[5:]}={row[k]}" for k in skeys),
        "PTX  top opcodes : " + top_p,
        "SASS top opcodes : " + top_s,
        f"ptxas: {row['regs']} regs, {row['spill_st_B']} B spill stores, {row['spill_ld_B']} B spill loads, "
        f"{row['stack_B']} B stack, {row['barriers']} named barriers; Triton dynamic smem {row['smem_B']} B",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", choices=("runtime", "plain"), default="runtime")
    ap.add_argument("--out", default="ptx_report", help="output stem inside benchmarks/ptx_report/")
    ap.add_argument("--quick", action="store_true", help="only the current default configs")
    ap.add_argument("--maxnreg", type=int, nargs="*", default=[0],
                    help="register caps to compile each config with (0: none; Triton's maxnreg option)")
    ap.add_argument("-j", "--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = ap.parse_args()

    _import_scan()  # install once in the parent if needed
    todo = [dict(j, maxnreg=m) for j in jobs(args.spec, args.quick) for m in args.maxnreg]
    # keep Triton's cache out of ~/.triton unless the user chose one
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "ptx_report_triton_cache"))
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        rows = list(ex.map(run_one, todo))
    print(f"compiled {len(rows)} kernels in {time.time() - t0:.0f} s", file=sys.stderr)

    import triton

    ptxas_ver = subprocess.run([str(_nv_bin() / "ptxas"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    header = [
        "Triton scan kernels, AOT for GPUTarget('cuda', 90, 32) (sm_90a), no GPU used.",
        f"triton {triton.__version__}; ptxas: {ptxas_ver}; flags: -lineinfo -v --regAllocOptLevel=2 --gpu-name=sm_90a",
        f"spec={args.spec} (see ptx_report.py docstring); launch: fwd MODE=0 PHASE=0 HAS_H0=0 STORE_STATES=1, "
        "bwd DXMODE=0 PHASE=0 HAS_G0=0 DY_PER_ROUTE=0; HAS_D=HAS_BIAS=SOFTPLUS=1, X_PER_ROUTE=0, CT=fp32, bf16 I/O.",
        "Columns: el/thr = T*NP*BD/(32*warps) (elements of one [T,NP,BD] tensor per thread); regs / spillSt / spillLd /",
        "stack (bytes) from ptxas -v; smem = Triton's dynamic shared memory (metadata.shared, bytes);",
        "LDL..SASS = STATIC instruction counts in the cuobjdump -sass listing (LDL/STL local memory, SHFL, BAR = BAR.*,",
        "EX2 = MUFU.EX2, LDS/STS shared ld/st, LDSM/STSM ldmatrix/stmatrix (shared, used by layout conversions),",
        "LDG/STG global, FFMA/FMUL/FADD fp32, SASS = all instructions).",
        f"rsSHFL = PTX shfl instructions whose .loc is the backward's reverse associative_scan (triton_scan.py:{_reverse_scan_line()});",
        "0 for the forward.",
        "* = current default config (N=16: T=8 BD_fwd=16 BD_bwd=8 w=1; N=1: T=32 BD=16 w=1).",
        "",
    ]
    text = "\n".join(header) + format_table(rows) + "\n"
    nospill = [r for r in rows if r["spill_st_B"] == 0 and r["spill_ld_B"] == 0 and r["stack_B"] == 0]
    text += f"\nconfigs with no spills and no stack: {len(nospill)} of {len(rows)}\n"
    text += ranking(rows)
    bad = [r for r in rows if not r["sass_same_as_triton"]]
    text += f"SASS of the re-run ptxas identical (opcode histogram) to Triton's own cubin for {len(rows) - len(bad)} of {len(rows)}\n"
    dflt = [r for r in rows if "_ptx" in r]
    if dflt:
        r = dflt[0]
        (HERE / ("bwd_n16_default.ptx" if args.spec == "runtime" else f"bwd_n16_default_{args.spec}.ptx")).write_text(r["_ptx"])
        text += "\nInstruction mix, bwd N=16 T=8 BD=8 warps=1 (static counts):\n" + mix_summary(r) + "\n"
    out_txt = HERE / f"{args.out}.txt"
    out_txt.write_text(text)
    with open(HERE / f"{args.out}.csv", "w", newline="") as f:
        keys = [k for k in rows[0] if not k.startswith("_") and k != "keep_ptx"]
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    print(text)


if __name__ == "__main__":
    main()
