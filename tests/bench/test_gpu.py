"""``agentattn bench gpu``: a clear refusal without CUDA, and its report section rendered from the committed
measurement (the H200 run in benchmarks/results). No speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agentattn.bench import gpu, report
from agentattn.cli.main import main

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu-h200.json"


def test_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--tokens", "4096"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_section_from_the_committed_measurement():
    result = json.loads(RESULT.read_text())
    assert result["kind"] == "gpu" and all(c["ok"] for c in result["checks"])
    section = gpu.section(result)
    text = report.render_section(section)
    assert "## GPU" in text and "softmax-flash" in text and "agent-triton" in text
    # Every op-level row is timed against the flash baseline of its own N.
    ops = [r for r in result["rows"] if r["level"] == "op"]
    assert {r["tokens"] for r in ops} == {4096, 16384, 65536}
    for r in ops:
        assert "speedup_vs_softmax-flash" in r["modes"]["fwd"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["bench", "gpu", "--tokens", "1024", "--layer-sides", "8", "--skip-checks", "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["rows"]
