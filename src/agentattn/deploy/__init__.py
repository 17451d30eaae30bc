"""Deployment: ONNX and ``torch.export`` programs of the zoo's models, int8 and bf16 CPU inference."""

from .export import (
    DEFAULT_OPSET,
    ModelSpec,
    atomic_output,
    export_onnx,
    export_program,
    export_torch,
    folded_agent_biases,
    load_exported,
    load_model,
)
from .quantize import OnnxModel, onnx_session, quantize_onnx_int8, to_bf16

__all__ = [
    "DEFAULT_OPSET",
    "ModelSpec",
    "OnnxModel",
    "atomic_output",
    "export_onnx",
    "export_program",
    "export_torch",
    "folded_agent_biases",
    "load_exported",
    "load_model",
    "onnx_session",
    "quantize_onnx_int8",
    "to_bf16",
]
