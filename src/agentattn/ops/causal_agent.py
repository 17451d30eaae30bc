"""Causal agent attention for autoregressive language modelling (design 2 of causal-agent-attention.md).

The sequence is cut into chunks of ``C`` tokens; ``c(t) = t // C`` is the chunk of position t. Per head:

- **Exact window.** Query t attends with plain softmax to the keys of its own chunk up to t and to the whole
  previous chunk: ``L(t) = {j <= t : c(j) >= c(t) - 1}`` (between C and 2C keys, never fewer than
  ``min(t + 1, C)``).
- **Agent memory.** Everything older, ``Mem(t) = {j : c(j) <= c(t) - 2}``, is summarised by ``n`` learned agent
  tokens ``a_i``. Agent i pools the old values with a softmax over the old keys, normalised over that prefix, with
  a per-agent recency prior (decay ``λ_i >= 0``): ``M_i(t) = Σ_{j∈Mem(t)} softmax_j(s·a_i·k_j - λ_i·(t - j)) v_j``.
- **One read.** Query t takes a single softmax over the agents (logits ``s·q_t·a_i + b_i``, only once the memory
  is non-empty) and the window keys (``s·q_t·k_j``), and mixes ``M_i(t)`` and ``v_j`` with it.

So the weights are ``σ(Q Aᵀ)·σ(A Kᵀ)`` of agent attention for the far past (agents as keys on the read side and as
queries on the write side, as in the paper) plus exact softmax attention for the last one to two chunks.

Three implementations, tested against each other:

- ``agentattn.ops.naive.causal_agent_attention``: builds the (B, H, T, T) weight matrix with explicit masks, O(T²).
- :func:`causal_agent_attention`: chunked parallel form for training, O(T·(2C + n)·d); the largest temporaries are
  (B, H, T, 2C + n), never T×T. The memory is a running (max m, sum S, normaliser z) per agent, scanned over chunks.
- :func:`causal_agent_step` with :func:`causal_agent_init_state` / :func:`causal_agent_prefill`: the recurrent form
  for decoding. The state is the agent memory (n×(d_v + 2) per head) plus a ring buffer of the last 2C keys and
  values: its size is fixed by (n, C, d), not by the sequence length, and there is no growing KV cache.

Numerics: half-precision inputs are computed in float32 and cast back; every exponent is taken relative to a
running maximum (log-sum-exp form), so scaled-up bf16/fp16 inputs give neither inf nor NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._causal_common import _check_args, _compute_dtype

__all__ = [
    "CausalAgentState",
    "causal_agent_attention",
    "causal_agent_init_state",
    "causal_agent_prefill",
    "causal_agent_step",
]


# ----------------------------------------------------------------------------------------------------------------
# shared pieces of the chunked and the recurrent form


def _chunk_summaries(
    kc: torch.Tensor, vc: torch.Tensor, agents: torch.Tensor, decay: torch.Tensor | None, s: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chunk and agent: max logit μ, Σ exp(u - μ) v and Σ exp(u - μ), with u relative to the chunk's end.

    kc: (B, H, N, C, d), vc: (B, H, N, C, d_v) → μ (B, H, N, n), S (B, H, N, n, d_v), z (B, H, N, n).
    """
    size = kc.shape[3]
    u = s * torch.einsum("bhcjd,hnd->bhcnj", kc, agents)  # (B, H, N, n, C)
    if decay is not None:
        lag = torch.arange(size - 1, -1, -1, device=kc.device, dtype=kc.dtype)  # distance to the chunk's end
        u = u - decay[None, :, None, :, None] * lag
    mu = u.amax(dim=-1).detach()  # the stabiliser cancels in S/z, so it needs no gradient
    p = torch.exp(u - mu[..., None])
    return mu, p @ vc, p.sum(dim=-1)


