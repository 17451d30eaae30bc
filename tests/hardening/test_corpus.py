"""Every crafted file of :mod:`tests.hardening.corpus` through every reader of its kind.

For each (case, reader): a clear refusal (ValueError from the library, one ``agentattn CMD: error:`` line from
the CLI, never a traceback, messages of bounded length), or, for the ``valid:*`` files, exactly what
``torch.load(weights_only=False)`` reads. While the reader runs, an audit hook watches the process: no
subprocess or shell (code execution), no socket (network), no file opened for writing outside the case's output
directory, and no read of the canary paths the hostile fields name. Peak memory per file is measured in a
fresh process (:mod:`tests.hardening.corpus_memory`) against the documented bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from agentattn.deploy import load_model
from agentattn.io import load_checkpoint, safe_torch_load
from agentattn.lm.model import AgentLM
from agentattn.models.pretrained import load_pretrained
from agentattn.train.restore import model_from_checkpoint
from tests.train import TINY_CLI

from . import figures
from .cases import CliFailed, run_cli
from .corpus import CORPUS, MODEL, RESUME_ARGS, TINY, TINY_CHANS, TINY_CLASSES, TINY_IMG, Canary, Crafted

ROOT = Path(__file__).resolve().parents[2]
MAX_MESSAGE = 1000  # characters of an error message: it quotes at most a few hundred of the file

# ---------------------------------------------------------------------------------------------------------------
# The watcher: one audit hook for the whole session, active only inside `watch`.

_EXEC_EVENTS = (
    "os.system",
    "subprocess.Popen",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "pty.spawn",
)
_NET_EVENTS = ("socket.", "urllib.Request", "http.client.connect", "ftplib.connect")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _Watch:
    active: _Watch | None = None

    def __init__(self, out_dir: Path, canary: Canary) -> None:
        self.out_dir, self.canary = str(out_dir.resolve()), str(canary.root.resolve())
        self.violations: list[str] = []

    def event(self, name: str, args: tuple) -> None:
        if name.startswith(_EXEC_EVENTS):
            self.violations.append(f"code execution: {name}")
        elif name.startswith(_NET_EVENTS):
            self.violations.append(f"network: {name}")
        elif name == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            mode, flags = args[1] if len(args) > 1 else None, args[2] if len(args) > 2 else 0
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                (flags or 0) & _WRITE_FLAGS
            )
            if path.startswith(self.canary):
                self.violations.append(f"touched canary {path}")
            elif writes and not path.startswith(self.out_dir) and path != os.devnull:
                self.violations.append(f"wrote {path}")


def _hook(name: str, args: tuple) -> None:
    watch = _Watch.active
    if watch is not None:
        watch.event(name, args)


sys.addaudithook(_hook)


def watched(
    out_dir: Path, canary: Canary, call: Callable[[], Any]
) -> tuple[Any, BaseException | None, list[str]]:
    watch = _Watch(out_dir, canary)
    _Watch.active = watch
    try:
        result, error = call(), None
    except Exception as err:
        result, error = None, err
    finally:
        _Watch.active = None
    return result, error, watch.violations


# ---------------------------------------------------------------------------------------------------------------
# Readers of each kind


def _image(tmp: Path) -> Path:
    from PIL import Image

    path = tmp / "input.png"
    if not path.exists():
        Image.new("L", (TINY_IMG, TINY_IMG), 128).save(path)
    return path


def _tiny_model(**kwargs: Any):
    import timm

    return timm.create_model(
        MODEL, num_classes=TINY_CLASSES, in_chans=TINY_CHANS, img_size=TINY_IMG, **TINY, **kwargs
    )


_KW = [f"{k}={v}" for k, v in TINY.items()]
READERS: dict[str, dict[str, Callable[[Path, Path], Any]]] = {
    "pth": {
        "safe_torch_load": lambda p, out: safe_torch_load(p),
        "load_checkpoint": lambda p, out: load_checkpoint(p),
        "load_pretrained": lambda p, out: load_pretrained(_tiny_model(), p),
        "timm.create_model(pretrained, file=)": lambda p, out: _tiny_model(pretrained=True,
                                                                           pretrained_cfg_overlay=dict(file=str(p))),
        "agentattn convert": lambda p, out: run_cli(["convert", p, out / "c.safetensors"]),
        "agentattn eval": lambda p, out: run_cli(["eval", "--checkpoint", p, "--model", MODEL, "--subset", "4",
                                                  "--model-kwargs", *_KW]),
        "agentattn export": lambda p, out: run_cli(["export", MODEL, out / "m.onnx", "--format", "onnx",
                                                    "--checkpoint", p, "--model-kwargs", *_KW]),
    },
    "training": {
        "model_from_checkpoint": lambda p, out: model_from_checkpoint(p),
        "deploy.load_model": lambda p, out: load_model(MODEL, p),
        "agentattn eval": lambda p, out: run_cli(["eval", "--checkpoint", p, "--subset", "4"]),
        "agentattn explain": lambda p, out: run_cli(["explain", p, _image(out), "--output", out / "figs"]),
        "agentattn export": lambda p, out: run_cli(["export", MODEL, out / "m.onnx", "--format", "onnx",
                                                    "--checkpoint", p]),
    },
    "safetensors": {
        "load_checkpoint": lambda p, out: load_checkpoint(p),
        "agentattn convert": lambda p, out: run_cli(["convert", p, out / "c.safetensors"]),
        "agentattn eval": lambda p, out: run_cli(["eval", "--checkpoint", p, "--model", MODEL, "--subset", "4",
                                                  "--model-kwargs", *_KW]),
    },
    "resume": {
        "agentattn train --resume": lambda p, out: run_cli(["train", *TINY_CLI, "--output", p.parent, *RESUME_ARGS,
                                                            "--max-steps", "2", "--resume"]),
    },
    "lm": {
        "AgentLM.load": lambda p, out: AgentLM.load(p),
        "agentattn lm sample": lambda p, out: run_cli(["lm", "sample", "--checkpoint", p, "--prompt", "a",
                                                       "--max-new-tokens", "1"]),
    },
}  # fmt: skip

PAIRS = [(case, reader) for case in CORPUS for reader in READERS[case.kind] if not case.valid]


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Canary:
    c = Canary(tmp_path_factory.mktemp("canary"))
    c.make()
    return c


@pytest.fixture(scope="module")
def files(tmp_path_factory, canary) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for i, case in enumerate(CORPUS):
        d = root / f"{i:03d}"
        d.mkdir()
        out[case.name] = case.make(d, canary)
    return out


def test_corpus_size_and_classes():
    counts: dict[str, int] = {}
    for case in CORPUS:
        counts[case.klass] = counts.get(case.klass, 0) + 1
    assert len(CORPUS) >= 150, counts
    assert len({c.name for c in CORPUS}) == len(CORPUS)
    assert {"metadata", "pickle", "zip", "legacy", "safetensors", "bounds", "malformed"} <= set(counts)


@pytest.mark.parametrize(("case", "reader"), PAIRS, ids=[f"{c.name}|{r}" for c, r in PAIRS])
def test_hostile_file_is_refused_cleanly(case: Crafted, reader: str, files, canary, tmp_path):
    path = files[case.name]
    before = path.read_bytes()
    out = path.parent if case.kind == "resume" else tmp_path  # a resumed run's output is its own directory
    _, error, violations = watched(out, canary, lambda: READERS[case.kind][reader](path, tmp_path))
    counts = figures.CORPUS.setdefault(case.klass, [0, 0])
    counts[0] += 1
    assert not violations, violations
    assert not canary.planted.exists(), "the file made the reader write the planted file"
    assert path.read_bytes() == before, "the reader changed its input"
    if error is None:
        assert reader in case.accept, f"{reader} accepted the hostile file {case.name}"
    elif isinstance(error, CliFailed):
        assert error.well_formed, error.stderr
        assert len(error.stderr) < MAX_MESSAGE, error.stderr[:300]
    else:
        assert isinstance(error, ValueError), f"{type(error).__name__}: {str(error)[:300]}"
        assert len(str(error)) < MAX_MESSAGE, str(error)[:300]
    counts[1] += 1


VALID = [c for c in CORPUS if c.valid]


@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_valid_file_loads_as_torch_load_does(case: Crafted, files, canary, tmp_path):
    path = files[case.name]
    ours, error, violations = watched(tmp_path, canary, lambda: safe_torch_load(path))
    assert error is None and not violations, (error, violations)
    theirs = torch.load(path, weights_only=False)

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor):
            return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                    and a.stride() == b.stride() and torch.equal(a, b))  # fmt: skip
        if isinstance(a, dict):
            return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        return a == b

    assert same(ours, theirs)
    figures.CORPUS.setdefault("valid", [0, 0])[0] += 1
    figures.CORPUS["valid"][1] += 1


def test_peak_memory_within_the_documented_bound(files, tmp_path):
    """The files are loaded in a fresh process; the growth of its peak RSS per file stays within S + 64 MiB."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([[c.name, c.kind, str(files[c.name])] for c in CORPUS]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.hardening.corpus_memory", str(manifest)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 20
    worst = max(rows, key=lambda r: r["growth"])
    figures.MEMORY.update(worst, files=len(rows), largest_file_bytes=max(r["file_bytes"] for r in rows))
    for row in rows:
        assert row["growth"] <= row["file_bytes"] + 64 * 2**20, row
