"""``agentattn compare``: one architecture, three attentions, same seed and budget, one report.

The twins differ only in the attention of every stage (``attn_type``): agent attention ('AAAA'), softmax
attention over all tokens ('BBBB', PVT's attention with spatial reduction 1) and elu+1 linear attention with
the same depthwise-conv term ('LLLL'). Each trains in its own ``agentattn train`` process, so that its peak
memory (the process's maximum resident set) is its own. Then every model is timed for inference in
interleaved rounds, the agents of the agent model are drawn on a few test images, and ``report.md`` and a
self-contained ``report.html`` are written with every figure computed in this run.

The run holds its output directory for its whole life (each twin's ``agentattn train`` holds its own
sub-directory), and refuses to start over an earlier comparison's results unless ``overwrite``, which removes
that comparison's own files (nothing else).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write_text, lock_run_directory, one_line
from ..measure import count_flops, count_params
from ..train.config import TrainConfig
from ..train.data import DataBundle, build_data
from ..train.loop import train
from ..train.record_checks import prepare_output
from ..train.restore import model_from_checkpoint
from ..train.state import RUN_FILES as TRAIN_RUN_FILES
from .explain import explain
from .figures import plot_curves
from .memory import step_peak_memory_mib
from .render import Report

__all__ = ["COMPARE_MODEL", "COMPARE_MODEL_KWARGS", "TWINS", "CompareConfig", "TwinResult", "compare"]

# attn_type per twin: one letter per stage.
TWINS: dict[str, str] = {"agent": "AAAA", "softmax": "BBBB", "linear": "LLLL"}
TWIN_DESCRIPTIONS = {
    "agent": "agent attention",
    "softmax": "softmax attention (SDPA, all tokens)",
    "linear": "linear attention (elu+1) + DWC",
}
# A 4-stage Agent-PVT for 28×28 inputs (0.37 M parameters, 4.9 MFLOPs): patch 2 gives 14×14, 7×7, 4×4 and
# 2×2 token grids, with 4×4, 3×3, 2×2 and 1 agents; one block per stage, head dim 16, no spatial reduction
# (the grids are small already). Patch 2 rather than 4 gives the agents 196 tokens to summarise in stage 1.
COMPARE_MODEL = "agent_pvt_tiny_224"
COMPARE_MODEL_KWARGS: dict[str, Any] = dict(
    patch_size=2,
    depths=(1, 1, 1, 1),
    embed_dims=(16, 32, 80, 128),
    agent_num=(16, 9, 4, 1),
    sr_ratios=(1, 1, 1, 1),
)
FULL_EPOCHS = 30
# The files a comparison writes: what overwrite removes, and nothing else (the twins' runs for every twin).
COMPARE_FILES = (
    "report.md",
    "report.html",
    "results.json",
    "loss.png",
    "accuracy.png",
    "agents_*.png",
    *(f"{twin}/{name}" for twin in TWINS for name in TRAIN_RUN_FILES),
)


@dataclass
class CompareConfig:
    """What ``agentattn compare`` runs. Fields not given keep ``agentattn train``'s defaults."""

    output: str | None = None  # default runs/<timestamp>
    data: str = "fashion-mnist"
    model: str = COMPARE_MODEL
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(COMPARE_MODEL_KWARGS))
    twins: tuple[str, ...] = ("agent", "softmax", "linear")
    epochs: int = 5
    full: bool = False  # FULL_EPOCHS epochs instead
    batch_size: int = 128
    seed: int = 0
    train_subset: int | None = None
    eval_subset: int | None = None
    max_steps: int = 0
    threads: int = 0
    explain_images: int = 3
    inference_batch: int = 256
    inference_rounds: int = 5
    progress: bool = True
    overwrite: bool = False  # replace an earlier comparison's results in output

    def __post_init__(self) -> None:
        unknown = [t for t in self.twins if t not in TWINS]
        if unknown or not self.twins:
            raise ValueError(f"twins must name some of {sorted(TWINS)}, got {list(self.twins)}")
        for name in ("epochs", "batch_size", "inference_batch", "inference_rounds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if "attn_type" in self.model_kwargs:
            got = self.model_kwargs["attn_type"]
            raise ValueError(f"model_kwargs must not set attn_type: compare sets it per twin, got {got!r}")

    @property
    def total_epochs(self) -> int:
        return FULL_EPOCHS if self.full else self.epochs


@dataclass
class TwinResult:
    """The measured figures of one twin."""

    twin: str
    attn_type: str
    run_dir: Path
    top1: float
    top5: float
    params: int
    flops: int
    train_img_per_s: float
    infer_img_per_s: float = 0.0
    train_step_mib: float = 0.0  # peak extra memory of one training step at the training batch size
    infer_mib: float = 0.0  # peak extra memory of one inference batch
    process_peak_mib: float = 0.0  # the training process's peak resident set (data and all)
    train_time_s: float = 0.0
    epochs: list[dict[str, Any]] = field(default_factory=list)


def _train_child(config: TrainConfig, conn: Connection) -> None:
    """In the child process: train, then send ("ok", peak RSS in KiB) or ("error", one line) back."""
    try:
        train(config)
    except BaseException as err:
        conn.send(("error", one_line(err)))
        raise SystemExit(1) from None
    conn.send(("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))  # KiB on Linux


def _train_twin(config: CompareConfig, twin: str, run_dir: Path) -> tuple[float, float]:
    """Train one twin with :func:`agentattn.train.train` in a fresh child process (its memory and threads are its
    own, as a separate ``agentattn train`` run's would be); return (its peak RSS in MiB, wall seconds)."""
    train_config = TrainConfig(
        data=config.data, model=config.model, model_kwargs={**config.model_kwargs, "attn_type": TWINS[twin]},
        epochs=config.total_epochs, batch_size=config.batch_size, seed=config.seed, output=str(run_dir),
        train_subset=config.train_subset, eval_subset=config.eval_subset, max_steps=config.max_steps,
        threads=config.threads, progress=config.progress,
    )  # fmt: skip
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this process's state
    receive, send = context.Pipe(duplex=False)
    start = time.perf_counter()
    child = context.Process(target=_train_child, args=(train_config, send), name=f"train-{twin}")
    child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:  # the child died without a word (killed, out of memory)
        status, value = "error", "the process ended without a result"
    child.join()
    if status != "ok" or child.exitcode != 0:
        raise RuntimeError(
            f"training the {twin} twin failed (exit code {child.exitcode}): {value}; see {run_dir}"
        )
    return value / 1024.0, time.perf_counter() - start


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.inference_mode()
def _inference_throughput(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """img/s of each model on ``batch``: one warm-up, then ``rounds`` interleaved timed calls; the median."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model(batch)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(batch)
            times[name].append(time.perf_counter() - start)
    return {name: len(batch) / statistics.median(t) for name, t in times.items()}


def _explain_indices(labels: list[int], num_classes: int, count: int) -> list[int]:
    """The first image of each of ``count`` classes spread evenly over the label range."""
    wanted = {round(i * num_classes / count) for i in range(min(count, num_classes))}
    first: dict[int, int] = {}
    for i, label in enumerate(labels):
        if label in wanted and label not in first:
            first[label] = i
    return [first[c] for c in sorted(first)]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def compare(config: CompareConfig) -> tuple[list[TwinResult], Path]:
    """Train the twins, measure them, write the report; return the results and the report directory.

    Raises:
        ValueError: an output directory holding an earlier comparison's results (and not ``overwrite``), or bad
            options.
        RunDirectoryInUse: another live run holds the output directory or a twin's (an ``OSError``).
        RuntimeError: a twin's training process failed.
    """
    output = Path(config.output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    # The test split now: a missing dataset fails here, in one line, before any training starts.
    data = build_data(config.data, eval_subset=config.eval_subset, seed=config.seed, with_train=False)
    with lock_run_directory(output):  # for the run's whole life; each twin's run locks its own sub-directory
        prepare_output(output, COMPARE_FILES, config.overwrite)
        return _compare(config, data, output)


def _compare(config: CompareConfig, data: DataBundle, output: Path) -> tuple[list[TwinResult], Path]:
    if config.threads:
        torch.set_num_threads(config.threads)
    results, records, models = _train_twins(config, output)
    _measure_speed_and_memory(config, data, results, models)
    ordered = [results[t] for t in config.twins]
    _write_report(config, data, ordered, records, models, output)
    return ordered, output


def _train_twins(
    config: CompareConfig, output: Path
) -> tuple[dict[str, TwinResult], dict[str, list[dict[str, Any]]], dict[str, nn.Module]]:
    """Train each twin in its own process; read back its metrics and last checkpoint."""
    results: dict[str, TwinResult] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    models: dict[str, nn.Module] = {}
    for twin in config.twins:
        run_dir = output / twin
        print(f"== {twin} twin ({TWIN_DESCRIPTIONS[twin]}, attn_type {TWINS[twin]}) -> {run_dir}", flush=True)
        peak_mib, wall_s = _train_twin(config, twin, run_dir)
        records[twin] = _read_metrics(run_dir)
        epochs = [r for r in records[twin] if r["kind"] == "epoch"]
        model, meta = model_from_checkpoint(run_dir / "last.pth")
        models[twin] = model
        in_shape = (meta["in_chans"], meta["img_size"], meta["img_size"])
        results[twin] = TwinResult(
            twin=twin,
            attn_type=TWINS[twin],
            run_dir=run_dir,
            top1=epochs[-1]["eval_top1"],
            top5=epochs[-1]["eval_top5"],
            params=count_params(model),
            flops=count_flops(model, in_shape).total,
            train_img_per_s=statistics.median(r["img_per_s"] for r in epochs),
            process_peak_mib=peak_mib,
            train_time_s=wall_s,
            epochs=epochs,
        )
    return results, records, models


def _measure_speed_and_memory(
    config: CompareConfig, data: DataBundle, results: dict[str, TwinResult], models: dict[str, nn.Module]
) -> None:
    """Inference speed, interleaved so that machine noise hits every twin alike; peak memory per step."""
    count = min(config.inference_batch, len(data.eval))  # type: ignore[arg-type]
    batch = torch.stack([data.eval[i][0] for i in range(count)])
    for twin, speed in _inference_throughput(models, batch, config.inference_rounds).items():
        results[twin].infer_img_per_s = speed
    for twin in config.twins:
        common = dict(
            num_classes=data.num_classes, in_chans=data.in_chans, img_size=data.img_size,
            threads=torch.get_num_threads(),
        )  # fmt: skip
        kwargs = {**config.model_kwargs, "attn_type": TWINS[twin]}
        results[twin].train_step_mib = step_peak_memory_mib(
            config.model, kwargs, batch_size=config.batch_size, mode="train", **common
        )
        results[twin].infer_mib = step_peak_memory_mib(
            config.model, kwargs, batch_size=config.inference_batch, mode="infer", **common
        )


def _write_report(
    config: CompareConfig, data: DataBundle, ordered: list[TwinResult],
    records: dict[str, list[dict[str, Any]]], models: dict[str, nn.Module], output: Path,
) -> None:  # fmt: skip
    """Figures, report.md and results.json in ``output``."""
    steps_per_epoch = max(
        1, max(r.get("step", 0) for r in records[config.twins[0]] if r["kind"] == "step") + 1
    )
    curves = plot_curves(records, output, steps_per_epoch)
    explanations = []
    if "agent" in models and config.explain_images > 0:
        labels = [int(data.eval[i][1]) for i in range(min(len(data.eval), 2000))]  # type: ignore[arg-type]
        picks = _explain_indices(labels, data.num_classes, config.explain_images)
        images = torch.stack([data.eval[i][0] for i in picks])
        explanations = explain(
            models["agent"], images, output, names=[f"test{i}" for i in picks],
            class_names=data.class_names, labels=[labels[i] for i in picks],
        )  # fmt: skip

    report = Report(f"Agent vs softmax vs linear attention on {config.data}")
    report.paragraph(
        f"Model `{config.model}` with {json.dumps(config.model_kwargs)}; only `attn_type` differs between the "
        f"twins. {config.total_epochs} epochs, batch {config.batch_size}, seed {config.seed}, the "
        f"`agentattn train` defaults otherwise (AdamW, cosine schedule, label smoothing 0.1). "
        f"Run on {datetime.now().isoformat(timespec='seconds')}, {_machine()}."
    )
    report.heading("Results")
    header, rows = results_table(ordered, config)
    report.table(header, rows)
    report.paragraph(
        f"Test accuracy is on {len(data.eval)} test images after the last epoch. Train throughput is the median over "
        "epochs of the images per second of the training process; inference throughput the median of "
        f"{config.inference_rounds} interleaved forward passes of a batch of {config.inference_batch} test "
        "images; MFLOPs are millions of multiply-adds per image. Memory is the growth of the peak resident set "
        "across one training step (forward, backward, AdamW) or one inference batch, each in a fresh process."
    )
    report.heading("Training curves")
    report.figure(curves["loss"], "training loss per step (faint) and its moving average")
    report.figure(curves["accuracy"], "test accuracy and test loss after each epoch")
    if explanations:
        report.heading("What the agents attend to")
        report.paragraph(
            "Top row: each agent's softmax over the keys (what it gathers), over the input. Bottom row: each "
            "query's weight on that agent (who reads it); the first map colours every query by its strongest "
            "agent. Weights are averaged over heads, for the first (finest) agent-attention layer."
        )
        for item in explanations:
            report.figure(item.figure, f"{item.source}: {item.figure.name}")
    report.heading("Per epoch")
    for result in ordered:
        report.paragraph(f"{result.twin} ({result.attn_type}):")
        report.table(
            ["epoch", "train loss", "test loss", "test top-1 (%)"],
            [
                [
                    str(e["epoch"] + 1),
                    f"{e['train_loss']:.4f}",
                    f"{e['eval_loss']:.4f}",
                    f"{e['eval_top1']:.2f}",
                ]
                for e in result.epochs
            ],
        )
    report.write(output)
    summary = {
        "config": {**asdict(config), "total_epochs": config.total_epochs},
        "machine": _machine(),
        "results": [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(r).items() if k != "epochs"}
            for r in ordered
        ],
    }
    atomic_write_text(output / "results.json", json.dumps(summary, indent=2) + "\n")


def results_table(results: list[TwinResult], config: CompareConfig) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the comparison table (also printed by the CLI)."""
    header = [
        "twin", "attention", "test top-1 (%)", "top-5 (%)", "params", "MFLOPs", "train img/s",
        f"infer img/s (b{config.inference_batch})", f"train step MiB (b{config.batch_size})",
        f"infer MiB (b{config.inference_batch})", "train time (s)",
    ]  # fmt: skip
    rows = []
    for r in results:
        rows.append(
            [
                *(r.twin, r.attn_type, f"{r.top1:.2f}", f"{r.top5:.2f}", f"{r.params:,}"),
                *(f"{r.flops / 1e6:.1f}", f"{r.train_img_per_s:.0f}", f"{r.infer_img_per_s:.0f}"),
                *(f"{r.train_step_mib:.0f}", f"{r.infer_mib:.0f}", f"{r.train_time_s:.0f}"),
            ]
        )
    return header, rows
