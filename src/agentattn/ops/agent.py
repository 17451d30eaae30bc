"""Fast agent attention: two ``scaled_dot_product_attention`` calls, or fused Triton kernels on CUDA.

Agent attention is two small softmax attentions chained through the agents:

    Va = softmax(s·A·Kᵀ + B1) · V      # (n, M) weights: agents gather from all keys
    O  = softmax(s·Q·Aᵀ + B2) · Va     # (N, n) weights: queries read from the agents

Each step is exactly what SDPA computes, with the bias as an additive mask. The path depends on the device
and on autograd (``agentattn bench attention`` and ``agentattn bench gpu`` measure each):

- CPU inference: both steps through SDPA's fused kernel (about 2× faster than matmuls at N = 197 for the agent
  step, and ahead of them for the query step from N ≈ 3k on, where the (B, H, N, n) logits outgrow the cache).
- CPU training: explicit matmuls. SDPA on CPU falls back to its unfused math kernel as soon as a mask requires
  grad, which measured slower.
- CUDA: SDPA for small problems; above ``CUDA_LARGE_WORK`` the fused Triton kernels of ``triton_agent`` for
  inference (split-K over the keys, which SDPA cannot do for n ≈ 49 queries) and explicit matmuls for training.
  The fused kernels also train (``backend="triton"``, or an :func:`attention_backend` block); ``auto`` does not
  pick them for training until a GPU run of ``agentattn bench gpu`` has measured where they win.

Fully masked rows. A row that is -inf throughout is taken as a row whose keys are all padded, on every backend,
with or without gradients: an agent whose B1 row is -inf at every key (after the cast to q's dtype, padded keys
counted as -inf) gathers zero values, and a query whose B2 row is -inf at every agent gets a zero output row. No
gradient flows through such a row (its bias gradient is zero) and every gradient stays finite. Rows with some
finite entries are ordinary softmaxes. Cost, with no such row: on CPU, a look at each bias's first and last
columns (a few µs; a row can only be -inf throughout if it is -inf at both ends). Where a look would cost a
device sync or break a traced graph (CUDA, torch.compile, torch.export) the rows are always patched instead: a
reduction and a fill of each bias, a multiply of the (B, H, n, d_v) agent values, and a multiply of the output,
which on the SDPA path shares the pass of the NaN term. The Triton kernels handle such rows themselves, at no
cost.

NaN is not checked for (that would cost a device sync): it propagates. A NaN in a query gives a NaN output row;
a NaN in a key, value or agent of a (batch, head) reaches every output row of that (batch, head).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import triton_agent
from ._masked_rows import check_rows_first, fully_masked_rows
from ._validation import check_agent_attention_args

BACKENDS: tuple[str, ...] = ("auto", "sdpa", "matmul", "triton")

# Devices on which the training path (autograd) also goes through SDPA. CPU is not one: there SDPA falls back to
# its unfused math kernel as soon as a mask requires grad, slower than the explicit matmuls.
SDPA_TRAINING_DEVICES: tuple[str, ...] = ("cuda",)

# On CUDA, B·H·max(N, M) from which the large-size paths win (measured on an H200, bf16, n = 49, d = 64, by
# `agentattn bench gpu`): the fused Triton forward (fixed cost ~0.2 ms, then 3.6× faster than SDPA at 64k tokens)
# and, for training, explicit matmuls (SDPA's memory-efficient backward runs ~B·H programs for the n agent
# rows, 3.2× slower than matmuls at 64k tokens, 2× faster at 4k).
CUDA_LARGE_WORK = 1 << 16


_forced_backend: list[str] = []  # the stack of attention_backend() blocks; the innermost wins


@contextlib.contextmanager
def attention_backend(backend: str) -> Iterator[None]:
    """Route every ``agent_attention(..., backend="auto")`` call inside the block, hence every agent layer of a model,
    to ``backend`` (one of ``"sdpa"``, ``"matmul"``, ``"triton"``; ``"auto"`` restores the per-call choice), as
    ``torch.nn.attention.sdpa_kernel`` does for SDPA. Not thread-local: it sets the choice for the process.

    >>> with attention_backend("triton"):   # the fused kernels, forward and backward
    ...     loss = model(images).logsumexp(-1).mean()
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _forced_backend.append(backend)
    try:
        yield
    finally:
        _forced_backend.pop()


