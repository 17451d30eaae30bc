"""Speed of causal agent attention against causal softmax (SDPA) and linear attention, on CPU, batch 1.

- **Layer forward**: one attention layer (qkv projection, mixer, output projection; the agent layer with its
  conv) under ``torch.inference_mode`` at context lengths T, with the same d_model and heads.
- **Decode**: per-token latency of an ``n_layers`` model at a given context: the agent and linear models step
  their recurrent state; the softmax model appends to a preallocated KV cache and attends over it with SDPA. The
  context is set up directly in the state (random keys and values), since latency does not depend on content.
- **State size**: decode state bytes at that context (agent: memory + window ring buffer + conv history,
  linear: S and z, softmax: the filled KV cache).
- **Crossover**: the smallest context where the agent layer (or decode step) is faster than softmax, by log-log
  interpolation between the measured grid points.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict
from typing import Any

import torch

from .. import measure
from ..ops.causal_agent import causal_agent_prefill
from ..ops.causal_linear import causal_linear_init_state
from ..ops.causal_retention import CausalRetentionState
from .model import ATTN_TYPES, AgentLM, AgentLMConfig, KVCache, MixerState, state_nbytes


def _config_kwargs(attn_type: str, agent_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The speed baselines are the plain layers: causal SDPA without rotary embeddings, elu+1 linear attention,
    neither with the causal conv (the agent layer keeps its conv, as the published figures were measured)."""
    if attn_type == "agent":
        return dict(agent_kwargs)
    return {**agent_kwargs, "conv_kernel": 0, "positions": "none"}


def _mixers(d_model: int, n_heads: int, **agent_kwargs: Any) -> dict[str, torch.nn.Module]:
    """One layer per attention type, with shared qkv/proj weights."""
    out = {}
    for attn_type in ATTN_TYPES:
        cfg = AgentLMConfig(
            attn_type=attn_type,
            d_model=d_model,
            n_heads=n_heads,
            n_layers=1,
            **_config_kwargs(attn_type, agent_kwargs),
        )
        out[attn_type] = AgentLM(cfg).blocks[0].attn.eval()
    shared = {k: v for k, v in out["agent"].state_dict().items() if k.startswith(("qkv", "proj"))}
    for name in ATTN_TYPES:
        if name != "agent":
            missing, unexpected = out[name].load_state_dict(shared, strict=False)
            assert not unexpected and all(key.startswith("head_norm") for key in missing), (
                missing,
                unexpected,
            )
    return out


