"""Print the hardening figures at the end of the run (and write them as JSON with HARDENING_FIGURES=FILE)."""

from __future__ import annotations

import json
import os

from agentattn.io import atomic_write_text

from . import figures


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if figures.empty():
        return
    terminalreporter.section("hardening figures")
    for line in figures.summary_lines():
        terminalreporter.write_line(line)
    target = os.environ.get("HARDENING_FIGURES")
    if target:
        atomic_write_text(target, json.dumps(figures.as_dict(), indent=1))
