"""``agentattn bench gpu``: check the CUDA paths, then time agent attention against FlashAttention (SDPA), bf16.

    agentattn bench gpu [--tokens 4096 16384 65536] [--batch 1] [--heads 8] [--head-dim 64] [--agents 49]
                        [--json FILE] [--section FILE]

Checks (each prints its relative error and fails the command when over its bound):
  - ``agent_attention`` on CUDA, every backend (fused Triton, SDPA, explicit matmuls), fp32 and bf16, with biases
    and a key padding mask, against ``ops.naive`` in float64; the gradients of every training path (auto = SDPA
    at that size, explicit matmuls, the fused Triton backward), fp32 and bf16.
  - ``AgentAttention`` (DeiT-T block) against the transcription of the official code, fp32, eval and train.

Timings (CUDA events through ``triton.testing.do_bench``, median; bf16; per (B, N)):
  - op: agent attention (Triton, SDPA, matmuls) vs softmax attention through SDPA's flash backend, and elu+1 linear
    attention; forward and forward+backward; peak memory from ``torch.cuda.max_memory_allocated``.
  - layer: the whole ``AgentAttention`` block (qkv, pooling, biases, DWC, proj) vs a softmax block with flash SDPA.

``--section FILE`` writes the figures as a ``bench report`` section (see ``agentattn.bench.report``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops import agent_attention, linear_attention, naive
from .attention import build_case

BACKENDS = ("triton", "sdpa", "matmul")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere counts as failure)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm()).item()


def _op_inputs(batch, heads, tokens, agents, head_dim, dtype, device, grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def t(*shape, s=1.0):
        x = (torch.randn(*shape, generator=g) * s).to(device, dtype)
        return x.requires_grad_(grad)

    return {
        "q": t(batch, heads, tokens, head_dim),
        "k": t(batch, heads, tokens, head_dim),
        "v": t(batch, heads, tokens, head_dim),
        "agents": t(batch, heads, agents, head_dim),
        "agent_bias": t(heads, agents, tokens, s=0.5),
        "query_bias": t(1, heads, tokens, agents, s=0.5),
    }


def check_paths(device: torch.device) -> list[dict]:
    """Correctness of every CUDA path against float64 references. Returns one row per check."""
    rows = []
    bounds = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, agents in ((1000, 49), (4097, 64), (333, 7)):
            t = _op_inputs(2, 4, tokens, agents, 64, dtype, device, seed=tokens)
            pad = torch.zeros(2, tokens, dtype=torch.bool, device=device)
            pad[0, -100:] = True
            ref = naive.agent_attention(**{k: v.double() for k, v in t.items()}, key_padding_mask=pad)
            for backend in BACKENDS:
                with torch.no_grad():
                    out = agent_attention(**t, key_padding_mask=pad, backend=backend)
                err = _rel(out, ref)
                rows.append(
                    {"check": f"op fwd {backend} {str(dtype)[6:]} N={tokens} n={agents}", "rel_err": err,
                     "bound": bounds[dtype], "ok": err <= bounds[dtype]}
                )  # fmt: skip
    # Gradients of every training path: SDPA (auto at this size), explicit matmuls, and the fused Triton backward,
    # fp32 and bf16, with a key padding mask.
    grad_bounds = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("auto", "matmul", "triton"):
            t = _op_inputs(2, 4, 1000, 49, 64, dtype, device, grad=True, seed=1)
            pad = torch.zeros(2, 1000, dtype=torch.bool, device=device)
            pad[1, -300:] = True
            ref_t = {k: v.detach().double().requires_grad_() for k, v in t.items()}
            out = agent_attention(**t, key_padding_mask=pad, backend=backend)
            ref = naive.agent_attention(**ref_t, key_padding_mask=pad)
            grad = torch.randn(ref.shape, device=device, generator=torch.Generator(device).manual_seed(2))
            out.backward(grad.to(dtype))
            ref.backward(grad.double())
            for name in t:
                err = _rel(t[name].grad, ref_t[name].grad)
                bound = grad_bounds[dtype]
                rows.append({"check": f"op grad {name} {str(dtype)[6:]} ({backend} training path)", "rel_err": err,
                             "bound": bound, "ok": err <= bound})  # fmt: skip
    # The whole DeiT-T block against the official code's math, same weights.
    ours = build_case("agentattn", 192, 3, 49, 14).to(device)
    official = build_case("official", 192, 3, 49, 14).to(device)
    x = torch.randn(8, 197, 192, device=device)
    for mode in ("eval", "train"):
        ours.train(mode == "train")
        official.train(mode == "train")
        with torch.no_grad():
            a, b = ours(x), official(x)
        err = ((a - b).abs().max() / b.abs().max()).item()
        rows.append({"check": f"AgentAttention vs official, DeiT-T block, fp32 {mode} (max abs / max |ref|)",
                     "rel_err": err, "bound": 1e-5, "ok": err <= 1e-5})  # fmt: skip
    return rows


def _bench(fn: Callable[[], object]) -> tuple[float, float]:
    """(median ms, peak MiB above the live tensors) of ``fn`` on the current CUDA device."""
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak


def _guarded(fn: Callable[[], object]) -> dict:
    try:
        ms, peak = _bench(fn)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "OOM"}
    return {"ms": ms, "peak_mb": peak}


def time_ops(
    batch: int, tokens: int, heads: int, head_dim: int, agents: int, device: torch.device
) -> list[dict]:
    """Forward and forward+backward of every attention op at one (B, N), bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = _op_inputs(batch, heads, tokens, agents, head_dim, torch.bfloat16, device)
    grads = {k: v.detach().requires_grad_() for k, v in t.items()}
    q, k, v = t["q"], t["k"], t["v"]
    qg, kg, vg = grads["q"], grads["k"], grads["v"]
    cases: dict[str, dict[str, Callable[[], object]]] = {}
    for backend in BACKENDS:
        cases[f"agent-{backend}"] = {
            "fwd": (lambda b=backend: agent_attention(**t, backend=b)),
            "fwd_bwd": (lambda b=backend: agent_attention(**grads, backend=b).sum().backward()),
        }

    def flash(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_, k_, v_)

    cases["softmax-flash"] = {
        "fwd": lambda: flash(q, k, v),
        "fwd_bwd": lambda: flash(qg, kg, vg).sum().backward(),
    }
    cases["linear-elu"] = {
        "fwd": lambda: linear_attention(q, k, v),
        "fwd_bwd": lambda: linear_attention(qg, kg, vg).sum().backward(),
    }
    rows = []
    for name, modes in cases.items():
        row = {"level": "op", "case": name, "batch": batch, "tokens": tokens, "modes": {}}
        for mode, fn in modes.items():
            ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
            with ctx:
                row["modes"][mode] = _guarded(fn)
        rows.append(row)
    return rows


