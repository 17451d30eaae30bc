"""``agentattn lm compare``: train the agent / softmax / linear twins on one budget and write a report.

Each twin gets the same data order (seed), the same number of training tokens and the same architecture except
for the attention mixer; parameter counts must agree within 2 %. The run directory gets ``report.md``,
``results.json``, ``loss_curves.png``, ``speed_vs_context.png`` and one sub-directory per twin (metrics.jsonl,
model.safetensors, result.json). The run holds the directory for its whole life (each twin's run its own
sub-directory) and refuses to start over an earlier comparison's results unless ``overwrite``, which removes
those files (nothing else).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io import atomic_write_text, lock_run_directory
from ..train.record_checks import prepare_output
from .bench import crossover, layer_forward
from .data import ByteCorpus, random_batch
from .model import ATTN_TYPES, AgentLM, AgentLMConfig
from .train import RUN_FILES, LMTrainConfig, train_lm

PARAM_TOLERANCE = 0.02
# The files a comparison writes: what overwrite removes, and nothing else (the twins' runs for every attention).
COMPARE_FILES = (
    "results.json",
    "report.md",
    "loss_curves.png",
    "speed_vs_context.png",
    *(f"{t}/{name}" for t in ATTN_TYPES for name in RUN_FILES),
)


def _plot_losses(results: dict[str, dict[str, Any]], path: Path) -> bool:
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


def check_param_parity(params: dict[str, int], tolerance: float = PARAM_TOLERANCE) -> float:
    """Largest relative deviation from the softmax twin; raise ValueError beyond ``tolerance``."""
    ref = params["softmax"]
    worst = max(abs(p - ref) / ref for p in params.values())
    if worst > tolerance:
        raise ValueError(f"parameter counts differ by {worst:.1%} > {tolerance:.0%}: {params}")
    return worst


def _steps_for_budget(
    configs: dict[str, AgentLMConfig],
    corpus: ByteCorpus,
    cfg: LMTrainConfig,
    budget_s: float,
    start: float,
    log: Callable[[str], None],
) -> int:
    """Largest step count <= cfg.steps whose estimated run time fits in ``budget_s`` (from ``start``).

    Times a few training steps and eval forwards of throw-away copies of every twin, then solves
    Σ_twins [steps · t_step + (curve evals + final eval) · t_eval] + speed section <= 85 % of what is left.
    The result is the same for all twins, so they still see the same number of tokens.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = random_batch(corpus.train, cfg.batch_size, cfg.seq_len, gen)
    per_step = per_eval = 0.0
    for c in configs.values():
        model = AgentLM(c)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        per_step += min(times[1:])
        with torch.no_grad():
            t0 = time.perf_counter()
            model(x)
            per_eval += time.perf_counter() - t0
    final_eval_batches = math.ceil(corpus.val.numel() / cfg.seq_len / cfg.batch_size)
    left = 0.85 * (budget_s - (time.perf_counter() - start)) - 60.0  # 60 s for the speed section and plots
    fixed = final_eval_batches * per_eval
    per_train_step = per_step + per_eval * cfg.eval_batches / cfg.eval_every
    steps = int(max(0.0, left - fixed) / per_train_step)
    steps = max(1, min(cfg.steps, steps))
    log(f"time budget {budget_s / 60:.0f} min: {per_step:.2f} s per step of all twins, {per_eval:.2f} s per eval "
        f"batch -> {steps} steps (asked {cfg.steps})")  # fmt: skip
    return steps


