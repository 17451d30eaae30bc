"""The one writer: unpredictable exclusive temp names, no symlink followed, atomic replace, clear errors."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from agentattn.io import atomic as atomic_module
from agentattn.io import (
    atomic_open,
    atomic_path,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    open_log,
    remove_stale_temp_files,
    save_safetensors,
)
from agentattn.io.atomic import temp_writer_pid


def _plant_old_temp_names(target, victim):
    """The attack on the old writer: symlinks at the predictable `.NAME.tmp-PID[suffix]` names."""
    for name in (f".{target.name}.tmp-{os.getpid()}", f".{target.name}.tmp-{os.getpid()}{target.suffix}",
                 f"{target.name}.tmp", f"{target.name}.tmp.png"):  # fmt: skip
        (target.parent / name).symlink_to(victim)


WRITERS = {
    "atomic_write_text": lambda path: atomic_write_text(path, "new"),
    "atomic_torch_save": lambda path: atomic_torch_save({"w": torch.ones(2)}, path),
    "save_safetensors": lambda path: save_safetensors({"w": torch.ones(2)}, path),
    "atomic_open": lambda path: atomic_open(path).__enter__().write(b"x"),
}


@pytest.mark.parametrize("writer", ["atomic_write_text", "atomic_torch_save", "save_safetensors"])
def test_planted_symlinks_are_never_written_through(tmp_path, writer):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "out.bin"
    _plant_old_temp_names(target, victim)
    WRITERS[writer](target)
    assert victim.read_text() == "keep"
    assert target.is_file() and not target.is_symlink()


@pytest.mark.parametrize("writer", ["atomic_write_text", "atomic_torch_save", "save_safetensors"])
def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path, writer):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "out.bin"
    target.symlink_to(victim)
    WRITERS[writer](target)
    assert victim.read_text() == "keep" and not target.is_symlink()


def test_temp_names_are_unpredictable_exclusive_and_carry_the_pid(tmp_path):
    names = set()
    for _ in range(20):
        with atomic_path(tmp_path / "x.json") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json"
            assert temp_writer_pid(tmp.name) == os.getpid()
            assert stat.S_ISREG(os.lstat(tmp).st_mode)
            names.add(tmp.name)
            tmp.write_text("{}")
    assert len(names) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_output_keeps_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_failure_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pth"
    atomic_torch_save({"w": torch.zeros(1)}, target)
    before = target.read_bytes()

    def full(fd, mode):
        f = os.fdopen(fd, mode)

        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f

    monkeypatch.setattr(atomic_module, "_fdopen", full)
    with pytest.raises(
        OSError, match=r"ckpt.pth could not be written \(No space left on device\); the previous"
    ):
        atomic_torch_save({"w": torch.ones(1000)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
    assert torch.equal(load_checkpoint(target)["w"], torch.zeros(1))


def test_exception_in_the_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "a.bin") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_logs_refuse_symlinks_and_non_regular_files(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "metrics.csv").symlink_to(victim)
    with pytest.raises(OSError, match="symlink"):
        open_log(tmp_path / "metrics.csv")
    with pytest.raises(OSError, match="symlink"):
        open_log(tmp_path / "metrics.csv", truncate=True)
    assert victim.read_text() == "keep"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError):
        open_log(tmp_path / "fifo")
    with open_log(tmp_path / "log.jsonl") as f:
        f.write("a\n")
    with open_log(tmp_path / "log.jsonl") as f:
        f.write("b\n")
    assert (tmp_path / "log.jsonl").read_text() == "a\nb\n"


def test_stale_temp_files_of_dead_writers_only_are_removed(tmp_path):
    dead = tmp_path / ".last.pth.tmp-999999999-abcdefgh"
    live = tmp_path / f".last.pth.tmp-{os.getpid()}-abcdefgh"
    other = tmp_path / ".last.pth.tmp-12"  # not a name this writer makes
    for p in (dead, live, other):
        p.write_text("x")
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / ".m.json.tmp-999999999-zzzzzzzz"
    nested.write_text("x")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([dead, nested])
    assert live.exists() and other.exists()
