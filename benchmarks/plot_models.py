"""Plot the resolution sweep of ``benchmarks/models.py``: time per image and peak memory vs resolution.

To run (anywhere matplotlib is installed: ``pip install -e ".[bench]"`` or ``pip install matplotlib``):
    python3 benchmarks/plot_models.py path/to/models.json [--out models_resolution.png]

Reads the ``sweep`` rows of ``models.json`` (backbone inference at batch 1, bf16) and writes a PNG
with two log-log panels, one line per backbone (ours solid, timm's dashed): milliseconds per image
and peak GiB against the image side in pixels. Resolutions that ran out of memory are marked with a
cross at the top of the panel. Dotted guides, ending at DeiT-S's largest point, show cost
proportional to the pixels (linear in tokens) and to the pixels squared (global attention); a
vertical line marks the first resolution from which ``vmamba_tiny`` is faster than ``deit_small``
at every larger one (the crossover ``models.py`` prints). The default output is
``models_resolution.png`` beside the JSON (or in the current folder when that one is read-only).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

OURS_STYLE = {"linestyle": "-", "marker": "o"}
PEER_STYLE = {"linestyle": "--", "marker": "s"}


def sweep_series(result: dict) -> dict[str, dict]:
    """model -> {"ours": bool, "ok": [(size, ms, GiB)], "oom": [size]} from the sweep rows."""
    series: dict[str, dict] = {}
    for r in result["rows"]:
        if r.get("case") != "sweep":
            continue
        s = series.setdefault(r["model"], {"ours": bool(r.get("ours")), "ok": [], "oom": []})
        if r["status"] == "ok":
            s["ok"].append((r["size"], r["ms"], r.get("peak_gib")))
        elif r["status"] == "OOM":
            s["oom"].append(r["size"])
    for s in series.values():
        s["ok"].sort()
    return series


def guides(ax, sizes: list[int], anchor: tuple[int, float], bottom: float) -> None:
    """Dotted lines ending at ``anchor`` (the peer's largest point) that grow like pixels (r^2) and
    pixels^2 (r^4), drawn leftwards down to ``bottom``."""
    r1, y1 = anchor
    for power, label in ((2, "∝ pixels"), (4, "∝ pixels²")):
        x0 = max(min(sizes), r1 * (bottom / y1) ** (1 / power))
        y0 = y1 * (x0 / r1) ** power
        ax.plot([x0, r1], [y0, y1], linestyle=":", color="0.6", linewidth=1)
        xm = (x0 * r1) ** 0.5
        ax.annotate(label, (xm, y1 * (xm / r1) ** power), textcoords="offset points", xytext=(4, -8), fontsize=7,
                    color="0.45")


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    series = sweep_series(result)
    if not series:
        raise SystemExit("no sweep rows in the JSON: run models.py with the 'sweep' case")
    sizes = sorted({x[0] for s in series.values() for x in s["ok"]} | {x for s in series.values() for x in s["oom"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, column, ylabel in ((axes[0], 1, "ms per image (batch 1)"), (axes[1], 2, "peak memory (GiB)")):
        tops = []
        for i, (model, s) in enumerate(series.items()):
            pts = [(x[0], x[column]) for x in s["ok"] if x[column] is not None]
            style = OURS_STYLE if s["ours"] else PEER_STYLE
            color = colors[i % len(colors)]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, label=model, markersize=4, **style)
                tops.append(max(y for _, y in pts))
            elif s["oom"]:
                ax.plot([], [], color=color, label=model, **style)
            s["color"] = color
        if not tops:
            ax.text(0.5, 0.5, "no measurement (CPU run: no memory figures)", transform=ax.transAxes, ha="center")
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        lo = min(y for s in series.values() for x in s["ok"] if (y := x[column]) is not None)
        top = max(tops) * 3
        ax.set_ylim(lo / 2, top)
        for s in series.values():  # out of memory: a cross at the top of the panel
            for size in s["oom"]:
                ax.plot([size], [top / 1.35], marker="x", color=s["color"], markersize=9, mew=2, linestyle="none")
                ax.annotate("OOM", (size, top / 1.35), textcoords="offset points", xytext=(5, -3), fontsize=7,
                            color=s["color"])
        peer = next((s for m, s in series.items() if m == "deit_small" and s["ok"]), None)
        if column == 1 and peer is not None:
            guides(ax, sizes, (peer["ok"][-1][0], peer["ok"][-1][1]), lo / 1.6)
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(x) for x in sizes])
        ax.set_xlabel("image side (px), square input")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        cross = next((c for c in result.get("summary", {}).get("crossover", []) if c["ours"] == "vmamba_tiny"), None)
        if cross and cross.get("first_faster_from"):
            x = cross["first_faster_from"]
            ax.axvline(x, color="0.3", linewidth=0.8, linestyle="-.")
            if column == 1:
                ax.annotate(f"vmamba_tiny faster than\ndeit_small from {x} px", (x, lo / 1.6),
                            textcoords="offset points", xytext=(-4, 2), ha="right", fontsize=7, color="0.3")
    axes[0].legend(fontsize=8, loc="upper left", title="solid: ours, dashed: timm", title_fontsize=7)
    env = result.get("env", {})
    fig.suptitle(f"Backbone inference vs resolution, bf16, batch 1 — {env.get('device', '?')}, "
                 f"torch {env.get('torch', '?')}, {env.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="?", default="models.json", help="models.json written by benchmarks/models.py")
    p.add_argument("--out", default=None, help="PNG path (default: models_resolution.png beside the JSON)")
    args = p.parse_args(argv)
    src = Path(args.json)
    result = json.loads(src.read_text())
    out = Path(args.out) if args.out else src.with_name("models_resolution.png")
    if args.out is None and not os.access(out.parent, os.W_OK):
        out = Path("models_resolution.png")
    plot(result, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
