"""Shared fixtures and tolerance helpers.

Tolerances are relative to the largest magnitude of the reference, the convention of the official vectors:
fp32 outputs within 1e-5 × max|ref|.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.utils._device  # the factory table the NaN-filling fixture warms (not imported by torch itself)
from hypothesis import HealthCheck, settings

DATA_DIR = Path(__file__).parent / "data"

# Property-based tests: a fixed, derandomised profile by default (bounded examples, the same draws on every
# run), and a longer random one with HYPOTHESIS_PROFILE=long. @given tests take their number of examples from
# the profile (do not set max_examples per test), so the profile sizes every fuzz test at once.
_HYPOTHESIS_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
settings.register_profile("ci", max_examples=20, derandomize=True, database=None, **_HYPOTHESIS_COMMON)
settings.register_profile("long", max_examples=500, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def assert_close_rel(
    actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "", floor: float = 0.0
) -> None:
    """Assert max|actual - expected| <= rel × max(max|expected|, floor) (and equal shapes).

    ``floor`` is for references that are zero in exact arithmetic (e.g. the q-gradient with a single agent),
    where float noise must be judged against the scale of the computation instead.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.to(torch.float64)
    diff = (actual.to(torch.float64) - expected).abs().max().item() if expected.numel() else 0.0
    bound = rel * max(expected.abs().max().item(), floor) if expected.numel() else 0.0
    assert diff <= bound, f"{what}: max abs diff {diff:.3e} > {rel:g} × max|ref| = {bound:.3e}"


@pytest.fixture(autouse=True)
def _two_threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch):
    """Fill ``torch.empty`` with NaN so that a read of uninitialised memory shows up as NaN (fla's trick)."""
    original = torch.empty

    def empty_nan(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.is_floating_point() and not t.requires_grad and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    # torch caches its table of factory functions for `with torch.device(...)` on first use: fill it with the
    # real torch.empty first, or meta-device construction inside the test would not reach the wrapped one.
    torch.utils._device._device_constructors()
    monkeypatch.setattr(torch, "empty", empty_nan)
    yield
    monkeypatch.undo()
    # torch caches its table of factory functions for `with torch.device(...)`; one built while the wrapper
    # was active would stop meta-device construction from working in later tests.
    torch.utils._device._device_constructors.cache_clear()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")


@pytest.hookimpl(trylast=True)  # after tests/timm_upstream/conftest.py has marked its slow runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or "slow" in (config.getoption("-m") or ""):
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
