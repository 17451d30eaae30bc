"""Trust no file in a run directory: it belongs to one live run, an earlier run's results are never truncated,
logs never follow a symlink, and every field of a training checkpoint is checked before ``train --resume`` uses
it (one line naming the file and the field, never a traceback).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from agentattn.io import lock_run_directory, run_directory_holder
from agentattn.train import load_training_checkpoint
from agentattn.train import loop as train_loop
from agentattn.train.data import FASHION_MNIST_DIR
from tests.train import PYTHON, TINY_CLI, needs_fashion_mnist, subprocess_env

from .cases import Case, CliFailed, check_case, run_cli

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
# 32 images in batches of 16: two steps per epoch.
TRAIN = ["train", *TINY_CLI, "--train-subset", "32", "--batch-size", "16", "--eval-subset", "16", "--no-progress",
         "--threads", "1"]  # fmt: skip
LOGS = ("metrics.jsonl", "metrics.csv")
DENSE_TINY = ["--backbone-kwargs", "depths=(1,1,1,1)", "embed_dims=(16,32,48,64)", "num_heads=(1,1,2,2)",
              "--img-size", "64", "--num-train", "8", "--num-val", "4", "--batch-size", "4", "--max-steps", "1",
              "--no-progress"]  # fmt: skip
LM_TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--num-agents", "4", "--chunk-size", "8",
           "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1"]  # fmt: skip


def _text(tmp: Path) -> Path:
    path = tmp / "text.txt"
    path.write_text("In the beginning God created the heaven and the earth. " * 40)
    return path


def _fails(argv: list) -> CliFailed:
    with pytest.raises(CliFailed) as info:
        run_cli(argv)
    assert info.value.well_formed, info.value.stderr
    return info.value


# -- one live run per directory ---------------------------------------------------------------------------------


@needs_fashion_mnist
def test_a_second_train_run_stops_at_once_and_the_first_keeps_its_results(tmp_path):
    """Two real processes: the first holds the directory (stopped with SIGSTOP while the second starts, so the
    overlap does not depend on timing); the second refuses, naming it; the first finishes with its own files."""
    out = tmp_path / "run"

    def command(seed: int) -> list[str]:
        return [PYTHON, "-m", "agentattn", "train", *TINY_CLI, "--output", str(out), "--train-subset", "64",
                "--batch-size", "16", "--eval-subset", "16", "--ckpt-every-steps", "1", "--seed", str(seed),
                "--threads", "1", "--no-progress"]  # fmt: skip

    first = subprocess.Popen(
        command(1), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 90
        while run_directory_holder(out) != first.pid:
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run did not take its directory within 90 s"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(
                command(2), env=subprocess_env(), capture_output=True, text=True, timeout=120
            )
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert second.stderr.startswith(
            f"agentattn train: error: {out} is in use by another run (PID {first.pid})"
        ), second.stderr
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    ckpt = load_training_checkpoint(out / "last.pth")
    assert ckpt["config"]["seed"] == 1 and ckpt["global_step"] == 4  # the first run's, complete
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) == ckpt["history"][0]["train_loss"]
    assert run_directory_holder(out) is None


HELD: dict[str, Callable[[Path, Path], list]] = {
    "train": lambda tmp, out: [*TRAIN, "--output", out],
    "dense train": lambda tmp, out: ["dense", "train", *DENSE_TINY, "--output", out],
    "lm train": lambda tmp, out: ["lm", "train", "--attn", "agent", "--data", f"textfile:{_text(tmp)}", *LM_TINY,
                                  "--out", out],
    "lm compare": lambda tmp, out: ["lm", "compare", "--data", f"textfile:{_text(tmp)}", *LM_TINY,
                                    "--time-budget-min", "0", "--out", out],
    "compare": lambda tmp, out: ["compare", "--output", out, *TINY_CLI[2:], "--max-steps", "1", "--train-subset",
                                 "32", "--eval-subset", "16", "--no-progress"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(HELD))
def test_every_run_command_refuses_a_directory_in_use(command, tmp_path):
    if command == "compare" and not HAVE_FMNIST:
        pytest.skip("compare loads the Fashion-MNIST test split first")
    out = tmp_path / "out"
    with lock_run_directory(out):
        err = _fails(HELD[command](tmp_path, out))
    assert f"{out} is in use by another run (PID {os.getpid()})" in err.stderr
    assert [p.name for p in out.iterdir()] == [".agentattn.lock"]  # nothing written, nothing started


@needs_fashion_mnist
def test_start_removes_temp_files_of_dead_writers_only(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "120"])
    try:
        stale = out / f".last.pth.tmp-{dead.pid}-Ab3dE6gH.pth"
        busy = out / f".last.pth.tmp-{live.pid}-Ij9kL2mN.pth"
        stale.write_bytes(b"left by a killed save")
        busy.write_bytes(b"being written")
        run_cli([*TRAIN, "--output", out, "--max-steps", "1"])
        assert not stale.exists()
        assert busy.read_bytes() == b"being written"
    finally:
        live.kill()
        live.wait()


# -- earlier results are never truncated ------------------------------------------------------------------------


@needs_fashion_mnist
def test_results_without_a_checkpoint_are_refused_and_overwrite_replaces_them(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = "".join(json.dumps({"kind": "step", "global_step": i, "loss": 1.0}) + "\n" for i in range(1, 400))
    (out / "metrics.jsonl").write_text(old)
    (out / "metrics.csv").write_text("epoch,train_loss\n0,1.0\n")
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--resume"]):  # --resume has no checkpoint to continue: it would truncate them too
        err = _fails([*TRAIN, "--output", out, "--max-steps", "1", *extra]).stderr
        assert str(out) in err and all(
            way in err for way in ("resume", "another output directory", "set overwrite")
        )
        assert (out / "metrics.jsonl").read_text() == old
    run_cli([*TRAIN, "--output", out, "--max-steps", "1", "--overwrite"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["kind"] == "step"] == [1]
    assert (out / "notes.txt").read_text() == "mine"  # not a file of the run: never removed
    assert load_training_checkpoint(out / "last.pth")["global_step"] == 1
    # Now there is a checkpoint: a new run without --resume is refused too, naming the three ways on.
    err = _fails([*TRAIN, "--output", out, "--max-steps", "1"]).stderr
    assert str(out / "last.pth") in err and all(
        w in err for w in ("set resume", "another output directory", "set overwrite")
    )


@needs_fashion_mnist
def test_a_symlinked_log_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").symlink_to(target)
    for extra in (
        [],
        ["--overwrite"],
    ):  # --overwrite removes the run's own files: never a link, nor through it
        err = _fails([*TRAIN, "--output", out, "--max-steps", "1", *extra]).stderr
        assert f"{out / 'metrics.csv'} is a symlink" in err
        assert target.read_text() == "precious\n" and (out / "metrics.csv").is_symlink()


# -- every field of the checkpoint is checked before --resume uses it -------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-epoch run stopped after its first epoch: last.pth at epoch 1, step 0, and its two logs."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path_factory.mktemp("base") / "run"
    run_cli([*TRAIN, "--output", out, "--epochs", "2", "--max-steps", "2"])
    return out


@pytest.fixture
def cached_data(monkeypatch):
    """The tiny data loads once for all the cases (the checks run after it: shapes depend on it)."""
    cache: dict[str, object] = {}
    real = train_loop.build_data

    def build_data(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        return cache[key]

    monkeypatch.setattr(train_loop, "build_data", build_data)


def _copy_run(base: Path, tmp: Path, mutate: Callable[[dict], object] | None) -> Path:
    out = tmp / "run"
    out.mkdir()
    for name in LOGS:
        (out / name).write_bytes((base / name).read_bytes())
    ckpt = torch.load(base / "last.pth", weights_only=True)
    if mutate is not None:
        mutate(ckpt)
    torch.save(ckpt, out / "last.pth")
    return out


def _set(path: str, value: object) -> Callable[[dict], None]:
    """Set ``ckpt[a][b]...`` (keys separated by '/'; digits index lists and int-keyed dicts)."""

    def mutate(ckpt: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        node = ckpt
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _delete(key: str) -> Callable[[dict], None]:
    return lambda ckpt: ckpt.pop(key)


def _apply(fn: Callable[[dict], object]) -> Callable[[dict], None]:
    def mutate(ckpt: dict) -> None:
        fn(ckpt)

    return mutate


# (name, mutation of the checkpoint, regex the one-line error must match; it also names the file)
BAD_FIELDS: list[tuple[str, Callable[[dict], None], str]] = [
    ("rng.torch is a list", _apply(lambda c: c["rng"].update(torch=c["rng"]["torch"].tolist())),
     r"field rng\.torch must be a uint8 tensor of shape \[5056\], got \[\d+, \d+, .*\.\.\."),
    ("rng.torch not an mt19937 state", _set("rng/torch", torch.zeros(5056, dtype=torch.uint8)),
     r"field rng\.torch must be a torch RNG state"),
    ("rng.python truncated", _set("rng/python", (3, (1, 2), None)), r"field rng\.python must be"),
    ("rng.numpy keys of the wrong shape", _apply(lambda c: c["rng"].update(numpy=(
        c["rng"]["numpy"][0], c["rng"]["numpy"][1][:10], *c["rng"]["numpy"][2:]))),
     r"field rng\.numpy\[1\] must be an int tensor of shape \[624\]"),
    ("rng.cuda a string", _set("rng/cuda", "cuda"), r"field rng\.cuda must be a list"),
    ("rng missing", _delete("rng"), r"field rng is missing"),
    ("optimizer is a list", _set("optimizer", [1, 2]), r"field optimizer must be a dict"),
    ("optimizer missing", _delete("optimizer"), r"field optimizer is missing"),
    ("optimizer with one param group", _apply(lambda c: c["optimizer"]["param_groups"].pop()),
     r"field optimizer\.param_groups must be a list of 2 groups"),
    ("exp_avg of the wrong shape", _set("optimizer/state/0/exp_avg", torch.zeros(3)),
     r"field optimizer\.state\[0\]\.exp_avg must be a float tensor of shape \[\d+(, \d+)*\], got a tensor of "
     r"shape \[3\]"),
    ("optimizer step a string", _set("optimizer/state/0/step", "1"), r"field optimizer\.state\[0\]\.step must be"),
    ("optimizer state without exp_avg_sq", _apply(lambda c: c["optimizer"]["state"][0].pop("exp_avg_sq")),
     r"field optimizer\.state\[0\]\.exp_avg_sq is missing"),
    ("optimizer state of no parameter", _set("optimizer/state/1000000", {}),
     r"field optimizer\.state\[1000000\] names no parameter"),
    ("param group lr a string", _set("optimizer/param_groups/0/lr", "fast"),
     r"field optimizer\.param_groups\[0\]\.lr must be a finite number >= 0, got 'fast'"),
    ("param group params not ids", _set("optimizer/param_groups/0/params", "abc"),
     r"field optimizer\.param_groups\[0\]\.params must be a list"),
    ("scheduler a string", _set("scheduler", "cosine"), r"field scheduler must be a dict"),
    ("scheduler t_initial 'abc'", _set("scheduler/t_initial", "abc"), r"field scheduler\.t_initial must be an int"),
    ("scheduler with an unknown key", _set("scheduler/optimizer", 1), r"field scheduler does not have this "
     r"scheduler's keys \(unknown \['optimizer'\]\)"),
    ("scaler a list", _set("scaler", [1]), r"field scaler must be a dict"),
    ("state_dict_ema a string", _set("state_dict_ema", "ema"), r"field state_dict_ema must be a state dict"),
    ("global_step 'abc'", _set("global_step", "abc"), r"field global_step must be an int in \[0, \d+\], got 'abc'"),
    ("global_step negative", _set("global_step", -5), r"field global_step must be an int in \[0, \d+\], got -5"),
    ("metrics_bytes 10**12", _set("metrics_bytes/metrics.jsonl", 10**12),
     r"field metrics_bytes\['metrics\.jsonl'\] must be an int in \[0, \d+\] \(the size of .*metrics\.jsonl\), "
     r"got 1000000000000"),
    ("metrics_bytes -1", _set("metrics_bytes/metrics.csv", -1), r"field metrics_bytes\['metrics\.csv'\] must be an "
     r"int >= 0, got -1"),
    ("metrics_bytes a float", _set("metrics_bytes/metrics.csv", 1.5), r"field metrics_bytes\['metrics\.csv'\]"),
    ("metrics_bytes without metrics.csv", _apply(lambda c: c["metrics_bytes"].pop("metrics.csv")),
     r"field metrics_bytes must have the keys"),
    ("metrics_bytes a list", _set("metrics_bytes", [1, 2]), r"field metrics_bytes must be a dict"),
    ("model_name an int", _set("model_name", 5), r"field model_name must be a string"),
    ("model_name a megabyte string", _set("model_name", "x" * 10**6), r"field model_name must be a string of at "
     r"most 500 characters, got 'x+\.\.\."),
    ("config a list", _set("config", [1]), r"field config must be a dict with string keys, got \[1\]"),
    ("config holding a tensor", _set("config/seed", torch.zeros(2)), r"field config must be plain values"),
    ("config with other settings", _set("config/seed", 7), r"last\.pth was written with other settings \(seed: 7 "
     r"-> 0\)"),
    ("history a string", _set("history", "abc"), r"field history must be a list, got 'abc'"),
    ("history of the wrong length", _set("history", []), r"field history must be a list of 1 epoch records"),
    ("history record with a string", _set("history/0/train_loss", "low"),
     r"field history\[0\]\.train_loss must be a number"),
    ("epoch_sums of one item", _set("epoch_sums", ["a"]), r"field epoch_sums must be a list of 2 items"),
    ("epoch_sums count negative", _set("epoch_sums", [0.0, -1]), r"field epoch_sums\[1\] must be an int >= 0"),
    ("epoch_sums loss NaN", _set("epoch_sums", [float("nan"), 0]), r"field epoch_sums\[0\] must be a finite number"),
    ("epoch beyond the run", _set("epoch", 99), r"field epoch must be an int in \[0, 2\], got 99"),
    ("epoch a float", _set("epoch", 1.0), r"field epoch must be an int"),
    ("step_in_epoch beyond the epoch", _set("step_in_epoch", 10**9),
     r"field step_in_epoch must be an int in \[0, 1\], got 1000000000"),
    ("model a list", _set("model", []), r"field model must be a state dict"),
    ("model tensor of the wrong shape", _apply(lambda c: c["model"].update({next(iter(c["model"])): torch.zeros(1)})),
     r"field model does not fit this model \(.*size mismatch"),
    ("model value not a tensor", _apply(lambda c: c["model"].update({next(iter(c["model"])): [1.0]})),
     r"field model\[.*\] must be a tensor"),
]  # fmt: skip


@pytest.mark.parametrize("name, mutate, match", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_train_resume_checks_every_field(name, mutate, match, base_run, cached_data, tmp_path):
    errors: list[CliFailed] = []

    def call(tmp: Path) -> None:
        out = _copy_run(base_run, tmp, mutate)
        try:
            run_cli([*TRAIN, "--epochs", "2", "--output", out, "--resume"])
        except CliFailed as err:
            errors.append(err)
            raise

    check_case(Case("agentattn train --resume", name, call, CliFailed, match), tmp_path)
    err = errors[0].stderr
    assert str(tmp_path / "run" / "last.pth") in err and len(err) < 600, err  # the file, a short quote
    for log in LOGS:  # nothing was cut (or grown into a huge sparse file)
        assert (tmp_path / "run" / log).read_bytes() == (base_run / log).read_bytes()


def test_an_untouched_checkpoint_resumes(base_run, cached_data, tmp_path):
    out = _copy_run(base_run, tmp_path, None)
    printed = run_cli([*TRAIN, "--epochs", "2", "--output", out, "--resume"])
    assert f"resuming from {out / 'last.pth'}: epoch 1, step 0 (global step 2)" in printed
    assert load_training_checkpoint(out / "last.pth")["global_step"] == 4


def test_resume_refuses_a_symlinked_log_and_leaves_its_target(base_run, cached_data, tmp_path):
    out = _copy_run(base_run, tmp_path, None)
    target = tmp_path / "precious.txt"
    target.write_text("precious\n" * 100)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(target)
    err = _fails([*TRAIN, "--epochs", "2", "--output", out, "--resume"]).stderr
    assert f"{out / 'metrics.jsonl'} is a symlink" in err
    assert target.read_text() == "precious\n" * 100
    assert (out / "metrics.csv").read_bytes() == (base_run / "metrics.csv").read_bytes()  # not cut either


@needs_fashion_mnist
def test_resume_with_nothing_to_resume_is_refused_and_leaves_no_directory(tmp_path):
    out = tmp_path / "never-ran"
    err = _fails([*TRAIN, "--output", out, "--max-steps", "1", "--resume"]).stderr
    assert "nothing to resume" in err and str(out / "last.pth") in err
    assert not out.exists()
    run_cli([*TRAIN, "--output", out, "--max-steps", "1", "--resume", "--overwrite"])  # start-or-continue
    assert load_training_checkpoint(out / "last.pth")["global_step"] == 1


@needs_fashion_mnist
def test_progress_bars_end_where_the_run_stops(tmp_path, capsys):
    """train's bar ends at --max-steps (it showed the whole epoch); lm train shows a bar, not only log lines."""
    from agentattn.cli.main import main

    train = [a for a in TRAIN if a != "--no-progress"]
    assert main([*train, "--output", str(tmp_path / "t"), "--max-steps", "1"]) == 0
    assert "1/1 " in capsys.readouterr().err  # 2 steps per epoch, stopped after 1
    assert main(["lm", "train", "--attn", "agent", *LM_TINY, "--data", f"textfile:{_text(tmp_path)}",
                 "--output", str(tmp_path / "lm")]) == 0  # fmt: skip
    assert "lm train (agent): 100%" in capsys.readouterr().err
