"""Checkpoints whose unpickling would run code, for "no loader executes pickled code" tests.

``make_malicious_pickle(path, marker_file)`` writes a file that any plain ``torch.load(weights_only=False)`` /
``pickle.load`` would turn into a call creating ``marker_file``. A loader is safe when it refuses the file (or
loads it inertly) and ``marker_file`` still does not exist afterwards::

    from tests.hardening.malicious import PAYLOADS, make_malicious_pickle

    @pytest.mark.parametrize("payload", PAYLOADS)
    def test_my_loader_refuses_pickled_code(tmp_path, payload):
        marker = tmp_path / "PWNED"
        path = make_malicious_pickle(tmp_path / "evil.pth", marker, payload=payload)
        with pytest.raises(ValueError):
            my_loader(path)
        assert not marker.exists()
"""

from __future__ import annotations

import builtins
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

# Which callable the pickle asks for: os.system (a shell command), builtins.exec (Python source),
# builtins.open (a file created by the call itself), subprocess.Popen-like via os.popen... and an eval.
PAYLOADS = ("system", "exec", "open", "eval")
# The container the payload hides in: a bare state dict entry, a training-script dict, our training
# checkpoint (``format`` tag set), the pickle root object itself, a legacy (pre-1.6) torch.save stream, or a
# plain pickle (no torch.save framing) under a .pth name.
LAYOUTS = ("state_dict", "official", "training", "root", "legacy", "raw_pickle")


class _Call:
    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def payload_object(marker_file: str | os.PathLike, payload: str = "system") -> Any:
    """An object whose unpickling creates ``marker_file``."""
    marker = str(marker_file)
    if payload == "system":
        return _Call(os.system, (f"touch {marker}",))
    if payload == "exec":
        return _Call(builtins.exec, (f"open({marker!r}, 'w').write('pwned')",))
    if payload == "open":
        return _Call(builtins.open, (marker, "w"))
    if payload == "eval":
        return _Call(builtins.eval, (f"__import__('pathlib').Path({marker!r}).touch()",))
    raise ValueError(f"payload must be one of {PAYLOADS}, got {payload!r}")


def make_malicious_pickle(
    path: str | os.PathLike, marker_file: str | os.PathLike, payload: str = "system", layout: str = "official"
) -> Path:
    """Write a checkpoint at ``path`` that runs ``payload`` (creating ``marker_file``) if unpickled naively.

    Args:
        payload: one of :data:`PAYLOADS`.
        layout: one of :data:`LAYOUTS` (where the payload sits; see above).

    Returns:
        ``path``. The file itself never ran anything: ``marker_file`` does not exist on return.
    """
    path = Path(path)
    evil = payload_object(marker_file, payload)
    weights = {"weight": torch.ones(4, 3), "bias": torch.zeros(4)}
    if layout == "state_dict":
        obj: Any = {**weights, "evil": evil}
    elif layout == "official":
        obj = {"model": weights, "epoch": 1, "config": evil}
    elif layout == "training":
        obj = {
            "format": "agentattn-train-v1",
            "model_name": "agent_pvt_tiny_224",
            "model": weights,
            "rng": evil,
        }
    elif layout == "root":
        obj = evil
    elif layout in ("legacy", "raw_pickle"):
        obj = {"model": weights, "config": evil}
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif layout == "raw_pickle":
        path.write_bytes(pickle.dumps({"config": evil}, protocol=2))
    else:
        torch.save(obj, path)
    assert not Path(marker_file).exists(), "writing the malicious file must not run it"
    return path


def naive_load_runs_it(path: str | os.PathLike, marker_file: str | os.PathLike) -> bool:
    """Control: does an unsafe ``torch.load(weights_only=False)`` of ``path`` create ``marker_file``? (It must, or
    the malicious file tests nothing.) The marker is removed again."""
    try:
        if Path(path).read_bytes()[:1] == b"\x80" and b"PK" not in Path(path).read_bytes()[:4]:
            with open(path, "rb") as f:
                try:
                    torch.load(f, weights_only=False)
                except Exception:
                    f.seek(0)
                    pickle.load(f)
        else:
            torch.load(path, weights_only=False)
    except Exception:
        pass
    ran = Path(marker_file).exists()
    if ran:
        Path(marker_file).unlink()
    sys.stdout.flush()
    return ran
