"""Whole-model throughput in the style of timm's ``benchmark.py``: inference and training img/s.

``agentattn bench model NAME... [--img-size 224 448]`` builds each timm model (agent models and their softmax
counterparts, e.g. ``deit_tiny_patch16_224`` and ``agent_deit_tiny_patch16_224``) at each resolution and
measures

- inference: eval mode, ``torch.inference_mode``, batch ``--batch`` (one, or one per ``--img-size``), img/s =
  batch / median step time;
- training: train mode, forward + cross-entropy + backward + SGD step, img/s likewise;

after warm-up steps, interleaved over the models so that a slow spell of a shared machine hits all of them. It
also records parameters and GFLOPs (one multiply-add = one FLOP, ``agentattn flops``'s convention). A model that
fails to build or run at a size, or whose step exceeds ``--step-timeout``, is marked and the run goes on.

On a GPU, as timm's ``benchmark.py`` runs it: ``--device cuda --amp bf16 --channels-last``. ``--backends`` times
every agent model once per agent-attention backend (``ops.attention_backend``): ``auto``, ``triton`` (the fused
kernels, forward and backward) and ``matmul`` (two explicit softmax matmuls: the official code's math), each row
named ``model[backend]``. ``--softmax-twins`` adds, for an agent model with no timm counterpart (PVT, CSwin), the
same model with softmax attention in every stage (``attn_type`` of all ``B``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from torch import nn

from .. import models as _models  # noqa: F401  (registers the agent models with timm)
from ..measure import count_flops, count_params
from ..ops.agent import attention_backend
from .section import write_section as write

DEFAULT_MODELS = (
    "deit_tiny_patch16_224",
    "agent_deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "agent_swin_tiny_224",
)


SOFTMAX_TWIN = "[softmax]"  # the suffix of an agent model rebuilt with softmax attention in every stage


@dataclass(frozen=True)
class Setup:
    """Where and how the steps run: device, autocast dtype (None = off), channels-last input and weights."""

    device: str = "cpu"
    amp: torch.dtype | None = None
    channels_last: bool = False


def _spec(entry: str) -> tuple[str, str | None, bool]:
    """``model``, ``model[backend]`` or ``model[softmax]`` → (timm name, backend or None, softmax twin)."""
    if entry.endswith(SOFTMAX_TWIN):
        return entry[: -len(SOFTMAX_TWIN)], None, True
    if entry.endswith("]") and "[" in entry:
        name, backend = entry[:-1].split("[", 1)
        return name, backend, False
    return entry, None, False


def _build(entry: str, img_size: int) -> nn.Module:
    name, _, twin = _spec(entry)
    torch.manual_seed(0)
    kwargs = {}
    if twin:
        stages = len(timm.create_model(name, pretrained=False, img_size=img_size).attn_type)
        kwargs["attn_type"] = "B" * stages
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=1000, **kwargs)


def _steps(model: nn.Module, batch: int, img_size: int, setup: Setup, backend: str | None):
    """{"infer": step, "train": step} for ``model`` (moved to ``setup.device``); each step waits for the device."""
    memory = torch.channels_last if setup.channels_last else torch.contiguous_format
    model.to(setup.device, memory_format=memory)
    x = torch.randn(batch, 3, img_size, img_size, device=setup.device).contiguous(memory_format=memory)
    target = torch.randint(0, 1000, (batch,), device=setup.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    device_type = torch.device(setup.device).type

    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if setup.amp is not None:
            stack.enter_context(torch.autocast(device_type, dtype=setup.amp))
        if backend is not None:
            stack.enter_context(attention_backend(backend))
        return stack

    def finish() -> None:
        if device_type == "cuda":
            torch.cuda.synchronize()

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), context():
            model(x)
        finish()

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        finish()

    return {"infer": infer, "train": train}


def expand_entries(names: list[str], backends: list[str], softmax_twins: bool) -> list[str]:
    """The rows to time: each agent model once per backend (``model[backend]``; plain when only ``auto``), its
    softmax twin when asked and it has no timm counterpart, and every other model as given."""
    entries: list[str] = []
    for name in names:
        if not name.startswith("agent_"):
            entries.append(name)
            continue
        entries += [name if b == "auto" and len(backends) == 1 else f"{name}[{b}]" for b in backends]
        if softmax_twins and counterpart(name) is None:
            entries.append(name + SOFTMAX_TWIN)
    return entries


def bench_models(
    names: list[str],
    img_sizes: list[int],
    batch: int | list[int] = 16,
    warmup: int = 1,
    rounds: int = 3,
    step_timeout_s: float = 120.0,
    modes: tuple[str, ...] = ("infer", "train"),
    log: Callable[[str], None] = print,
    setup: Setup = Setup(),
) -> list[dict]:
    """One row per (entry, size): params, GFLOPs, and per mode img/s (or a status). An entry is a timm model name,
    ``name[backend]`` (its agent layers on that ``ops.attention_backend``) or ``name[softmax]`` (see
    :func:`expand_entries`)."""
    batches = batch if isinstance(batch, list) else [batch] * len(img_sizes)
    if len(batches) != len(img_sizes):
        raise ValueError(f"batch: one size, or one per image size {img_sizes}; got {batches}")
    rows: list[dict] = []
    for size, batch in zip(img_sizes, batches, strict=True):
        built: dict[str, dict[str, Callable[[], None]]] = {}
        group: dict[str, dict] = {}
        for name in names:
            row: dict = {"model": name, "img_size": size, "batch": batch, "modes": {}}
            group[name] = row
            rows.append(row)
            try:
                model = _build(name, size)
                row["params_m"] = count_params(model) / 1e6
                row["gflops"] = count_flops(model, (3, size, size)).total / 1e9
                built[name] = _steps(model, batch, size, setup, _spec(name)[1])
            except Exception as e:  # an architecture that cannot take this size: mark it, go on
                row["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"
                log(f"  {name} @ {size}: {row['status']}")
                continue
        for mode in modes:
            calls: dict[str, Callable[[], None]] = {}
            for name, steps in built.items():
                try:
                    t0 = time.perf_counter()
                    for _ in range(max(warmup, 1)):
                        steps[mode]()
                    cold = (time.perf_counter() - t0) / max(warmup, 1)
                except Exception as e:
                    group[name]["modes"][mode] = {"status": f"error: {type(e).__name__}: {str(e)[:160]}"}
                    continue
                if cold > step_timeout_s:
                    group[name]["modes"][mode] = {"status": "timeout", "step_ms": cold * 1e3, "runs": 1}
                    continue
                calls[name] = steps[mode]
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(rounds):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                step = statistics.median(ts)
                group[name]["modes"][mode] = {
                    "step_ms": step * 1e3,
                    "img_per_s": batch / step,
                    "runs": rounds,
                }
                log(f"  {name} @ {size} {mode}: {batch / step:.1f} img/s")
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """Attach to each agent row its softmax counterpart's throughput ratio (agent / softmax): timm's model by name,
    else the model's own softmax twin; and, for ``name[backend]`` rows, the ratio to ``name[matmul]`` (the
    official code's math)."""
    for row in rows:
        name, backend, twin = _spec(row["model"])
        if twin:
            continue
        others = {"counterpart": counterpart(name) or name + SOFTMAX_TWIN}
        if backend not in (None, "matmul"):
            others["official_math"] = f"{name}[matmul]"
        for key, other in others.items():
            ref = next((r for r in rows if r["model"] == other and r["img_size"] == row["img_size"]), None)
            if ref is None:
                continue
            row[key] = other
            for mode, r in row["modes"].items():
                o = ref["modes"].get(mode, {})
                if "img_per_s" in r and "img_per_s" in o:
                    r[f"vs_{key}"] = r["img_per_s"] / o["img_per_s"]


