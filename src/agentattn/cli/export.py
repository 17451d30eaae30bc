"""``agentattn export NAME [--checkpoint FILE] --format onnx|torch-export [--img-size S] [--dynamic-batch] OUT``.

Exports a registered model with weights from FILE (an ``agentattn train`` checkpoint, an official ``.pth`` or a
``.safetensors`` file; random weights without one) to ONNX (opset 18, input ``images``, output ``logits``) or to
a ``torch.export`` program (``torch.export.save``; run it with ``torch.export.load(OUT).module()``).

- ``--quantize int8`` (ONNX): dynamic int8 quantisation with onnxruntime; ``--quantize bf16`` (torch-export):
  a bfloat16 program with fp32 inputs and outputs.
- After writing OUT it runs the exported model on a random batch (1 and 3 with ``--dynamic-batch``) and prints
  the max |Δlogits| to eager fp32 PyTorch.
- ``--eval``: top-1 on the test split of ``--data`` (default: the data the checkpoint was trained on) for eager
  fp32 PyTorch, the fp32 ONNX model (with int8) and the exported model, with throughput.

Bad input ends with one ``agentattn export: error: ...`` line and exit code 1; OUT is then left untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..deploy.export import (
    DEFAULT_OPSET,
    ModelSpec,
    check_runs,
    example_input,
    export_onnx,
    export_program,
    export_torch,
    load_exported,
    load_model,
)
from ..deploy.quantize import OnnxModel, quantize_onnx_int8, to_bf16
from ..io import atomic_write_text, one_line
from .train import parse_model_kwargs

FORMATS = ("onnx", "torch-export")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}  # what onnxruntime / torch.export.load users expect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` options."""
    add = parser.add_argument
    add("name", help="registered model name (timm.list_models('agent_*'), or any timm model)")
    add("out", type=Path, help="output file (.onnx or .pt2)")
    add("--format", required=True, choices=FORMATS)
    add("--checkpoint", type=Path, default=None, help="train checkpoint, official .pth or .safetensors")
    add("--img-size", type=int, default=None, help="input side S (default: the checkpoint's or model's)")
    add("--dynamic-batch", action="store_true", help="symbolic batch axis (else fixed to --batch-size)")
    add("--batch-size", type=int, default=1, help="the fixed batch without --dynamic-batch")
    add("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE", help="timm.create_model kwargs")
    add("--num-classes", type=int, default=None, help="classifier size (default: the checkpoint's)")
    add("--in-chans", type=int, default=None, help="input channels (default: the checkpoint's, else 3)")
    add("--ema", action="store_true", help="export the EMA weights")
    add("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (≥ 17)")
    add("--quantize", choices=("none", "int8", "bf16"), default="none", help="int8: onnx; bf16: torch-export")
    add("--threads", type=int, default=None, help="torch and onnxruntime threads for checks and --eval")
    add("--eval", action="store_true", help="also report test accuracy of eager fp32 and the exported model")
    add("--data", default=None, help="--eval data (default: the checkpoint's, else fashion-mnist)")
    add("--eval-subset", type=int, default=None, help="--eval on N test images chosen from seed 0")
    add("--eval-batch-size", type=int, default=256)
    add("--json", type=Path, default=None, help="also write the check and --eval results here")


def _check_options(args: argparse.Namespace) -> None:
    if args.quantize == "int8" and args.format != "onnx":
        raise ValueError("--quantize int8 needs --format onnx (onnxruntime dynamic quantisation)")
    if args.quantize == "bf16" and args.format != "torch-export":
        raise ValueError("--quantize bf16 needs --format torch-export (onnxruntime has no bf16 CPU kernels)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"OUT {out}: give a file name in an existing directory")


def _max_diff(reference: nn.Module, exported: nn.Module, spec, batches: list[int]) -> dict[int, float]:
    """Max |logits - eager logits| on seeded random images, per batch size."""
    out = {}
    for batch in batches:
        x = example_input(spec, batch)
        with torch.no_grad():
            out[batch] = (exported(x).float() - reference(x)).abs().max().item()
    return out


def _diffs(diffs: dict[int, float]) -> str:
    return ", ".join(f"{d:.2e} (batch {b})" for b, d in diffs.items())


def _evaluate(models: dict[str, nn.Module], args: argparse.Namespace, spec) -> dict[str, Any]:
    from ..train.data import build_data
    from ..train.loop import evaluate

    data_spec = args.data or spec.data or "fashion-mnist"
    data = build_data(data_spec, img_size=spec.img_size, eval_subset=args.eval_subset, with_train=False)
    if (data.num_classes, data.in_chans) != (spec.num_classes, spec.in_chans):
        raise ValueError(
            f"--data {data_spec} has {data.num_classes} classes / {data.in_chans} channels, the model "
            f"{spec.num_classes} / {spec.in_chans}: pass the data it was trained on"
        )
    loader = DataLoader(data.eval, batch_size=args.eval_batch_size)
    results = {}
    for label, model in models.items():
        r = evaluate(model, loader, torch.device("cpu"), data.num_classes)
        results[label] = {k: r[k] for k in ("top1", "top5", "loss", "images", "img_per_s")}
        print(
            f"  {label:<16} top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
            f"{r['img_per_s']:.0f} img/s (batch {args.eval_batch_size})"
        )
    return {"data": data_spec, "split": data.eval_split, "results": results}


def _load(args: argparse.Namespace, out: Path) -> tuple[nn.Module, ModelSpec]:
    """Check the options, then build the model with its weights and check it runs at the export size."""
    _check_options(args)
    expected = SUFFIXES[args.format]
    if out.suffix != expected:
        print(
            f"agentattn export: warning: {out} does not end in {expected}; writing {args.format} there anyway",
            file=sys.stderr,
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec = load_model(
        args.name,
        args.checkpoint,
        img_size=args.img_size,
        model_kwargs=parse_model_kwargs(args.model_kwargs),
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        use_ema=args.ema,
    )
    check_runs(model, spec)
    return model, spec


def _export(
    args: argparse.Namespace, model: nn.Module, spec: ModelSpec, out: Path, tmp_fp32: Path | None
) -> float:
    """Write OUT (through the fp32 ONNX file ``tmp_fp32`` when quantising to int8); return the seconds taken."""
    target = to_bf16(model) if args.quantize == "bf16" else model
    example = example_input(spec, 2 if args.dynamic_batch else args.batch_size)
    start = time.perf_counter()
    try:
        program = export_program(target, example, dynamic_batch=args.dynamic_batch)
        if args.format == "torch-export":
            export_torch(program, out)
        elif tmp_fp32 is not None:
            export_onnx(program, tmp_fp32, args.opset)
            quantize_onnx_int8(tmp_fp32, out)
        else:
            export_onnx(program, out, args.opset)
    except (ValueError, OSError, ImportError):
        raise
    except Exception as err:  # exporter failures come as many types; report them in one line
        raise ValueError(
            f"exporting {args.name} failed ({type(err).__name__}: {one_line(err, 400)})"
        ) from err
    return time.perf_counter() - start


def _written(args: argparse.Namespace, spec: ModelSpec, out: Path, elapsed: float) -> dict[str, Any]:
    """Print what was written from which model; return the report's fields for it."""
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.format}, {args.quantize}) in {elapsed:.1f} s"
    )
    print(
        f"model {spec.name}, {spec.in_chans}×{spec.img_size}×{spec.img_size} → {spec.num_classes} classes, "
        f"batch {'dynamic' if args.dynamic_batch else args.batch_size}, "
        f"checkpoint {spec.checkpoint or 'none (random weights)'}"
    )
    return {
        "model": spec.name,
        "format": args.format,
        "quantize": args.quantize,
        "img_size": spec.img_size,
        "out": str(out),
        "export_s": elapsed,
    }


