"""Attention-layer benchmark: agent attention against the official math, softmax and linear attention.

For each token count N (DeiT-style: one cls token plus a square patch grid; default N ∈ {197, 785, 3137, 12545,
50177}) it measures, on the same ``qkv``/``proj`` weights:

- ``agentattn``: :class:`agentattn.layers.AgentAttention`;
- ``official``: :class:`agentattn.bench.official.OfficialAgentAttention`, the official forward transcribed
  (explicit matmuls, biases interpolated and ``repeat``-ed over the batch on every call);
- ``softmax-sdpa``: multi-head softmax attention through ``scaled_dot_product_attention``;
- ``softmax-explicit``: the same with the (B, h, N, N) attention matrix materialised;
- ``linear-elu``: elu+1 linear attention plus the same depthwise conv (:class:`agentattn.layers.LinearAttention`);
- ``agentattn-compiled`` (opt-in, in ``cases``): the agentattn layer under ``torch.compile(fullgraph=True)``, which
  fails on any graph break.

Forward is timed in eval mode under ``torch.inference_mode``, forward+backward in train mode; medians after a
warm-up, interleaved over rounds so that a slow spell of a shared machine hits every case alike. Peak memory
is measured per case in a fresh subprocess (the rise of ``ru_maxrss`` over the process's state before the
call), which also gives each case one cold timing and enforces the time limit: a case that runs out of time
or memory, or whose estimated memory exceeds ``mem_limit_gb``, is marked and the sweep goes on. FLOPs are
analytic forward counts, multiply and add counted separately (fwd+bwd counted as 3× forward). The run also
times the bare op (q, k, v → output before proj) and measures the fp32 matmul peak, 2·m³/t, to report the op's
efficiency.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ..measure import median_ms
from ..ops import agent_attention
from .attention_cases import (
    CASES,
    COMPILED,
    DEFAULT_TOKENS,
    MODES,
    TOKEN_BUDGET,
    build_case,
    core_flops,
    estimated_bytes,
    forward_flops,
    time_mode,
)
from .attention_report import (
    attention_goals,
    crossover,
    format_table,
    plot,
    rounds_table,
    write_rounds_section,
)
from .attention_worker import _worker, measure_case, measure_in_subprocess

# The sweep lives here; its cases, subprocess worker and output live in the modules above and stay importable
# from this one (the command line, ``bench report`` and the tests use these names).
__all__ = [
    "CASES",
    "COMPILED",
    "DEFAULT_TOKENS",
    "MODES",
    "TOKEN_BUDGET",
    "attention_goals",
    "bench_op_efficiency",
    "bench_sweep",
    "build_case",
    "core_flops",
    "crossover",
    "estimated_bytes",
    "format_table",
    "forward_flops",
    "matmul_peak",
    "measure_case",
    "measure_in_subprocess",
    "plot",
    "rounds_table",
    "time_mode",
    "write_rounds_section",
]


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
            if name == COMPILED and n_tokens not in compile_tokens:
                continue
            case = {"case": name, "tokens": n_tokens, "batch": batch, "dim": dim, "heads": heads,
                    "agents": agents, "threads": threads}  # fmt: skip
            row = _case_row(case, mem_limit_gb, case_timeout_s, fresh_process)
            group[name] = row
            log(f"  N={n_tokens} B={batch} {name}: " + _short(row))
        _time_group(group, batch, n_tokens, dim, side, budget_s, rounds, heads, agents)
        _add_ratios(group)
        rows.extend(group.values())
    return rows


def _case_row(case: dict, mem_limit_gb: float, case_timeout_s: float, fresh_process: bool) -> dict:
    """One (N, case) row: modes over the memory estimate marked, the others' peak memory and cold call."""
    name, n_tokens, batch, dim, heads = (case[k] for k in ("case", "tokens", "batch", "dim", "heads"))
    flops = forward_flops(name, batch, n_tokens, dim, heads, case["agents"])
    row = {"case": name, "tokens": n_tokens, "batch": batch, "fwd_flops": flops, "modes": {}}
    modes = []
    for mode in MODES:
        need = estimated_bytes(name, batch, n_tokens, dim, heads, mode)
        if need > mem_limit_gb * 2**30:
            row["modes"][mode] = {
                "status": "oom",
                "detail": f"estimated {need / 2**30:.1f} GiB > mem_limit_gb {mem_limit_gb:g}",
            }
        else:
            modes.append(mode)
    if name == COMPILED:
        modes = []  # compiled in the main process only: a second compile per case costs minutes
        for mode in MODES:
            row["modes"][mode] = {"cold_ms": 0.0}
    if modes:
        spec = {**case, "modes": modes}
        if fresh_process:
            # interpreter start-up and imports, plus the limit per call
            measured = measure_in_subprocess(spec, timeout_s=60 + case_timeout_s * len(modes))
        else:
            measured = dict(measure_case(spec))
        # A call that finished but took longer than the limit keeps its one timing ('1 run').
        row["modes"].update(measured)
    return row


def _add_ratios(group: dict[str, dict]) -> None:
    """Each timed mode's ratio to agentattn (paired per round when both have rounds) and its FLOP rate."""
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


def _short(row: dict) -> str:
    """The log line of one row: per mode its status, or its cold call and peak memory."""
    parts = []
    for mode, r in row["modes"].items():
        if "status" in r:
            parts.append(f"{mode} {r['status']}")
        elif "peak_mb" in r:
            parts.append(f"{mode} cold {r['cold_ms']:.0f} ms, peak +{r['peak_mb']:.0f} MiB")
        else:
            parts.append(f"{mode} timed in-process")
    return "; ".join(parts)


def _time_group(
    group: dict[str, dict],
    batch: int,
    n_tokens: int,
    dim: int,
    side: int,
    budget_s: float,
    rounds: int,
    heads: int,
    agents: int,
) -> None:
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


if (
    __name__ == "__main__"
):  # the child that measure_in_subprocess starts: python -m agentattn.bench.attention SPEC
    _worker(json.loads(sys.argv[1]))
