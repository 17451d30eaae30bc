"""Matplotlib figures of the reports: training curves and what the agents attend to.

Every function renders off-screen (Agg) and writes a PNG atomically; none needs a display.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
import torch

from ..io import atomic_write_bytes
from ..layers.attention_maps import AgentAttentionMaps

__all__ = ["plot_agent_attention", "plot_curves", "save_figure"]

# One colour per twin, the same in every figure.
TWIN_COLORS = {"agent": "tab:red", "softmax": "tab:blue", "linear": "tab:green"}


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render ``fig`` to PNG bytes, write them atomically to ``path``, close the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")  # not-atomic: into memory
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    # Trailing moving average that keeps the first points (shorter windows at the start).
    if window <= 1 or len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, steps_per_epoch: int
) -> dict[str, Path]:
    """Loss and accuracy curves of several runs, from their ``metrics.jsonl`` records.

    Args:
        runs: label → records (``{"kind": "step", "global_step", "loss"}`` and ``{"kind": "epoch", "epoch",
            "eval_top1", "eval_loss"}``).
        out_dir: where ``loss.png`` and ``accuracy.png`` go.
        steps_per_epoch: to put the x axes in epochs.

    Returns:
        ``{"loss": path, "accuracy": path}``.
    """
    out_dir = Path(out_dir)
    fig_loss, ax_loss = plt.subplots(figsize=(6.4, 4.0))
    fig_acc, (ax_acc, ax_eval_loss) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for label, records in runs.items():
        color = TWIN_COLORS.get(label)
        steps = [r for r in records if r.get("kind") == "step"]
        epochs = [r for r in records if r.get("kind") == "epoch"]
        if steps:
            x = np.array([r["global_step"] for r in steps], dtype=float) / max(steps_per_epoch, 1)
            y = np.array([r["loss"] for r in steps], dtype=float)
            ax_loss.plot(x, y, color=color, alpha=0.15, linewidth=0.8)
            ax_loss.plot(x, _smooth(y, max(1, steps_per_epoch // 10)), color=color, label=label)
        if epochs:
            x = [r["epoch"] + 1 for r in epochs]
            ax_acc.plot(x, [r["eval_top1"] for r in epochs], "o-", color=color, label=label)
            ax_eval_loss.plot(x, [r["eval_loss"] for r in epochs], "o-", color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (label-smoothed CE)", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="Test accuracy")
    ax_eval_loss.set(xlabel="epoch", ylabel="test cross-entropy", title="Test loss")
    for ax in (ax_loss, ax_acc, ax_eval_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    return {
        "loss": save_figure(fig_loss, out_dir / "loss.png"),
        "accuracy": save_figure(fig_acc, out_dir / "accuracy.png"),
    }


def _to_display(image: torch.Tensor) -> np.ndarray:
    # (C, H, W) normalised tensor -> (H, W) or (H, W, 3) in [0, 1], min-max scaled per image.
    x = image.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def plot_agent_attention(
    image: torch.Tensor,
    maps: AgentAttentionMaps,
    index: int,
    path: str | Path,
    title: str = "",
) -> Path:
    """One figure of one image's agent attention in one layer.

    Columns: the image, then one per agent. Rows: (1) where each agent gathers from (its softmax over the keys,
    on the image); (2) which queries read from that agent (each query's weight on it); the first column of
    row 2 shows every query's strongest agent.

    Args:
        image: (C, H, W) the normalised model input.
        maps: a recorded layer call (:func:`agentattn.layers.record_agent_attention`).
        index: which image of the recorded batch.
        path: the PNG to write.
        title: a line above the figure (e.g. the true and predicted class).
    """
    picture = _to_display(image)
    cmap_picture = "gray" if picture.ndim == 2 else None
    gather = maps.agent_maps()[index].numpy()  # (n, Hk, Wk)
    reads = maps.query_maps()[index].numpy()  # (n, Hq, Wq)
    n = gather.shape[0]
    extent = (0, picture.shape[1], picture.shape[0], 0)
    fig, axes = plt.subplots(2, n + 1, figsize=(1.15 * (n + 1), 2.6), squeeze=False)
    axes[0, 0].imshow(picture, cmap=cmap_picture)
    axes[0, 0].set_title("input", fontsize=7)
    strongest = reads.argmax(axis=0)  # (Hq, Wq): each query's top agent
    axes[1, 0].imshow(strongest, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
    axes[1, 0].set_title("top agent", fontsize=7)
    read_max = float(reads.max())  # one colour scale for the row, so agents compare
    for i in range(n):
        axes[0, i + 1].imshow(picture, cmap=cmap_picture, extent=extent)
        axes[0, i + 1].imshow(gather[i], cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
        axes[0, i + 1].set_title(f"agent {i}", fontsize=7, color=plt.get_cmap("tab20")(i % 20))
        axes[1, i + 1].imshow(reads[i], cmap="viridis", vmin=0.0, vmax=read_max, interpolation="nearest")
    axes[0, 0].set_ylabel("agent ← keys", fontsize=7)
    axes[1, 0].set_ylabel(f"queries → agent (0..{read_max:.2f})", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    rows, cols = maps.agent_grid
    fig.suptitle(
        f"{title}{' · ' if title else ''}{maps.layer}: {n} agents ({rows}×{cols} pooled queries), "
        f"keys {maps.key_grid[0]}×{maps.key_grid[1]}, queries {maps.query_grid[0]}×{maps.query_grid[1]}",
        fontsize=8,
    )
    return save_figure(fig, path)
