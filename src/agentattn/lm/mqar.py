"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv 2312.04927).

A sequence holds ``num_pairs`` key-value pairs, then the keys again as queries, each followed by its value:

    k1 v1 k2 v2 ... kD vD   0 0 k3 v3 0 k1 v1 0 0 ...      (0 is filler)

and the model must predict the value after each queried key. Keys come from the first half of the vocabulary and
values from the second, as in Zoology; only the query positions count (loss and accuracy). A bounded-state model
can fail here while matching perplexity, so this is the recall test of the causal agent attention: it keeps n
agents plus an exact window of C..2C tokens, and a query further back than the window must be recalled through
the agents.

``agentattn lm mqar`` trains a 2-layer model per (mixer, d_model) and writes accuracy against d_model, one line
per mixer, as Zoology's figure does; the agent mixer can be swept over (n, C).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io import atomic_write_text
from .model import AgentLM, AgentLMConfig

__all__ = ["MQARConfig", "mqar_accuracy", "mqar_batch", "run_mqar", "train_mqar"]

IGNORE = -100


def mqar_batch(
    batch: int, seq_len: int, num_pairs: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, T) int64, labels (B, T) int64): labels are the value at each query key, IGNORE elsewhere."""
    half = vocab_size // 2
    rest = seq_len - 2 * num_pairs
    if num_pairs < 1 or half - 1 < num_pairs:
        raise ValueError(f"num_pairs must be in [1, vocab_size // 2 - 1 = {half - 1}], got {num_pairs}")
    if rest < 2 * num_pairs:
        raise ValueError(
            f"seq_len must be >= 4·num_pairs = {4 * num_pairs} (pairs, then queries), got {seq_len}"
        )
    keys = (
        torch.rand(batch, half - 1, generator=generator).argsort(dim=1)[:, :num_pairs] + 1
    )  # distinct, >= 1
    values = torch.randint(half, vocab_size, (batch, num_pairs), generator=generator)
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    labels = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0 : 2 * num_pairs : 2], inputs[:, 1 : 2 * num_pairs : 2] = keys, values
    # Each pair is queried once, in random order, at distinct even offsets of the rest (a key, then its value).
    slots = torch.rand(batch, rest // 2, generator=generator).argsort(dim=1)[:, :num_pairs]
    positions = 2 * num_pairs + 2 * slots.sort(dim=1).values  # (B, D)
    order = torch.rand(batch, num_pairs, generator=generator).argsort(dim=1)
    query_keys, query_values = keys.gather(1, order), values.gather(1, order)
    inputs.scatter_(1, positions, query_keys)
    inputs.scatter_(1, positions + 1, query_values)
    labels.scatter_(1, positions, query_values)  # predict the next token: the value
    return inputs, labels


@torch.no_grad()
def mqar_accuracy(model: AgentLM, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of query positions whose argmax prediction is the right value."""
    was_training = model.training
    model.eval()
    asked = labels != IGNORE
    predicted = model.lm_head(model.hidden_states(inputs)[asked]).argmax(dim=-1)  # logits at the queries only
    model.train(was_training)
    return float((predicted == labels[asked]).float().mean())


@dataclass
class MQARConfig:
    """One MQAR training run (Zoology's defaults where they fit a CPU: 2 layers, vocabulary 8192)."""

    attn_type: str = "agent"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    seq_len: int = 256
    num_pairs: int = 16
    vocab_size: int = 8192
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    eval_examples: int = 1000
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # e.g. agent_num, chunk_size, conv_kernel, positions
    device: str = "cpu"  # the batches are drawn on the CPU (the same sequences on any device) and moved


def train_mqar(config: MQARConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on fresh MQAR batches (AdamW, cosine decay, loss on the query positions); return the accuracy on
    ``eval_examples`` held-out sequences and the run's settings."""
    torch.manual_seed(config.seed)
    lm_config = AgentLMConfig(
        attn_type=config.attn_type,
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        max_seq_len=config.seq_len,
        **config.model,
    )
    model = AgentLM(lm_config).to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    train_gen = torch.Generator().manual_seed(config.seed)
    eval_gen = torch.Generator().manual_seed(10_000 + config.seed)  # another stream: held-out sequences
    start = time.perf_counter()
    for step in range(config.steps):
        inputs, labels = mqar_batch(
            config.batch_size, config.seq_len, config.num_pairs, config.vocab_size, train_gen
        )
        inputs, labels = inputs.to(config.device), labels.to(config.device)
        asked = labels != IGNORE  # the loss is on the query positions: only their logits are computed
        loss = F.cross_entropy(model.lm_head(model.hidden_states(inputs)[asked]), labels[asked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if log is not None and (step + 1) % max(config.steps // 5, 1) == 0:
            log(f"  step {step + 1}/{config.steps}  loss {loss.item():.3f}")
    hits, total = 0.0, 0
    for first in range(0, config.eval_examples, 250):
        count = min(250, config.eval_examples - first)
        inputs, labels = mqar_batch(count, config.seq_len, config.num_pairs, config.vocab_size, eval_gen)
        inputs, labels = inputs.to(config.device), labels.to(config.device)
        hits += mqar_accuracy(model, inputs, labels) * count
        total += count
    return {
        **asdict(config),
        "accuracy": hits / total,
        "params": model.num_params(),
        "train_time_s": time.perf_counter() - start,
    }


def _label(row: dict[str, Any]) -> str:
    if row["attn_type"] != "agent":
        return row["attn_type"]
    m = row["model"]
    return f"agent n={m.get('agent_num', m.get('num_agents', 16))} C={m.get('chunk_size', 32)}"


def run_mqar(
    attn_types: list[str],
    d_models: list[int],
    base: MQARConfig,
    out_dir: Path,
    agent_grid: list[tuple[int, int]] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every (mixer, d_model) run; the agent mixer once per (n, C) of ``agent_grid``. Writes ``mqar.json`` and
    ``mqar.png`` (accuracy against d_model) into ``out_dir``; returns the rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for attn_type in attn_types:
        variants = [{"agent_num": n, "chunk_size": c} for n, c in (agent_grid or [(16, 32)])]
        for extra in variants if attn_type == "agent" else [{}]:
            for d_model in d_models:
                config = MQARConfig(**{**asdict(base), "attn_type": attn_type, "d_model": d_model,
                                       "model": {**base.model, **extra}})  # fmt: skip
                row = train_mqar(config, log=log)
                log(
                    f"{_label(row)} d_model={d_model}: accuracy {row['accuracy']:.3f} ({row['train_time_s']:.0f} s)"
                )
                rows.append(row)
                atomic_write_text(out_dir / "mqar.json", json.dumps(rows, indent=1))
    _plot(rows, out_dir / "mqar.png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label in dict.fromkeys(_label(r) for r in rows):
        mine = sorted((r["d_model"], r["accuracy"]) for r in rows if _label(r) == label)
        ax.plot([d for d, _ in mine], [a for _, a in mine], marker="o", label=label)
    first = rows[0]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model dimension")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"MQAR: T={first['seq_len']}, {first['num_pairs']} pairs, vocab {first['vocab_size']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..report.figures import save_figure  # after the matplotlib check: it imports pyplot

    save_figure(fig, path, dpi=110)
    return True
