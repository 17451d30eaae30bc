"""Deployment benchmark: CPU throughput of eager, ``torch.compile`` and onnxruntime fp32/int8, in one run.

For each model (random weights: throughput does not depend on them) it builds the model at 224², exports one
ONNX file with a dynamic batch (:mod:`agentattn.deploy`), quantises it to dynamic int8, and times a forward at
each batch size for

- ``eager``: fp32 PyTorch under ``torch.inference_mode``;
- ``compile``: ``torch.compile(model)`` (inductor, compile time not counted, reported apart);
- ``ort-fp32`` / ``ort-int8``: onnxruntime, CPU execution provider, all graph optimisations;

as the median after warm-up (``agentattn.measure.median_ms``), reported in images/s. It also records the
max |Δlogits| between onnxruntime fp32 and eager at batch 1 and 3 (the ONNX parity check). Default models: the
four tiny agent models and their softmax counterparts in timm (there is no CSwin in timm; PVT v1 is not in
timm either, ``pvt_v2_b1`` stands in for it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..deploy.export import example_input, export_onnx, export_program, load_model
from ..deploy.quantize import OnnxModel, quantize_onnx_int8
from ..io import one_line
from ..measure import median_ms

DEFAULT_MODELS = (
    "agent_deit_tiny_patch16_224",
    "agent_pvt_tiny_224",
    "agent_swin_tiny_224",
    "agent_cswin_tiny_224",
    "deit_tiny_patch16_224",
    "pvt_v2_b1",
    "swin_tiny_patch4_window7_224",
)
BACKENDS = ("eager", "compile", "ort-fp32", "ort-int8")


@dataclass
class ModelResult:
    model: str
    params_m: float
    img_size: int
    img_per_s: dict[str, dict[int, float]] = field(default_factory=dict)  # backend -> batch -> images/s
    max_abs_diff: dict[int, float] = field(default_factory=dict)  # ort-fp32 vs eager, per batch
    logit_scale: float = 0.0  # max |eager logits| at batch 1, to read the diffs against
    export_s: float = 0.0
    compile_s: dict[int, float] = field(default_factory=dict)
    onnx_mib: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def bench_model(
    name: str,
    batches: list[int],
    backends: list[str],
    workdir: Path,
    img_size: int,
    threads: int,
    budget_s: float,
    kwargs: dict | None = None,
) -> ModelResult:
    """Time ``name`` on every backend and batch; a failing backend is recorded in ``errors``, not raised."""
    model, spec = load_model(name, img_size=img_size, model_kwargs=kwargs)
    result = ModelResult(name, sum(p.numel() for p in model.parameters()) / 1e6, spec.img_size)
    inputs = {b: example_input(spec, b) for b in batches}

    def timed(backend: str, fn) -> None:
        try:
            result.img_per_s[backend] = {}
            for b in batches:
                ms = median_ms(
                    lambda b=b: fn(inputs[b]), warmup=1, min_reps=3, max_reps=20, budget_s=budget_s
                )
                result.img_per_s[backend][b] = 1e3 * b / ms
                print(f"  {name} {backend} batch {b}: {result.img_per_s[backend][b]:.1f} img/s", flush=True)
        except Exception as err:  # one failing backend must not lose the run
            result.errors[backend] = f"{type(err).__name__}: {one_line(err, 200)}"
            print(f"  {name} {backend}: failed ({result.errors[backend]})", flush=True)

    if "eager" in backends:
        with torch.inference_mode():
            timed("eager", model)
    if "compile" in backends:
        compiled = torch.compile(model)
        for b in batches:  # compile (and recompile per batch) outside the timing
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    compiled(inputs[b])
            except Exception as err:
                result.errors["compile"] = f"{type(err).__name__}: {one_line(err, 200)}"
                break
            result.compile_s[b] = time.perf_counter() - start
        if "compile" not in result.errors:
            with torch.inference_mode():
                timed("compile", compiled)
        torch._dynamo.reset()
    if "ort-fp32" in backends or "ort-int8" in backends:
        fp32, int8 = workdir / f"{name}.onnx", workdir / f"{name}.int8.onnx"
        try:
            start = time.perf_counter()
            export_onnx(export_program(model, example_input(spec, 2), dynamic_batch=True), fp32)
            result.export_s = time.perf_counter() - start
            result.onnx_mib["fp32"] = fp32.stat().st_size / 2**20
            session = OnnxModel(fp32, threads)
            ref = {}
            with torch.no_grad():
                for b in (1, 3):
                    x = example_input(spec, b)
                    ref[b] = model(x)
                    result.max_abs_diff[b] = (session(x) - ref[b]).abs().max().item()
            result.logit_scale = ref[1].abs().max().item()
            print(f"  {name} ort-fp32 parity: max |Δlogits| {result.max_abs_diff}", flush=True)
            if "ort-fp32" in backends:
                timed("ort-fp32", session)
            if "ort-int8" in backends:
                quantize_onnx_int8(fp32, int8)
                result.onnx_mib["int8"] = int8.stat().st_size / 2**20
                timed("ort-int8", OnnxModel(int8, threads))
        except Exception as err:
            result.errors["onnx"] = f"{type(err).__name__}: {one_line(err, 200)}"
            print(f"  {name} onnx: failed ({result.errors['onnx']})", flush=True)
    return result


def format_table(results: list[ModelResult], batches: list[int], backends: list[str]) -> str:
    """Markdown: one row per model and batch, images/s per backend, int8 speed-up over onnxruntime fp32."""
    head = "| model | params (M) | batch | " + " | ".join(f"{b} (img/s)" for b in backends)
    lines = [head + " | int8 / fp32 (ORT) | ORT max abs diff (b=1, 3) |"]
    lines.append("|---|---:|---:|" + "---:|" * len(backends) + "---:|---:|")
    for r in results:
        for b in batches:
            cells = [f"{r.img_per_s[k][b]:.1f}" if b in r.img_per_s.get(k, {}) else "—" for k in backends]
            fp32, int8 = r.img_per_s.get("ort-fp32", {}).get(b), r.img_per_s.get("ort-int8", {}).get(b)
            ratio = f"{int8 / fp32:.2f}×" if fp32 and int8 else "—"
            diff = (
                f"{r.max_abs_diff[1]:.1e}, {r.max_abs_diff[3]:.1e}"
                if b == batches[0] and r.max_abs_diff
                else ""
            )
            lines.append(
                f"| {r.model} | {r.params_m:.1f} | {b} | " + " | ".join(cells) + f" | {ratio} | {diff} |"
            )
    return "\n".join(lines)
