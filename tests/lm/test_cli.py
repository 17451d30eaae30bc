"""``agentattn lm``: train / eval / sample / compare / bench smoke runs on a tiny text file, and CLI errors."""

from __future__ import annotations

import json

import pytest

from agentattn.cli.main import main

TINY_MODEL = [
    "--d-model",
    "32",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--agent-num",
    "4",
    "--chunk-size",
    "8",
]
TINY_TRAIN = [
    "--steps",
    "3",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-every",
    "2",
    "--eval-batches",
    "1",
]


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "text.txt"
    verse = "And God said, Let there be light: and there was light. "
    path.write_text(verse * 80 + "Ünïcödé ✓\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(textfile, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["lm", "train", "--attn", "agent", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN,
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    return out / "model.safetensors"


def test_train_writes_checkpoint_and_metrics(checkpoint, capsys):
    assert checkpoint.is_file()
    rows = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "val_bpb" in rows[-1]


def test_eval_reports_bpb(checkpoint, textfile, capsys):
    assert (
        main(
            [
                "lm",
                "eval",
                "--checkpoint",
                str(checkpoint),
                "--data",
                f"textfile:{textfile}",
                "--split",
                "test",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("test bpb ")
    assert 0 < float(out.split()[2]) < 10


def test_sample_streams_text(checkpoint, capsys):
    rc = main(["lm", "sample", "--checkpoint", str(checkpoint), "--prompt", "And God", "--max-new-tokens", "12",
               "--temperature", "0"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.startswith("And God")


def test_compare_writes_report(textfile, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["lm", "compare", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN, "--speed-contexts", "16",
               "--speed-budget-s", "0.01", "--time-budget-min", "0.5", "--seeds", "0", "--conv-kernels", "4",
               "--context-multiples", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    report = (out / "report.md").read_text()
    for name in ("agent", "softmax", "linear", "retention"):
        assert f"| {name} |" in report
        assert (out / name / "model.safetensors").is_file()
    assert (out / "loss_curves.png").stat().st_size > 0 and (out / "speed_vs_context.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert len(set(results["tokens"].values())) == 1  # the same token budget for every twin
    assert results["param_max_deviation"] <= 0.02
    assert results["train_config"]["steps"] == 1 and "capped from 3 to 1" in report  # the time budget bites


def test_compare_over_seeds_conv_and_contexts(textfile, tmp_path, capsys):
    """The study: every mixer × conv on/off × seeds; val and test at 1× and 2× the context; mean ± sd; a section."""
    out, section = tmp_path / "study", tmp_path / "lm-quality.json"
    rc = main(["lm", "compare", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN, "--speed-contexts",
               "--attn", "agent", "softmax", "--seeds", "0", "1", "--conv-kernels", "4", "0",
               "--context-multiples", "1", "2", "--section", str(section), "--out", str(out)])  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    names = {f"{t}-conv{k}-seed{s}" for t in ("agent", "softmax") for k in (4, 0) for s in (0, 1)}
    assert set(results["eval"]) == names and all((out / n / "model.safetensors").is_file() for n in names)
    assert set(results["eval"]["agent-conv0-seed1"]) == {"val@1x", "val@2x", "test@1x", "test@2x"}
    row = results["table"]["softmax|0"]["test@2x"]  # [mean, sd] over the two seeds
    runs = [results["eval"][f"softmax-conv0-seed{s}"]["test@2x"] for s in (0, 1)]
    assert row[0] == pytest.approx(sum(runs) / 2) and row[1] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5)
    assert results["eval"]["agent-conv4-seed0"] != results["eval"]["agent-conv4-seed1"]  # the seed matters
    assert "| softmax | 0 |" in (out / "report.md").read_text() and "±" in (out / "report.md").read_text()
    assert "Bits per byte" in json.loads(section.read_text())["markdown"]


def test_compare_of_the_agent_with_rotary_window_logits(textfile, tmp_path, capsys):
    out, section = tmp_path / "win", tmp_path / "win.json"
    rc = main(["lm", "compare", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN, "--speed-contexts",
               "--attn", "agent", "--window-positions", "rope", "--seeds", "0", "--conv-kernels", "4",
               "--context-multiples", "1", "--out", str(out), "--section", str(section)])  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model_config"]["window_positions"] == "rope" and results["model_config"]["agent_num"] == 4
    assert "rotary in the window" in (out / "report.md").read_text()
    assert json.loads(section.read_text())["title"].endswith("agent with rotary logits in its exact window")


def test_merge_of_single_seed_runs_equals_one_multi_seed_run(textfile, tmp_path, capsys):
    """Seeds run one after another (or on several machines) and merged give the table of one --seeds run; files
    that are not comparisons of the same study are refused with one line."""
    common = ["lm", "compare", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN, "--speed-contexts",
              "--attn", "agent", "softmax", "--conv-kernels", "4", "0", "--context-multiples", "1", "2"]  # fmt: skip
    for seeds, name in ((["0"], "s0"), (["1"], "s1"), (["0", "1"], "both")):
        assert main([*common, "--seeds", *seeds, "--out", str(tmp_path / name)]) == 0
    merged, section = tmp_path / "merged", tmp_path / "merged.json"
    argv = ["lm", "merge", str(tmp_path / "s1" / "results.json"), str(tmp_path / "s0" / "results.json")]
    assert main([*argv, "--output", str(merged), "--section", str(section)]) == 0
    got = json.loads((merged / "results.json").read_text())
    want = json.loads((tmp_path / "both" / "results.json").read_text())
    assert got["seeds"] == [0, 1] and list(got["eval"]) == list(want["eval"])
    assert got["eval"] == want["eval"] and got["table"] == want["table"]
    assert (
        "± " in (merged / "report.md").read_text() and "2 seeds" in json.loads(section.read_text())["title"]
    )

    def refused(paths, match):
        capsys.readouterr()
        assert main(["lm", "merge", *map(str, paths), "--output", str(tmp_path / "refused")]) == 1
        assert match in capsys.readouterr().err

    refused([tmp_path / "s0" / "results.json", tmp_path / "both" / "results.json"], "share seeds")
    other = json.loads((tmp_path / "s1" / "results.json").read_text())
    for key, value, match in (
        ("train_config", {**other["train_config"], "lr": 1.0}, "train_config differs"),
        ("params", {**other["params"], "agent-conv4": 1}, "params differs"),
        ("conv_kernels", [4], "is not a run of this comparison (conv kernels [4]"),
        ("eval", {**other["eval"], "agent-conv4": {"val@1x": float("nan")}}, "non-finite"),
        ("eval", {"mamba-conv4": {}}, "is not a run of this comparison"),
        ("seeds", "1", "'seeds' missing or not a list"),
        ("history", {"agent-conv4": [{"tokens": "x"}]}, "'history' must map each run"),
    ):
        bad = tmp_path / f"bad-{key}.json"
        bad.write_text(json.dumps({**other, key: value}))
        refused([tmp_path / "s0" / "results.json", bad], match)
    (tmp_path / "junk.json").write_bytes(b"\x80not json")
    refused([tmp_path / "s0" / "results.json", tmp_path / "junk.json"], "not a readable JSON file")
    refused([tmp_path / "s0" / "results.json"], "at least two")
    # Files stripped of their loss histories (as committed in benchmarks/results/lm-quality) merge too, no figure.
    stripped = []
    for name in ("s0", "s1"):
        data = json.loads((tmp_path / name / "results.json").read_text())
        data.pop("history")
        stripped.append(tmp_path / f"{name}-stripped.json")
        stripped[-1].write_text(json.dumps(data))
    assert main(["lm", "merge", *map(str, stripped), "--output", str(tmp_path / "m2")]) == 0
    assert json.loads((tmp_path / "m2" / "results.json").read_text())["table"] == want["table"]
    assert not (tmp_path / "m2" / "loss_curves.png").exists()


def test_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["lm", "bench", "--layer-contexts", "16", "64", "--decode-contexts", "8", "40", "--d-model", "32",
               "--n-heads", "2", "--n-layers", "1", "--chunk-size", "8", "--agent-num", "4", "--budget-s", "0.01",
               "--json", str(path)])  # fmt: skip
    assert rc == 0
    result = json.loads(path.read_text())
    assert [r["context"] for r in result["layer_forward"]] == [16, 64]
    decode = result["decode"][-1]
    assert decode["softmax_state_bytes"] == 2 * 1 * 40 * 32 * 4  # K and V, 1 layer, 40 positions, fp32
    assert result["decode"][0]["agent_state_bytes"] == decode["agent_state_bytes"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["lm", "train", "--attn", "agent", "--data", "textfile:/nonexistent.txt"], "does not exist"),
        (["lm", "train", "--attn", "agent", "--data", "wiki"], "'kjv' or 'textfile:PATH'"),
        (["lm", "eval", "--checkpoint", "/nonexistent.safetensors"], "does not exist"),
        (["lm", "train", "--attn", "softmax", "--d-model", "30", "--n-heads", "4"], "divisible by n_heads"),
    ],
)
def test_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("agentattn lm: error: ") and match in err and err.count("\n") == 1


def test_sample_prompt_too_long(checkpoint, capsys):
    assert main(["lm", "sample", "--checkpoint", str(checkpoint), "--prompt", "x" * 33]) == 1
    assert "more than max_seq_len = 32" in capsys.readouterr().err


def test_train_refuses_earlier_results_and_overwrite_replaces_them(textfile, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n' * 50)
    (out / "notes.txt").write_text("mine")
    argv = ["lm", "train", "--attn", "agent", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("agentattn lm: error: ") and err.count("\n") == 1
    assert (
        f"{out} already holds results of an earlier run (metrics.jsonl)" in err
        and "choose another output directory" in err
    )
    assert "set overwrite" in err and (out / "metrics.jsonl").read_text() == '{"step": 1}\n' * 50
    assert main([*argv, "--overwrite"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"


def test_train_refuses_a_symlinked_log_and_leaves_its_target(textfile, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(target)
    argv = ["lm", "train", "--attn", "agent", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'metrics.jsonl'} is a symlink" in err
    assert target.read_text() == "precious\n"


def test_compare_refuses_earlier_results(textfile, tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "softmax").mkdir(parents=True)
    (out / "softmax" / "model.safetensors").write_bytes(b"earlier weights")
    rc = main(
        ["lm", "compare", "--data", f"textfile:{textfile}", *TINY_MODEL, *TINY_TRAIN, "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert f"{out} already holds results of an earlier run (softmax/model.safetensors)" in err
    assert (
        "set overwrite" in err and (out / "softmax" / "model.safetensors").read_bytes() == b"earlier weights"
    )
