"""Every official module vector: outputs, input gradients and parameter gradients, with strict state-dict loading.

The vectors in tests/data/vectors/attn were produced by the official code (commit 207ce3eb357b); see
tests/data/vectors/README.md. Nothing here depends on the particular configs: the layer is built from the
constructor arguments recorded with each vector.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from agentattn.layers import AgentAttention, CSwinAgentAttention, PVTAgentAttention
from tests.conftest import DATA_DIR, assert_close_rel

VECTOR_DIR = DATA_DIR / "vectors"
CASES = json.loads((VECTOR_DIR / "attn" / "index.json").read_text())["cases"]


def build_layer(meta: dict) -> torch.nn.Module:
    kwargs = meta["constructor_kwargs"]
    common = dict(
        dim=meta["dim"],
        num_heads=meta["num_heads"],
        agent_num=meta["agent_num"],
        grid_size=tuple(meta["grid"]),
    )
    family = meta["family"]
    if family == "agent_deit":
        return AgentAttention(**common, num_prefix_tokens=1, qkv_bias=kwargs["qkv_bias"])
    if family == "agent_swin":
        return AgentAttention(**common, num_prefix_tokens=0, qkv_bias=kwargs["qkv_bias"])
    if family == "agent_pvt":
        return PVTAgentAttention(**common, sr_ratio=kwargs["sr_ratio"], qkv_bias=kwargs["qkv_bias"])
    if family == "agent_cswin":
        return CSwinAgentAttention(**common)
    raise AssertionError(f"unknown family {family}")


@pytest.mark.parametrize("case", CASES, ids=[c["case_id"] for c in CASES])
def test_official_module_vector(case):
    meta = json.loads((VECTOR_DIR / case["meta"]).read_text())
    tensors = load_file(VECTOR_DIR / case["file"])
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}

    layer = build_layer(meta).eval()
    layer.load_state_dict(state, strict=True)
    ours = layer.state_dict()
    assert list(ours) == list(meta["state_dict_keys"]) or set(ours) == set(meta["state_dict_keys"])
    assert {k: list(v.shape) for k, v in ours.items()} == meta["state_dict_keys"]

    x = tensors["x"].clone().requires_grad_()
    y = layer(x)
    assert_close_rel(y, tensors["y"], 1e-5, "y")

    (y * tensors["g"]).sum().backward()
    assert_close_rel(x.grad, tensors["grad_x"], 1e-4, "grad_x")
    grads = {name: p.grad for name, p in layer.named_parameters()}
    expected_grads = {k.removeprefix("grad."): v for k, v in tensors.items() if k.startswith("grad.")}
    assert set(grads) == set(expected_grads)
    for name, want in expected_grads.items():
        assert_close_rel(grads[name], want, 1e-4, f"grad.{name}")
