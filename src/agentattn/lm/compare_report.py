"""The output of ``agentattn lm compare`` (:mod:`agentattn.lm.compare`): ``report.md``, ``results.json``, the loss
and speed figures, and the comparison as a ``bench report`` section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .model import ATTN_TYPES


def _plot_losses(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """loss_curves.png: smoothed train and subset val bpb of every run; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        hist = res["history"]
        tokens = [r["tokens"] / 1e6 for r in hist]
        # smoothed train curve (moving average over 20 steps)
        raw = [r["train_bpb"] for r in hist]
        smooth = [
            sum(raw[max(0, i - 19) : i + 1]) / len(raw[max(0, i - 19) : i + 1]) for i in range(len(raw))
        ]
        axes[0].plot(tokens, smooth, label=name)
        val = [(r["tokens"] / 1e6, r["val_bpb"]) for r in hist if "val_bpb" in r]
        axes[1].plot([a for a, _ in val], [b for _, b in val], marker="o", label=name)
    for ax, title in zip(axes, ("train bpb (20-step mean)", "val bpb (subset)"), strict=True):
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("bits per byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    from ..report.figures import save_figure  # after the matplotlib check: it imports pyplot

    save_figure(fig, path, dpi=110)
    return True


def _plot_speed(rows: list[dict[str, Any]], path: Path) -> bool:
    """speed_vs_context.png: one-layer forward time of every mixer against T; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    contexts = [r["context"] for r in rows]
    for name in (n for n in ATTN_TYPES if f"{n}_ms" in rows[0]):
        ax.plot(contexts, [r[f"{name}_ms"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length T")
    ax.set_ylabel("one-layer forward (ms, batch 1)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    from ..report.figures import save_figure  # after the matplotlib check: it imports pyplot

    save_figure(fig, path, dpi=110)
    return True


def _write_outputs(out_dir: Path, summary: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """results.json (the summary and every run's loss history), report.md, and the figures."""
    first_seed = {n: r for n, r in results.items() if r["seed"] == summary["seeds"][0]}
    # Merged results may come without their loss histories (results.json files stripped of them): no figure then.
    has_loss_png = all(r["history"] for r in first_seed.values()) and _plot_losses(
        first_seed, out_dir / "loss_curves.png"
    )
    speed_rows = summary["speed"]
    has_speed_png = bool(speed_rows) and _plot_speed(speed_rows, out_dir / "speed_vs_context.png")
    atomic_write_text(out_dir / "results.json", json.dumps(
        {**summary, "history": {n: r["history"] for n, r in results.items()}}, indent=1))  # fmt: skip
    atomic_write_text(out_dir / "report.md", render_report(summary, has_loss_png, has_speed_png))


def write_compare_section(path: str | Path, summary: dict[str, Any], environment: dict[str, Any]) -> None:
    """The comparison as a ``bench report`` section (rendered into BENCHMARKS.md): the report's tables, titled by
    what was compared. ``summary`` is what :func:`run_compare` returns (``results.json`` without ``history``)."""
    from ..bench.section import write_section

    seeds, convs = summary["seeds"], summary["conv_kernels"]
    title = (
        f"Language modelling quality: {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, causal conv "
        f"{' / '.join(str(k) for k in convs)}, contexts {' / '.join(f'{m}x' for m in summary['context_multiples'])}"
    )
    if summary["model_config"].get("window_positions") == "rope":
        title += ", agent with rotary logits in its exact window"
    body = render_report(summary, False, False).split("\n", 2)[2]  # without the report's own title
    write_section(path, title, summary.get("command") or "agentattn lm compare", environment, body)


def render_report(s: dict[str, Any], loss_png: bool, speed_png: bool) -> str:
    """report.md of a comparison summary (``results.json``), linking the figures that were written."""
    mc, tc = s["model_config"], s["train_config"]
    seeds, convs = s.get("seeds", [tc["seed"]]), s.get("conv_kernels", [mc.get("conv_kernel", 4)])
    lines = [
        "# Causal agent attention against softmax (Transformer++), linear and retention twins (byte-level LM)",
        "",
        f"Data: `{s['data']}`, 90/5/5 contiguous split; bits per byte over the whole validation and test splits "
        f"(non-overlapping windows of {tc['seq_len']} bytes, and of {', '.join(f'{m}×' for m in s.get('context_multiples', [1]))} "
        "that length).",
        f"Model: d_model {mc.get('d_model', 128)}, {mc.get('n_layers', 4)} layers, {mc.get('n_heads', 4)} heads, "
        f"RMSNorm; softmax positions: {mc.get('positions', 'rope')}; agent: {mc.get('agent_num', mc.get('num_agents', 16))} agents, "
        f"chunk {mc.get('chunk_size', 32)}{', rotary in the window' if mc.get('window_positions') == 'rope' else ''}; causal conv kernels compared: {convs} (0 = off).",
        f"Training: {tc['steps']} steps × {tc['batch_size']} × {tc['seq_len']} bytes, AdamW lr {tc['lr']}, "
        f"seeds {seeds}; {s['threads']} threads; wall time {s['wall_time_s'] / 60:.1f} min.",
    ]
    if s.get("time_budget_s") and s.get("requested_steps") != tc["steps"]:
        lines.append(
            f"The step count was capped from {s['requested_steps']} to {tc['steps']} (the same for every run) "
            f"to fit the {s['time_budget_s'] / 60:.0f}-minute budget, from timed steps on this machine."
        )
    if s.get("command"):
        lines += ["", f"Command: `{s['command']}`"]
    table = s.get("table", {})
    if table:
        keys = list(next(iter(table.values())))
        spread = "mean ± standard deviation over the seeds" if len(seeds) > 1 else "one seed"
        lines += ["", f"## Bits per byte ({spread})", "", "| mixer | conv | " + " | ".join(keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]  # fmt: skip
        for row_key, row in table.items():
            mixer, conv = row_key.split("|")
            cells = [f"{m:.4f} ± {sd:.4f}" if len(seeds) > 1 else f"{m:.4f}" for m, sd in row.values()]
            lines.append(f"| {mixer} | {conv} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| run | params | training tokens | val bpb | train time (s) |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, bpb in s["val_bpb"].items():
        base = name.split("-seed")[0]
        lines.append(
            f"| {name} | {s['params'].get(base, 0):,} | {s['tokens'][name]:,} | {bpb:.4f} | "
            f"{s['train_time_s'][name]:.0f} |"
        )
    lines.append("")
    lines.append(f"Parameter counts agree within {s['param_max_deviation']:.2%} of the softmax twin.")
    if "agent_over_softmax" in s:
        lines += [
            f"Agent / softmax (Transformer++) val bpb at 1× context, conv {convs[0]}, mean over the seeds: "
            f"**{s['agent_over_softmax']:.4f}** (goal ≤ 1.00, with the agent below the linear and retention "
            f"twins): **{'met' if s['quality_pass'] else 'not met'}**.",
        ]
    if loss_png:
        lines += ["", "![loss curves](loss_curves.png)"]
    if s["speed"]:
        lines += [
            "",
            "## One-layer forward time vs context (batch 1, fp32, CPU, inference mode)",
            "",
            "| T | agent (ms) | softmax SDPA (ms) | linear (ms) | softmax / agent |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in s["speed"]:
            lines.append(
                f"| {r['context']} | {r['agent_ms']:.2f} | {r['softmax_ms']:.2f} | {r['linear_ms']:.2f} | "
                f"{r['agent_speedup_vs_softmax']:.2f}× |"
            )
        cross = s["speed_crossover_context"]
        lines += ["", f"Crossover (agent layer faster than softmax from): "
                  f"{f'T ≈ {round(cross)}' if cross else 'not reached in this grid'}."]  # fmt: skip
        if speed_png:
            lines += ["", "![speed vs context](speed_vs_context.png)"]
    return "\n".join(lines) + "\n"