def _check_exported(
    args: argparse.Namespace,
    model: nn.Module,
    spec: ModelSpec,
    out: Path,
    tmp_fp32: Path | None,
    report: dict[str, Any],
) -> None:
    """Print the exported model's max |Δlogits| to eager fp32 (and --eval accuracies); add them to ``report``."""
    exported = _load_exported(out, args)
    if exported is None:
        print("onnxruntime is not installed: skipped the output check (pip install 'agentattn[deploy]')")
        return
    batches = [1, 3] if args.dynamic_batch else [args.batch_size]
    report["max_abs_diff"] = diffs = _max_diff(model, exported, spec, batches)
    print(f"max |Δlogits| vs eager fp32: {_diffs(diffs)}")
    models = {"eager fp32": model}
    if tmp_fp32 is not None:
        models["onnxruntime fp32"] = fp32_model = OnnxModel(tmp_fp32, args.threads)
        report["max_abs_diff_fp32"] = diffs = _max_diff(model, fp32_model, spec, batches)
        print(f"  (the fp32 ONNX graph before quantising: {_diffs(diffs)})")
    if args.eval:
        label = {"onnx": "onnxruntime", "torch-export": "torch.export"}[args.format]
        models[f"{label} {args.quantize if args.quantize != 'none' else 'fp32'}"] = exported
        if not args.dynamic_batch:  # graphs of a fixed batch see the test set in batches of that size
            models = {k: v if v is model else _FixedBatch(v, args.batch_size) for k, v in models.items()}
        print(f"test accuracy (--data {args.data or spec.data or 'fashion-mnist'}):")
        report["eval"] = _evaluate(models, args, spec)


def run(args: argparse.Namespace) -> int:
    """Export; print the checks; return 0, or 1 with one line on stderr for bad input or a failed export."""
    out = Path(args.out)
    tmp_fp32: Path | None = None
    try:
        model, spec = _load(args, out)
        if args.format == "onnx" and args.quantize == "int8":
            # The fp32 file is an intermediate (and --eval's reference), deleted at the end.
            tmp_fp32 = out.with_name(f".{out.stem}.fp32-{os.getpid()}{out.suffix}")
        elapsed = _export(args, model, spec, out, tmp_fp32)
        report = _written(args, spec, out, elapsed)
        _check_exported(args, model, spec, out, tmp_fp32, report)
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    except (ValueError, OSError, ImportError) as err:
        print(f"agentattn export: error: {one_line(err, 400)}", file=sys.stderr)
        return 1
    finally:
        if tmp_fp32 is not None:
            tmp_fp32.unlink(missing_ok=True)
    return 0


class _FixedBatch(nn.Module):
    """Runs a graph exported for a fixed batch on any batch: slices of ``batch`` images, the last one padded
    with zeros (its padding rows are dropped from the output)."""

    def __init__(self, graph: nn.Module, batch: int) -> None:
        super().__init__()
        self.graph, self.batch = graph, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) for any B → (B, num_classes)."""
        outputs = []
        for part in x.split(self.batch):
            short = self.batch - part.shape[0]
            padded = torch.cat([part, part.new_zeros(short, *part.shape[1:])]) if short else part
            outputs.append(self.graph(padded)[: part.shape[0]])
        return torch.cat(outputs)


class _Program(nn.Module):
    """A loaded torch.export program behind ``nn.Module`` (its own module refuses ``.eval()``)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.run = program.__call__  # a bound method, not a submodule: .eval() must not reach it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, num_classes)."""
        return self.run(x)


def _load_exported(out: Path, args: argparse.Namespace) -> nn.Module | None:
    if args.format == "torch-export":
        return _Program(load_exported(out))
    try:
        return OnnxModel(out, args.threads)
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
