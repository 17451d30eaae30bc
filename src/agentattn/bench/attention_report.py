"""The output of the attention sweep (:mod:`agentattn.bench.attention`): its tables, crossover, plot, the issue's
goals and the paired-rounds report section."""

from __future__ import annotations

import statistics
from pathlib import Path

from .. import measure
from ..io import atomic_open
from .section import write_section


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (N, case), latency, ratio to agentattn, FLOP rate and peak memory."""
    lines = [
        "| N | B | case | fwd (ms) | × agentattn | fwd+bwd (ms) | × agentattn | fwd GFLOP/s | peak fwd (MiB) | peak fwd+bwd (MiB) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, fb = r["modes"].get("fwd", {}), r["modes"].get("fwd_bwd", {})
        lines.append(
            f"| {r['tokens']} | {r['batch']} | {r['case']} | {_ms(f)} | {_num(f, 'ratio')} | {_ms(fb)} | "
            f"{_num(fb, 'ratio')} | {_num(f, 'gflops_per_s', '.1f')} | {_num(f, 'peak_mb', '.0f')} | "
            f"{_num(fb, 'peak_mb', '.0f')} |"
        )
    return "\n".join(lines)


def _ms(r: dict) -> str:
    """A table cell of one mode's latency: its status, '–' when not timed, or the median (1 run marked)."""
    if "status" in r:
        return r["status"]
    if "ms" not in r:
        return "–"
    return f"{r['ms']:.2f}" + (" (1 run)" if r.get("runs") == 1 else "")


def _num(r: dict, key: str, fmt: str = ".2f") -> str:
    """A table cell of ``r[key]`` in ``fmt``, or '–' when absent."""
    return format(r[key], fmt) if key in r else "–"


def crossover(rows: list[dict], mode: str, other: str = "softmax-sdpa") -> float | None:
    """The N where agentattn's per-sample latency drops to ``other``'s (log-log interpolation), if any."""
    points = []
    for n in sorted({r["tokens"] for r in rows}):
        by = {r["case"]: r for r in rows if r["tokens"] == n}
        a, o = (
            by.get("agentattn", {}).get("modes", {}).get(mode, {}),
            by.get(other, {}).get("modes", {}).get(mode, {}),
        )
        if "ms" in a and "ms" in o:
            points.append((n, a["ms"], o["ms"]))
    return measure.crossover(points)


