"""``python -m tests.hardening.corpus_memory MANIFEST``: peak memory of loading each crafted file.

Run in a fresh process by ``test_corpus.py``, which writes the files and a JSON manifest of
``[name, kind, path]`` rows. This process only imports the loaders and reads: after a warm-up (the three smallest
files), each file is loaded with ``load_checkpoint`` (``AgentLM.load`` for LM files), smallest first, and one
JSON line gives the file's size and how far the process's peak RSS grew while loading it (Linux resets the
peak through /proc/self/clear_refs before each file; see ``agentattn.report.memory``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

from agentattn.measure import peak_kib, reset_peak_kib


def main(manifest: str) -> None:
    from agentattn.io import load_checkpoint
    from agentattn.lm.model import AgentLM

    torch.set_num_threads(1)
    with open(manifest) as f:
        rows = sorted(json.load(f), key=lambda row: os.path.getsize(row[2]))
    for _, _, path in rows[:3]:  # warm-up: the first loads grow the allocator's arenas
        with contextlib.suppress(Exception):
            load_checkpoint(path)
    for name, kind, path in rows:
        before = reset_peak_kib()
        with contextlib.suppress(Exception):
            (AgentLM.load if kind == "lm" else load_checkpoint)(path)
        growth = max(0, peak_kib() - before) * 1024
        line = {"case": name, "file_bytes": os.path.getsize(path), "growth": growth}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
