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

import agentattn.models  # noqa: F401  (registers the agent models with timm)

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
