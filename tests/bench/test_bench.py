"""The benchmarks run at tiny sizes and write their JSON, plots and report. No speed is asserted."""

from __future__ import annotations

import json

import pytest

from agentattn.bench import attention, report
from agentattn.cli.main import main

TINY = ["--tokens", "17", "--agents", "4", "--dim", "32", "--heads", "2", "--batch", "17=2"]


@pytest.fixture(scope="module")
def attention_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path, png = out / "attention.json", out / "attention.png"
    argv = ["bench", "attention", *TINY, "--budget", "0.05", "--rounds", "2", "--peak-size", "128"]
    argv += ["--memory", "inprocess"]  # the fresh-process path is tested on one case below
    assert main([*argv, "--json", str(path), "--plot", str(png), "--section", str(out / "rounds.json")]) == 0
    return path, png


def test_attention_sweep_writes_every_case(attention_json):
    path, png = attention_json
    result = json.loads(path.read_text())
    assert result["kind"] == "attention" and result["command"].startswith("agentattn bench attention")
    assert {r["case"] for r in result["layers"]} == set(attention.CASES)
    for row in result["layers"]:
        assert row["tokens"] == 17 and row["batch"] == 2 and row["fwd_flops"] > 0
        for mode in attention.MODES:
            res = row["modes"][mode]
            assert res["ms"] > 0 and res["peak_mb"] >= 0, (row["case"], mode, res)
    base = next(r for r in result["layers"] if r["case"] == "agentattn")
    assert base["modes"]["fwd"]["ratio"] == 1.0
    official = next(r for r in result["layers"] if r["case"] == "official")["modes"]["fwd"]
    assert len(official["round_ms"]) == official["runs"] == len(official["round_ratios"])
    assert min(official["round_ratios"]) <= official["ratio"] <= max(official["round_ratios"])
    assert result["matmul_peak"]["gflops_per_s"] > 0
    assert 0 < result["op"][0]["fraction_of_peak"]
    assert png.stat().st_size > 0


def test_rounds_section_lists_paired_ratios(attention_json):
    path, _ = attention_json
    section = json.loads((path.parent / "rounds.json").read_text())
    assert section["kind"] == "section" and section["title"] == "Attention layers: paired rounds at N = 17"
    table = [line for line in section["markdown"].splitlines() if line.startswith("| 17 | 2 |")]
    result = json.loads(path.read_text())
    expected = sum(
        "round_ratios" in res
        for r in result["layers"]
        if r["case"] != "agentattn"
        for res in r["modes"].values()
    )
    assert expected > 0 and len(table) == expected
    assert section["goals"] == []  # the tiny config is not a goal config
    text = report.build_report(None, None, [path.parent / "rounds.json"], path.parent, path.parent, "cmd")
    assert "## Attention layers: paired rounds at N = 17" in text and table[0] in text


def test_cases_share_weights_and_agree_with_official():
    import torch

    ours = attention.build_case("agentattn", 32, 2, 4, 4).eval()
    official = attention.build_case("official", 32, 2, 4, 4).eval()
    softmax = attention.build_case("softmax-sdpa", 32, 2, 4, 4)
    assert torch.equal(ours.qkv.weight, softmax.qkv.weight)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=0, atol=1e-5)


def test_case_over_memory_limit_is_marked_not_run():
    rows = attention.bench_sweep(
        [17], ["softmax-explicit"], 32, 2, 4, budget_s=0.05, rounds=1, mem_limit_gb=0.0, log=lambda s: None
    )
    assert all(res["status"] == "oom" for res in rows[0]["modes"].values())


def test_fresh_process_measures_peak_memory():
    spec = {"case": "agentattn", "tokens": 17, "batch": 2, "dim": 32, "heads": 2, "agents": 4, "threads": 1}
    result = attention.measure_in_subprocess({**spec, "modes": ["fwd", "fwd_bwd"]}, timeout_s=120)
    for mode in attention.MODES:
        assert result[mode]["cold_ms"] > 0 and result[mode]["peak_mb"] >= 0, result


def test_case_over_time_limit_is_marked_timeout():
    spec = {"case": "agentattn", "tokens": 17, "batch": 2, "dim": 32, "heads": 2, "agents": 4, "threads": 1}
    result = attention.measure_in_subprocess({**spec, "modes": ["fwd"]}, timeout_s=0.01)
    assert result["fwd"]["status"] == "timeout"