def run_compare(
    corpus: ByteCorpus,
    model_cfg: dict[str, Any],
    train_cfg: LMTrainConfig,
    out_dir: Path,
    speed_contexts: list[int],
    attn_types: tuple[str, ...] = ATTN_TYPES,
    log: Callable[[str], None] = print,
    command: str = "",
    speed_budget_s: float = 0.5,
    time_budget_s: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train every twin, evaluate, time, and write the report (a tqdm bar per twin with ``progress``). Returns
    the results dict.

    With ``time_budget_s``, the step count (the same for every twin) is capped so that the whole run fits:
    see :func:`_steps_for_budget`.

    Raises:
        ValueError: bad input, or ``out_dir`` holds an earlier comparison's results (and not ``overwrite``).
        RunDirectoryInUse: another live run holds ``out_dir`` or a twin's sub-directory (an ``OSError``).
    """
    out_dir = Path(out_dir)
    with lock_run_directory(out_dir):  # for the run's whole life
        prepare_output(out_dir, COMPARE_FILES, overwrite, "--output")
        return _run_compare(corpus, model_cfg, train_cfg, out_dir, speed_contexts, attn_types, log, command,
                            speed_budget_s, time_budget_s, progress)  # fmt: skip


def _run_compare(
    corpus: ByteCorpus,
    model_cfg: dict[str, Any],
    train_cfg: LMTrainConfig,
    out_dir: Path,
    speed_contexts: list[int],
    attn_types: tuple[str, ...],
    log: Callable[[str], None],
    command: str,
    speed_budget_s: float,
    time_budget_s: float | None,
    progress: bool = False,
) -> dict[str, Any]:
    start = time.perf_counter()
    configs = {t: AgentLMConfig(attn_type=t, **model_cfg) for t in attn_types}
    params = {t: AgentLM(c).num_params() for t, c in configs.items()}
    parity = check_param_parity(params) if "softmax" in params else 0.0
    requested_steps = train_cfg.steps
    if time_budget_s:
        train_cfg = replace(
            train_cfg, steps=_steps_for_budget(configs, corpus, train_cfg, time_budget_s, start, log)
        )
    log(f"parameters: {params} (max deviation {parity:.2%}); {train_cfg.steps} steps of "
        f"{train_cfg.batch_size}x{train_cfg.seq_len} tokens each")  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for t in attn_types:
        log(f"== training {t}")
        torch.manual_seed(train_cfg.seed)  # same init stream, same data order
        model = AgentLM(configs[t])
        results[t] = train_lm(model, corpus, replace(train_cfg), out_dir / t, log, progress=progress)
    speed_rows: list[dict[str, Any]] = []
    if speed_contexts:
        log(f"== speed vs context {speed_contexts}")
        speed_rows = layer_forward(
            speed_contexts,
            model_cfg.get("d_model", 128),
            model_cfg.get("n_heads", 4),
            budget_s=speed_budget_s,
            **{k: model_cfg[k] for k in ("num_agents", "chunk_size", "conv_kernel") if k in model_cfg},
        )
    summary = {
        "data": corpus.source,
        "command": command,
        "model_config": model_cfg,
        "train_config": asdict(train_cfg),
        "requested_steps": requested_steps,
        "time_budget_s": time_budget_s,
        "params": params,
        "param_max_deviation": parity,
        "tokens": {t: r["tokens"] for t, r in results.items()},
        "val_bpb": {t: r["val_bpb"] for t, r in results.items()},
        "train_time_s": {t: r["train_time_s"] for t, r in results.items()},
        "speed": speed_rows,
        "speed_crossover_context": crossover(speed_rows, "agent_ms", "softmax_ms") if speed_rows else None,
        "threads": torch.get_num_threads(),
    }
    if {"agent", "softmax", "linear"} <= set(results):
        bpb = summary["val_bpb"]
        summary["agent_over_softmax"] = bpb["agent"] / bpb["softmax"]
        summary["quality_pass"] = bool(bpb["agent"] <= 1.05 * bpb["softmax"] and bpb["agent"] < bpb["linear"])
    summary["wall_time_s"] = time.perf_counter() - start
    has_loss_png = _plot_losses(results, out_dir / "loss_curves.png")
    has_speed_png = bool(speed_rows) and _plot_speed(speed_rows, out_dir / "speed_vs_context.png")
    atomic_write_text(out_dir / "results.json", json.dumps(
        {**summary, "history": {t: r["history"] for t, r in results.items()}}, indent=1))  # fmt: skip
    atomic_write_text(out_dir / "report.md", render_report(summary, has_loss_png, has_speed_png))
    log(f"report: {out_dir / 'report.md'} ({summary['wall_time_s'] / 60:.1f} min)")
    return summary


def render_report(s: dict[str, Any], loss_png: bool, speed_png: bool) -> str:
    mc, tc = s["model_config"], s["train_config"]
    lines = [
        "# Causal agent attention vs softmax and linear attention (byte-level LM)",
        "",
        f"Data: `{s['data']}`, 90/5/5 contiguous split; val bpb over the whole validation split "
        f"(non-overlapping windows of {tc['seq_len']} bytes).",
        f"Model: d_model {mc.get('d_model', 128)}, {mc.get('n_layers', 4)} layers, {mc.get('n_heads', 4)} heads, "
        f"RMSNorm, no positional embedding; agent: {mc.get('num_agents', 16)} agents, chunk "
        f"{mc.get('chunk_size', 64)}, causal conv k={mc.get('conv_kernel', 4)}.",
        f"Training: {tc['steps']} steps × {tc['batch_size']} × {tc['seq_len']} bytes, AdamW lr {tc['lr']}, "
        f"seed {tc['seed']}; {s['threads']} threads; wall time {s['wall_time_s'] / 60:.1f} min.",
    ]
    if s.get("time_budget_s") and s.get("requested_steps") != tc["steps"]:
        lines.append(
            f"The step count was capped from {s['requested_steps']} to {tc['steps']} (the same for every twin) "
            f"to fit the {s['time_budget_s'] / 60:.0f}-minute budget, from timed steps on this machine."
        )
    if s.get("command"):
        lines += ["", f"Command: `{s['command']}`"]
    lines += [
        "",
        "| attention | params | training tokens | val bpb | train time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for t, bpb in s["val_bpb"].items():
        lines.append(
            f"| {t} | {s['params'][t]:,} | {s['tokens'][t]:,} | {bpb:.4f} | {s['train_time_s'][t]:.0f} |"
        )
    lines.append("")
    lines.append(f"Parameter counts agree within {s['param_max_deviation']:.2%} of the softmax twin.")
    if "agent_over_softmax" in s:
        bpb = s["val_bpb"]
        lines += [
            f"Agent / softmax val bpb: **{s['agent_over_softmax']:.4f}** (criterion ≤ 1.05); agent "
            f"{'<' if bpb['agent'] < bpb['linear'] else '≥'} linear ({bpb['agent']:.4f} vs {bpb['linear']:.4f}). "
            f"Quality criteria: **{'pass' if s['quality_pass'] else 'FAIL'}**.",
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
