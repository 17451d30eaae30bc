"""Training and evaluation of :class:`~agentattn.lm.model.AgentLM` in bits per byte.

AdamW, linear warm-up then cosine decay to 10 %, gradient clipping at 1.0, random windows of the train split.
The token budget is ``steps × batch_size × seq_len``, the same for every twin of a comparison.

A run with an output directory holds it for its whole life (a second run into it stops at once), refuses to
start over an earlier run's results unless ``overwrite`` (which removes that run's own files, nothing else), and
appends ``metrics.jsonl`` through :func:`agentattn.io.open_log`, which never writes through a symlink.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from ..io import atomic_write_text, lock_run_directory, open_log
from ..train.record_checks import prepare_output
from .data import ByteCorpus, eval_windows, random_batch
from .model import AgentLM

LN2 = math.log(2.0)
# The files a run writes into its output directory: what overwrite removes, and nothing else.
RUN_FILES = ("metrics.jsonl", "model.safetensors", "result.json")


@dataclass
class LMTrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8  # batches of the val split for the curve; the final eval reads the whole split
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def scheduler(self, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
        """timm's cosine schedule with linear warm-up (as ``agentattn train`` uses), per optimizer step:
        ``lr / warmup`` → ``lr`` over the warm-up, then cosine down to ``lr · min_lr_ratio`` at the last step.
        Call ``step_update(step)`` before each step."""
        warmup = min(
            self.warmup_steps, max(1, self.steps // 5)
        )  # short runs keep 80 % of steps after warm-up
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, self.steps - warmup),
            lr_min=self.lr * self.min_lr_ratio,
            warmup_t=warmup,
            warmup_lr_init=self.lr / warmup,
            warmup_prefix=True,
            t_in_epochs=False,
        )


@torch.no_grad()
def evaluate_bpb(
    model: AgentLM,
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int = 16,
    max_batches: int | None = None,
    progress: bool = False,
) -> float:
    """Bits per byte over non-overlapping windows of ``tokens`` (all of them unless ``max_batches``), with a tqdm
    bar when ``progress``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = eval_windows(tokens, min(seq_len, model.config.max_seq_len))
    total_nats, total_bytes = 0.0, 0
    # group windows of equal length (all but maybe the last) into batches
    groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for x, y in windows:
        groups.setdefault(x.numel(), []).append((x, y))
    batches = 0
    planned = sum(-(-len(items) // batch_size) for items in groups.values())
    bar = tqdm(total=min(planned, max_batches or planned), desc="eval", disable=not progress, leave=False)
    for items in groups.values():
        for i in range(0, len(items), batch_size):
            if max_batches is not None and batches >= max_batches:
                break
            x = torch.stack([a for a, _ in items[i : i + batch_size]]).to(device)
            y = torch.stack([b for _, b in items[i : i + batch_size]]).to(device)
            logits = model(x).float()
            total_nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            total_bytes += y.numel()
            batches += 1
            bar.update(1)
    bar.close()
    model.train(was_training)
    if total_bytes == 0:
        raise ValueError("nothing to evaluate: the split is shorter than 2 bytes")
    return total_nats / total_bytes / LN2


def train_lm(
    model: AgentLM,
    corpus: ByteCorpus,
    cfg: LMTrainConfig,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place; return the history and final val bpb. Writes ``metrics.jsonl``,
    ``model.safetensors`` and ``result.json`` under ``out_dir`` when given. ``progress`` shows a tqdm bar
    (the evaluation lines then go above it); ``log`` gets them otherwise.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel (gloo on CPU, nccl on CUDA):
    every rank draws its own batches (global batch = ``batch_size`` × ranks), gradients are averaged, and only
    rank 0 logs, evaluates the curve and writes files. ``model`` must start from the same weights on every rank
    (build it after the same ``torch.manual_seed``; DDP also broadcasts rank 0's).

    Raises:
        ValueError: bad input, or ``out_dir`` holds an earlier run's results (and not ``overwrite``).
        RunDirectoryInUse: another live run holds ``out_dir`` (an ``OSError``).
    """
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    started_group = False
    if world_size > 1 and not dist.is_initialized():
        device = next(model.parameters()).device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started_group = True
    try:
        with contextlib.ExitStack() as stack:
            out = Path(out_dir) if out_dir is not None and rank == 0 else None
            if out is not None:
                stack.enter_context(lock_run_directory(out))  # for the run's whole life
                prepare_output(out, RUN_FILES, overwrite)
            return _train_lm(
                model, corpus, cfg, out, log if rank == 0 else None, progress and rank == 0, world_size, rank
            )
    finally:
        if started_group:
            dist.destroy_process_group()


def _train_lm(
    model: AgentLM,
    corpus: ByteCorpus,
    cfg: LMTrainConfig,
    out: Path | None,
    log: Callable[[str], None] | None,
    progress: bool = False,
    world_size: int = 1,
    rank: int = 0,
) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)  # each rank its own batches
    device = next(model.parameters()).device
    train_model: torch.nn.Module = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = _optimizer(model, cfg)
    metrics_file = None
    if out is not None:
        # An append-only log (a symlink is refused), closed in the finally below.
        metrics_file = open_log(out / "metrics.jsonl", truncate=True)

    history: list[dict[str, float]] = []
    scheduler = cfg.scheduler(opt)
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=f"lm train ({model.config.attn_type})", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    say = bar.write if progress else log  # eval lines above the bar, not through it
    try:
        for step in range(cfg.steps):
            scheduler.step_update(step)
            lr = opt.param_groups[0]["lr"]
            x, y = random_batch(corpus.train, cfg.batch_size, cfg.seq_len, gen)
            x, y = x.to(device), y.to(device)
            mean_loss = _train_step(train_model, opt, x, y, cfg.clip_grad, world_size, step)
            row: dict[str, float] = {
                "step": step + 1,
                "tokens": (step + 1) * cfg.batch_size * world_size * x.shape[1],
                "train_bpb": mean_loss.item() / LN2,
                "lr": lr,
                "time_s": time.perf_counter() - start,
            }
            if rank == 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                row["val_bpb"] = evaluate_bpb(
                    model, corpus.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches
                )
                if say is not None:
                    say(
                        f"step {step + 1}/{cfg.steps}  train {row['train_bpb']:.3f} bpb  "
                        f"val~ {row['val_bpb']:.3f} bpb  {row['time_s']:.0f}s"
                    )
            history.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(bpb=f"{row['train_bpb']:.3f}", lr=f"{lr:.2e}")
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return _finish(model, corpus, cfg, out, log, history, time.perf_counter() - start, world_size)


def _optimizer(model: AgentLM, cfg: LMTrainConfig) -> torch.optim.AdamW:
    """AdamW (β2 0.95) with weight decay on the matrices but not on the agents, norms, biases and decays."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "agents" not in name else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def _train_step(
    train_model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    clip_grad: float, world_size: int, step: int,
) -> torch.Tensor:  # fmt: skip
    """One optimiser step on the batch x, y (B, T); returns the batch's mean loss (over every rank's batch)."""
    loss = F.cross_entropy(train_model(x).float().flatten(0, 1), y.flatten())
    mean_loss = loss.detach().clone()
    if world_size > 1:  # the logged loss is the global batch's; every rank sees the same, also a NaN
        dist.all_reduce(mean_loss)
        mean_loss /= world_size
    if not torch.isfinite(mean_loss):
        raise FloatingPointError(f"loss is {mean_loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), clip_grad)
    opt.step()
    return mean_loss


def _finish(
    model: AgentLM, corpus: ByteCorpus, cfg: LMTrainConfig, out: Path | None, log: Callable[[str], None] | None,
    history: list[dict[str, float]], train_time: float, world_size: int,
) -> dict[str, Any]:  # fmt: skip
    """Bits per byte on the whole validation split; the result dict, and model.safetensors + result.json."""
    val_bpb = evaluate_bpb(model, corpus.val, cfg.seq_len, batch_size=32)  # whole split; bigger batches
    result = {
        "attn_type": model.config.attn_type,
        "params": model.num_params(),
        "tokens": cfg.steps * cfg.batch_size * world_size * cfg.seq_len,
        "world_size": world_size,
        "train_time_s": train_time,
        "val_bpb": val_bpb,
        "history": history,
        "train_config": asdict(cfg),
        "model_config": asdict(model.config),
    }
    if out is not None:
        model.save(out / "model.safetensors", {"val_bpb": f"{val_bpb:.6f}", "data": corpus.source})
        atomic_write_text(
            out / "result.json", json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2)
        )
    if log is not None:
        log(
            f"{model.config.attn_type}: val {val_bpb:.4f} bpb ({train_time:.0f}s, {model.num_params():,} params)"
        )
    return result