def test_crossover_interpolates_in_log_space():
    def row(case, n, ms):
        return {"case": case, "tokens": n, "modes": {"fwd": {"ms": ms}}}

    rows = [row("agentattn", 100, 2.0), row("softmax-sdpa", 100, 1.0)]
    rows += [row("agentattn", 10000, 1.0), row("softmax-sdpa", 10000, 2.0)]
    assert attention.crossover(rows, "fwd") == pytest.approx(1000.0)
    assert attention.crossover(rows[:2], "fwd") is None


def test_bad_tokens_is_a_one_line_error(capsys):
    assert main(["bench", "attention", "--tokens", "18"]) == 2
    assert "1 + a square" in capsys.readouterr().err


def test_model_bench_and_report(tmp_path, attention_json):
    model_json = tmp_path / "model.json"
    names = ["deit_tiny_patch16_224", "agent_deit_tiny_patch16_224"]
    argv = ["bench", "model", *names, "--img-size", "32", "--batch", "2", "--rounds", "1"]
    assert main([*argv, "--json", str(model_json)]) == 0
    result = json.loads(model_json.read_text())
    assert result["kind"] == "model" and len(result["models"]) == 2
    agent = next(r for r in result["models"] if r["model"] == names[1])
    assert agent["gflops"] > 0 and agent["modes"]["infer"]["img_per_s"] > 0
    assert agent["modes"]["train"]["vs_counterpart"] > 0

    section = tmp_path / "sd.json"
    section.write_text(
        json.dumps(
            {
                "kind": "section",
                "title": "Stable Diffusion",
                "command": "agentattn bench sd",
                "tables": [{"caption": "UNet", "columns": ["model", "s"], "rows": [["sd15", 1.5]]}],
                "goals": [{"goal": "faster", "value": "2×", "met": True}],
            }
        )
    )
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "report", "--attention", str(attention_json[0]), "--model", str(model_json)]
    assert (
        main([*argv, "--section", str(section), "--output", str(out), "--figures", str(tmp_path / "fig")])
        == 0
    )
    text = out.read_text()
    for needle in (
        "## Attention layers",
        "## Whole models",
        "## Stable Diffusion",
        "| sd15 | 1.5 |",
        "### Goals",
    ):
        assert needle in text
    assert "Do not edit by hand" in text and (tmp_path / "fig" / "attention.png").exists()
    # Goal rows only judge configurations that were measured: the tiny sweep leaves them "not measured".
    assert "DeiT-T block" in text and "not measured" in text


def test_report_goals_from_a_sweep():
    def row(case, n, b, **modes):
        return {"case": case, "tokens": n, "batch": b, "modes": modes}

    result = {
        "config": {"dim": 192, "heads": 3, "agents": 49},
        "layers": [
            row("agentattn", 197, 64, fwd={"ms": 1.0, "ratio": 1.0}, fwd_bwd={"ms": 1.0, "ratio": 1.0}),
            row("official", 197, 64, fwd={"ms": 1.4, "ratio": 1.4, "round_ratios": [1.25, 1.4, 1.5]},
                fwd_bwd={"ms": 1.2, "ratio": 1.2}),
        ],
    }  # fmt: skip
    goals = attention.attention_goals(result)
    assert [g["met"] for g in goals[:2]] == [True, False]
    assert goals[0]["value"] == "1.40× (rounds 1.25–1.50×)" and goals[1]["value"] == "1.20×"


def test_fresh_process_peak_memory_sees_a_large_case():
    # A materialised (2, 2, 1025, 1025) fp32 softmax holds 16 MiB per matrix: the figure must show it, even though
    # importing torch peaked higher before the call (the peak is reset first).
    spec = {
        "case": "softmax-explicit",
        "tokens": 1025,
        "batch": 2,
        "dim": 32,
        "heads": 2,
        "agents": 4,
        "threads": 1,
    }
    result = attention.measure_in_subprocess({**spec, "modes": ["fwd"]}, timeout_s=120)
    assert result["fwd"]["peak_mb"] >= 16, result


def test_rounds_section_judges_the_deit_goals(tmp_path):
    def row(case, **modes):
        return {"case": case, "tokens": 197, "batch": 64, "modes": modes}

    rounds = {"ms": 1.0, "ratio": 1.0, "round_ratios": [1.0, 1.0, 1.0]}
    result = {
        "command": "agentattn bench attention --tokens 197", "environment": {},
        "config": {"dim": 192, "heads": 3, "agents": 49, "label": "DeiT-T", "rounds": 3, "budget_s": 1.0},
        "layers": [
            row("agentattn", fwd=rounds, fwd_bwd=rounds),
            row("official", fwd={"ms": 1.4, "ratio": 1.4, "round_ratios": [1.2, 1.4, 1.5]},
                fwd_bwd={"ms": 1.25, "ratio": 1.25, "round_ratios": [1.1, 1.25, 1.6]}),
        ],
    }  # fmt: skip
    attention.write_rounds_section(result, tmp_path / "s.json")
    section = json.loads((tmp_path / "s.json").read_text())
    assert [g["met"] for g in section["goals"]] == [True, False]
    assert "| 197 | 64 | official | fwd_bwd | 1.25× | 1.25× |" in section["markdown"]


