"""What a measurement was taken on and with: recorded beside every benchmark result."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time

import torch

__all__ = ["command_line", "environment"]


def environment(threads: int | None = None) -> dict:
    """Machine and library versions, recorded with every result."""
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def command_line(*command: str) -> str:
    """The command as typed, normalised to ``agentattn COMMAND... ARGS`` (also when run as ``python -m`` or from a
    script): the arguments are those after the first ``command[-1]`` in ``sys.argv``, or all of them.

    Example: ``command_line("bench", "model")`` gives ``"agentattn bench model --sizes 224"``.
    """
    if not command:
        raise ValueError("command_line needs the command's words, e.g. command_line('bench', 'model')")
    argv = sys.argv[1:]
    if command[-1] in argv:
        argv = argv[argv.index(command[-1]) + 1 :]
    return shlex.join(["agentattn", *command, *argv])
