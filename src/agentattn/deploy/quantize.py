"""Reduced-precision CPU inference: dynamic int8 through onnxruntime, bf16 through PyTorch.

- int8: :func:`quantize_onnx_int8` rewrites an fp32 ONNX file with onnxruntime's dynamic quantisation. The
  weights of every MatMul/Gemm with a constant weight (all Linear layers: qkv, proj, MLP, head) become int8
  per tensor; activations are quantised on the fly per batch. Attention matmuls between activations, the
  softmaxes, convs and norms stay fp32.
- bf16: :func:`to_bf16` casts a copy of the model to bfloat16 behind an fp32 interface (fp32 images in, fp32
  logits out), for eager use or for ``torch.export``.

:class:`OnnxModel` runs an ONNX file in onnxruntime (CPU execution provider) as an ``nn.Module``, so the
training code's ``evaluate`` measures its accuracy like any model's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .export import atomic_output

__all__ = ["OnnxModel", "onnx_session", "quantize_onnx_int8", "to_bf16"]

INT8_OP_TYPES = ("MatMul", "Gemm")


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "onnxruntime is not installed: pip install 'agentattn[deploy]' (onnx, onnxruntime, onnxscript)"
        ) from err
    return onnxruntime


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` on the CPU execution provider, all graph optimisations on.

    Args:
        threads: intra-op threads (None: onnxruntime's default, one per core).
    """
    ort = _require_onnxruntime()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable files
        raise ValueError(f"{path}: onnxruntime cannot load it ({' '.join(str(err).split())[:300]})") from err


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime behind ``forward(images) -> logits``.

    Shape:
        ``forward(x)``: x (B, C, H, W) float32 on the CPU → (B, num_classes) float32.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, num_classes)."""
        if x.device.type != "cpu":
            raise ValueError(f"OnnxModel runs on the CPU; x is on {x.device}")
        array = x.detach().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def quantize_onnx_int8(src: str | os.PathLike, out: str | os.PathLike, per_channel: bool = False) -> Path:
    """Dynamic int8 quantisation of the fp32 ONNX file ``src`` into ``out`` (written atomically).

    Weights of MatMul/Gemm nodes with a constant second input become int8 (``QInt8``); activations are
    quantised to uint8 per batch at run time (``DynamicQuantizeLinear`` + ``MatMulInteger``).
    """
    _require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_output(out) as tmp:
        quantize_dynamic(
            Path(src),
            tmp,
            op_types_to_quantize=list(INT8_OP_TYPES),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    return Path(out)


class _CastModel(nn.Module):
    """Runs ``model`` in ``dtype`` with fp32 inputs and outputs."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) fp32 → (B, num_classes) fp32."""
        return self.model(x.to(self.dtype)).float()


def to_bf16(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of ``model`` (weights and compute) taking and returning float32 tensors."""
    return _CastModel(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16).eval()