def layer_forward(
    contexts: list[int], d_model: int = 256, n_heads: int = 4, budget_s: float = 2.0, rounds: int = 3,
    **agent_kwargs: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Forward ms of one layer per attention type at each context length (batch 1).

    The layers take turns, ``rounds`` times ``budget_s / rounds`` each (at least one call per turn after one
    warm-up call), so that a slow spell of the machine falls on all of them alike; the figure is the median.
    """
    mixers = _mixers(d_model, n_heads, **agent_kwargs)
    rows = []
    with torch.inference_mode():
        for T in contexts:
            x = torch.randn(1, T, d_model)
            times: dict[str, list[float]] = {name: [] for name in mixers}
            for r in range(rounds):
                for name, mixer in mixers.items():
                    slice_s = budget_s / rounds
                    times[name] += measure.times_ms(
                        lambda m=mixer, x=x: m(x), warmup=int(r == 0), min_reps=1, max_reps=50, budget_s=slice_s,
                        slow_call_s=slice_s / 2,
                    )  # fmt: skip
            row: dict[str, Any] = {"context": T}
            for name in mixers:
                row[f"{name}_ms"] = statistics.median(times[name])
            row["agent_speedup_vs_softmax"] = row["softmax_ms"] / row["agent_ms"]
            rows.append(row)
    return rows


def _decode_state(model: AgentLM, context: int) -> list[Any]:
    """A per-layer decode state holding ``context`` positions of random keys/values."""
    cfg = model.config
    hd = cfg.d_model // cfg.n_heads
    states: list[Any] = []
    for block in model.blocks:
        if cfg.attn_type == "softmax":
            k = torch.randn(1, cfg.n_heads, context + 64, hd)
            states.append(MixerState(KVCache(k, torch.randn_like(k), context), None))
        elif cfg.attn_type == "linear":
            st = causal_linear_init_state(1, cfg.n_heads, hd, hd)
            st.S.normal_().abs_()
            st.z.uniform_(1.0, 2.0).mul_(context)
            st.t = context
            states.append(MixerState(st, None))
        elif cfg.attn_type == "retention":
            states.append(
                MixerState(CausalRetentionState(torch.randn(1, cfg.n_heads, hd, hd), context), None)
            )
        else:
            mixer = block.attn
            k = torch.randn(1, cfg.n_heads, context, hd)
            window_k = (
                torch.randn_like(k) if cfg.window_positions == "rope" else None
            )  # rotary keys' stand-in
            st = causal_agent_prefill(
                k, torch.randn_like(k), mixer.agents, mixer.log_decay.exp(), chunk_size=cfg.chunk_size,
                window_k=window_k,
            )  # fmt: skip
            conv = torch.randn(1, cfg.conv_kernel - 1, cfg.d_model) if cfg.conv_kernel else None
            states.append(MixerState(st, conv))
    return states


def decode(
    contexts: list[int], n_layers: int = 4, d_model: int = 256, n_heads: int = 4, steps: int = 16,
    rounds: int = 4, **agent_kwargs: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per-token decode latency (ms) and state bytes of an ``n_layers`` model per attention type and context.

    The three models take turns, ``rounds`` times ``steps // rounds`` timed steps each after one warm-up step, so
    that a slow spell of the machine falls on all of them alike; the figure is the median over all timed steps.
    """
    rows = []
    models = {
        t: AgentLM(
            AgentLMConfig(
                attn_type=t,
                n_layers=n_layers,
                d_model=d_model,
                n_heads=n_heads,
                max_seq_len=max(contexts) + steps + 64,
                **_config_kwargs(t, agent_kwargs),
            )
        ).eval()
        for t in ATTN_TYPES
    }
    per_round = max(steps // rounds, 1)
    token = torch.zeros(1, dtype=torch.long)
    for context in contexts:
        row: dict[str, Any] = {"context": context}
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            states = {name: _decode_state(model, context) for name, model in models.items()}
            for name, model in models.items():
                row[f"{name}_state_bytes"] = state_nbytes(states[name])
                model.step(token, states[name])  # warm-up
            for _ in range(rounds):
                for name, model in models.items():
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        model.step(token, states[name])
                        times[name].append(time.perf_counter() - t0)
        for name in models:
            row[f"{name}_ms_per_token"] = statistics.median(times[name]) * 1e3
        row["agent_latency_ratio_vs_softmax"] = row["agent_ms_per_token"] / row["softmax_ms_per_token"]
        row["softmax_kv_over_agent_state"] = row["softmax_state_bytes"] / row["agent_state_bytes"]
        rows.append(row)
    return rows


def crossover(rows: list[dict[str, Any]], agent_key: str, softmax_key: str) -> float | None:
    """Smallest context where agent time <= softmax time, log-log interpolated; None if never in the grid."""
    return measure.crossover((row["context"], row[agent_key], row[softmax_key]) for row in rows)


def run_benchmark(
    layer_contexts: list[int], decode_contexts: list[int], d_model: int = 256, n_heads: int = 4,
    n_layers: int = 4, threads: int | None = None, budget_s: float = 2.0, **agent_kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """All figures in one run; returns a JSON-ready dict."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    agent_cfg = AgentLMConfig(
        attn_type="agent", d_model=d_model, n_heads=n_heads, n_layers=n_layers, **agent_kwargs
    )
    layer_rows = layer_forward(layer_contexts, d_model, n_heads, budget_s, **agent_kwargs)
    decode_rows = decode(decode_contexts, n_layers, d_model, n_heads, **agent_kwargs)
    return {
        "setup": {
            "d_model": d_model,
            "n_heads": n_heads,
            "n_layers_decode": n_layers,
            "batch": 1,
            "dtype": "float32",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "agent_config": {
                k: v
                for k, v in asdict(agent_cfg).items()
                if k in ("agent_num", "chunk_size", "conv_kernel", "window_positions")
            },
        },
        "layer_forward": layer_rows,
        "decode": decode_rows,
        "crossover_context_layer_forward": crossover(layer_rows, "agent_ms", "softmax_ms"),
        "crossover_context_decode": crossover(decode_rows, "agent_ms_per_token", "softmax_ms_per_token"),
    }


def _row(rows: list[dict[str, Any]], context: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["context"] == context), None)


def speed_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's speed goals (d_model 256, 4 heads, batch 1, CPU), checked against one run."""
    layer = _row(result["layer_forward"], 16384)
    dec = _row(result["decode"], 8192)
    goals = [
        {"goal": "one layer's forward at T = 16384: ≥ 5× faster than causal SDPA",
         "value": f"{layer['agent_speedup_vs_softmax']:.2f}×" if layer else "–",
         "met": None if layer is None else layer["agent_speedup_vs_softmax"] >= 5},
        {"goal": "4-layer decode at context 8192: per-token latency ≤ 0.5× the softmax KV-cache decode",
         "value": f"{dec['agent_latency_ratio_vs_softmax']:.2f}×" if dec else "–",
         "met": None if dec is None else dec["agent_latency_ratio_vs_softmax"] <= 0.5},
        {"goal": "decode state ≥ 10× smaller than the KV cache at context 8192",
         "value": f"{dec['softmax_kv_over_agent_state']:.0f}× smaller" if dec else "–",
         "met": None if dec is None else dec["softmax_kv_over_agent_state"] >= 10},
    ]  # fmt: skip
    return goals


def section_markdown(result: dict[str, Any]) -> str:
    """Tables of one ``agentattn lm bench`` result, for BENCHMARKS.md."""
    setup = result["setup"]
    lines = [
        f"CPU, fp32, batch 1, {setup['threads']} threads; d_model {setup['d_model']}, {setup['n_heads']} heads, "
        f"agent config {setup['agent_config']}. Softmax is causal SDPA (KV cache when decoding); linear is causal "
        "elu+1 linear attention.",
        "",
        "| T | agent layer (ms) | softmax (ms) | linear (ms) | softmax / agent |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["layer_forward"]:
        lines.append(
            f"| {r['context']} | {r['agent_ms']:.2f} | {r['softmax_ms']:.2f} | {r['linear_ms']:.2f} | "
            f"{r['agent_speedup_vs_softmax']:.2f}× |"
        )
    lines += [
        "",
        "| context | agent decode (ms/token) | softmax KV cache (ms/token) | linear (ms/token) | agent / softmax "
        "| KV cache / agent state |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['context']} | {r['agent_ms_per_token']:.3f} | {r['softmax_ms_per_token']:.3f} | "
            f"{r['linear_ms_per_token']:.3f} | {r['agent_latency_ratio_vs_softmax']:.2f}× | "
            f"{r['softmax_kv_over_agent_state']:.0f}× |"
        )
    lines += [
        "",
        f"Crossover: the agent layer's forward overtakes softmax from T ≈ {_fmt_context(result['crossover_context_layer_forward'])}; "
        f"agent decoding overtakes the KV cache from context ≈ {_fmt_context(result['crossover_context_decode'])}.",
    ]
    return "\n".join(lines)


def _fmt_context(value: float | None) -> str:
    return "– (not within the measured range)" if value is None else f"{value:,.0f}"
