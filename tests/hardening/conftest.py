"""Print the hardening figures at the end of the run (and write them as JSON with HARDENING_FIGURES=FILE)."""

from __future__ import annotations

import json
import os

from . import figures


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if figures.empty():
        return
    terminalreporter.section("hardening figures")
    for line in figures.summary_lines():
        terminalreporter.write_line(line)
    target = os.environ.get("HARDENING_FIGURES")
    if target:
        with open(target + ".tmp", "w") as f:
            json.dump(figures.as_dict(), f, indent=1)
        os.replace(target + ".tmp", target)
