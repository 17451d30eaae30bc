"""FLOP counting in the convention of the paper's tables (fvcore, as the official ``temp.py`` uses it).

One multiply-add counts as one FLOP, and only these operators count (fvcore's default handles):

    linear / mm / addmm / bmm / matmul   batch · n · k · m
    convolution                          N · C_out · prod(out spatial) · C_in/groups · prod(kernel)
    layer_norm                           5 · numel(input) (4 without affine)
    upsample_bilinear2d                  4 · numel(output)
    adaptive_avg_pool2d                  numel(input)

Softmax, GELU and element-wise ops count 0, as in fvcore. Unlike fvcore or ``FlopCounterMode`` on CPU, the
fused attention kernels count too: ``scaled_dot_product_attention`` is its two matmuls, so a model that calls
SDPA is not flattered.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(shape)


def _matmul(a_shape, b_shape) -> int:
    *batch, n, k = a_shape
    m = b_shape[-1]
    return _numel(batch) * n * k * m


def _sdpa(q, k, v) -> int:
    # q @ kᵀ: (…, L, d) × (…, d, S); probs @ v: (…, L, S) × (…, S, d_v)
    batch = _numel(q.shape[:-2])
    length, dim = q.shape[-2:]
    keys, value_dim = v.shape[-2], v.shape[-1]
    return batch * length * keys * (dim + value_dim)


def _conv(x, w, out) -> int:
    return out.shape[0] * _numel(out.shape[2:]) * w.shape[0] * _numel(w.shape[1:])


_HANDLERS: dict[object, tuple[str, Callable]] = {
    # mm/addmm come from nn.Linear (fvcore's "linear"); batched products are fvcore's "matmul".
    aten.mm.default: ("linear", lambda args, out: _matmul(args[0].shape, args[1].shape)),
    aten.addmm.default: ("linear", lambda args, out: _matmul(args[1].shape, args[2].shape)),
    aten.bmm.default: ("matmul", lambda args, out: _matmul(args[0].shape, args[1].shape)),
    aten.baddbmm.default: ("matmul", lambda args, out: _matmul(args[1].shape, args[2].shape)),
    aten.convolution.default: ("conv", lambda args, out: _conv(args[0], args[1], out)),
    aten.native_layer_norm.default: (
        "layer_norm",
        lambda args, out: _numel(args[0].shape) * (5 if len(args) > 2 and args[2] is not None else 4),
    ),
    aten.upsample_bilinear2d.default: ("upsample_bilinear2d", lambda args, out: 4 * out.numel()),
    aten.upsample_bilinear2d.vec: ("upsample_bilinear2d", lambda args, out: 4 * out.numel()),
    aten._adaptive_avg_pool2d.default: ("adaptive_avg_pool2d", lambda args, out: args[0].numel()),
}
for _name in (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
):
    if hasattr(aten, _name):
        _HANDLERS[getattr(aten, _name).default] = (
            "matmul",
            lambda args, out: _sdpa(args[0], args[1], args[2]),
        )


class FlopCounter(TorchDispatchMode):
    """Counts multiply-adds per operator class while active. ``total`` and ``by_operator`` after the block."""

    def __init__(self) -> None:
        super().__init__()
        self.by_operator: dict[str, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.by_operator.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        handler = _HANDLERS.get(func)
        if handler is not None:
            name, count = handler
            self.by_operator[name] += int(count(args, out[0] if isinstance(out, tuple) else out))
        return out


@torch.no_grad()
def count_flops(model: torch.nn.Module, input_size: tuple[int, ...]) -> FlopCounter:
    """Run ``model`` once in eval mode on ``torch.rand(1, *input_size)`` and count its FLOPs (multiply-adds).

    Returns the counter: ``.total`` and ``.by_operator``.
    """
    was_training = model.training
    model.eval()
    x = torch.rand(1, *input_size)
    counter = FlopCounter()
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return counter


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (buffers excluded), as in the paper's tables."""
    return sum(p.numel() for p in model.parameters())