def plot(result: dict, path: str | Path) -> None:
    """Log-log per-sample latency against N (forward, fwd+bwd) and peak memory, crossover marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, mode, title in (
        (axes[0], "fwd", "forward (eval)"),
        (axes[1], "fwd_bwd", "forward+backward (train)"),
    ):
        for case in cases:
            pts = [
                (r["tokens"], r["modes"][mode]["ms"] / r["batch"])
                for r in rows
                if r["case"] == case and "ms" in r["modes"].get(mode, {})
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=case)
        cross = crossover(rows, mode)
        if cross is not None:
            ax.axvline(cross, color="gray", linestyle="--")
            ax.annotate(f"crossover N≈{cross:.0f}", (cross, 0.9), xycoords=("data", "axes fraction"))
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="ms per sample", title=title)
        ax.grid(True, which="both", alpha=0.3)
    for case in cases:
        pts = [
            (r["tokens"], r["modes"]["fwd"]["peak_mb"] / r["batch"])
            for r in rows
            if r["case"] == case
            and "peak_mb" in r["modes"].get("fwd", {})
            and r["modes"]["fwd"]["peak_mb"] > 0
        ]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=case)
    axes[2].set(
        xscale="log", yscale="log", xlabel="tokens N", ylabel="MiB per sample", title="peak memory, forward"
    )
    axes[2].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(
        f"{result['config']['label']} — {env['cpu']}, {env['threads']} threads, torch {env['torch']}"
    )
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def _row(rows: list[dict], case: str, tokens: int) -> dict:
    """The sweep row of ``case`` at ``tokens``, or an empty one."""
    return next((r for r in rows if r["case"] == case and r["tokens"] == tokens), {"modes": {}})


def attention_goals(result: dict) -> list[dict]:
    """The issue's attention goals, checked against one sweep."""
    rows = result["layers"]
    cfg = result["config"]
    goals: list[dict] = []
    deit = cfg["dim"] == 192 and cfg["heads"] == 3 and cfg["agents"] == 49
    for mode, label in (("fwd", "forward (eval)"), ("fwd_bwd", "forward+backward (train)")):
        r = _row(rows, "official", 197)
        ratio = r["modes"].get(mode, {}).get("ratio")
        ok = deit and r.get("batch") == 64 and ratio is not None
        value = f"{ratio:.2f}×" if ratio is not None else "–"
        per_round = r["modes"].get(mode, {}).get("round_ratios")
        if ratio is not None and per_round:
            value += f" (rounds {min(per_round):.2f}–{max(per_round):.2f}×)"
        goals.append(
            {
                "goal": f"DeiT-T block (B=64, N=197, C=192, 3 heads, 49 agents, cls): ≥ 1.3× faster than the official math, {label}",
                "value": value,
                "met": (ratio >= 1.3) if ok else None,
            }
        )
    for tokens, need in ((12545, 15.0), (50177, 50.0)):
        for mode, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
            r = _row(rows, "softmax-sdpa", tokens)
            res = r["modes"].get(mode, {})
            ratio = res.get("ratio")
            goals.append(
                {
                    "goal": f"N={tokens}, batch 1: ≥ {need:g}× faster than softmax SDPA, {label}",
                    "value": f"{ratio:.1f}×" if ratio is not None else res.get("status", "–"),
                    "met": (ratio >= need) if ratio is not None and r.get("batch") == 1 else None,
                }
            )
    for mode, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        ours = _row(rows, "agentattn", 12545)["modes"].get(mode, {}).get("peak_mb")
        expl = _row(rows, "softmax-explicit", 12545)["modes"].get(mode, {})
        sdpa = _row(rows, "softmax-sdpa", 12545)["modes"].get(mode, {}).get("peak_mb")
        value, met = "–", None
        if ours is not None and "peak_mb" in expl:
            value = f"{ours:.0f} MiB vs {expl['peak_mb']:.0f} MiB = 1/{expl['peak_mb'] / max(ours, 1e-9):.0f}"
            met = ours <= expl["peak_mb"] / 10
        elif ours is not None and "status" in expl:
            value = f"{ours:.0f} MiB vs materialised softmax: {expl['status']} ({expl.get('detail', '')})"
        if ours is not None and sdpa is not None:
            value += f"; SDPA (flash) {sdpa:.0f} MiB"
        goals.append(
            {
                "goal": f"N=12545: peak memory ≤ 1/10 of the materialised softmax's, {label}",
                "value": value,
                "met": met,
            }
        )
    op = result.get("op") or []
    for r in op:
        if r["tokens"] >= 3137:
            goals.append(
                {
                    "goal": f"op efficiency at N={r['tokens']} (B={r['batch']}): ≥ 35% of the fp32 matmul peak",
                    "value": f"{r['gflops_per_s']:.1f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of "
                    f"{r.get('peak_gflops_per_s', result['matmul_peak']['gflops_per_s']):.1f}",
                    "met": r["fraction_of_peak"] >= 0.35,
                }
            )
    return goals


def rounds_table(rows: list[dict]) -> str:
    """Markdown table of the paired per-round ratios (case time / agentattn time in the same round)."""
    lines = [
        "| N | B | case | mode | ratio of medians | per-round ratios: median | quartiles | range | rounds |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for mode, res in row["modes"].items():
            per_round = sorted(res.get("round_ratios", []))
            if row["case"] == "agentattn" or not per_round:
                continue
            quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            lines.append(
                f"| {row['tokens']} | {row['batch']} | {row['case']} | {mode} | {res['ratio']:.2f}× | "
                f"{statistics.median(per_round):.2f}× | {quartiles[0]:.2f}–{quartiles[2]:.2f}× | "
                f"{per_round[0]:.2f}–{per_round[-1]:.2f}× | {len(per_round)} |"
            )
    return "\n".join(lines)


def write_rounds_section(result: dict, path: str | Path) -> None:
    """A report section for a focused run (e.g. the DeiT-T goal config with many rounds)."""
    config = result["config"]
    markdown = (
        f"Config: {config['label']}; {config['rounds']} interleaved rounds, {config['budget_s']:g} s per case and "
        "mode. Each round times every case in turn; a per-round ratio divides a case's time by agentattn's in the "
        "same round, so a slow spell of the machine hits both sides of it.\n\n"
        + rounds_table(result["layers"])
    )
    goals = [g for g in attention_goals(result) if g["met"] is not None]
    tokens = ", ".join(str(n) for n in sorted({r["tokens"] for r in result["layers"]}))
    write_section(
        path, f"Attention layers: paired rounds at N = {tokens}", result["command"], result["environment"],
        markdown, goals,
    )  # fmt: skip
