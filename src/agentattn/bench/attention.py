"""Attention-layer benchmark: agentattn against the official math and softmax attention, in one run.

For each token count N (DeiT-style: one cls token plus a square patch grid) it times, on the same weights:

- ``agentattn``: :class:`agentattn.layers.AgentAttention`;
- ``official``: :class:`agentattn.bench.official.OfficialAgentAttention`, the official forward transcribed
  (explicit matmuls, biases interpolated and repeated over the batch on every call);
- ``softmax-sdpa``: multi-head softmax attention through ``scaled_dot_product_attention``, same projections;

forward in eval mode under ``torch.inference_mode``, and forward+backward in train mode, as medians after
warm-up, interleaved over rounds. Ratios are to agentattn (> 1 means agentattn is faster). It also times the bare op against SDPA on
the same q, k and v.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AgentAttention
from ..ops import agent_attention
from .official import OfficialAgentAttention, SoftmaxAttention
from .timing import median_ms

TOKEN_BUDGET = 12608  # B·N of the DeiT-T config (B = 64, N = 197); larger N get a smaller batch


@dataclass
class Row:
    impl: str
    tokens: int
    batch: int
    fwd_ms: float
    fwd_bwd_ms: float
    fwd_ratio: float = float("nan")
    fwd_bwd_ratio: float = float("nan")


def _layers(dim: int, heads: int, agents: int, window: int) -> dict[str, nn.Module]:
    ours = AgentAttention(dim, heads, agents, window, num_prefix_tokens=1)
    official = OfficialAgentAttention(dim, heads, agents, window, num_prefix_tokens=1)
    official.load_state_dict(ours.state_dict(), strict=True)
    softmax = SoftmaxAttention(dim, heads)
    softmax.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if k.split(".")[0] in ("qkv", "proj")}
    )
    return {"agentattn": ours, "official": official, "softmax-sdpa": softmax}


def _time_forward(layer: nn.Module, x: torch.Tensor, budget_s: float, warmup: int) -> float:
    layer.eval()
    with torch.inference_mode():
        return median_ms(lambda: layer(x), warmup=warmup, min_reps=1, budget_s=budget_s)


def _time_forward_backward(layer: nn.Module, x: torch.Tensor, budget_s: float, warmup: int) -> float:
    layer.train()

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    return median_ms(step, warmup=warmup, min_reps=1, budget_s=budget_s)


def _interleaved(
    layers: dict[str, nn.Module], timer, x: torch.Tensor, budget_s: float, rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` rounds, each timing every layer in turn (after one warm-up pass of each), so that a
    slow spell of a shared machine hits all layers alike instead of whichever happened to run then."""
    per_layer: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():  # warm-up: allocator, kernels, bias caches
        timer(layer, x, budget_s / rounds, warmup=2)
    for _ in range(rounds):
        for name, layer in layers.items():
            per_layer[name].append(timer(layer, x, budget_s / rounds, warmup=0))
    return {name: statistics.median(times) for name, times in per_layer.items()}


def bench_layers(
    tokens: list[int],
    dim: int = 192,
    heads: int = 3,
    agents: int = 49,
    budget_s: float = 4.0,
    rounds: int = 5,
) -> list[Row]:
    """Time the three layers at each N = 1 + side² (batch = TOKEN_BUDGET // N, at least 1).

    Each layer gets ``budget_s`` seconds per mode, split over ``rounds`` interleaved rounds.
    """
    rows: list[Row] = []
    for n_tokens in tokens:
        side = math.isqrt(n_tokens - 1)
        if side * side != n_tokens - 1:
            raise ValueError(f"tokens must be 1 + a square (cls + patch grid), got {n_tokens}")
        batch = max(1, TOKEN_BUDGET // n_tokens)
        torch.manual_seed(0)
        x = torch.randn(batch, n_tokens, dim)
        layers = _layers(dim, heads, agents, side)
        fwd = _interleaved(layers, _time_forward, x, budget_s, rounds)
        fwd_bwd = _interleaved(layers, _time_forward_backward, x, budget_s, rounds)
        group = [Row(name, n_tokens, batch, fwd[name], fwd_bwd[name]) for name in layers]
        base = group[0]
        for row in group:
            row.fwd_ratio = row.fwd_ms / base.fwd_ms
            row.fwd_bwd_ratio = row.fwd_bwd_ms / base.fwd_bwd_ms
        rows.extend(group)
    return rows


def bench_op(
    tokens: int = 16385, heads: int = 3, head_dim: int = 64, agents: int = 49, budget_s: float = 6.0
) -> dict:
    """``agent_attention`` against ``scaled_dot_product_attention`` on the same q, k, v (B = 1, no biases)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim) for _ in range(3))
    side = math.isqrt(agents)
    with torch.inference_mode():
        pooled = F.adaptive_avg_pool1d(q.flatten(0, 1).transpose(1, 2), side * side).transpose(1, 2)
        pooled = pooled.reshape(1, heads, side * side, head_dim)
        agent_ms = median_ms(lambda: agent_attention(q, k, v, pooled), budget_s=budget_s)
        sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), warmup=1, budget_s=budget_s)
    return {
        "tokens": tokens,
        "heads": heads,
        "head_dim": head_dim,
        "agents": agents,
        "agent_ms": agent_ms,
        "sdpa_ms": sdpa_ms,
        "speedup": sdpa_ms / agent_ms,
    }


def format_table(rows: list[Row]) -> str:
    lines = [
        "| N | B | layer | forward (ms) | × agentattn | fwd+bwd (ms) | × agentattn |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tokens} | {r.batch} | {r.impl} | {r.fwd_ms:.2f} | {r.fwd_ratio:.2f} | {r.fwd_bwd_ms:.2f} | {r.fwd_bwd_ratio:.2f} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench attention", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[197, 3137, 16385], help="token counts N = 1 + side²"
    )
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--agents", type=int, default=49)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed runs per case")
    parser.add_argument("--skip-op", action="store_true", help="skip the op-level comparison with SDPA")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    env = environment()
    print(
        f"torch {env['torch']}, {env['threads']} threads, {env['machine']}, fp32, "
        f"C={args.dim}, heads={args.heads}, agents={args.agents}"
    )
    rows = bench_layers(args.tokens, args.dim, args.heads, args.agents, args.budget)
    print(format_table(rows))
    op = None
    if not args.skip_op:
        op = bench_op(budget_s=args.budget)
        print(
            f"\nop, inference, B=1 H={op['heads']} N=M={op['tokens']} d={op['head_dim']} n={op['agents']}, no biases: "
            f"agent_attention {op['agent_ms']:.2f} ms, SDPA {op['sdpa_ms']:.2f} ms -> {op['speedup']:.1f}x faster"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "layers": [asdict(r) for r in rows], "op": op}, f, indent=1)
    return 0
