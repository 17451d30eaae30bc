"""Run timm's own model suite (test_models.py beside this file, vendored unchanged) on the agent zoo.

Importing ``agentattn.models`` registers the 18 agent models before pytest collects timm's file, whose
parametrisations call ``timm.list_models()``. Only the agent models' runs are kept. One model per family runs
in ``make test``; the other 14 are marked ``slow`` (``pytest --run-slow tests/timm_upstream``).

Deselected, with reasons:
- ``test_model_forward_torchscript`` and the fx+torchscript tests: ``torch.jit.script`` is deprecated in the
  torch this project pins, and scripting is not supported (``torch.jit.trace`` is, see tests/models/).
- tests without a ``model_name`` (timm's NaFlexViT parity checks): they test timm's own code, not ours.
"""

from __future__ import annotations

import pytest
import timm.layers
import timm.models

import agentattn.models  # noqa: F401  (registers the agent models with timm)

# The vendored file names timm classes of its own version at import; with an older timm (pyproject allows
# >= 1.0.9) it is not collected, rather than failing the whole run.
_NEEDS = {
    timm.models: ("EfficientVit", "EfficientVitLarge", "FasterNet", "HighPerfGpuNet", "GhostNet", "MetaNeXt",
                  "MobileNetV3", "RepGhostNet", "VGG", "get_notrace_modules", "get_notrace_functions"),
    timm.layers: ("Format", "get_spatial_dim", "get_channel_dim"),
}  # fmt: skip
collect_ignore = (
    [] if all(hasattr(m, n) for m, names in _NEEDS.items() for n in names) else ["test_models.py"]
)

FAST_MODELS = frozenset(
    {
        "agent_deit_tiny_patch16_224",
        "agent_pvt_tiny_224",
        "agent_swin_tiny_224",
        "agent_cswin_tiny_224",
    }
)
UNSUPPORTED_TESTS = ("torchscript",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        if "timm_upstream" not in item.nodeid:
            keep.append(item)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        test_name = item.originalname if isinstance(item, pytest.Function) else item.name
        if not (isinstance(name, str) and name.startswith("agent_")) or any(
            word in test_name for word in UNSUPPORTED_TESTS
        ):
            drop.append(item)
            continue
        if name not in FAST_MODELS:
            item.add_marker(pytest.mark.slow)
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