COUNTERPARTS = {
    "agent_deit_tiny_patch16_224": "deit_tiny_patch16_224",
    "agent_deit_small_patch16_224": "deit_small_patch16_224",
    "agent_deit_base_patch16_224": "deit_base_patch16_224",
    "agent_swin_tiny_224": "swin_tiny_patch4_window7_224",
    "agent_swin_small_224": "swin_small_patch4_window7_224",
    "agent_swin_base_224": "swin_base_patch4_window7_224",
}


def counterpart(name: str) -> str | None:
    """The timm softmax model an agent model is compared with, if known."""
    return COUNTERPARTS.get(name)


def format_table(rows: list[dict]) -> str:
    official = any("official_math" in r for r in rows)
    extra_head, extra_rule = (" × official math |", "---:|") if official else ("", "")
    lines = [
        "| model | size | B | params (M) | GFLOPs | infer img/s | × softmax | train img/s | × softmax |"
        + extra_head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + extra_rule,
    ]
    for r in rows:
        if "status" in r:
            lines.append(f"| {r['model']} | {r['img_size']} | {r['batch']} | – | – | {r['status']} | | | |")
            continue
        i, t = r["modes"].get("infer", {}), r["modes"].get("train", {})
        extra = f" {_x(t, 'vs_official_math')} |" if official else ""
        lines.append(
            f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['params_m']:.1f} | {r['gflops']:.2f} | "
            f"{_rate(i)} | {_x(i)} | {_rate(t)} | {_x(t)} |" + extra
        )
    return "\n".join(lines)


