"""Exported graphs match eager PyTorch: ONNX in onnxruntime, and the torch.export program after save/load."""

from __future__ import annotations

import onnx
import pytest
import torch
from safetensors.torch import load_file

from agentattn.deploy import OnnxModel, export_torch, load_exported, quantize_onnx_int8, to_bf16
from agentattn.deploy.export import MIN_OPSET, example_input, folded_agent_biases
from agentattn.layers.agent_attention import AgentAttentionBase

from .conftest import OFFICIAL_DEIT, REDUCED, get_export, needs_exporter

PARITY = 1e-4  # max abs diff on logits (the bound)
# Nodes that would mean the agent op did not export as plain matmul/softmax/pool/conv: index gathers from the
# generic adaptive-pool decomposition, control flow, bias interpolation (the biases are folded constants).
UNWANTED_NODES = {"GatherND", "ScatterND", "Range", "Loop", "If", "Resize", "Attention"}


def check_graph(path) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= MIN_OPSET
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Softmax", "Conv"} <= ops, ops
    assert not ops & UNWANTED_NODES, ops & UNWANTED_NODES
    assert {n.domain for n in model.graph.node} <= {""}, "custom-domain nodes"
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value, "the batch axis is not dynamic"


def _parity(exported, batches=(1, 3)) -> None:
    runtime = OnnxModel(exported.onnx)
    for batch in batches:
        x = example_input(exported.spec, batch)
        with torch.no_grad():
            ref = exported.model(x)
        out = runtime(x)
        assert out.shape == ref.shape == (batch, exported.spec.num_classes)
        diff = (out - ref).abs().max().item()
        assert diff <= PARITY, f"{exported.spec.name} batch {batch}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_onnx_parity_agent_families(export_cache, name):
    needs_exporter()
    exported = get_export(export_cache, name)
    check_graph(exported.onnx)
    _parity(exported)


def test_onnx_reproduces_the_official_logits(export_cache):
    """The ONNX export of the official reduced Agent-DeiT checkpoint gives the official code's logits."""
    needs_exporter()
    exported = get_export(export_cache, "agent_deit_tiny_patch16_224")
    io = load_file(str(OFFICIAL_DEIT / "io.safetensors"))
    assert exported.spec.num_classes == io["logits"].shape[1] == 100  # read from the file's head
    diff = (OnnxModel(exported.onnx)(io["images"]) - io["logits"]).abs().max().item()
    assert diff <= PARITY, f"max abs diff to the official logits {diff:.2e}"


def test_torch_export_round_trip(export_cache, tmp_path):
    needs_exporter()
    exported = get_export(export_cache, "agent_deit_tiny_patch16_224")
    path = export_torch(exported.program, tmp_path / "deit.pt2")
    loaded = load_exported(path)
    for batch in (1, 3):
        x = example_input(exported.spec, batch)
        with torch.no_grad():
            before, after, eager = exported.program.module()(x), loaded(x), exported.model(x)
        assert torch.equal(before, after), "the program changed through save/load"
        assert (after - eager).abs().max().item() <= PARITY
    assert [p.name for p in tmp_path.iterdir()] == ["deit.pt2"]  # no temp file left


def test_int8_runs_close_to_fp32(export_cache, tmp_path):
    needs_exporter()
    exported = get_export(export_cache, "agent_deit_tiny_patch16_224")
    path = quantize_onnx_int8(exported.onnx, tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
    x = example_input(exported.spec, 3)
    fp32, int8 = OnnxModel(exported.onnx)(x), OnnxModel(path)(x)
    assert int8.shape == fp32.shape and torch.isfinite(int8).all()
    assert 0 < (int8 - fp32).abs().max().item() <= 0.1 * fp32.abs().max().item()


def test_bf16_copy_is_close_and_leaves_the_model_fp32(export_cache):
    needs_exporter()
    exported = get_export(export_cache, "agent_deit_tiny_patch16_224")
    bf16 = to_bf16(exported.model)
    x = example_input(exported.spec, 3)
    with torch.no_grad():
        ref, out = exported.model(x), bf16(x)
    assert out.dtype == torch.float32 and next(exported.model.parameters()).dtype == torch.float32
    assert (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_folded_biases_are_constants_and_removed_after(export_cache):
    needs_exporter()
    exported = get_export(export_cache, "agent_swin_tiny_224")
    model, x = exported.model, example_input(exported.spec)
    layers = [m for m in model.modules() if isinstance(m, AgentAttentionBase)]
    with folded_agent_biases(model, x) as count:
        assert count == len(layers) > 0
        layer = layers[0]
        assert not layer._folded_bias1.requires_grad
        assert "_folded_bias1" not in model.state_dict()  # non-persistent: checkpoints are unchanged
        with torch.no_grad():
            folded = model(x)
    assert all("biases" not in m.__dict__ and "_folded_bias1" not in m._buffers for m in layers)
    with torch.no_grad():
        assert torch.equal(model(x), folded)
