"""No lost state: every file src/ writes goes through an atomic writer; SIGKILL at random points (also inside a
checkpoint write) never loses the last good checkpoint and resuming reaches the uninterrupted result bit for bit;
a full disk gives a clear error and leaves the previous checkpoint intact.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import agentattn.io.atomic as atomic_module
from agentattn.train import load_training_checkpoint
from tests.train import PYTHON, ROOT, TINY_CLI, needs_fashion_mnist, subprocess_env

from . import figures
from .cases import CliFailed, run_cli

# Functions allowed to open files for writing: the atomic writers themselves (temp file + fsync + os.replace).
ATOMIC_WRITERS = {
    ("io/atomic.py", "atomic_path"),
    ("io/atomic.py", "atomic_open"),
    ("io/checkpoint.py", "atomic_torch_save"),
    ("io/checkpoint.py", "save_safetensors"),
}
# Appends (logs, through agentattn.io.open_log) are allowed: a kill can leave at most a partial last line, and
# the training loop truncates its logs back to the checkpoint's recorded size on resume. A write that is not a data file (e.g. /proc) can be
# marked on its line with a comment "# not-atomic: <reason>".
NOT_ATOMIC_MARK = "# not-atomic:"
WRITE_CALLS = {"write_text", "write_bytes", "save", "save_file", "savefig", "to_csv", "save_pretrained"}


def _is_rename(node: ast.AST) -> bool:
    """os.replace(a, b) / os.rename(a, b) / path.replace(target) / path.rename(target)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
    if node.func.attr in ("replace", "rename"):
        return (owner == "os" and len(node.args) == 2) or (owner != "os" and len(node.args) == 1)
    return False


ATOMIC_CONTEXTS = {"atomic_open", "atomic_path"}  # `with atomic_open(path) as f:` writes a temp file


