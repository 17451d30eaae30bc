"""Counts gathered while the hardening tests run, printed in pytest's terminal summary.

``pytest tests/hardening`` ends with a "hardening figures" section (fuzz cases and largest errors per dtype,
bad-input cases per entry point, kill/resume cycles, malicious pickles blocked); with
``HARDENING_FIGURES=FILE`` the same figures are also written to FILE as JSON.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

FUZZ_CASES: dict[str, int] = defaultdict(int)  # test family -> hypothesis examples run
MAX_ERROR: dict[str, float] = defaultdict(float)  # "dtype: what" -> largest error / max|fp64 reference|
BAD_INPUT: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # entry point -> [tried, clear]
UNCLEAR: list[str] = []  # "entry: case: what happened" for the cases that did not give a clear error
KILLS: dict[str, int] = defaultdict(int)  # cycles, during_write, lost
MALICIOUS: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # loader -> [tried, blocked]
MIXED: dict[str, float] = {}  # large-logit mixed precision: "dtype path what" -> error / max|ref|
CORPUS: dict[
    str, list[int]
] = {}  # crafted-file class -> [(case, reader) pairs tried, refused cleanly / loaded]
MEMORY: dict[str, Any] = {}  # the crafted file whose load grew the peak RSS most beyond its size


def record_error(dtype: str, what: str, rel_error: float) -> None:
    key = f"{dtype}: {what}"
    MAX_ERROR[key] = max(MAX_ERROR[key], float(rel_error))


def as_dict() -> dict[str, Any]:
    return {
        "fuzz_cases": dict(FUZZ_CASES),
        "fuzz_cases_total": sum(FUZZ_CASES.values()),
        "max_rel_error": dict(sorted(MAX_ERROR.items())),
        "mixed_precision_large_logits": dict(sorted(MIXED.items())),
        "bad_input": {k: {"tried": v[0], "clear": v[1]} for k, v in sorted(BAD_INPUT.items())},
        "bad_input_total": [sum(v[0] for v in BAD_INPUT.values()), sum(v[1] for v in BAD_INPUT.values())],
        "unclear": list(UNCLEAR),
        "kill_resume": dict(KILLS),
        "malicious": {k: {"tried": v[0], "blocked": v[1]} for k, v in sorted(MALICIOUS.items())},
        "corpus": {k: {"tried": v[0], "clean": v[1]} for k, v in sorted(CORPUS.items())},
        "corpus_worst_memory": dict(MEMORY),
    }


def empty() -> bool:
    return not (FUZZ_CASES or MAX_ERROR or BAD_INPUT or KILLS or MALICIOUS or MIXED or CORPUS or MEMORY)


def summary_lines() -> list[str]:
    d = as_dict()
    lines = [f"fuzz cases run: {d['fuzz_cases_total']} " + json.dumps(d["fuzz_cases"])]
    lines += [f"  largest error / max|fp64 ref|, {k}: {v:.2e}" for k, v in d["max_rel_error"].items()]
    lines += [f"  logits ±1e4, {k}: {v:.2e}" for k, v in d["mixed_precision_large_logits"].items()]
    tried, clear = d["bad_input_total"]
    lines.append(f"bad-input cases: {tried} tried, {clear} clear error or documented behaviour")
    lines += [f"  {k}: {v['tried']} tried, {v['clear']} clear" for k, v in d["bad_input"].items()]
    lines += [f"  UNCLEAR {u}" for u in d["unclear"]]
    if d["kill_resume"]:
        lines.append("kill/resume: " + json.dumps(d["kill_resume"]))
    blocked = sum(v["blocked"] for v in d["malicious"].values())
    total = sum(v["tried"] for v in d["malicious"].values())
    lines.append(f"malicious pickles: {blocked} of {total} blocked, code never ran")
    lines += [f"  {k}: {v['blocked']}/{v['tried']}" for k, v in d["malicious"].items()]
    if d["corpus"]:
        clean = sum(v["clean"] for v in d["corpus"].values())
        lines.append(f"crafted-file corpus: {clean} of {sum(v['tried'] for v in d['corpus'].values())} "
                     "(file, reader) runs refused cleanly or loaded as torch.load does")  # fmt: skip
        lines += [f"  {k}: {v['clean']}/{v['tried']}" for k, v in d["corpus"].items()]
    if d["corpus_worst_memory"]:
        lines.append(
            "  largest peak-memory growth beyond the file size: " + json.dumps(d["corpus_worst_memory"])
        )
    return lines
