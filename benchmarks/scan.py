"""Selective-scan operator on the GPU: correctness against an fp64 reference, then timing.

To run (on a CUDA machine, from the repo root):
    python benchmarks/scan.py --check --bench [--mamba-ssm-src .bench_deps/mamba_ssm_selective_scan] \
        [--out results_dir]

--check: fp32 and bf16 inputs at real sequence lengths (reduced batch), forward and all gradients
         against the fp64 reference (kernels/reference.py run on the GPU in float64), relative
         Frobenius error; outputs poisoned with NaN (MAMBA_DENSE_POISON=1) so an unwritten
         element fails; fresh random inputs each run (seeded from the clock, seed printed).
--bench: the issue's shapes S1..S5, bf16 inputs, forward and forward+backward medians
         (triton.testing.do_bench), achieved bandwidth, ratio to the byte floor
         (minimal bytes / 3.0 TB/s), side by side with mamba_ssm's CUDA selective_scan when its
         csrc/selective_scan sources are given (built here for sm_90 with torch.utils.cpp_extension;
         it is given its best case: inputs already laid out as (b, K*D, L), no cross-scan copies).
--impl:  forward implementations to run --check and --bench with, one after the other, e.g.
         ``--impl default,seq``: "default" (triton_scan.py) or "seq" (the experimental sequential
         forward, kernels/triton_scan_seq.py; the backward is the same), each set through
         MAMBA_DENSE_SCAN_IMPL around its runs. "seq=BD/warps/stages[/prefetch[/programs_per_sm]]"
         also sets MAMBA_DENSE_SEQ_CFG (and MAMBA_DENSE_SEQ_PROGRAMS_PER_SM) for that entry, so
         several tunings compare in one call: ``--impl default,seq,seq=64/1/1/1,seq=32/1/1/1/32``.
         Without --impl nothing is set (whatever the environment selects runs, as before).
         mamba_ssm is timed with the first entry only; a side-by-side table ends the run.
--shapes S1,S4: only the shapes whose names start with one of these; --fwd-only: skip the
         forward+backward timing.
--kernel-times: also the summed CUDA kernel time of one call (torch.profiler, mean of 20), ours and
         mamba_ssm's: do_bench includes host time, which sets the pace of a small shape (S3).

--graphs: also the forward + backward captured once in a CUDA graph and replayed under do_bench, ours and
         mamba_ssm's through autograd (as torch.compile(mode="reduce-overhead") or
         torch.cuda.make_graphed_callables would run them): no host time per call.

mamba_ssm's forward + backward is timed two ways: its extension's fwd and bwd called back to back (its
best case, column "mss f+b"), and through an autograd.Function that calls them as mamba_ssm's
selective_scan_fn does, with torch.autograd.grad over leaves that require grad ("mss fn f+b"): the same
harness as ours (autograd engine included), the comparison that counts where host time sets the pace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bootstrap  # noqa: E402,F401  (mamba_dense importable without an install)

COPY_RATE = 3.0e12  # bytes/s, measured device-to-device copy of an H100 (read + write)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_inputs(batch, L, K, D, N, dtype, device, gen):
    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, device=device) * scale)

    x = r(batch, L, D).to(dtype)
    dt = (r(batch, L, K, D, scale=0.5) - 1.0).to(dtype)
    B = r(batch, L, K, N).to(dtype)
    C = r(batch, L, K, N).to(dtype)
    A = -torch.exp(r(K, D, N, scale=0.5))  # negative, fp32 parameter as in the models
    Dp = r(K, D)
    bias = r(K, D, scale=0.3)
    return x, dt, A, B, C, Dp, bias


def shape_cases(prefixes: str, device, seed: int):
    """The SHAPES whose names start with one of the comma-separated prefixes (a prefix ending in "$":
    the whole name, e.g. "S5 volume 64^3 b2 N1$" without the N16 shape), as (name, N, route,
    inputs, leaves, dy): bf16 inputs (x, dt, A, B, C, D, dt_bias) from make_inputs, the same as
    leaves that require grad, and a bf16 dy of the output's shape; a generator seeded with seed
    for each shape."""
    from mamba_dense.kernels import routes

    for name, batch, L, K, D, N, rdesc in SHAPES:
        if not any(name == p[:-1] if p.endswith("$") else name.startswith(p) for p in prefixes.split(",")):
            continue
        gen = torch.Generator(device=device).manual_seed(seed)
        route = getattr(routes, rdesc[0])(*rdesc[1:]).to(device)
        inputs = make_inputs(batch, L, K, D, N, torch.bfloat16, device, gen)
        leaves = [t.detach().requires_grad_() for t in inputs]
        dy = torch.randn(batch, L, D, device=device, dtype=torch.bfloat16, generator=gen)
        yield name, N, route, inputs, leaves, dy


def reference_errors(leaves, route, merge: str, gen) -> dict:
    """Relative errors of selective_scan's output and its seven gradients against the fp64 reference
    from the same (rounded) inputs, for a random fp64 dy drawn from gen."""
    from mamba_dense.kernels import selective_scan, selective_scan_ref

    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = selective_scan_ref(*ref_in, route=route, merge=merge)
    dy = torch.randn(y_ref.shape, generator=gen, device=y_ref.device, dtype=torch.float64)
    g_ref = torch.autograd.grad(y_ref, ref_in, dy)
    ins = [t.detach().clone().requires_grad_() for t in leaves]
    y = selective_scan(*ins, route=route, merge=merge)
    g = torch.autograd.grad(y, ins, dy.to(y.dtype))
    if y.is_cuda:
        torch.cuda.synchronize()
    errs = {"y": rel(y, y_ref)}
    for nm, a, b in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dbias"), g, g_ref):
        errs[nm] = rel(a, b)
    return errs


def check(device, seed, out_rows):
    from mamba_dense.kernels import routes

    os.environ["MAMBA_DENSE_POISON"] = "1"
    gen = torch.Generator(device=device).manual_seed(seed)
    cases = [
        # name, batch, route builder, L, D, N, merge
        ("cross2d 56x56 D96 N1", 2, lambda: routes.cross2d(56, 56), 56 * 56, 96, 1, "sum"),
        # S1's own batch: chunked and merged by route pairs since session 22 (PAIR_MIN_PROGRAMS_PER_SM)
        ("cross2d 56x56 D96 N1 b64 (S1)", 64, lambda: routes.cross2d(56, 56), 56 * 56, 96, 1, "sum"),
        ("cross2d 256x256 D96 N1 (chunk-parallel)", 1, lambda: routes.cross2d(256, 256), 65536, 96, 1, "sum"),
        ("cross2d 56x56 D192 N16", 2, lambda: routes.cross2d(56, 56), 56 * 56, 192, 16, "sum"),
        ("localmamba 30x45 D64 N16 merge=none", 2,
         lambda: routes.localmamba(30, 45, ("h_flip", "v", "w2", "w7_flip")), 30 * 45, 64, 16, "none"),
        ("segmamba3d 32^3 D48 N1", 1, lambda: routes.segmamba3d(32, 32, 32), 32 ** 3, 48, 1, "sum"),
        ("segmamba3d 16^3 D48 N16", 2, lambda: routes.segmamba3d(16, 16, 16), 16 ** 3, 48, 16, "sum"),
        ("registers bidirectional L=197+4 D40 N4", 3,
         lambda: routes.with_registers(routes.bidirectional(197), 197, 4), 201, 40, 4, "sum"),
    ]
    worst = {}
    for name, batch, rb, L, D, N, merge in cases:
        route = rb().to(device)
        K = route.shape[0]
        for dtype in (torch.float32, torch.bfloat16):
            x, dt, A, B, C, Dp, bias = make_inputs(batch, L, K, D, N, dtype, device, gen)
            errs = reference_errors([x, dt, A, B, C, Dp, bias], route, merge, gen)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            ok = all(e == e and e < tol for e in errs.values())
            row = {"case": name, "dtype": str(dtype), "tol": tol, "ok": ok, **errs}
            out_rows.append(row)
            print(f"{'PASS' if ok else 'FAIL'} {name:45s} {str(dtype):15s} " +
                  " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
            worst[(name, str(dtype))] = ok
            del x, dt, A, B, C, Dp, bias, errs
            torch.cuda.empty_cache()
    os.environ["MAMBA_DENSE_POISON"] = "0"
    return all(worst.values())


class MssScanFn(torch.autograd.Function):
    """mamba_ssm's extension behind autograd, as its selective_scan_fn wraps it (no z, no last state):
    the forward saves the inputs and the chunk states x, the backward calls bwd with them."""

    @staticmethod
    def forward(ctx, mss, u, delta, A, B, C, D, delta_bias):
        out, xs, *_ = mss.fwd(u, delta, A, B, C, D, None, delta_bias, True)
        ctx.mss = mss
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, xs)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, delta_bias, xs = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias, *_ = ctx.mss.bwd(
            u, delta, A, B, C, D, None, delta_bias, dout.contiguous(), xs, None, None, True, False)
        return None, du, ddelta, dA, dB, dC, dD, dbias


def mss_layout(x, dt, A, B, C, Dp, bias) -> tuple:
    """Our inputs in mamba_ssm's layout, (u, delta, A, B, C, D, delta_bias): x copied to every route as
    (b, K*D, L), dt as (b, K*D, L), B and C as (b, K, N, L) groups, A (K*D, N), D and the bias flat."""
    batch, L, K, D = dt.shape
    N = A.shape[2]
    u = x.transpose(1, 2).reshape(batch, 1, D, L).expand(batch, K, D, L).reshape(batch, K * D, L).contiguous()
    de = dt.permute(0, 2, 3, 1).reshape(batch, K * D, L).contiguous()
    Bm, Cm = B.permute(0, 2, 3, 1).contiguous(), C.permute(0, 2, 3, 1).contiguous()
    return (u, de, A.reshape(K * D, N).contiguous(), Bm, Cm, Dp.reshape(-1).contiguous(),
            bias.reshape(-1).contiguous())


def graph_ms(fn) -> float:
    """do_bench median of replaying fn (its kernels, autograd's backward included) captured once in a
    CUDA graph, after warm-up calls on a side stream (as torch.cuda.make_graphed_callables does)."""
    import triton

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")


def build_mamba_ssm(src: str):
    from torch.utils.cpp_extension import load

    src = Path(src)
    files = [str(src / "selective_scan.cpp")] + sorted(str(p) for p in src.glob("selective_scan_*.cu"))
    flags = [
        "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
        "-gencode", "arch=compute_90,code=sm_90",
    ]
    t0 = time.time()
    mod = load(name="selective_scan_cuda", sources=files, extra_cuda_cflags=flags,
               extra_cflags=["-O3", "-std=c++17"], extra_include_paths=[str(src)], verbose=False)
    print(f"built mamba_ssm selective_scan_cuda in {time.time() - t0:.0f} s", flush=True)
    return mod


SHAPES = [
    # name, batch, L, K, D, N, route
    ("S1 VMamba-T st1 224 b64", 64, 3136, 4, 96, 1, ("cross2d", 56, 56)),
    ("S2 VMamba-T st1 512 b16", 16, 16384, 4, 96, 1, ("cross2d", 128, 128)),
    ("S3 VMamba-T st1 1024 b1", 1, 65536, 4, 96, 1, ("cross2d", 256, 256)),
    ("S4 vanilla st1 b32 N16", 32, 3136, 4, 192, 16, ("cross2d", 56, 56)),
    ("S5 volume 64^3 b2 N1", 2, 262144, 3, 48, 1, ("segmamba3d", 64, 64, 64)),
    ("S5 volume 64^3 b2 N16", 2, 262144, 3, 48, 16, ("segmamba3d", 64, 64, 64)),
]


def floor_bytes(batch, L, K, D, N, es=2):
    x = batch * L * D * es
    dt = batch * L * K * D * es
    bc = 2 * batch * L * K * N * es
    fwd = x + dt + bc + x  # read x, dt, B, C; write y
    bwd = (x + dt + bc + x) + (x + dt + bc)  # read x, dt, B, C, dy; write dx, ddt, dB, dC
    return fwd, fwd + bwd


IMPL_ENV = ("MAMBA_DENSE_SCAN_IMPL", "MAMBA_DENSE_SEQ_CFG", "MAMBA_DENSE_SEQ_PROGRAMS_PER_SM")


def parse_impls(spec: str) -> list[tuple[str, dict]]:
    """'default,seq,seq=64/1/1/1/32' -> [(label, environment to set), ...]."""
    out = []
    for item in (v.strip() for v in spec.split(",")):
        name, _, cfg = item.partition("=")
        if name not in ("default", "seq") or (cfg and name != "seq"):
            raise SystemExit(f"--impl: unknown entry {item!r} (default, seq or seq=BD/warps/stages[/prefetch[/pps]])")
        env = {"MAMBA_DENSE_SCAN_IMPL": name}
        if cfg:
            f = cfg.split("/")
            if len(f) not in (3, 4, 5):
                raise SystemExit(f"--impl: {item!r}: expected seq=BD/warps/stages[/prefetch[/programs_per_sm]]")
            env["MAMBA_DENSE_SEQ_CFG"] = ",".join(f[:4])
            if len(f) == 5:
                env["MAMBA_DENSE_SEQ_PROGRAMS_PER_SM"] = f[4]
        out.append((item, env))
    return out


@contextlib.contextmanager
def impl_env(env: dict):
    """Set the implementation's variables for the block, then put the previous values back."""
    saved = {k: os.environ.get(k) for k in IMPL_ENV}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def profile_trace(fn, calls: int = 20):
    """A torch.profiler trace (CUDA activity) of `calls` calls of fn, after 3 warm-up calls."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return p


def kernel_profile(fn, calls: int = 20) -> tuple[float, dict[str, float]]:
    """(summed CUDA kernel ms of one call of fn, {kernel name: us per call}): the mean over `calls` calls
    in a torch.profiler trace after 3 warm-up calls (no host time in it; the measure to compare kernels
    by where the host sets the pace). Also used by benchmarks/scan_kernels.py."""
    ev = [e for e in profile_trace(fn, calls).key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in ev) / calls / 1e3
    return total, {e.key[:40]: round(e.self_device_time_total / calls, 1) for e in ev}


def kernel_ms(fn, calls: int = 20) -> float:
    """Summed CUDA kernel ms of one call of fn (kernel_profile)."""
    return kernel_profile(fn, calls)[0]


def bench(device, mss, out_rows, impl="", shapes=None, fwd_only=False, kernels=False, graphs=False):
    import triton

    from mamba_dense.kernels import routes, selective_scan
    from mamba_dense.kernels import triton_scan_seq

    gen = torch.Generator(device=device).manual_seed(1234)
    if impl:
        print(f"\n== impl {impl} ({', '.join(f'{k}={os.environ.get(k)}' for k in IMPL_ENV if os.environ.get(k))})",
              flush=True)
    print(f"\n{'shape':28s} {'fwd ms':>8s} {'floor':>7s} {'x':>5s} {'GB/s':>6s} | {'f+b ms':>8s} {'floor':>7s} {'x':>5s}"
          f" | {'mss fwd':>8s} {'mss f+b':>8s} {'spd fwd':>7s} {'spd f+b':>7s}", flush=True)
    for name, batch, L, K, D, N, rdesc in SHAPES:
        if shapes and not any(name.startswith(p) for p in shapes):
            continue
        route = getattr(routes, rdesc[0])(*rdesc[1:]).to(device)
        x, dt, A, B, C, Dp, bias = make_inputs(batch, L, K, D, N, torch.bfloat16, device, gen)
        fb, fbb = floor_bytes(batch, L, K, D, N)
        plan = None
        if triton_scan_seq.impl() == "seq":
            plan = triton_scan_seq.seq_plan(batch, L, D, N, K, route.shape[1], torch.bfloat16, device)
            print(f"  seq plan {name}: {plan}", flush=True)
        with torch.no_grad():
            t_f = triton.testing.do_bench(lambda: selective_scan(x, dt, A, B, C, Dp, bias, route=route),
                                          warmup=50, rep=300, return_mode="median")
        ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, Dp, bias)]
        dy = torch.randn(batch, L, D, device=device, dtype=torch.bfloat16, generator=gen)

        def fwbw():
            y = selective_scan(*ins, route=route)
            torch.autograd.grad(y, ins, dy)

        t_fb = float("nan") if fwd_only else triton.testing.do_bench(fwbw, warmup=50, rep=300, return_mode="median")
        t_graph = graph_ms(fwbw) if graphs and not fwd_only else float("nan")
        row = dict(impl=impl or triton_scan_seq.impl(), seq_plan=plan,
                   shape=name, fwd_ms=t_f, fwd_floor_ms=fb / COPY_RATE * 1e3, fwdbwd_ms=t_fb,
                   fwdbwd_floor_ms=fbb / COPY_RATE * 1e3, fwd_GBps=fb / (t_f * 1e-3) / 1e9)
        m_f = m_fb = float("nan")
        if mss is not None:
            u, de, Am, Bm, Cm, Dm_, bm = mss_layout(x, dt, A, B, C, Dp, bias)
            m_f = triton.testing.do_bench(lambda: mss.fwd(u, de, Am, Bm, Cm, Dm_, None, bm, True),
                                          warmup=50, rep=300, return_mode="median")
            out, xs, *_ = mss.fwd(u, de, Am, Bm, Cm, Dm_, None, bm, True)
            dout = torch.randn_like(out)

            def mfb():
                o, xs_, *_ = mss.fwd(u, de, Am, Bm, Cm, Dm_, None, bm, True)
                mss.bwd(u, de, Am, Bm, Cm, Dm_, None, bm, dout, xs_, None, None, True, False)

            m_fb = triton.testing.do_bench(mfb, warmup=50, rep=300, return_mode="median")
            mins = [t.detach().requires_grad_() for t in (u, de, Am, Bm, Cm, Dm_, bm)]

            def mfn():
                torch.autograd.grad(MssScanFn.apply(mss, *mins), mins, dout)

            m_fn = triton.testing.do_bench(mfn, warmup=50, rep=300, return_mode="median")
            row["mss_fn_fwdbwd_ms"] = m_fn
            if graphs and not fwd_only:
                row["mss_graph_fwdbwd_ms"] = graph_ms(mfn)
            print(f"  mamba_ssm through autograd (selective_scan_fn's harness), f+b ms: {m_fn:.3f}"
                  f" (ours {t_fb:.3f}: {m_fn / t_fb:.2f}x)", flush=True)
        row.update(mss_fwd_ms=m_f, mss_fwdbwd_ms=m_fb, graph_fwdbwd_ms=t_graph)
        if graphs and not fwd_only:
            m_g = row.get("mss_graph_fwdbwd_ms", float("nan"))
            print(f"  CUDA graph replay, f+b ms: ours {t_graph:.3f}, mamba_ssm through autograd {m_g:.3f}"
                  f" ({m_g / t_graph:.2f}x)", flush=True)
        if kernels:
            # the same calls' kernel time alone (profiler), ours and mamba_ssm's
            with torch.no_grad():
                row["fwd_kernel_ms"] = kernel_ms(lambda: selective_scan(x, dt, A, B, C, Dp, bias, route=route))
            row["fwdbwd_kernel_ms"] = float("nan") if fwd_only else kernel_ms(fwbw)
            if mss is not None:
                row["mss_fwd_kernel_ms"] = kernel_ms(lambda: mss.fwd(u, de, Am, Bm, Cm, Dm_, None, bm, True))
                row["mss_fwdbwd_kernel_ms"] = kernel_ms(mfb)
            print(f"  kernels only, ms: ours {row['fwd_kernel_ms']:.3f} / {row['fwdbwd_kernel_ms']:.3f}, mamba_ssm "
                  f"{row.get('mss_fwd_kernel_ms', float('nan')):.3f} / {row.get('mss_fwdbwd_kernel_ms', float('nan')):.3f}",
                  flush=True)
        out_rows.append(row)
        print(f"{name:28s} {t_f:8.3f} {row['fwd_floor_ms']:7.3f} {t_f / row['fwd_floor_ms']:5.2f} "
              f"{row['fwd_GBps']:6.0f} | {t_fb:8.3f} {row['fwdbwd_floor_ms']:7.3f} {t_fb / row['fwdbwd_floor_ms']:5.2f}"
              f" | {m_f:8.3f} {m_fb:8.3f} {m_f / t_f:7.2f} {m_fb / t_fb:7.2f}", flush=True)
        del x, dt, B, C, ins, dy
        torch.cuda.empty_cache()


def summary(rows, labels):
    """Side-by-side forward (and forward+backward) medians of the implementations, ms."""
    by = {(r["impl"], r["shape"]): r for r in rows}
    names = [r["shape"] for r in rows if r["impl"] == labels[0]]
    print("\nfwd ms / f+b ms per implementation (speed-up vs the first in brackets)", flush=True)
    print(f"{'shape':28s} " + " ".join(f"{lb[:30]:>31s}" for lb in labels), flush=True)
    for nm in names:
        base = by[(labels[0], nm)]
        cells = []
        for lb in labels:
            r = by.get((lb, nm))
            if r is None:
                cells.append(f"{'-':>31s}")
                continue
            cells.append(f"{r['fwd_ms']:7.3f} ({base['fwd_ms'] / r['fwd_ms']:4.2f}x) {r['fwdbwd_ms']:7.3f} "
                         f"({base['fwdbwd_ms'] / r['fwdbwd_ms']:4.2f}x)")
        print(f"{nm:28s} " + " ".join(cells), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--mamba-ssm-src", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--impl", default=None, help="comma-separated: default, seq, seq=BD/warps/stages[/prefetch[/pps]]")
    ap.add_argument("--shapes", default=None, help="comma-separated name prefixes, e.g. S1,S4 (default: all)")
    ap.add_argument("--fwd-only", action="store_true", help="time the forward only")
    ap.add_argument("--kernel-times", action="store_true",
                    help="also the summed CUDA kernel time of the same calls (torch.profiler), ours and mamba_ssm's")
    ap.add_argument("--graphs", action="store_true",
                    help="also forward + backward replayed from a CUDA graph, ours and mamba_ssm's through autograd")
    args = ap.parse_args()
    impls = parse_impls(args.impl) if args.impl else [("", {})]
    shapes = [v.strip() for v in args.shapes.split(",")] if args.shapes else None
    device = torch.device("cuda")
    import triton

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), cmd=" ".join(sys.argv))
    print(info, flush=True)
    res = {"info": info, "check": [], "bench": []}
    ok = True
    if args.check:
        seed = int(time.time()) % 100000
        print(f"check seed {seed}")
        for label, env in impls:
            with impl_env(env):
                if label:
                    print(f"== check impl {label}", flush=True)
                n0 = len(res["check"])
                ok_i = check(device, seed, res["check"])
                for row in res["check"][n0:]:
                    row["impl"] = label or "env"
            ok = ok and ok_i
            if label:
                print("CHECK", label, "PASSED" if ok_i else "FAILED", flush=True)
        print("CHECK", "PASSED" if ok else "FAILED", flush=True)
    if args.bench:
        mss = None
        if args.mamba_ssm_src:
            try:
                mss = build_mamba_ssm(args.mamba_ssm_src)
            except Exception as e:  # report and go on without the peer
                print(f"mamba_ssm build failed: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
        for i, (label, env) in enumerate(impls):
            with impl_env(env):
                bench(device, mss if i == 0 else None, res["bench"], label, shapes, args.fwd_only, args.kernel_times,
                      args.graphs)
        if len(impls) > 1:
            summary(res["bench"], [label for label, _ in impls])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "scan_results.json").write_text(json.dumps(res, indent=1, default=str))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
