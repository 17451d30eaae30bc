"""Byte-level corpora: the King James Bible from Debian's ``bible-kjv``, or any UTF-8 text file.

``kjv``: the text of ``bible -l0 'gen1:1-rev22:21'`` (about 4.3 MB), extracted once and cached as
``<cache_dir>/kjv.txt`` (default ``$XDG_CACHE_HOME/agentattn`` or ``~/.cache/agentattn``). Nothing is downloaded.
``textfile:PATH``: the bytes of PATH (must decode as UTF-8).

Splits are fixed contiguous byte ranges: train [0, 90%), val [90%, 95%), test [95%, 100%).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_write_bytes

KJV_COMMAND = ["bible", "-l0", "gen1:1-rev22:21"]
SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentattn"


def extract_kjv(cache_dir: str | Path | None = None) -> bytes:
    """The KJV text as bytes, from the cache or from the ``bible`` program (Debian package ``bible-kjv``)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "kjv.txt"
    if path.is_file() and path.stat().st_size > 0:
        return path.read_bytes()
    exe = shutil.which(KJV_COMMAND[0])
    if exe is None:
        raise FileNotFoundError(
            "the KJV corpus needs the `bible` program from the Debian package bible-kjv "
            "(sudo apt-get install bible-kjv), or use data='textfile:PATH'"
        )
    try:
        proc = subprocess.run([exe, *KJV_COMMAND[1:]], capture_output=True, check=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        raise OSError(f"`{' '.join(KJV_COMMAND)}` failed: {err}") from None
    if not proc.stdout:
        raise OSError(f"`{' '.join(KJV_COMMAND)}` printed nothing")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, proc.stdout)
    return proc.stdout


def load_text_bytes(spec: str, cache_dir: str | Path | None = None) -> bytes:
    """``"kjv"`` or ``"textfile:PATH"`` → the corpus bytes."""
    if spec == "kjv":
        return extract_kjv(cache_dir)
    if spec.startswith("textfile:"):
        path = Path(spec.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data {spec!r}: {path} does not exist")
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"data {spec!r}: {path} is not UTF-8 ({err})") from None
        return data
    raise ValueError(f"data must be 'kjv' or 'textfile:PATH', got {spec!r}")


@dataclass
class ByteCorpus:
    """Byte tokens (uint8 tensors) of the three contiguous splits."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    source: str

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "bytes", min_split: int = 2) -> ByteCorpus:
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        n = tokens.numel()
        a, b = int(n * 0.90), int(n * 0.95)
        corpus = cls(tokens[:a], tokens[a:b], tokens[b:], source)
        for name in SPLITS:
            if corpus.split(name).numel() < min_split:
                raise ValueError(
                    f"{source}: the {name} split has {corpus.split(name).numel()} bytes; the corpus ({n} bytes) "
                    f"is too small for a 90/5/5 split with windows of {min_split} bytes"
                )
        return corpus

    @classmethod
    def load(cls, spec: str, cache_dir: str | Path | None = None, min_split: int = 2) -> ByteCorpus:
        return cls.from_bytes(load_text_bytes(spec, cache_dir), spec, min_split)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def random_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs x (B, L) and next-byte targets y (B, L), int64."""
    if tokens.numel() < 2:
        raise ValueError("the split needs at least 2 bytes")
    seq_len = min(seq_len, tokens.numel() - 1)
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = tokens[starts[:, None] + offsets].long()  # (B, L + 1)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering the split: every byte after the first is predicted exactly once."""
    out = []
    for start in range(0, tokens.numel() - 1, seq_len):
        chunk = tokens[start : start + seq_len + 1].long()
        if chunk.numel() >= 2:
            out.append((chunk[:-1], chunk[1:]))
    return out