def _rate(r: dict) -> str:
    return f"{r['img_per_s']:.1f}" if "img_per_s" in r else r.get("status", "–")


def _x(r: dict, key: str = "vs_counterpart") -> str:
    return f"{r[key]:.2f}" if key in r else ""


AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def describe(config: dict) -> str:
    """One sentence on how the steps ran (older results carry no device fields: CPU, fp32)."""
    batch = config["batch"]
    batches = " / ".join(str(b) for b in batch) if isinstance(batch, list) else str(batch)
    amp = config.get("amp", "none")
    return (
        f"timm benchmark.py style on {config.get('device', 'cpu')}: batch {batches} (per image size), "
        f"{'fp32' if amp == 'none' else amp + ' autocast'}{', channels-last' if config.get('channels_last') else ''}; "
        "inference in eval mode under `torch.inference_mode`, training = forward + cross-entropy + backward + SGD "
        f"step; median of {config['rounds']} interleaved steps after {config['warmup']} warm-up step(s). "
        "'× softmax' is the agent model's img/s over its softmax counterpart's at the same size (timm's model, or "
        "the same model with softmax attention in every stage, `[softmax]`); '× official math' is a backend's "
        "training img/s over the same model's on explicit matmuls (`[matmul]`, the official code's math). "
        "GFLOPs: one multiply-add = one FLOP."
    )


# The GPU issue's whole-model training goals: (goal, image size (448: 448 and above), ratio key, target).
TRAINING_GOALS = (
    (
        "every agent model, fused kernels, ≥ 1.3× its official-math counterpart at 224",
        224,
        "vs_official_math",
        1.3,
    ),
    (
        "every agent model, fused kernels, ≥ 1.5× its softmax counterpart at 448 and above",
        448,
        "vs_counterpart",
        1.5,
    ),
)


def goals(rows: list[dict]) -> list[dict]:
    """The whole-model training goals, judged on the ``[triton]`` rows (none judged where none ran)."""
    out = []
    fused = [r for r in rows if _spec(r["model"])[1] == "triton" and "train" in r["modes"]]
    for text, size, key, target in TRAINING_GOALS:
        measured = [r for r in fused if (r["img_size"] == size if size == 224 else r["img_size"] >= size)]
        ratios = {r["model"]: r["modes"]["train"][key] for r in measured if key in r["modes"]["train"]}
        if ratios:
            worst = min(ratios, key=ratios.get)
            out.append({"goal": text, "value": f"lowest {ratios[worst]:.2f}× ({worst})",
                        "met": ratios[worst] >= target})  # fmt: skip
    deit = next((r for r in fused if r["model"].startswith("agent_deit_tiny") and r["img_size"] == 224), None)
    if deit and "vs_counterpart" in deit["modes"]["train"]:
        ratio = deit["modes"]["train"]["vs_counterpart"]
        out.append({"goal": "Agent-DeiT-T at 224, fused kernels, ≥ 1.0× timm DeiT-T (FlashAttention) in training",
                    "value": f"{ratio:.2f}×", "met": ratio >= 1.0})  # fmt: skip
    return out


def write_section(path: str, result: dict) -> None:
    """The result as a ``bench report`` section: how it ran, the table, and the training goals."""
    where = result["environment"].get("gpu") or result["config"].get("device", "cpu")
    title = f"Whole models on {where}: agent backends vs official math and softmax"
    markdown = describe(result["config"]) + "\n\n" + format_table(result["models"])
    write(path, title, result["command"], result["environment"], markdown, goals(result["models"]))
