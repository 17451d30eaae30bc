"""Is a tracer recording this call? One answer for the ops, layers and models.

Checks that read Python values from shapes are skipped while tracing: the graph is recorded once, on a valid
input, and under torch.fx the shapes are symbolic proxies (under torch.jit.trace, 0-d tensors) that cannot answer
a Python ``if`` without fixing the trace or breaking it.
"""

from __future__ import annotations

import torch
import torch.fx

# torch.fx's own test for "inside symbolic_trace" (older torch has only is_fx_tracing, which also covers export)
_fx_tracing = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing
)


def is_tracing() -> bool:
    """True while torch.fx, torch.jit.trace, torch.compile or torch.export traces the caller."""
    return _fx_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()
