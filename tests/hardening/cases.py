"""Table-driven bad-input tests: one :class:`Case` per (entry point, bad input), one runner for all.

A case passes when the call raises the expected exception type with a message matching ``match`` (which names
the argument or file at fault), or, for ``raises=None``, returns normally and passes ``check`` (documented
behaviour: B = 0, N = 1, NaN in → NaN out, ...). A crash deep inside torch (RuntimeError, IndexError, an
unrelated ValueError) never matches. CLI cases go through :func:`run_cli`: a non-zero exit must come with a
short message (one ``agentattn CMD: error: ...`` line, or argparse's usage + error), never a traceback.

To cover a new entry point, add rows to a table (a list of cases) and parametrize a test over it::

    CASES = [Case("lm.generate", "prompt of rank 3", lambda tmp: generate(torch.ones(1, 2, 3)), ValueError, "prompt")]

    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_bad_input(case, tmp_path):
        check_case(case, tmp_path)
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import figures


@dataclass(frozen=True)
class Case:
    """One bad input for one entry point.

    ``call(tmp_path)`` makes the call; ``raises`` is the expected exception type (``None``: it must succeed and
    pass ``check(result)``); ``match`` is a regex searched in the message.
    """

    entry: str
    name: str
    call: Callable[[Path], Any]
    raises: type[BaseException] | tuple[type[BaseException], ...] | None
    match: str = ""
    check: Callable[[Any], None] | None = None


def case_id(case: Case) -> str:
    return f"{case.entry}|{case.name}"


class CliFailed(Exception):
    """A CLI command exited non-zero; the message is its stderr."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(stderr)
        self.code, self.stderr = code, stderr

    @property
    def well_formed(self) -> bool:
        """One error line, optionally after argparse's usage block; no traceback."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        if not lines or "Traceback" in self.stderr or self.code in (0, None) or "error" not in lines[-1]:
            return False
        head = lines[:-1]
        return not head or (head[0].startswith("usage:") and all(ln.startswith(" ") for ln in head[1:]))


def run_cli(argv: Sequence[str]) -> str:
    """Run ``agentattn ARGV`` in this process; return stdout, or raise :class:`CliFailed` on a non-zero exit.

    Any other exception escaping the command is a crash (not a clear error) and propagates as is.
    """
    from agentattn.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse errors, and commands that exit with a message
            code = exit_.code
            if isinstance(code, str):
                err.write(code + "\n")
                code = 1
    if code:
        raise CliFailed(int(code), err.getvalue())
    return out.getvalue()


def check_case(case: Case, tmp_path: Path) -> None:
    """Run one case, count it in the figures, and fail with what happened if the error was not clear."""
    counts = figures.BAD_INPUT[case.entry]
    counts[0] += 1
    expected = case.raises.__name__ if isinstance(case.raises, type) else str(case.raises)
    problem = None
    try:
        result = case.call(tmp_path)
    except Exception as err:
        message = str(err)
        if case.raises is None:
            problem = f"documented to work, raised {type(err).__name__}: {message}"
        elif not isinstance(err, case.raises):
            problem = f"expected {expected}, got {type(err).__name__}: {message}"
        elif not re.search(case.match, message):
            problem = f"{type(err).__name__} message {message!r} does not match {case.match!r}"
        elif isinstance(err, CliFailed) and not err.well_formed:
            problem = f"CLI error is not one short line: {err.stderr!r}"
    else:
        if case.raises is not None:
            problem = f"expected {expected} matching {case.match!r}, but the call returned"
        elif case.check is not None:
            try:
                case.check(result)
            except AssertionError as err:
                problem = f"documented behaviour not met: {err}"
    if problem:
        figures.UNCLEAR.append(f"{case.entry}: {case.name}: {problem}"[:300])
        pytest.fail(f"{case.entry} / {case.name}: {problem}")
    counts[1] += 1