def _in_atomic_context(tree: ast.AST) -> set[ast.AST]:
    """The nodes inside the body of a ``with atomic_open(...)`` / ``with atomic_path(...)`` block."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call):
                    name = (
                        call.func.attr
                        if isinstance(call.func, ast.Attribute)
                        else getattr(call.func, "id", "")
                    )
                    if name in ATOMIC_CONTEXTS:
                        inside.update(n for stmt in node.body for n in ast.walk(stmt))
    return inside


def _writes(tree: ast.AST):
    """(function name, line, what) for each call in ``tree`` that writes a file in place.

    A write inside a function that also renames a file into place (temp file + os.replace), or inside a
    ``with atomic_open(...)`` / ``with atomic_path(...)`` block, counts as atomic.
    """
    parents: dict[ast.AST, ast.AST] = {}
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                parents[node] = func  # later (inner) functions overwrite outer ones: innermost wins
    renames = {func for func in set(parents.values()) if any(_is_rename(n) for n in ast.walk(func))}
    atomic = _in_atomic_context(tree)
    for node in ast.walk(tree):
        if parents.get(node) in renames or node in atomic:
            continue
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        what = None
        if name == "open" and owner in ("", "io", "builtins"):
            mode = (
                node.args[1]
                if len(node.args) > 1
                else next((k.value for k in node.keywords if k.arg == "mode"), None)
            )
            text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else ""
            if "a" in text:
                what = "append"
            elif any(c in text for c in "wx+") or (mode is not None and not isinstance(mode, ast.Constant)):
                what = f"open(..., {text!r})"
        elif name in WRITE_CALLS and not (name == "save" and owner not in ("torch", "")):
            what = f"{owner + '.' if owner else ''}{name}(...)"
        if what:
            func = parents.get(node)
            yield (func.name if func is not None else "<module>"), node.lineno, what


def test_every_file_written_by_src_is_written_atomically():
    src = ROOT / "src" / "agentattn"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        text = path.read_text()
        lines = text.splitlines()
        for func, line, what in _writes(ast.parse(text, str(path))):
            if (rel, func) in ATOMIC_WRITERS or what == "append" or NOT_ATOMIC_MARK in lines[line - 1]:
                continue
            offenders.append(f"{rel}:{line} {func}: {what}")
    assert not offenders, (
        "files written in place (use agentattn.io.atomic_write_text/bytes, io.atomic_torch_save or "
        "io.save_safetensors):\n  " + "\n  ".join(offenders)
    )


# -- disk full --------------------------------------------------------------------------------------------------


class _FullDisk:
    """``agentattn.io.atomic._fdopen`` (how the atomic writer opens its temp files): writes fail with ENOSPC after
    ``budget`` bytes, once ``fail_after`` temp files have been written completely."""

    def __init__(self, fail_after: int, budget: int = 4096) -> None:
        self.fail_after, self.budget, self.opened = fail_after, budget, 0
        self.real_fdopen = atomic_module._fdopen

    def __call__(self, fd, mode):
        f = self.real_fdopen(fd, mode)  # always a temp file of atomic_open
        self.opened += 1
        if self.opened <= self.fail_after:
            return f
        real_write, written = f.write, [0]

        def write(data):
            written[0] += len(data)
            if written[0] > self.budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(data)

        f.write = write
        return f


@needs_fashion_mnist
def test_disk_full_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", *TINY_CLI, "--output", out, "--batch-size", "16", "--train-subset", "64", "--eval-subset",
            "16", "--ckpt-every-steps", "1", "--max-steps", "3", "--threads", "1", "--no-progress"]  # fmt: skip
    monkeypatch.setattr(atomic_module, "_fdopen", _FullDisk(fail_after=1))
    with pytest.raises(CliFailed) as info:
        run_cli(args)
    err = info.value.stderr
    assert info.value.well_formed, err
    assert "No space left on device" in err and str(out / "last.pth") in err and "unchanged" in err
    kept = load_training_checkpoint(out / "last.pth")  # the first checkpoint, intact
    assert kept["global_step"] == 1
    assert not list(out.glob(".last.pth.tmp-*")), "temp file left behind"
    figures.BAD_INPUT["agentattn train (disk full)"][0] += 1
    figures.BAD_INPUT["agentattn train (disk full)"][1] += 1


def test_disk_full_during_convert_and_flops_json(tmp_path, monkeypatch):
    import safetensors.torch

    from agentattn.io import save_safetensors

    src = tmp_path / "in.safetensors"
    save_safetensors({"w": torch.ones(3)}, src)
    dst = tmp_path / "out.safetensors"
    save_safetensors({"old": torch.zeros(2)}, dst)
    before = dst.read_bytes()

    def full_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_save_file)
    with pytest.raises(CliFailed) as info:
        run_cli(["convert", src, dst])
    assert (
        info.value.well_formed
        and "No space left on device" in info.value.stderr
        and "unchanged" in info.value.stderr
    )
    assert dst.read_bytes() == before and not list(tmp_path.glob(".out.safetensors.tmp-*"))
    monkeypatch.undo()

    report = tmp_path / "flops.json"
    report.write_text("[]")
    monkeypatch.setattr(atomic_module, "_fdopen", _FullDisk(fail_after=0, budget=10))
    with pytest.raises(CliFailed) as info:
        run_cli(["flops", "agent_deit_tiny_patch16_224", "--json", report])
    assert info.value.well_formed and "No space left on device" in info.value.stderr
    assert report.read_text() == "[]"
    for name in ("agentattn convert (disk full)", "agentattn flops (disk full)"):
        figures.BAD_INPUT[name] = [1, 1]


# -- SIGKILL at random points -----------------------------------------------------------------------------------

STEPS = 2 * (64 // 16)
TIMING = {"time_s", "img_per_s", "epoch_time_s"}


# Runs ``agentattn.cli.train`` with every torch.save held open for argv[1] seconds after it has written the whole
# temp file, before the rename: it widens the window in which a kill lands inside a checkpoint write.
SLOW_SAVE_LAUNCHER = """
import runpy, sys, time
import torch
pause_s = float(sys.argv.pop(1))
real_save = torch.save
def slow_save(*args, **kwargs):
    real_save(*args, **kwargs)
    time.sleep(pause_s)
