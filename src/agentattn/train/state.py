"""What a training run keeps across a kill, and how it gets it back.

- the checkpoint (``last.pth``): its format tag, reading it safely, and checking every field before use;
- the RNG state of Python, NumPy and torch, so a resumed run draws what the uninterrupted run would have;
- the metrics logs, cut back to the sizes the checkpoint recorded;
- the output directory: one run's files, never an earlier run's results.

:mod:`agentattn.train.loop` writes and reads these; nothing here trains.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import load_tagged_checkpoint, open_log, quote
from .config import TrainConfig
from .record_checks import (
    check_dict,
    check_int,
    check_list,
    check_number,
    check_plain,
    check_rng_state,
    check_str,
    get_field,
    remove_results,
    results_in,
)

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "METRICS_NAMES", "RUN_FILES", "load_training_checkpoint"]

CHECKPOINT_NAME = "last.pth"
CHECKPOINT_FORMAT = "agentattn-train-v1"
METRICS_NAMES = ("metrics.jsonl", "metrics.csv")
# The files a run writes into its output directory: what ``overwrite`` removes, and nothing else.
RUN_FILES = (*METRICS_NAMES, CHECKPOINT_NAME)
# Options a resumed run must share with the run it continues.
_RESUME_KEYS = (
    "data",
    "model_kwargs",
    "seed",
    "batch_size",
    "train_subset",
    "img_size",
    "drop_path",
    "epochs",
)


def _rng_state() -> dict[str, Any]:
    # Plain containers only (numpy's state holds an ndarray, which the safe loader would refuse).
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002  (timm Mixup draws from it)
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the global RNG is what timm Mixup uses)
    torch.manual_seed(seed)


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` with the safe loader (no pickled code runs).

    Raises:
        ValueError: missing, unreadable or corrupted file, or one that :func:`train` did not write.
    """
    return load_tagged_checkpoint(path, CHECKPOINT_FORMAT, "agentattn train")


def plain_config(config: TrainConfig) -> dict[str, Any]:
    out = asdict(config)
    out["betas"] = list(config.betas)
    return out


class _MetricsWriter:
    """Appends JSONL (steps and epochs) and CSV (epochs) lines; ``sizes()`` lets a resume truncate them."""

    def __init__(
        self, output: Path, enabled: bool, truncate_to: dict[str, int] | None, source: Path | None = None
    ) -> None:
        self.enabled = enabled
        self.jsonl_path, self.csv_path = output / "metrics.jsonl", output / "metrics.csv"
        if not enabled:
            return
        paths = (self.jsonl_path, self.csv_path)
        with contextlib.ExitStack() as stack:
            # Both logs open (a symlink is refused) before either is cut.
            logs = [stack.enter_context(open_log(path, binary=True)) for path in paths]
            for path, log in zip(paths, logs, strict=True):
                size = (truncate_to or {}).get(path.name, 0)
                current = os.fstat(log.fileno()).st_size
                if size > current:  # never grow a log (a huge size would make a huge sparse file)
                    raise ValueError(
                        f"{source}: field metrics_bytes[{path.name!r}] must be at most {current} (the size of "
                        f"{path}), got {size}"
                    )
                # Drop the lines written after the checkpoint we resume from: they will be written again.
                log.truncate(size)
        self.jsonl = open_log(self.jsonl_path)
        self.csv = open_log(self.csv_path)

    def step(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps({"kind": "step", **record}) + "\n")

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": "epoch", **record}) + "\n")
        writer = csv.DictWriter(self.csv, fieldnames=list(record))
        if self.csv.tell() == 0:
            writer.writeheader()
        writer.writerow(record)

    def sizes(self) -> dict[str, int]:
        if not self.enabled:
            return {}
        self.jsonl.flush()
        self.csv.flush()
        return {self.jsonl_path.name: self.jsonl.tell(), self.csv_path.name: self.csv.tell()}

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.csv.close()