def forced_backend() -> str | None:
    """The backend of the innermost :func:`attention_backend` block, or None outside any."""
    return _forced_backend[-1] if _forced_backend else None


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    """Leading unit dims up to 4-D: SDPA rejects a 1-D mask that broadcasting alone would accept."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _agent_mask(
    agent_bias: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fold the key padding mask into B1. Returns (mask for SDPA, (B,) rows whose keys are all padded)."""
    bias = None if agent_bias is None else _as_4d(agent_bias.to(dtype))
    if key_padding_mask is None:
        return bias, None
    # A sequence with every key padded would make a softmax over nothing (NaN): unmask it for the kernel
    # and zero its agent values afterwards, so that neither the output nor the gradients see a NaN.
    all_padded = key_padding_mask.all(dim=-1)  # (B,)
    padded = (key_padding_mask & ~all_padded[:, None])[:, None, None, :]  # (B, 1, 1, M)
    if bias is None:
        bias = torch.zeros(padded.shape, dtype=dtype, device=padded.device)
    return bias.masked_fill(padded, float("-inf")), all_padded


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float | None = None,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Agent attention: softmax(s·Q·Aᵀ + B2) · softmax(s·A·Kᵀ + B1) · V, in O(N·n·d).

    Args:
        q: (B, H, N, d) queries.
        k: (B, H, M, d) keys.
        v: (B, H, M, d_v) values.
        agents: (B, H, n, d) agent tokens (pooled queries, learned tokens, merged tokens, ...).
        scale: logit scale s for both softmaxes; ``d ** -0.5`` when None.
        agent_bias: B1, added to the agent→key logits; broadcastable to (B, H, n, M).
        query_bias: B2, added to the query→agent logits; broadcastable to (B, H, N, n).
        key_padding_mask: (B, M) bool; True marks a padded key, which is left out of the agent
            aggregation (the ``nn.MultiheadAttention`` convention). A sequence whose keys are all padded
            gets zero agent values, hence a zero output.
        dropout_p: dropout probability on both attention matrices, applied only when ``training``.
        training: whether dropout is active.
        backend: ``"auto"`` (default) picks per call: on CPU, SDPA for inference and explicit matmuls for
            training; on CUDA, SDPA below ``CUDA_LARGE_WORK`` = B·H·max(N, M), and above it the fused Triton
            kernels for inference and explicit matmuls for training; explicit matmuls under ``torch.export``.
            ``"sdpa"``, ``"matmul"`` or ``"triton"`` force one (so does an enclosing :func:`attention_backend`
            block for ``"auto"``); ``"triton"`` (the fused kernels of ``ops.triton_agent``, forward and backward,
            no dropout) needs CUDA (or ``TRITON_INTERPRET=1``).

    Returns:
        (B, H, N, d_v). Biases are cast to the dtype of q. B = 0 gives an empty result.

    A row of a bias that is -inf throughout counts as fully padded: it gives zero agent values or a zero output
    row, with finite gradients (see the module docstring, as for NaN, which propagates). fp16/bf16 inputs get
    fp32 logits and softmax on every path.
    """
    check_agent_attention_args(q, k, v, agents, agent_bias, query_bias, key_padding_mask, dropout_p, scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    p = dropout_p if training else 0.0
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, agents, agent_bias, query_bias)
    )
    if backend == "auto" and _forced_backend:
        backend = _forced_backend[-1]
    chosen = _choose_backend(backend, q, v, agents, needs_grad, p)
    # The fused kernels mask padded keys and fully masked rows themselves, forward and backward.
    if chosen == "triton":
        return triton_agent.agent_attention_triton(
            q, k, v, agents, scale=s,
            agent_bias=None if agent_bias is None else agent_bias.to(q.dtype),
            query_bias=None if query_bias is None else query_bias.to(q.dtype),
            key_padding_mask=key_padding_mask,
        )  # fmt: skip
    mask1, all_padded = _agent_mask(agent_bias, key_padding_mask, q.dtype)
    mask2 = None if query_bias is None else _as_4d(query_bias.to(q.dtype))
    # Fully masked rows (-inf throughout) are unmasked for the kernels (a softmax over nothing is NaN in the output
    # or in the gradient, depending on the kernel and the torch version) and their output rows multiplied by 0.
    check_first = check_rows_first(q)
    mask1, dead1 = _unmask_dead_rows(mask1, check_first)  # dead1: (B|1, H|1, n|1, 1) or None
    mask2, dead2 = _unmask_dead_rows(mask2, check_first)  # dead2: (B|1, H|1, N|1, 1) or None
    attend = _attend_matmul if chosen == "matmul" else _attend_sdpa
    agent_values = attend(agents, k, v, mask1, p, s)  # (B, H, n, d_v)
    if dead1 is not None:  # × 0 rather than a fill: NaN in -> NaN out, as the reference
        agent_values = agent_values * dead1.logical_not()
    if all_padded is not None:
        agent_values = agent_values.masked_fill(all_padded[:, None, None, None], 0.0)
    out = attend(q, agents, agent_values, mask2, p, s)  # (B, H, N, d_v)
    return _zero_dead_keep_nan(out, q, mask2, dead2, sdpa=attend is _attend_sdpa)


def _zero_dead_keep_nan(
    out: torch.Tensor, q: torch.Tensor, mask2: torch.Tensor | None, dead2: torch.Tensor | None, sdpa: bool
) -> torch.Tensor:
    """out (B, H, N, d_v) with the fully masked query rows zeroed, and NaN queries kept NaN on the SDPA path."""
    # PyTorch's fused kernel can return zeros for a query row holding NaN; keep NaN in -> NaN out, as the other
    # paths do (adding ±0 changes nothing else).
    nan_term = None
    if sdpa and _may_hold_nan(q, mask2):
        nan_term = q.sum(dim=-1, keepdim=True).mul(0.0)
    if dead2 is not None:
        keep = dead2.logical_not().to(out.dtype)
        return out * keep if nan_term is None else torch.addcmul(nan_term, out, keep)  # one pass either way
    return out if nan_term is None else out + nan_term


def _unmask_dead_rows(
    mask: torch.Tensor | None, check_first: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The mask with its rows of -inf set to 0, and those rows (a (.., 1) bool tensor), or None for none."""
    dead = fully_masked_rows(mask, check_first)
    return (mask if dead is None else mask.masked_fill(dead, 0.0)), dead