def _fold(
    m: torch.Tensor | None,
    S: torch.Tensor | None,
    z: torch.Tensor | None,
    mu: torch.Tensor,
    S_hat: torch.Tensor,
    z_hat: torch.Tensor,
    step_decay: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add one chunk (μ, Ŝ, ẑ) to the memory (m, S, z): decay the old part by exp(-λC), rescale to the new max."""
    if m is None:
        return mu, S_hat, z_hat
    old = m if step_decay is None else m - step_decay
    m_new = torch.maximum(old, mu).detach()
    a, b = torch.exp(old - m_new), torch.exp(mu - m_new)  # one of them is 1, so z stays >= 1
    return m_new, a[..., None] * S + b[..., None] * S_hat, a * z + b * z_hat


def _memory_readouts(
    kc: torch.Tensor, vc: torch.Tensor, agents: torch.Tensor, decay: torch.Tensor | None, s: float, C: int
) -> torch.Tensor:
    """Memory readout S/z after each of the chunks kc (B, H, N, C, d), vc (B, H, N, C, d_v) → (B, H, N, n, d_v).

    The running max obeys m_c = max(m_{c-1} - λC, μ_c), i.e. m_c = cummax_c'(μ_c' + λC·c') - λC·c, so it is
    computed in one pass. With it, [S | z] (z as an extra column) follows acc_c = a_c·acc_{c-1} + b_c·aug_c with
    a_c = exp(m_{c-1} - λC - m_c) <= 1 and b_c = exp(μ_c - m_c) <= 1 known up front: one fused op per chunk. Any
    rounding in m cancels exactly in S/z (the same m_c scales S_c and z_c).
    """
    dv, N = vc.shape[-1], kc.shape[2]
    mu, S_hat, z_hat = _chunk_summaries(kc, vc, agents, decay, s)  # mu (B, H, N, n)
    if decay is None:
        m = torch.cummax(mu, dim=2).values
        log_a = m[:, :, :-1] - m[:, :, 1:]
    else:
        ramp = (decay * C)[None, :, None, :] * torch.arange(N, device=kc.device, dtype=kc.dtype)[:, None]
        m = (torch.cummax(mu + ramp.detach(), dim=2).values - ramp.detach()).detach()
        log_a = m[:, :, :-1] - decay[None, :, None, :] * C - m[:, :, 1:]
    a = torch.exp(log_a)[..., None]  # (B, H, N - 1, n, 1)
    b_aug = (
        torch.cat([S_hat, z_hat[..., None]], dim=-1) * torch.exp(mu - m)[..., None]
    )  # (B, H, N, n, dv + 1)
    acc = b_aug[:, :, 0]
    outs = [acc]
    for c in range(1, N):
        acc = torch.addcmul(b_aug[:, :, c], acc, a[:, :, c - 1])
        outs.append(acc)
    total = torch.stack(outs, dim=2)
    return total[..., :dv] / total[..., dv:]  # z >= 1: the largest term of the sums is exp(0)


def causal_agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    decay: torch.Tensor | None = None,
    agent_bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    window_q: torch.Tensor | None = None,
    window_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked parallel causal agent attention (training path). Same arguments and result as the naive form.

    Cost O(T·(2C + n)·d) time, O(T·(2C + n)) extra memory: no T×T matrix is built.

    Args:
        q, k: (B, H, T, d). v: (B, H, T, d_v). agents: (H, n, d). decay, agent_bias: (H, n) or None.
        window_q, window_k: (B, H, T, d) or None: the queries and keys of the exact-window logits (default q, k),
            e.g. q and k with rotary embeddings, while the agent logits keep the position-free q and k.
    Returns:
        (B, H, T, d_v) in the dtype of q.
    """
    _check_args(q, k, v, agents, decay, agent_bias, chunk_size, scale, window_q, window_k)
    out_dtype, cd = q.dtype, _compute_dtype(q.dtype)
    q, k, v, agents = q.to(cd), k.to(cd), v.to(cd), agents.to(cd)
    decay = None if decay is None else decay.to(cd)
    B, H, T, d = q.shape
    dv, n, C = v.shape[-1], agents.shape[1], chunk_size
    s = d**-0.5 if scale is None else scale
    N = math.ceil(T / C)
    pad = N * C - T  # padding at the end is only ever seen by padded queries
    # Contiguous (B, H, T, d) inputs: the chunk views below then have uniform batch strides, and every batched
    # matmul reads its operands in place (heads split from a fused qkv projection would be copied at each one).
    window = () if window_q is None else (window_q.to(cd), window_k.to(cd))
    q, k, v, *window = (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous() for t in (q, k, v, *window))
    kc, vc = k.view(B, H, N, C, d), v.view(B, H, N, C, dv)

    # One softmax per query over three parts, normalised jointly without concatenating them:
    # n agents (values: memory readouts over chunks <= c - 2) | the previous chunk | the current chunk (causal).
    # The agent logits use q; the window logits use window_q and window_k when given (e.g. rotary ones).
    qs = (q * s).view(B, H, N, C, d)
    wqs, wkc = (
        (qs, kc) if not window else ((window[0] * s).view(B, H, N, C, d), window[1].view(B, H, N, C, d))
    )
    mem = q.new_zeros(B, H, N, n, dv)
    if N > 2:
        # Readouts after every chunk (the last two are not needed, but slicing the inputs would copy them).
        mem[:, :, 2:] = _memory_readouts(kc, vc, agents, decay, s, C)[:, :, : N - 2]
    s_agent = qs @ agents.transpose(-2, -1)[None, :, None]  # (B, H, N, C, n)
    if agent_bias is not None:
        s_agent = s_agent + agent_bias.to(cd)[None, :, None, None, :]
    s_agent[:, :, :2] = float("-inf")  # no memory before chunk 2 (in place: matmul/add keep no output)
    i = torch.arange(C, device=q.device)
    s_cur = wqs @ wkc.transpose(-2, -1)  # (B, H, N, C, C)
    s_cur.masked_fill_(i[None, :] > i[:, None], float("-inf"))
    m = torch.maximum(s_agent.amax(-1), s_cur.amax(-1)).detach()  # (B, H, N, C); finite: the diagonal
    p_agent = torch.exp(s_agent - m[..., None])
    p_cur = torch.exp(s_cur - m[..., None])
    den = p_agent.sum(-1) + p_cur.sum(-1)
    num = p_agent @ mem + p_cur @ vc  # (B, H, N, C, dv)
    if N > 1:  # chunks >= 1 also see the whole previous chunk
        # Over the B·H·N chunks in a row, chunk g reads chunk g - 1: offset views with one batch stride, so the
        # matmuls copy nothing. The first chunk of each (b, h) would read another head's last chunk: masked.
        BHN = B * H * N
        q_flat, k_flat, v_flat = wqs.view(BHN, C, d), wkc.view(BHN, C, d), vc.view(BHN, C, dv)
        s_prev = q_flat[1:] @ k_flat[:-1].transpose(-2, -1)  # (BHN - 1, C, C)
        s_prev[N - 1 :: N] = float("-inf")
        m_read = m.view(BHN, C)[1:]
        m_new = torch.maximum(m_read, s_prev.amax(-1)).detach()
        rescale = torch.exp(m_read - m_new)
        p_prev = torch.exp(s_prev - m_new[..., None])
        den.view(BHN, C)[1:].mul_(rescale).add_(p_prev.sum(-1))  # in place: rescale carries no gradient
        num.view(BHN, C, dv)[1:].mul_(rescale[..., None]).add_(p_prev @ v_flat[:-1])
    out = num.div_(den[..., None])  # (B, H, N, C, dv); in place: num's buffer is not needed again
    return out.reshape(B, H, N * C, dv)[:, :, :T].to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# recurrent form


@dataclass
class CausalAgentState:
    """Decoding state of one causal agent-attention layer; its size depends on (B, H, n, C, d), not on T.

    m, z: (B, H, n) memory max and normaliser; S: (B, H, n, d_v) memory sum. ``keys`` (B, H, n + 2C, d) and
    ``values`` (B, H, n + 2C, d_v) hold what one decoding step attends over, so that the step is one SDPA call:
    rows :n are the agents and the memory readouts S / z (cached; they change only when a chunk is folded in),
    rows n: the ring buffer of the window, slot ``p % 2C`` holding position p. ``mask`` (1, H, 1, n + 2C) is the
    additive mask of a step over those rows: the agent bias (-inf while there is no memory), then 0 for the window
    slots a query may read and -inf for the others (empty or left the window). It is kept up to date in place, and
    is 4-D because SDPA takes its fused CPU kernel only for a 4-D mask (the 3-D one falls back to the math path,
    5× slower for one query); a decoding step is a few dozen µs of work, so it avoids rebuilding anything.
    ``has_memory`` is False until the first chunk has left the window; t: tokens seen.

    With separate window keys (``window_k``, e.g. rotary keys) the rows are 2d wide and a step's query is
    [q | window_q]: agent rows are [a | 0] and window rows [0 | window_k], so the one SDPA call still gives
    s·q·a for the agents and s·window_q·window_k for the window. ``memory_keys`` (B, H, 2C, d) then keeps the
    window's plain keys, which the memory folds.

    The agent rows (agents in ``keys``, agent bias in ``mask``) are written by the first step after each fold
    (``agent_rows_current``), not on every step: like the memory, which was built with the agents of its time, a
    state belongs to the parameters it was made with; after changing them, prefill again.
    """

    m: torch.Tensor
    S: torch.Tensor
    z: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    chunk_size: int
    agent_num: int
    t: int = 0
    has_memory: bool = False
    agent_rows_current: bool = False
    memory_keys: torch.Tensor | None = None

    @property
    def folds_next(self) -> bool:
        """True when the next step folds a chunk into the memory: chunk c - 2 leaves the window at t = c·C."""
        return self.t % self.chunk_size == 0 and self.t >= 2 * self.chunk_size

    @property
    def separate_window_keys(self) -> bool:
        return self.memory_keys is not None

    @property
    def k_buf(self) -> torch.Tensor:
        """(B, H, 2C, d) view: the window's keys as the window logits read them."""
        window_rows = self.keys[:, :, self.agent_num :]
        return window_rows[..., window_rows.shape[-1] // 2 :] if self.separate_window_keys else window_rows

    @property
    def fold_k_buf(self) -> torch.Tensor:
        """(B, H, 2C, d) view: the window's plain keys, which the memory folds when they leave the window."""
        return self.memory_keys if self.memory_keys is not None else self.keys[:, :, self.agent_num :]

    @property
    def v_buf(self) -> torch.Tensor:
        """(B, H, 2C, d_v) view: the window's values."""
        return self.values[:, :, self.agent_num :]

    @property
    def readout(self) -> torch.Tensor:
        """(B, H, n, d_v) view: the memory readouts S / z."""
        return self.values[:, :, : self.agent_num]

    def tensors(self) -> list[torch.Tensor]:
        extra = [] if self.memory_keys is None else [self.memory_keys]
        return [self.m, self.S, self.z, self.keys, self.values, self.mask, *extra]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def causal_agent_init_state(
    batch: int, heads: int, agent_num: int, head_dim: int, value_dim: int, chunk_size: int,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    separate_window_keys: bool = False,
) -> CausalAgentState:  # fmt: skip
    """Empty state (no token seen). ``dtype`` is the input dtype; half types keep a float32 state.
    ``separate_window_keys``: the steps will pass window_q / window_k (see :class:`CausalAgentState`)."""
    cd = _compute_dtype(dtype)
    rows = agent_num + 2 * chunk_size
    width = 2 * head_dim if separate_window_keys else head_dim
    memory_keys = None
    if separate_window_keys:
        memory_keys = torch.zeros(batch, heads, 2 * chunk_size, head_dim, device=device, dtype=cd)
    return CausalAgentState(
        m=torch.zeros(batch, heads, agent_num, device=device, dtype=cd),
        S=torch.zeros(batch, heads, agent_num, value_dim, device=device, dtype=cd),
        z=torch.zeros(batch, heads, agent_num, device=device, dtype=cd),
        keys=torch.zeros(batch, heads, rows, width, device=device, dtype=cd),
        values=torch.zeros(batch, heads, rows, value_dim, device=device, dtype=cd),
        mask=torch.full((1, heads, 1, rows), float("-inf"), device=device, dtype=cd),
        chunk_size=chunk_size,
        agent_num=agent_num,
        memory_keys=memory_keys,
    )


def _fold_into_state(
    state: CausalAgentState, kc: torch.Tensor, vc: torch.Tensor, agents: torch.Tensor,
    decay: torch.Tensor | None, s: float,
) -> None:  # fmt: skip
    """Fold whole chunks kc (B, H, N, C, d), vc (B, H, N, C, d_v) into the memory, oldest first."""
    mu, S_hat, z_hat = _chunk_summaries(kc, vc, agents, decay, s)
    step_decay = None if decay is None else decay * state.chunk_size
    m, S, z = (state.m, state.S, state.z) if state.has_memory else (None, None, None)
    for c in range(kc.shape[2]):
        m, S, z = _fold(m, S, z, mu[:, :, c], S_hat[:, :, c], z_hat[:, :, c], step_decay)
    state.m, state.S, state.z, state.has_memory, state.agent_rows_current = m, S, z, True, False
    state.readout.copy_(S / z[..., None])


@torch.no_grad()
def causal_agent_prefill(
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    decay: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    window_k: torch.Tensor | None = None,
) -> CausalAgentState:
    """The state after reading k, v (B, H, T, d / d_v) in one go: equal to T calls of :func:`causal_agent_step`.

    ``window_k`` (B, H, T, d): the keys of the exact-window logits, if the steps will pass window_q / window_k.
    """
    _check_args(k, k, v, agents, decay, None, chunk_size, scale, window_k, window_k)
    cd = _compute_dtype(k.dtype)
    k, v, agents = k.to(cd), v.to(cd), agents.to(cd)
    decay = None if decay is None else decay.to(cd)
    B, H, T, d = k.shape
    C = chunk_size
    s = d**-0.5 if scale is None else scale
    separate = window_k is not None
    state = causal_agent_init_state(B, H, agents.shape[1], d, v.shape[-1], C, k.device, cd, separate)
    if T == 0:
        return state
    last_chunk = (T - 1) // C
    if last_chunk >= 2:  # chunks <= last_chunk - 2 have left the window
        end = (last_chunk - 1) * C
        state_k = k[:, :, :end].reshape(B, H, last_chunk - 1, C, d)
        state_v = v[:, :, :end].reshape(B, H, last_chunk - 1, C, v.shape[-1])
        _fold_into_state(state, state_k, state_v, agents, decay, s)
    pos = torch.arange(max(last_chunk - 1, 0) * C, T, device=k.device)
    slots = pos % (2 * C)
    state.k_buf[:, :, slots] = (window_k.to(cd) if separate else k)[:, :, pos]
    if separate:
        state.fold_k_buf[:, :, slots] = k[:, :, pos]
    state.v_buf[:, :, slots] = v[:, :, pos]
    state.mask[..., agents.shape[1] + slots] = 0.0  # exactly the positions a next query may read
    state.t = T
    return state


@torch.no_grad()
def causal_agent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    state: CausalAgentState,
    decay: torch.Tensor | None = None,
    agent_bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    check_inputs: bool = True,
    window_q: torch.Tensor | None = None,
    window_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step: q, k (B, H, 1, d), v (B, H, 1, d_v) at position ``state.t`` → (B, H, 1, d_v).

    Updates ``state`` in place (ring-buffer write, and a chunk fold when a chunk leaves the window).
    ``window_q`` / ``window_k`` (B, H, 1, d): the exact-window query and key, for a state made with separate
    window keys (and only then). ``check_inputs=False`` skips the argument checks, for a caller that built the
    inputs itself (the decode loop of a model, where the checks would cost more than the step); ``decay`` is then
    only needed when ``state.folds_next``.
    """
    if check_inputs:
        _check_args(q, k, v, agents, decay, agent_bias, state.chunk_size, scale, window_q, window_k)
        if q.shape[2] != 1:
            raise ValueError(
                f"causal_agent_step takes one token: q must be (B, H, 1, d), got {tuple(q.shape)}"
            )
    return _causal_agent_step(q, k, v, agents, state, decay, agent_bias, scale, window_q, window_k)


def _causal_agent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, state: CausalAgentState,
    decay: torch.Tensor | None, agent_bias: torch.Tensor | None, scale: float | None,
    window_q: torch.Tensor | None = None, window_k: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`causal_agent_step` without the argument checks and the grad-mode switch, for the decode loop of
    :class:`~agentattn.lm.AgentLM`, which makes q, k, v itself and runs under ``no_grad``: at batch 1 a step is a
    few dozen µs of tensor work, and the checks cost ~10 µs of it. ``decay`` is read only when
    ``state.folds_next``."""
    keys = state.keys
    if keys.shape[:2] != q.shape[:2] or keys.device != q.device or state.agent_num != agents.shape[1]:
        raise ValueError(
            f"state was made for (B, H) = {tuple(keys.shape[:2])} and n = {state.agent_num} on "
            f"{keys.device}, got q {tuple(q.shape[:2])}, n = {agents.shape[1]} on {q.device}"
        )
    if (
        window_k is not None
    ) != state.separate_window_keys:  # checked here too: the LM skips the other checks
        made = "with" if state.separate_window_keys else "without"
        raise ValueError(
            f"state was made {made} separate window keys: pass window_q and window_k "
            f"{'' if state.separate_window_keys else 'not '}to every step"
        )
    out_dtype, cd = q.dtype, keys.dtype
    if q.dtype != cd:
        q, k, v, agents = q.to(cd), k.to(cd), v.to(cd), agents.to(cd)
        if window_q is not None:
            window_q, window_k = window_q.to(cd), window_k.to(cd)
    C, t, n, d = state.chunk_size, state.t, agents.shape[1], q.shape[-1]
    s = d**-0.5 if scale is None else scale
    if state.folds_next:  # chunk c - 2 leaves the window: fold it into the memory
        half = ((t // C - 2) % 2) * C
        kc = state.fold_k_buf[:, :, half : half + C].unsqueeze(2)
        vc = state.v_buf[:, :, half : half + C].unsqueeze(2)
        _fold_into_state(state, kc, vc, agents, None if decay is None else decay.to(cd), s)
        state.mask.narrow(3, n + half, C).fill_(float("-inf"))
    if state.has_memory and not state.agent_rows_current:
        state.keys.narrow(2, 0, n).narrow(3, 0, d).copy_(agents)  # separate window keys: the rest stays 0
        bias_rows = state.mask.narrow(3, 0, n)  # (1, H, 1, n)
        if agent_bias is None:
            bias_rows.fill_(0.0)
        else:
            bias_rows.copy_(agent_bias[:, None])
        state.agent_rows_current = True
    row = n + t % (2 * C)
    if window_k is None:
        state.keys.narrow(2, row, 1).copy_(k)
    else:  # the window row is [0 | window_k] (its first half stays 0); the memory keeps the plain key
        state.keys.narrow(2, row, 1).narrow(3, d, d).copy_(window_k)
        state.memory_keys.narrow(2, row - n, 1).copy_(k)
        q = torch.cat([q, window_q], dim=-1)  # (B, H, 1, 2d): q meets the agents, window_q the window keys
    state.values.narrow(2, row, 1).copy_(v)
    state.mask.narrow(3, row, 1).fill_(0.0)
    # One softmax over [agents | window]: agent logits s·q·a + b read the memory (masked with -inf until it
    # exists), window logits s·q·k read the keys of the previous and the current chunk up to t.
    out = F.scaled_dot_product_attention(q, state.keys, state.values, attn_mask=state.mask, scale=s)
    state.t = t + 1
    return out.to(out_dtype)