torch.save = slow_save
sys.argv[0] = "agentattn.cli.train"
runpy.run_module("agentattn.cli.train", run_name="__main__", alter_sys=True)
"""


def _command(out: Path, save_pause_s: float | None = None) -> list[str]:
    # A kill before the first checkpoint leaves logs without a checkpoint: the documented way on is --overwrite.
    again = ["--resume"] if (out / "last.pth").exists() else ["--overwrite"] if out.exists() else []
    launch = (
        ["-m", "agentattn.cli.train"]
        if save_pause_s is None
        else ["-c", SLOW_SAVE_LAUNCHER, str(save_pause_s)]
    )
    return [PYTHON, *launch, *TINY_CLI, "--output", str(out), "--epochs", "2",
            "--batch-size", "16", "--train-subset", "64", "--eval-subset", "16", "--seed", "5", "--deterministic",
            "--ckpt-every-steps", "1", "--ema-decay", "0.9", "--mixup", "0.8", "--no-progress", *again]  # fmt: skip


def _in_write(out: Path, pid: int) -> bool:
    """Whether process ``pid`` has a checkpoint temp file in ``out`` (``.last.pth.tmp-PID-RANDOM.pth``)."""
    return any(out.glob(f".last.pth.tmp-{pid}-*"))


def _steps(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


@needs_fashion_mnist
def test_sigkill_at_random_points_never_loses_state(tmp_path):
    """Kill a run 3 times (twice inside a checkpoint write, once at a random moment), resume after each kill,
    and compare the final weights and metrics with an uninterrupted run."""
    rng = random.Random(9)
    env = subprocess_env()
    out, straight = tmp_path / "killed", tmp_path / "straight"
    last_step, lost = 0, 0
    for cycle, mode in enumerate(("during write", "random", "during write")):
        proc = subprocess.Popen(
            _command(out, save_pause_s=0.2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_saves = rng.randint(1, 3)  # let this many saves of this process start before acting
        seen, deadline = 0, time.monotonic() + 90
        while seen < wait_saves:
            assert proc.poll() is None, (
                f"cycle {cycle}: the run ended before the kill: {proc.stderr.read()!r}"
            )
            assert time.monotonic() < deadline, "no checkpoint write within 90 s"
            if _in_write(out, proc.pid):
                seen += 1
                if seen < wait_saves:
                    while _in_write(out, proc.pid) and proc.poll() is None:
                        time.sleep(0.005)
            time.sleep(0.005)
        in_write = _in_write(out, proc.pid)
        if mode == "random":
            time.sleep(rng.uniform(0.0, 0.4))
            in_write = _in_write(out, proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        figures.KILLS["cycles"] += 1
        figures.KILLS["killed during a checkpoint write"] += int(in_write)
        # The last good checkpoint loads, and it is never older than the one before the kill.
        if not (out / "last.pth").exists():
            ok = last_step == 0  # killed before the first save completed: there was nothing to lose
        else:
            try:
                ckpt = load_training_checkpoint(out / "last.pth")
                ok = ckpt["global_step"] >= last_step > -1
                last_step = ckpt["global_step"]
            except (ValueError, OSError):
                ok = False
        lost += int(not ok)
        figures.KILLS["lost data"] = lost
        assert ok, f"cycle {cycle} ({mode}): last.pth lost or went back (step {last_step})"

    final = subprocess.run(_command(out, save_pause_s=0.2), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert not list(out.glob(".last.pth.tmp-*"))  # the killed writers' temp files went at the next start
    reference = subprocess.run(_command(straight), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    a, b = load_training_checkpoint(out / "last.pth"), load_training_checkpoint(straight / "last.pth")
    assert a["global_step"] == b["global_step"] == STEPS
    for part in ("model", "state_dict_ema"):
        for key, value in b[part].items():
            same = torch.equal(a[part][key], value)
            if not same:
                figures.KILLS["lost data"] = lost + 1
            assert same, f"{part}.{key} differs from the uninterrupted run"
    assert _steps(out) == _steps(straight)
    figures.KILLS["resumed runs equal to the uninterrupted run (bit for bit)"] += 1