def _may_hold_nan(q: torch.Tensor, query_mask: torch.Tensor | None) -> bool:
    """Whether the NaN term is needed. On CPU: not with an additive query mask (every agent layer's B2), through
    which the fused kernel's output row does turn NaN (tests/hardening checks it on the installed torch), which
    spares a scan over q worth 2-10% of the op at N >= 3k; else one reduction tells, with no sync to pay.
    Elsewhere, and in a compiled graph (which a data-dependent branch would break), assume yes."""
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    if query_mask is not None:
        return False
    return not bool(torch.isfinite(q.sum()))


def _choose_backend(
    backend: str, q: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, needs_grad: bool, dropout_p: float
) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    triton_device = q.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and q.device.type == "cpu")
    if backend == "triton":
        if dropout_p > 0:
            raise ValueError("backend='triton' has no dropout: call it with dropout_p=0 or training=False")
        if not (triton_device and triton_agent.supports(q, v, agents)):
            raise ValueError(
                "backend='triton' needs Triton, a CUDA tensor (or TRITON_INTERPRET=1 on CPU), a float dtype and "
                f"at most {triton_agent.MAX_AGENTS} agents and head dim {triton_agent.MAX_HEAD_DIM}; got device "
                f"{q.device}, dtype {q.dtype}, n = {agents.shape[-2]}, d = {q.shape[-1]}, d_v = {v.shape[-1]}"
            )
        return "triton"
    if backend != "auto":
        return backend
    # Under torch.export and torch.jit.trace (and so both ONNX exporters) record the explicit matmuls: plain
    # MatMul/Softmax nodes for any runtime, no SDPA decomposition whose output strides differ from the eager
    # kernel's, and one graph whatever the grad mode.
    if (
        torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or (needs_grad and q.device.type not in SDPA_TRAINING_DEVICES)
    ):
        return "matmul"
    if not q.is_cuda:
        return "sdpa"
    large = q.shape[0] * q.shape[1] * max(q.shape[-2], v.shape[-2]) >= CUDA_LARGE_WORK
    # Small CUDA problems train through SDPA: its memory-efficient kernel takes an additive mask and returns its
    # gradient, so autograd keeps no (B, H, N, n) or (B, H, n, M) probabilities.
    if needs_grad:
        return "matmul" if large else "sdpa"
    if dropout_p > 0 or torch.compiler.is_compiling() or not large:
        return "sdpa"
    return "triton" if triton_agent.supports(q, v, agents) else "sdpa"


def _attend_sdpa(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def _attend_matmul(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    """softmax(s·q·kᵀ + bias)·v with explicit matmuls; s is fused with the bias, else applied to the smaller operand.

    Logits and softmax are computed in fp32 when the inputs are fp16/bf16 or autocast is on, as the fused SDPA
    kernels do: rounded half-precision logits at |logit| ~ 1e4 are off by tens, which flips the softmax.
    """
    device_type = q.device.type
    upcast = q.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if upcast else contextlib.nullcontext():
        if upcast:
            q, k = q.float(), k.float()
            bias = None if bias is None else bias.float()
        if bias is not None:
            logits = torch.add(bias, q @ k.transpose(-2, -1), alpha=scale)  # scale and bias in one pass
        elif q.shape[-1] <= k.shape[-2]:
            logits = (q * scale) @ k.transpose(-2, -1)
        else:
            logits = (q @ k.transpose(-2, -1)) * scale
        probs = logits.softmax(dim=-1)  # max-subtracted by torch
    probs = F.dropout(probs.to(v.dtype), dropout_p, training=dropout_p > 0)
    return probs @ v
