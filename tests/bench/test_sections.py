"""Section files of the other benchmarks (``--section``): written atomically, rendered by ``bench report``, with
their goals judged from the measured rows. No speed is asserted: the rows here are made up."""

from __future__ import annotations

import argparse
import json

from agentattn.bench import report
from agentattn.bench.sd import Row, sd_goals, section_markdown
from agentattn.bench.section import write_section
from agentattn.lm.bench import section_markdown as lm_markdown
from agentattn.lm.bench import speed_goals


def _sd_row(method: str, latent: int, ms: float, speedup: float) -> Row:
    return Row(
        "sd15", latent, method, ms, speedup, 100.0, 0.0 if method == "unpatched" else 0.1, 0.5, None, 4, 4
    )


def test_write_section_renders_in_the_report(tmp_path):
    path = tmp_path / "s.json"
    goals = [{"goal": "fast", "value": "2×", "met": True}]
    write_section(path, "Title", "agentattn bench x", {"cpu": "c", "gpu": "G"}, "| a |\n|---|\n| 1 |", goals)
    section = json.loads(path.read_text())
    assert section["kind"] == "section" and section["goals"] == goals
    text = report.render_section(section)
    assert "## Title" in text and "GPU G" in text and "| 1 |" in text and "| fast | 2× | yes |" in text


def test_sd_goals_judge_128_latents():
    rows = [
        _sd_row("unpatched", 128, 1000, 1.0),
        _sd_row("agentsd", 128, 500, 2.0),
        _sd_row("tomesd", 128, 700, 1.43),
    ]
    goals = sd_goals(rows)
    assert [g["met"] for g in goals] == [True, True]
    slow = [
        _sd_row("unpatched", 128, 1000, 1.0),
        _sd_row("agentsd", 128, 800, 1.25),
        _sd_row("tomesd", 128, 700, 1.43),
    ]
    assert [g["met"] for g in sd_goals(slow)] == [False, False]
    assert [g["met"] for g in sd_goals(rows[:1])] == [None, None]  # not measured
    args = argparse.Namespace(batch=1, threads=2, device="cpu", warmup=1, repeats=2, ratio=0.5, agent_ratio=0.95,
                              sx=4, sy=4, tome_ratio=None)  # fmt: skip
    assert "tomesd: ratio 0.5" in section_markdown(rows, args)


def test_lm_goals_and_tables():
    result = {
        "setup": {"threads": 2, "d_model": 256, "n_heads": 4, "agent_config": {"num_agents": 16}},
        "layer_forward": [{"context": 16384, "agent_ms": 100.0, "softmax_ms": 600.0, "linear_ms": 90.0,
                           "agent_speedup_vs_softmax": 6.0}],
        "decode": [{"context": 8192, "agent_ms_per_token": 4.0, "softmax_ms_per_token": 10.0,
                    "linear_ms_per_token": 3.0, "agent_latency_ratio_vs_softmax": 0.4,
                    "softmax_kv_over_agent_state": 100.0}],
        "crossover_context_layer_forward": 3000.0,
        "crossover_context_decode": None,
    }  # fmt: skip
    assert [g["met"] for g in speed_goals(result)] == [True, True, True]
    text = lm_markdown(result)
    assert (
        "| 16384 | 100.00 | 600.00 |" in text
        and "T ≈ 3,000" in text
        and "not within the measured range" in text
    )
