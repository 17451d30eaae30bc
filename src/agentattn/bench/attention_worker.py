"""One case of the attention sweep in a fresh process: its peak memory and a cold timing per mode.

The child is started as ``python -m agentattn.bench.attention SPEC`` (that module's ``__main__`` calls
:func:`_worker`), one JSON line per mode on its stdout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

from ..measure import peak_kib, reset_peak_kib
from .attention_cases import COMPILED, build_case, time_mode


def _worker(spec: dict) -> None:
    """Run one case once per mode and print one JSON line per mode: peak memory rise and wall time."""
    torch.set_num_threads(spec["threads"])
    for mode, result in measure_case(spec):
        print(json.dumps({"mode": mode, **result}))
        sys.stdout.flush()


def measure_case(spec: dict):
    """Yield (mode, {"peak_mb", "cold_ms"}) for one call of the case per mode, in this process."""
    side = math.isqrt(spec["tokens"] - 1)
    layer = build_case(spec["case"], spec["dim"], spec["heads"], spec["agents"], side)
    if spec["case"] == COMPILED:
        layer = torch.compile(layer, fullgraph=True)
    x = torch.randn(spec["batch"], spec["tokens"], spec["dim"])
    for mode in spec["modes"]:
        call = time_mode(layer, x, mode)
        # Reset the peak resident set first: a higher peak reached earlier (imports, the previous mode) must
        # not hide this call's own.
        base = reset_peak_kib()
        t0 = time.perf_counter()
        call()
        elapsed = time.perf_counter() - t0
        yield mode, {"peak_mb": max(0, peak_kib() - base) / 1024, "cold_ms": elapsed * 1e3}


def measure_in_subprocess(spec: dict, timeout_s: float) -> dict[str, dict]:
    """Run :func:`_worker` in a fresh interpreter. Returns {mode: {"peak_mb", "cold_ms"} or {"status"}}."""
    cmd = [sys.executable, "-m", "agentattn.bench.attention", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    results: dict[str, dict] = {}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        out, err, failed = proc.stdout, proc.stderr, proc.returncode != 0
        status = "error"
        if failed and ("out of memory" in err.lower() or proc.returncode in (-9, 137)):
            status = "oom"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, failed, status = "", True, "timeout"
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row.pop("mode")] = row
    for mode in spec["modes"]:
        if mode not in results:
            reason = err.strip().splitlines()[-1] if err.strip() else ""
            results[mode] = {"status": status if failed else "error", "detail": reason[:200]}
    return results
