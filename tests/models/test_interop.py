"""The PyTorch contracts other tools rely on, for every family, on the official reduced checkpoints.

``model.to(memory_format=torch.channels_last)`` (timm's ``train.py --channels-last``), ``torch.jit.trace``, the
legacy ONNX exporter (``torch.onnx.export(dynamo=False)``), torch.fx through timm's and torchvision's feature
extractors, and construction on the meta device (FSDP / accelerate). timm's own model suite runs in
tests/timm_upstream/.
"""

from __future__ import annotations

import io
import warnings

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._manipulate import reinit_non_persistent_buffers

import agentattn.models  # noqa: F401  (registers the models)
from tests.conftest import DATA_DIR, assert_close_rel
from tests.models import test_agent_cswin, test_agent_deit, test_agent_pvt, test_agent_swin

FAMILIES = {
    "deit": ("agent_deit_tiny_patch16_224", test_agent_deit.REDUCED),
    "pvt": ("agent_pvt_tiny_224", test_agent_pvt.reduced_kwargs()),
    "swin": ("agent_swin_tiny_224", test_agent_swin.reduced_kwargs()),
    "cswin": ("agent_cswin_tiny_224", test_agent_cswin.reduced_kwargs()),
}
ALL_MODELS = sorted(timm.list_models("agent_*"))


def official(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The reduced model with the official code's weights, and the official images and logits."""
    name, kwargs = FAMILIES[family]
    vector = DATA_DIR / "vectors" / "models" / f"agent_{family}_reduced_a"
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(vector / "checkpoint.pth")), **kwargs
    )
    return model.eval(), load_file(str(vector / "io.safetensors"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_channels_last_keeps_the_official_layout_and_numbers(family):
    model, data = official(family)
    images = data["images"]
    with torch.no_grad():
        reference = model(images)
    layout = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    official_state = {k: v.clone() for k, v in model.state_dict().items()}

    model = model.to(memory_format=torch.channels_last)

    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == layout
    model.load_state_dict(official_state, strict=True)  # the official checkpoint still loads, strictly
    with torch.no_grad():
        out = model(images.contiguous(memory_format=torch.channels_last))
    assert_close_rel(out, reference, 1e-5, f"{family} channels_last")
    assert (out - data["logits"]).abs().max().item() <= 1e-4  # the bound of the official-parity tests
    # A training step, as timm's train.py --channels-last takes it.
    model.train()
    model(images.contiguous(memory_format=torch.channels_last)).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def _trace(model: torch.nn.Module, images: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings for the (constant) grid, and trace's deprecation
        return torch.jit.trace(model, images)  # check_trace on: the graph must not differ between runs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jit_trace_matches_eager_at_any_batch_size(family):
    model, data = official(family)
    images = data["images"]
    traced = _trace(model, images[:1])
    with torch.no_grad():
        assert_close_rel(traced(images), model(images), 1e-5, f"{family} traced, batch 2")
        assert_close_rel(traced(images[:1]), model(images[:1]), 1e-5, f"{family} traced, batch 1")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_legacy_onnx_export_runs_in_onnxruntime(family):
    ort = pytest.importorskip("onnxruntime")
    model, data = official(family)
    images = data["images"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (images[:1],),  # traced at batch 1, run at batch 2: the batch axis must stay dynamic
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        reference = model(images)
    # onnxruntime's kernels sum in another order than PyTorch's: 1e-4 relative, not the 1e-5 of eager parity
    assert_close_rel(torch.from_numpy(logits), reference, 1e-4, f"{family} onnxruntime")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torchvision_feature_extractor_with_timm_leaves(family):
    from torchvision.models.feature_extraction import create_feature_extractor

    model, data = official(family)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    extractor = create_feature_extractor(model, return_nodes={"head": "logits"}, tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        assert torch.equal(extractor(data["images"])["logits"], model(data["images"]))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_meta_device_construction_then_materialise(name):
    """Every registered model builds on the meta device; ``to_empty`` + a strict load gives the CPU model."""
    with torch.device("meta"):
        meta_model = timm.create_model(name)
    assert all(p.is_meta for p in meta_model.parameters())
    if name not in {FAMILIES[f][0] for f in FAMILIES}:
        return  # the full-size models: layout only (tests/models/test_zoo.py checks it against the manifests)
    family = next(f for f in FAMILIES if FAMILIES[f][0] == name)
    model, data = official(family)
    with torch.device("meta"):
        meta_model = timm.create_model(name, **FAMILIES[family][1])
    meta_model = meta_model.to_empty(device="cpu")
    meta_model.load_state_dict(model.state_dict(), strict=True)
    reinit_non_persistent_buffers(meta_model)  # timm's step: buffers outside the state dict are rebuilt
    with torch.no_grad():
        assert_close_rel(meta_model.eval()(data["images"]), model(data["images"]), 1e-5, name)
