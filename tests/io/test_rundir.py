"""Run-directory locks: one live run per directory, released however the holder exits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from agentattn.io import RunDirectoryInUse, lock_run_directory, run_directory_holder


def test_second_holder_is_refused_with_the_pid(tmp_path):
    run = tmp_path / "run"
    with lock_run_directory(run):
        assert run_directory_holder(run) == os.getpid()
        code = textwrap.dedent(f"""
            from agentattn.io import RunDirectoryInUse, lock_run_directory
            try:
                with lock_run_directory({str(run)!r}):
                    print("ACQUIRED")
            except RunDirectoryInUse as err:
                print(err)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
        assert f"{run} is in use by another run (PID {os.getpid()})" in out
    assert run_directory_holder(run) is None
    with lock_run_directory(run):  # released: free again
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    code = f"from agentattn.io import lock_run_directory\nimport time\nwith lock_run_directory({str(run)!r}):\n" \
           "    print('HELD', flush=True)\n    time.sleep(60)\n"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HELD"
        with pytest.raises(RunDirectoryInUse, match=f"PID {proc.pid}"), lock_run_directory(run):
            pass
    finally:
        proc.kill()
        proc.wait()
    with lock_run_directory(run):
        pass


def test_a_symlinked_lock_file_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (run / ".agentattn.lock").symlink_to(victim)
    with pytest.raises(OSError), lock_run_directory(run):
        pass
    assert victim.read_text() == "keep"


def test_a_rejected_run_leaves_no_directory_it_created(tmp_path):
    fresh, existing = tmp_path / "a" / "fresh", tmp_path / "existing"
    existing.mkdir()
    for directory in (fresh, existing):
        with pytest.raises(ValueError, match="rejected"), lock_run_directory(directory):
            raise ValueError("rejected")
    assert not fresh.exists()  # created by the run and empty: removed
    assert existing.is_dir()  # the user's directory stays
    with lock_run_directory(fresh):  # a run that succeeds keeps its directory
        pass
    assert fresh.is_dir()
    other = tmp_path / "written"
    with pytest.raises(ValueError), lock_run_directory(other):
        (other / "result.json").write_text("{}")
        raise ValueError("failed after writing")
    assert (other / "result.json").exists()  # results are never removed
