"""Fully masked rows: one answer on every path of the agent attention op.

A row of logits that is -inf everywhere leaves its softmax nothing to attend to (0/0, NaN in a plain softmax).
That happens when a row of B1 (one agent over the keys, padded keys counted as -inf) or of B2 (one query over the
agents) is -inf at every position. Every path treats such a row as a sequence whose keys are all padded: it
attends to nothing, so its output row (the agent's values, or the query's output) is zero, no gradient flows
through it (the gradient of that bias row is zero) and every gradient stays finite. A row with some -inf entries
and some finite ones is an ordinary softmax over its finite entries.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def softmax_or_zero(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, with a zero row (and a zero gradient) where the logits are -inf throughout.

    The reference formulation: the fully masked rows are set to 0 before the softmax (so it sees no 0/0) and
    its output is zeroed on them after. A NaN logit is not -inf, so NaN still propagates.
    """
    dead = (logits == NEG_INF).all(dim=-1, keepdim=True)
    return logits.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)


def fully_masked_rows(mask: torch.Tensor | None, check_first: bool) -> torch.Tensor | None:
    """The rows of an additive mask that are -inf at every position: a (…, 1) bool tensor, or None if none is.

    With ``check_first`` (where reading a tensor's value costs no device sync and breaks no traced graph) the
    common case costs a look at the first and last columns (a few µs): a row can be -inf throughout only if it is
    -inf at both ends, so if the rows' larger end values have a finite sum, no row is. Only otherwise is the whole
    mask reduced, and None comes back when no row is fully masked. (Both ends, so that neither right nor left key
    padding folded into B1 sends every call down the full reduction.) Without ``check_first`` the rows are
    always computed, one reduction over the mask, for the caller to apply unconditionally.
    """
    if mask is None:
        return None
    if check_first and math.isfinite(torch.maximum(mask.select(-1, 0), mask.select(-1, -1)).sum().item()):
        return None
    dead = mask.amax(dim=-1, keepdim=True) == NEG_INF  # a NaN row is not fully masked: NaN propagates
    if check_first and not bool(dead.any()):
        return None
    return dead


def check_rows_first(x: torch.Tensor) -> bool:
    """Whether to look for fully masked rows before paying for them (see :func:`fully_masked_rows`): on CPU, where a
    look costs no device sync, and not in a compiled, exported or traced call, where a data-dependent branch would
    break or be baked into the graph. Elsewhere they are always patched."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    return x.device.type == "cpu"
