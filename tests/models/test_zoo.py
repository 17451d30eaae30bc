"""The 18 registered models against the official manifests: layouts, parameter counts and FLOPs."""

from __future__ import annotations

import json

import pytest
import timm

import agentattn  # noqa: F401  (registers the models)
from agentattn.measure import count_flops, count_params
from tests.conftest import DATA_DIR

MANIFESTS = {
    "agent_deit_tiny_patch16_224": "agent_deit_t",
    "agent_deit_small_patch16_224": "agent_deit_s",
    "agent_deit_small_patch16_448": "agent_deit_s_448",
    "agent_deit_base_patch16_224": "agent_deit_b",
    "agent_pvt_tiny_224": "agent_pvt_t",
    "agent_pvt_small_224": "agent_pvt_s",
    "agent_pvt_medium_224": "agent_pvt_m",
    "agent_pvt_medium_256": "agent_pvt_m_256",
    "agent_pvt_large_224": "agent_pvt_b",
    "agent_swin_tiny_224": "agent_swin_t",
    "agent_swin_small_224": "agent_swin_s",
    "agent_swin_small_288": "agent_swin_s_288",
    "agent_swin_base_224": "agent_swin_b",
    "agent_swin_base_384": "agent_swin_b_384",
    "agent_cswin_tiny_224": "agent_cswin_t",
    "agent_cswin_small_224": "agent_cswin_s",
    "agent_cswin_base_224": "agent_cswin_b",
    "agent_cswin_base_384": "agent_cswin_b_384",
}


def manifest(name: str) -> dict:
    return json.loads((DATA_DIR / "manifests" / f"{MANIFESTS[name]}.json").read_text())


def test_registry_has_exactly_the_official_names():
    assert sorted(timm.list_models("agent_*")) == sorted(MANIFESTS)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_layout_params_and_flops_match_the_official_manifest(name):
    ref = manifest(name)
    model = timm.create_model(name, pretrained=False)
    params = dict(model.named_parameters())
    ref_params = {e["key"]: e["shape"] for e in ref["state_dict"] if e["kind"] == "parameter"}
    assert {k: list(v.shape) for k, v in params.items()} == ref_params
    assert count_params(model) == ref["param_count"]
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, ref["img_size"], ref["img_size"])
    flops = count_flops(model, tuple(cfg["input_size"])).total
    assert abs(flops - ref["flops_fvcore"]) <= 0.02 * ref["flops_fvcore"], (flops, ref["flops_fvcore"])


def test_flops_cli(capsys):
    from agentattn.cli.main import main

    assert main(["flops", "agent_deit_tiny_patch16_224"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("agent_deit_tiny"))
    _, img, params_m, gflops = row.split()
    ref = manifest("agent_deit_tiny_patch16_224")
    assert int(img) == 224 and float(params_m) == round(ref["param_count"] / 1e6, 2)
    assert abs(float(gflops) - ref["flops_fvcore"] / 1e9) <= 0.02 * ref["flops_fvcore"] / 1e9
    assert main(["flops", "agent_no_such_model"]) == 1
    assert "agentattn flops: error: unknown model 'agent_no_such_model'" in capsys.readouterr().err
