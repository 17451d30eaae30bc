"""Attention-layer benchmark: agent attention against the official math, softmax and linear attention.

For each token count N (DeiT-style: one cls token plus a square patch grid; default N ∈ {197, 785, 3137, 12545,
50177}) it measures, on the same ``qkv``/``proj`` weights:

- ``agentattn``: :class:`agentattn.layers.AgentAttention`;
- ``official``: :class:`agentattn.bench.official.OfficialAgentAttention`, the official forward transcribed
  (explicit matmuls, biases interpolated and ``repeat``-ed over the batch on every call);
- ``softmax-sdpa``: multi-head softmax attention through ``scaled_dot_product_attention``;
- ``softmax-explicit``: the same with the (B, h, N, N) attention matrix materialised;
- ``linear-elu``: elu+1 linear attention plus the same depthwise conv (:class:`agentattn.layers.LinearAttention`);
- ``agentattn-compiled`` (``--compile``): the agentattn layer under ``torch.compile(fullgraph=True)``, which
  fails on any graph break.

Forward is timed in eval mode under ``torch.inference_mode``, forward+backward in train mode; medians after a
warm-up, interleaved over rounds so that a slow spell of a shared machine hits every case alike. Peak memory
is measured per case in a fresh subprocess (the rise of ``ru_maxrss`` over the process's state before the
call), which also gives each case one cold timing and enforces the time limit: a case that runs out of time
or memory, or whose estimated memory exceeds ``--mem-limit-gb``, is marked and the sweep goes on. FLOPs are
analytic forward counts, multiply and add counted separately (fwd+bwd counted as 3× forward). The run also
times the bare op (q, k, v → output before proj) and measures the fp32 matmul peak, 2·m³/t, to report the op's
efficiency.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import measure
from ..io import atomic_open
from ..layers import AgentAttention, LinearAttention, SoftmaxAttention
from ..measure import median_ms, peak_kib, reset_peak_kib
from ..ops import agent_attention
from .official import OfficialAgentAttention
from .section import write_section

TOKEN_BUDGET = (
    12608  # B·N of the DeiT-T config (B = 64, N = 197); larger N get a smaller batch (1 from 12545)
)
DEFAULT_TOKENS = (197, 785, 3137, 12545, 50177)
CASES = ("agentattn", "official", "softmax-sdpa", "softmax-explicit", "linear-elu")
COMPILED = "agentattn-compiled"
MODES = ("fwd", "fwd_bwd")


# -- cases -------------------------------------------------------------------------------------------------------
def build_case(name: str, dim: int, heads: int, agents: int, side: int) -> nn.Module:
    """One layer of the sweep with the weights of seed 0 (the same ``qkv``/``proj`` for every case)."""
    torch.manual_seed(0)
    ours = AgentAttention(dim, heads, agents, side, num_prefix_tokens=1)
    if name in ("agentattn", COMPILED):
        return ours
    shared = {k: v for k, v in ours.state_dict().items() if k.split(".")[0] in ("qkv", "proj", "dwc")}
    if name == "official":
        layer: nn.Module = OfficialAgentAttention(dim, heads, agents, side, num_prefix_tokens=1)
        layer.load_state_dict(ours.state_dict(), strict=True)
        return layer
    if name in ("softmax-sdpa", "softmax-explicit"):
        layer = SoftmaxAttention(dim, heads, materialize=name == "softmax-explicit")
        layer.load_state_dict({k: v for k, v in shared.items() if not k.startswith("dwc")}, strict=True)
        return layer
    if name == "linear-elu":
        layer = LinearAttention(dim, heads, side, num_prefix_tokens=1)
        layer.load_state_dict(shared, strict=True)
        return layer
    raise ValueError(f"unknown case {name!r}; expected one of {(*CASES, COMPILED)}")


def forward_flops(name: str, batch: int, tokens: int, dim: int, heads: int, agents: int) -> int:
    """Analytic forward FLOPs (multiply and add counted separately) of one case.

    Projections 2·B·N·C·4C; agent core 2·(2·B·H·n·N·d + 2·B·H·N·n·d) plus the 3×3 depthwise conv 2·9·B·(N-1)·C;
    softmax 2·2·B·H·N²·d; linear attention 2·2·B·H·N·d² (+ its normaliser and the same conv).
    """
    d = dim // heads
    proj = 2 * batch * tokens * dim * 4 * dim
    dwc = 2 * 9 * batch * (tokens - 1) * dim
    if name in ("agentattn", COMPILED, "official"):
        return proj + core_flops(batch, heads, tokens, tokens, agents, d) + dwc
    if name in ("softmax-sdpa", "softmax-explicit"):
        return proj + 2 * 2 * batch * heads * tokens * tokens * d
    if name == "linear-elu":
        return proj + 2 * 2 * batch * heads * tokens * d * d + 2 * 2 * batch * heads * tokens * d + dwc
    raise ValueError(f"unknown case {name!r}")


def core_flops(batch: int, heads: int, queries: int, keys: int, agents: int, head_dim: int) -> int:
    """FLOPs of the agent attention op, 2 × (2·B·H·n·M·d + 2·B·H·N·n·d) (multiply and add counted apart)."""
    return 2 * (
        2 * batch * heads * agents * keys * head_dim + 2 * batch * heads * queries * agents * head_dim
    )


def estimated_bytes(name: str, batch: int, tokens: int, dim: int, heads: int, mode: str) -> int:
    """A rough upper estimate of the working memory of one case, to skip cases that cannot fit."""
    activations = 12 * batch * tokens * dim * 4
    if name == "softmax-explicit":
        # logits, probabilities (and their gradients in training) of (B, h, N, N).
        activations += (2 if mode == "fwd" else 4) * batch * heads * tokens * tokens * 4
    elif name == "softmax-sdpa" and mode == "fwd_bwd":
        # the CPU backward of the fused kernel works in blocks; count a generous (B, h, N, 512) workspace.
        activations += 2 * batch * heads * tokens * 512 * 4
    return activations


def time_mode(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """A closure running one timed call of ``layer`` in ``mode`` ('fwd' or 'fwd_bwd'), setting eval/train."""
    if mode == "fwd":
        layer.eval()

        def call() -> object:
            with torch.inference_mode():
                return layer(x)

        return call
    layer.train()

    def step() -> object:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        return None

    return step


# -- one case in a fresh process: peak memory and a cold timing ---------------------------------------------------
def _worker(spec: dict) -> None:
    """Run one case once per mode and print one JSON line per mode: peak memory rise and wall time."""
    torch.set_num_threads(spec["threads"])
    for mode, result in measure_case(spec):
        print(json.dumps({"mode": mode, **result}))
        sys.stdout.flush()


def measure_case(spec: dict):
    """Yield (mode, {"peak_mb", "cold_ms"}) for one call of the case per mode, in this process."""
    side = math.isqrt(spec["tokens"] - 1)
    layer = build_case(spec["case"], spec["dim"], spec["heads"], spec["agents"], side)
    if spec["case"] == COMPILED:
        layer = torch.compile(layer, fullgraph=True)
    x = torch.randn(spec["batch"], spec["tokens"], spec["dim"])
    for mode in spec["modes"]:
        call = time_mode(layer, x, mode)
        # Reset the peak resident set first: a higher peak reached earlier (imports, the previous mode) must
        # not hide this call's own.
        base = reset_peak_kib()
        t0 = time.perf_counter()
        call()
        elapsed = time.perf_counter() - t0
        yield mode, {"peak_mb": max(0, peak_kib() - base) / 1024, "cold_ms": elapsed * 1e3}


def measure_in_subprocess(spec: dict, timeout_s: float) -> dict[str, dict]:
    """Run :func:`_worker` in a fresh interpreter. Returns {mode: {"peak_mb", "cold_ms"} or {"status"}}."""
    cmd = [sys.executable, "-m", "agentattn.bench.attention", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    results: dict[str, dict] = {}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        out, err, failed = proc.stdout, proc.stderr, proc.returncode != 0
        status = "error"
        if failed and ("out of memory" in err.lower() or proc.returncode in (-9, 137)):
            status = "oom"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, failed, status = "", True, "timeout"
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row.pop("mode")] = row
    for mode in spec["modes"]:
        if mode not in results:
            reason = err.strip().splitlines()[-1] if err.strip() else ""
            results[mode] = {"status": status if failed else "error", "detail": reason[:200]}
    return results


# -- the sweep ---------------------------------------------------------------------------------------------------
def _interleaved(
    calls: dict[str, Callable[[], object]], budget_s: float, rounds: int
) -> dict[str, list[float]]:
    """Per-round medians (ms) of every case over ``rounds`` rounds, each timing every case in turn after one
    warm-up call of each."""
    per_case: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            per_case[name].append(
                median_ms(call, warmup=0, min_reps=1, max_reps=5, budget_s=budget_s / rounds)
            )
    return per_case


def bench_sweep(
    tokens: list[int],
    cases: list[str],
    dim: int = 192,
    heads: int = 3,
    agents: int = 49,
    budget_s: float = 4.0,
    rounds: int = 3,
    threads: int = 2,
    case_timeout_s: float = 120.0,
    mem_limit_gb: float = 8.0,
    batch_override: dict[int, int] | None = None,
    compile_tokens: tuple[int, ...] = (197,),
    fresh_process: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Measure every case at every N. Returns one row per (N, case) with per-mode results.

    The batch is ``TOKEN_BUDGET // N`` (at least 1) unless ``batch_override`` names it. A case is timed in the
    interleaved rounds only if its cold call took under ``max(budget_s, 5)`` seconds; slower ones report the
    cold call (1 run). The compiled case runs only at ``compile_tokens``, in this process (no memory figure).
    ``fresh_process=False`` measures memory and the cold call in this process instead (quick, for tests: the
    peak then shows only a rise over what earlier cases used, and no time limit is enforced).
    """
    rows: list[dict] = []
    for n_tokens in tokens:
        side = math.isqrt(n_tokens - 1)
        if side < 1 or side * side != n_tokens - 1:
            raise ValueError(f"tokens must be 1 + a square (cls + patch grid), got {n_tokens}")
        batch = (batch_override or {}).get(n_tokens, max(1, TOKEN_BUDGET // n_tokens))
        group: dict[str, dict] = {}
        for name in cases:
            row = {"case": name, "tokens": n_tokens, "batch": batch, "fwd_flops": 0, "modes": {}}
            row["fwd_flops"] = forward_flops(name, batch, n_tokens, dim, heads, agents)
            modes = []
            for mode in MODES:
                need = estimated_bytes(name, batch, n_tokens, dim, heads, mode)
                if need > mem_limit_gb * 2**30:
                    row["modes"][mode] = {
                        "status": "oom",
                        "detail": f"estimated {need / 2**30:.1f} GiB > --mem-limit-gb {mem_limit_gb:g}",
                    }
                else:
                    modes.append(mode)
            if name == COMPILED:
                modes = []  # compiled in the main process only: a second compile per case costs minutes
                if n_tokens not in compile_tokens:
                    continue
                for mode in MODES:
                    row["modes"][mode] = {"cold_ms": 0.0}
            if modes:
                spec = {
                    "case": name,
                    "tokens": n_tokens,
                    "batch": batch,
                    "dim": dim,
                    "heads": heads,
                    "agents": agents,
                    "threads": threads,
                    "modes": modes,
                }
                if fresh_process:
                    # interpreter start-up and imports, plus the limit per call
                    measured = measure_in_subprocess(spec, timeout_s=60 + case_timeout_s * len(modes))
                else:
                    measured = dict(measure_case(spec))
                # A call that finished but took longer than the limit keeps its one timing ('1 run').
                row["modes"].update(measured)
            group[name] = row
            log(f"  N={n_tokens} B={batch} {name}: " + _short(row))
        _time_group(group, batch, n_tokens, dim, side, budget_s, rounds, heads, agents)
        base = group.get("agentattn")
        for row in group.values():
            for mode, result in row["modes"].items():
                ref = base["modes"].get(mode, {}) if base else {}
                if "ms" in result and "ms" in ref:
                    result["ratio"] = result["ms"] / ref["ms"]  # > 1: agentattn is faster
                    if "round_ms" in result and "round_ms" in ref:  # the same rounds: paired, time-matched
                        result["round_ratios"] = [
                            a / b for a, b in zip(result["round_ms"], ref["round_ms"], strict=True)
                        ]
                if "ms" in result:
                    flops = row["fwd_flops"] * (1 if mode == "fwd" else 3)
                    result["gflops_per_s"] = flops / result["ms"] / 1e6
        rows.extend(group.values())
    return rows


def _short(row: dict) -> str:
    parts = []
    for mode, r in row["modes"].items():
        if "status" in r:
            parts.append(f"{mode} {r['status']}")
        elif "peak_mb" in r:
            parts.append(f"{mode} cold {r['cold_ms']:.0f} ms, peak +{r['peak_mb']:.0f} MiB")
        else:
            parts.append(f"{mode} timed in-process")
    return "; ".join(parts)


def _time_group(group, batch, n_tokens, dim, side, budget_s, rounds, heads, agents) -> None:
    """Interleaved timing of the cases whose cold call was fast enough; the others keep their cold time."""
    torch.manual_seed(0)
    x = torch.randn(batch, n_tokens, dim)
    for mode in MODES:
        calls = {}
        for name, row in group.items():
            r = row["modes"].get(mode, {})
            if "status" in r:
                continue
            if r["cold_ms"] > max(budget_s, 5.0) * 1e3:
                r["ms"], r["runs"] = r["cold_ms"], 1
                continue
            layer = build_case(name, dim, heads, agents, side)
            if name == COMPILED:
                layer = torch.compile(layer, fullgraph=True)
            calls[name] = time_mode(layer, x, mode)
        if calls:
            for name, times in _interleaved(calls, budget_s, rounds).items():
                group[name]["modes"][mode].update(ms=statistics.median(times), runs=rounds, round_ms=times)


def bench_op_efficiency(
    tokens: list[int], heads: int = 3, head_dim: int = 64, agents: int = 49, budget_s: float = 3.0,
    rounds: int = 5, peak_size: int = 2048,
) -> list[dict]:  # fmt: skip
    """The bare op (q, k, v, agents, biases → output before proj), inference, at the sweep's batch per N.

    Each of ``rounds`` rounds times the fp32 matmul of :func:`matmul_peak` (one call) and right after it the op
    (median of its calls): the fraction of peak is the median of the per-round ratios, so that the machine's drift
    (this VM's speed moves by ±25% within minutes) falls on both sides of each ratio alike.
    """
    rows = []
    side = math.isqrt(agents)
    a, b = torch.randn(peak_size, peak_size), torch.randn(peak_size, peak_size)
    for n_tokens in tokens:
        batch = max(1, TOKEN_BUDGET // n_tokens)
        torch.manual_seed(0)
        # q, k, v as views of one (B, N, 3, h, d) projection, as the layer produces them.
        qkv = torch.randn(batch, n_tokens, 3, heads, head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        agent_tokens = torch.randn(batch, heads, side * side, head_dim)
        bias1 = torch.randn(1, heads, side * side, n_tokens) * 0.02
        bias2 = torch.randn(1, heads, n_tokens, side * side) * 0.02
        flops = core_flops(batch, heads, n_tokens, n_tokens, side * side, head_dim)
        call = functools.partial(agent_attention, q, k, v, agent_tokens, agent_bias=bias1, query_bias=bias2)
        op_ms, peaks, fractions = [], [], []
        with torch.inference_mode():
            a @ b
            for r in range(rounds):
                peak = 2 * peak_size**3 / _timed_matmul(a, b) / 1e9
                ms = median_ms(call, warmup=int(r == 0), min_reps=3, budget_s=budget_s / rounds)
                op_ms.append(ms)
                peaks.append(peak)
                fractions.append(flops / ms / 1e6 / peak)
        ms = statistics.median(op_ms)
        rows.append(
            {
                "tokens": n_tokens, "batch": batch, "ms": ms, "flops": flops, "gflops_per_s": flops / ms / 1e6,
                "peak_gflops_per_s": statistics.median(peaks), "fraction_of_peak": statistics.median(fractions),
                "rounds": rounds,
            }
        )  # fmt: skip
    return rows


def matmul_peak(size: int = 2048, reps: int = 5) -> dict:
    """fp32 matmul peak: 2·m³/t of a square (m × m)·(m × m) product, best of ``reps`` after a warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed_matmul(a, b) for _ in range(reps))
    return {"size": size, "seconds": best, "gflops_per_s": 2 * size**3 / best / 1e9}


def _timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    """Seconds of one ``a @ b``."""
    t0 = time.perf_counter()
    a @ b
    return time.perf_counter() - t0


# -- output ------------------------------------------------------------------------------------------------------
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
    if "status" in r:
        return r["status"]
    if "ms" not in r:
        return "–"
    return f"{r['ms']:.2f}" + (" (1 run)" if r.get("runs") == 1 else "")


def _num(r: dict, key: str, fmt: str = ".2f") -> str:
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


if (
    __name__ == "__main__"
):  # the child that measure_in_subprocess starts: python -m agentattn.bench.attention SPEC
    _worker(json.loads(sys.argv[1]))
