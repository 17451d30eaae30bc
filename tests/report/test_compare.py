"""``agentattn compare`` end to end on a tiny budget: three twins, the table, both reports and every figure."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from agentattn.cli import compare as compare_cli
from agentattn.io import RunDirectoryInUse, lock_run_directory
from agentattn.report.compare import COMPARE_FILES, TWINS, CompareConfig, _explain_indices
from agentattn.train.record_checks import prepare_output

from ..train import TINY_KWARGS, TINY_MODEL, needs_fashion_mnist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    kwargs = [f"{k}={v!r}".replace(" ", "") for k, v in TINY_KWARGS.items()]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = compare_cli.main(
            [
                "--output", str(out), "--model", TINY_MODEL, "--model-kwargs", *kwargs, "--epochs", "2",
                "--batch-size", "32", "--train-subset", "96", "--eval-subset", "64", "--threads", "1",
                "--explain-images", "2", "--no-progress",
            ]
        )  # fmt: skip
    return code, out, printed.getvalue()


@needs_fashion_mnist
def test_compare_writes_the_table_and_a_self_contained_report(tiny_compare):
    code, out, printed = tiny_compare
    assert code == 0
    summary = json.loads((out / "results.json").read_text())
    rows = {r["twin"]: r for r in summary["results"]}
    assert set(rows) == set(TWINS)
    for twin, row in rows.items():
        assert row["attn_type"] == TWINS[twin]
        assert 0.0 <= row["top1"] <= 100.0 and row["params"] > 0 and row["flops"] > 0
        assert row["train_img_per_s"] > 0 and row["infer_img_per_s"] > 0 and row["process_peak_mib"] > 50
        assert (
            row["train_step_mib"] >= 0 and row["infer_mib"] >= 0
        )  # a tiny model may fit in pages already touched
        epochs = [json.loads(line) for line in (out / twin / "metrics.jsonl").read_text().splitlines()]
        assert sum(e["kind"] == "epoch" for e in epochs) == 2
        # The table reports the last epoch of that twin's own run.
        assert row["top1"] == [e for e in epochs if e["kind"] == "epoch"][-1]["eval_top1"]
    # The twins differ in attention only: the agent model has the bias tables, the others do not.
    assert rows["agent"]["params"] > rows["softmax"]["params"]

    md = (out / "report.md").read_text()
    for twin in TWINS:
        assert re.search(rf"^\| {twin} \| {TWINS[twin]} \| ", md, flags=re.M)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"loss.png", "accuracy.png"} <= set(linked) and sum(p.startswith("agents_") for p in linked) == 2
    for name in linked:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(linked)
    assert not re.search(r'src="(?!data:)', page)  # nothing to fetch: the page is self-contained
    assert "report: " in printed and str(out / "report.html") in printed
    assert all(re.search(rf"^{twin}\s+{TWINS[twin]}\s", printed, flags=re.M) for twin in TWINS)


@needs_fashion_mnist
def test_compare_refuses_to_overwrite_a_report(tiny_compare, capsys):
    _, out, _ = tiny_compare
    assert compare_cli.main(["--output", str(out), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"agentattn compare: error: {out} already holds results of an earlier run (report.md, report.html, "
    )
    assert (
        err.endswith("choose another output directory, or set overwrite to replace them") and "\n" not in err
    )


def test_compare_overwrite_removes_its_own_files_only(tmp_path):
    out = tmp_path / "cmp"
    own = ["report.md", "report.html", "results.json", "loss.png", "agents_test3.png", "agent/last.pth",
           "agent/metrics.jsonl", "linear/metrics.csv"]  # fmt: skip
    theirs = ["notes.md", "agent/notes.txt", "other/last.pth"]
    for name in own + theirs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    (out / "accuracy.png").symlink_to(target)
    with lock_run_directory(out):
        with pytest.raises(ValueError, match=r"already holds results .*set overwrite"):
            prepare_output(out, COMPARE_FILES, overwrite=False)
        assert all((out / name).exists() for name in own)
        assert sorted(prepare_output(out, COMPARE_FILES, overwrite=True)) == sorted(own)
    assert not any((out / name).exists() for name in own)
    assert all((out / name).read_text() == "x" for name in theirs)
    assert (out / "accuracy.png").is_symlink() and target.read_text() == "precious"


def test_compare_refuses_a_twin_directory_in_use(tmp_path):
    out = tmp_path / "cmp"
    (out / "softmax").mkdir(parents=True)
    with lock_run_directory(out / "softmax"), lock_run_directory(out):
        with pytest.raises(
            RunDirectoryInUse, match=rf"{out / 'softmax'} is in use by another run \(PID \d+\)"
        ):
            prepare_output(out, COMPARE_FILES, overwrite=True)


def test_compare_rejects_bad_options(tmp_path, capsys):
    assert compare_cli.main(["--output", str(tmp_path / "o"), "--epochs", "0"]) == 1
    assert "epochs must be at least 1, got 0" in capsys.readouterr().err
    assert compare_cli.main(["--output", str(tmp_path / "o"), "--model-kwargs", "attn_type='AAAA'"]) == 1
    assert "must not set attn_type" in capsys.readouterr().err
    with pytest.raises(ValueError, match="twins must name some of"):
        CompareConfig(twins=("agent", "cosine"))


def test_compare_names_the_missing_dataset(tmp_path, capsys):
    code = compare_cli.main(
        ["--output", str(tmp_path / "o"), "--data", f"fashion-mnist:{tmp_path}", "--max-steps", "1"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("agentattn compare: error: ") and len(err.splitlines()) == 1
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "o" / "agent").exists()  # nothing was trained


def test_explain_indices_pick_distinct_classes():
    labels = [3, 3, 0, 7, 1, 0, 7, 9]
    assert _explain_indices(labels, num_classes=10, count=3) == [2, 0, 3]  # classes 0, 3, 7
    assert _explain_indices(labels, num_classes=10, count=1) == [2]
