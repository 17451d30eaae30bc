"""Whole-model throughput in the style of timm's ``benchmark.py``: inference and training img/s.

``agentattn bench model NAME... [--img-size 224 448]`` builds each timm model (agent models and their softmax
counterparts, e.g. ``deit_tiny_patch16_224`` and ``agent_deit_tiny_patch16_224``) at each resolution and
measures

- inference: eval mode, ``torch.inference_mode``, batch ``--batch``, img/s = batch / median step time;
- training: train mode, forward + cross-entropy + backward + SGD step, img/s likewise;

after warm-up steps, interleaved over the models so that a slow spell of a shared machine hits all of them. It
also records parameters and GFLOPs (one multiply-add = one FLOP, ``agentattn flops``'s convention). A model that
fails to build or run at a size, or whose step exceeds ``--step-timeout``, is marked and the run goes on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from .. import models as _models  # noqa: F401  (registers the agent models with timm)
from ..models._flops import count_flops, count_params
from .attention import command_line, environment, write_json

DEFAULT_MODELS = (
    "deit_tiny_patch16_224",
    "agent_deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "agent_swin_tiny_224",
)


def _build(name: str, img_size: int) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=1000)


def _steps(model: nn.Module, batch: int, img_size: int) -> dict[str, Callable[[], None]]:
    x = torch.randn(batch, 3, img_size, img_size)
    target = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimizer.step()

    return {"infer": infer, "train": train}


def bench_models(
    names: list[str],
    img_sizes: list[int],
    batch: int = 16,
    warmup: int = 1,
    rounds: int = 3,
    step_timeout_s: float = 120.0,
    modes: tuple[str, ...] = ("infer", "train"),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One row per (model, size): params, GFLOPs, and per mode img/s (or a status)."""
    rows: list[dict] = []
    for size in img_sizes:
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
            except Exception as e:  # an architecture that cannot take this size: mark it, go on
                row["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"
                log(f"  {name} @ {size}: {row['status']}")
                continue
            built[name] = _steps(model, batch, size)
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
    """Attach to each agent model its timm counterpart's throughput ratio (agent / softmax), by name."""
    for row in rows:
        other = counterpart(row["model"])
        if other is None:
            continue
        ref = next((r for r in rows if r["model"] == other and r["img_size"] == row["img_size"]), None)
        if ref is None:
            continue
        row["counterpart"] = other
        for mode, r in row["modes"].items():
            o = ref["modes"].get(mode, {})
            if "img_per_s" in r and "img_per_s" in o:
                r["vs_counterpart"] = r["img_per_s"] / o["img_per_s"]


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
    lines = [
        "| model | size | B | params (M) | GFLOPs | infer img/s | × softmax | train img/s | × softmax |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "status" in r:
            lines.append(f"| {r['model']} | {r['img_size']} | {r['batch']} | – | – | {r['status']} | | | |")
            continue
        i, t = r["modes"].get("infer", {}), r["modes"].get("train", {})
        lines.append(
            f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['params_m']:.1f} | {r['gflops']:.2f} | "
            f"{_rate(i)} | {_x(i)} | {_rate(t)} | {_x(t)} |"
        )
    return "\n".join(lines)


def _rate(r: dict) -> str:
    return f"{r['img_per_s']:.1f}" if "img_per_s" in r else r.get("status", "–")


def _x(r: dict) -> str:
    return f"{r['vs_counterpart']:.2f}" if "vs_counterpart" in r else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help="timm model names")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224, 448], help="input resolutions")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and mode")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per model and mode (interleaved)")
    parser.add_argument("--step-timeout", type=float, default=120.0, help="seconds allowed for one step")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        print(f"error: unknown model(s) {unknown}; see timm.list_models('agent_*')", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(f"torch {env['torch']}, timm {env['timm']}, {env['threads']} threads, {env['cpu']}, fp32")
    rows = bench_models(
        args.models,
        args.img_size,
        args.batch,
        args.warmup,
        args.rounds,
        args.step_timeout,
        tuple(args.modes),
    )
    print(format_table(rows))
    if args.json:
        write_json(
            {
                "kind": "model",
                "command": command_line("model"),
                "environment": env,
                "config": {"batch": args.batch, "rounds": args.rounds, "warmup": args.warmup},
                "models": rows,
            },
            args.json,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