def test_model_bench_backends_batches_and_softmax_twins(tmp_path, capsys):
    from agentattn.bench import model as model_bench

    out = tmp_path / "model.json"
    argv = ["bench", "model", "agent_deit_tiny_patch16_224", "--img-size", "32", "48", "--batch", "2", "1",
            "--rounds", "1", "--modes", "train", "--backends", "auto", "matmul", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["models"]
    assert [(r["model"], r["img_size"], r["batch"]) for r in rows] == [
        ("agent_deit_tiny_patch16_224[auto]", 32, 2),
        ("agent_deit_tiny_patch16_224[matmul]", 32, 2),
        ("agent_deit_tiny_patch16_224[auto]", 48, 1),
        ("agent_deit_tiny_patch16_224[matmul]", 48, 1),
    ]
    assert rows[0]["official_math"] == "agent_deit_tiny_patch16_224[matmul]"
    assert rows[0]["modes"]["train"]["vs_official_math"] > 0
    assert "× official math" in capsys.readouterr().out
    # A model without a timm counterpart gets its all-softmax twin; the twin really has no agent layer.
    entries = model_bench.expand_entries(["agent_pvt_tiny_224", "deit_tiny_patch16_224"], ["auto"], True)
    assert entries == ["agent_pvt_tiny_224", "agent_pvt_tiny_224[softmax]", "deit_tiny_patch16_224"]
    twin = model_bench._build("agent_pvt_tiny_224[softmax]", 224)
    assert twin.attn_type == "BBBB"
    from agentattn.layers.agent_attention import AgentAttentionBase

    assert not any(isinstance(m, AgentAttentionBase) for m in twin.modules())
    assert main(["bench", "model", "deit_tiny_patch16_224", "--img-size", "32", "--batch", "2", "1"]) == 2
    assert "--batch: one size, or one per --img-size" in capsys.readouterr().err


def test_model_goals_judge_the_fused_rows_only(tmp_path):
    from agentattn.bench import model as model_bench

    def row(name, size, train_img_s):
        return {"model": name, "img_size": size, "batch": 8, "params_m": 1.0, "gflops": 1.0,
                "modes": {"train": {"img_per_s": train_img_s}}}  # fmt: skip

    rows = [
        row("agent_deit_tiny_patch16_224[triton]", 224, 130.0),
        row("agent_deit_tiny_patch16_224[matmul]", 224, 100.0),
        row("deit_tiny_patch16_224", 224, 120.0),
        row("agent_pvt_tiny_224[triton]", 448, 90.0),
        row("agent_pvt_tiny_224[matmul]", 448, 80.0),
        row("agent_pvt_tiny_224[softmax]", 448, 100.0),
    ]
    model_bench._ratios(rows)
    by_text = {g["goal"]: g for g in model_bench.goals(rows)}
    official = next(g for t, g in by_text.items() if "official-math" in t)
    assert official["met"] is True and "1.30×" in official["value"]
    softmax = next(g for t, g in by_text.items() if "448 and above" in t)
    assert (
        softmax["met"] is False
        and "0.90×" in softmax["value"]
        and "agent_pvt_tiny_224[triton]" in softmax["value"]
    )
    deit = next(g for t, g in by_text.items() if "timm DeiT-T" in t)
    assert deit["met"] is True and deit["value"] == "1.08×"
    assert len(by_text) == 3
    result = {"command": "agentattn bench model ...", "environment": {"gpu": "Test GPU"},
              "config": {"batch": [256, 64], "rounds": 5, "warmup": 2, "device": "cuda", "amp": "bf16",
                         "channels_last": True}, "models": rows}  # fmt: skip
    model_bench.write_section(str(tmp_path / "s.json"), result)
    section = json.loads((tmp_path / "s.json").read_text())
    assert section["title"].startswith("Whole models on Test GPU")
    assert "bf16 autocast, channels-last" in section["markdown"] and "× official math" in section["markdown"]