def _prepare_output(output: Path, config: TrainConfig) -> None:
    """Refuse to start over an earlier run's results (unless ``overwrite``: then remove its files).

    Called by rank 0 with the directory locked. Resuming an existing checkpoint is always allowed; ``resume``
    without one is refused (timm's train.py refuses a missing resume file too) rather than starting over,
    unless ``overwrite`` also says to start over.
    """
    ckpt_path = output / CHECKPOINT_NAME
    if config.resume and ckpt_path.is_file():
        return
    found = results_in(output, RUN_FILES)
    if config.resume and not config.overwrite:
        earlier = f" (it holds an earlier run's {', '.join(found)})" if found else ""
        raise ValueError(
            f"nothing to resume: {ckpt_path} does not exist{earlier}; start the run without resume, choose "
            "another output directory, or set overwrite to replace the earlier results"
        )
    if not found:
        return
    if config.overwrite:
        removed = remove_results(output, RUN_FILES)
        print(f"overwrite: removed the earlier run's {', '.join(removed)} from {output}")
        return
    if CHECKPOINT_NAME in found:
        raise ValueError(
            f"{ckpt_path} exists: set resume to continue that run, choose another output directory, or set "
            "overwrite to replace its results"
        )
    raise ValueError(
        f"{output} holds results of an earlier run ({', '.join(found)}) but no {CHECKPOINT_NAME} to continue "
        "it with resume: choose another output directory, or set overwrite to replace them"
    )


def _log_size(path: Path) -> int | None:
    """The size of the log at ``path``, 0 when there is none; None for a symlink or another non-regular file
    (refused when it is opened, before anything is cut)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _resume_fields(path: Path, ckpt: dict[str, Any], config: TrainConfig, master: bool) -> dict[str, Any]:
    """Check the fields of the checkpoint ``path`` that do not depend on the data or the model (before the data
    loads: a bad file fails at once). ValueError names the file and the field."""
    name = check_str(path, "model_name", get_field(path, ckpt, "model_name"), 500)
    if name != config.model:
        raise ValueError(f"{path} is a {quote(name)} checkpoint, not {config.model!r}")
    # These fix the data order and the weights' shapes: resuming with other values would not continue the run.
    saved = check_plain(path, "config", check_dict(path, "config", get_field(path, ckpt, "config")))
    now = plain_config(config)
    changed = [k for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"{k}: {quote(saved.get(k), 80)} -> {quote(now[k], 80)}" for k in changed)
        raise ValueError(f"{path} was written with other settings ({diffs}): use the run's settings again")
    total_epochs = config.epochs + config.cooldown_epochs
    epoch = check_int(path, "epoch", get_field(path, ckpt, "epoch"), 0, total_epochs)
    step = check_int(path, "step_in_epoch", get_field(path, ckpt, "step_in_epoch"), 0)
    global_step = check_int(path, "global_step", get_field(path, ckpt, "global_step"), 0, 2**62)
    sums = check_list(path, "epoch_sums", get_field(path, ckpt, "epoch_sums"), 2)
    loss_sum = check_number(path, "epoch_sums[0]", sums[0], 0)
    seen = check_int(path, "epoch_sums[1]", sums[1], 0)
    history = check_list(path, "history", get_field(path, ckpt, "history"))
    if len(history) != epoch:  # one record per finished epoch
        raise ValueError(
            f"{path}: field history must be a list of {epoch} epoch records (field epoch is {epoch}), "
            f"got {len(history)}"
        )
    for i, record in enumerate(history):
        for key, value in check_dict(path, f"history[{i}]", record).items():
            check_number(path, f"history[{i}].{quote(key, 40)[1:-1]}", value, finite=False)
    sizes = check_dict(path, "metrics_bytes", get_field(path, ckpt, "metrics_bytes"))
    if set(sizes) != set(METRICS_NAMES):
        raise ValueError(
            f"{path}: field metrics_bytes must have the keys {list(METRICS_NAMES)}, got {quote(list(sizes))}"
        )
    output = path.parent
    for log in METRICS_NAMES:
        size = check_int(path, f"metrics_bytes[{log!r}]", sizes[log], 0)
        current = _log_size(output / log) if master else None
        if current is not None and size > current:
            raise ValueError(
                f"{path}: field metrics_bytes[{log!r}] must be an int in [0, {current}] (the size of "
                f"{output / log}), got {size}"
            )
    rng = check_rng_state(path, "rng", get_field(path, ckpt, "rng"))
    return dict(
        epoch=epoch,
        step_in_epoch=step,
        global_step=global_step,
        epoch_sums=(loss_sum, seen),
        history=[dict(r) for r in history],
        metrics_bytes={k: int(sizes[k]) for k in METRICS_NAMES},
        rng=rng,
    )