def time_layers(batch: int, side: int, dim: int, heads: int, agents: int, device: torch.device) -> list[dict]:
    """Forward (eval, inference mode) of whole blocks at N = 1 + side², bf16."""
    x = torch.randn(batch, 1 + side * side, dim, device=device, dtype=torch.bfloat16)
    rows = []
    for name in ("agentattn", "official", "softmax-sdpa", "linear-elu"):
        layer = build_case(name, dim, heads, agents, side).to(device, torch.bfloat16).eval()

        def call(layer=layer):
            with torch.inference_mode():
                return layer(x)

        rows.append({"level": "layer", "case": name, "batch": batch, "tokens": x.shape[1],
                     "modes": {"fwd": _guarded(call)}})  # fmt: skip
        del layer
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Add ``ratio`` = baseline ms / case ms (how many times faster than the baseline) to every mode."""
    for r in rows:
        base = next(
            b
            for b in rows
            if b["case"] == baseline and b["tokens"] == r["tokens"] and b["level"] == r["level"]
        )
        for mode, m in r["modes"].items():
            bm = base["modes"].get(mode, {})
            if "ms" in m and "ms" in bm:
                m["speedup_vs_" + baseline] = bm["ms"] / m["ms"]


def format_rows(rows: list[dict], baseline: str) -> str:
    lines = [
        f"| level | N | B | case | fwd (ms) | × faster than {baseline} | fwd+bwd (ms) | × faster | peak fwd (MiB) | peak fwd+bwd (MiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, fb = r["modes"].get("fwd", {}), r["modes"].get("fwd_bwd", {})

        def ms(m):
            return m.get("status") or (f"{m['ms']:.3f}" if "ms" in m else "–")

        def num(m, key, fmt):
            return format(m[key], fmt) if key in m else "–"

        key = "speedup_vs_" + baseline
        lines.append(
            f"| {r['level']} | {r['tokens']} | {r['batch']} | {r['case']} | {ms(f)} | {num(f, key, '.2f')} | {ms(fb)} | "
            f"{num(fb, key, '.2f')} | {num(f, 'peak_mb', '.0f')} | {num(fb, 'peak_mb', '.0f')} |"
        )
    return "\n".join(lines)


# The speed goals of the fused kernels against FlashAttention (H200, bf16): {mode: {N: times faster}}.
GOALS = {"fwd": {1024: 1.0, 4096: 5.0, 65536: 100.0}, "fwd_bwd": {2048: 1.0, 16384: 4.0, 65536: 20.0}}


def _goal(mode: str, tokens: int) -> float | None:
    return GOALS.get(mode, {}).get(tokens)


def section(result: dict) -> dict:
    """The ``bench report`` section of one ``bench gpu`` result."""
    rows, cfg, env = result["rows"], result["config"], result["environment"]
    checks = "\n".join(
        f"| {c['check']} | {c['rel_err']:.1e} | {c['bound']:.0e} | {'yes' if c['ok'] else 'NO'} |"
        for c in result["checks"]
    )
    goals = []
    for r in rows:
        if (
            r["level"] == "op"
            and r["case"] == "agent-triton"
            and "speedup_vs_softmax-flash" in r["modes"]["fwd"]
        ):
            for mode, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
                m = r["modes"].get(mode, {})
                if "speedup_vs_softmax-flash" not in m:
                    continue
                target = _goal(mode, r["tokens"])
                goals.append({"goal": f"fused agent attention vs FlashAttention (SDPA), bf16 {label}, "
                              f"N = {r['tokens']}" + (f" (goal ≥ {target}×)" if target else ""),
                              "value": f"{m['speedup_vs_softmax-flash']:.2f}× faster",
                              "met": None if target is None else m["speedup_vs_softmax-flash"] >= target})  # fmt: skip
    markdown = (
        f"GPU: {env.get('gpu')}; torch {env.get('torch')}, Triton {env.get('triton')}. bf16, B = {cfg['batch']}, "
        f"{cfg['heads']} heads of {cfg['head_dim']}, {cfg['agents']} agents; op-level inputs carry both biases. "
        "Times are medians of CUDA-event timings (`triton.testing.do_bench`); peak memory is "
        "`torch.cuda.max_memory_allocated` above the inputs.\n\n"
        "Correctness checks run in the same command (relative error ‖out − ref‖/‖ref‖ against float64):\n\n"
        "| check | error | bound | passed |\n|---|---:|---:|---|\n"
        + checks
        + "\n\n"
        + format_rows([r for r in rows if r["level"] == "op"], "softmax-flash")
        + "\n\n"
        + format_rows([r for r in rows if r["level"] == "layer"], "softmax-sdpa")
    )
    return {"kind": "section", "title": "GPU: fused Triton agent attention vs FlashAttention", "command":
            result["command"], "environment": env, "markdown": markdown, "goals": goals}  # fmt: skip
