"""``agentattn sd --model DIR --prompt TEXT... [--output DIR] [--baseline]``: AgentSD image generation.

Loads a diffusers pipeline from a local directory (``from_pretrained(DIR)``, nothing is downloaded), patches its
UNet with AgentSD (with the recommended step schedule, spec §5.4), generates one image per prompt and writes
``NN-agentsd.png`` files plus ``timings.json``. With ``--baseline`` it also generates every image unpatched (same
seed) and reports the speed-up. Bad input ends with one ``agentattn sd: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_open, atomic_write_text

PROG = "agentattn sd"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--model",
        required=True,
        help="local diffusers pipeline directory (model_index.json, unet/, vae/, ...)",
    )
    add("--prompt", nargs="+", default=["a photograph of an astronaut riding a horse"], help="one image each")
    add("--output", default="runs/sd", help="directory for the PNGs and timings.json")
    add("--steps", type=int, default=50)
    add("--guidance", type=float, default=7.5)
    add("--height", type=int, default=None, help="default: the pipeline's")
    add("--width", type=int, default=None)
    add("--seed", type=int, default=0, help="image i uses seed + i")
    add("--ratio", type=float, default=0.4)
    add("--agent-ratio", type=float, default=0.95)
    add("--sx", type=int, default=4)
    add("--sy", type=int, default=4)
    add("--max-downsample", type=int, default=None, help="default: the top attention level")
    add(
        "--switch-step",
        type=int,
        default=20,
        help="step schedule: sx=sy=2, agent_ratio 0.5 from here (0: off)",
    )
    add("--attn-precision", choices=["fp32"], default=None)
    add("--baseline", action="store_true", help="also generate unpatched images and report the speed-up")
    add("--device", default="cpu")
    add("--dtype", choices=sorted(DTYPES), default="float32")
    add("--variant", default=None, help="weight file variant to load, e.g. fp16 (*.fp16.safetensors)")
    add("--threads", type=int, default=None, help="torch intra-op threads (CPU)")


def _save_png(image: Any, path: Path) -> None:
    with atomic_open(path) as f:
        image.save(f, format="PNG")


def _generate(
    pipe: Any, prompt: str, args: argparse.Namespace, seed: int, callback: Any
) -> tuple[Any, float]:
    gen = torch.Generator(args.device).manual_seed(seed)
    kwargs: dict[str, Any] = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "generator": gen,
    }
    if args.height is not None:
        kwargs["height"] = args.height
    if args.width is not None:
        kwargs["width"] = args.width
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(prompt, **kwargs).images[0]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return image, time.perf_counter() - t0


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


class _BadInput(Exception):
    """Bad input or a pipeline that cannot load: :func:`run` prints it as one error line and returns 1."""


def _load_pipeline(args: argparse.Namespace, model_dir: Path) -> Any:
    """Check the options, then load the pipeline from ``model_dir`` onto --device / --dtype (no download)."""
    if not (model_dir / "model_index.json").is_file():
        raise _BadInput(
            f"--model {args.model} is not a local diffusers pipeline directory (no model_index.json); "
            "nothing is downloaded, see the README for where to get Stable Diffusion weights"
        )
    if args.steps < 1:
        raise _BadInput(f"--steps must be >= 1, got {args.steps}")
    try:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        from ..diffusion.patch import AgentSDConfig, check_config
    except ImportError:
        raise _BadInput("needs diffusers: pip install 'agentattn[diffusion]'") from None
    try:  # before loading the weights
        check_config(AgentSDConfig(args.ratio, args.agent_ratio, args.sx, args.sy, args.max_downsample or 1))
    except ValueError as e:
        raise _BadInput(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True, variant=args.variant)
        pipe = pipe.to(args.device, DTYPES[args.dtype])
    except Exception as e:  # diffusers raises many kinds here; keep the CLI to one line
        raise _BadInput(
            f"cannot load a pipeline from {args.model}: {type(e).__name__}: {e}".splitlines()[0]
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _patch(pipe: Any, args: argparse.Namespace) -> None:
    """Patch ``pipe``'s UNet with AgentSD as the options say."""
    from ..diffusion import apply_patch

    try:
        apply_patch(
            pipe,
            ratio=args.ratio,
            agent_ratio=args.agent_ratio,
            sx=args.sx,
            sy=args.sy,
            max_downsample=args.max_downsample,
            attn_precision=args.attn_precision,
        )
    except (TypeError, ValueError) as e:
        raise _BadInput(str(e)) from None


def _generate_all(
    pipe: Any, args: argparse.Namespace, out_dir: Path, callback: Any, settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """Generate, save and time each prompt's image (with --baseline also unpatched, same seed); one record each."""
    from ..diffusion import apply_patch, remove_patch

    records: list[dict[str, Any]] = []
    for i, prompt in enumerate(args.prompt):
        for method in ("agentsd", "unpatched") if args.baseline else ("agentsd",):
            if method == "unpatched":
                remove_patch(pipe)
            image, seconds = _generate(
                pipe, prompt, args, args.seed + i, callback if method == "agentsd" else None
            )
            if method == "unpatched":
                apply_patch(pipe, **settings)
            path = out_dir / f"{i:02d}-{method}.png"
            _save_png(image, path)
            records.append(
                {
                    "prompt": prompt,
                    "seed": args.seed + i,
                    "method": method,
                    "file": path.name,
                    "seconds": seconds,
                }
            )
            print(f"{path}: {seconds:.2f} s ({method})")
    return records


def _summary(records: list[dict[str, Any]], images: int) -> dict[str, Any]:
    """Mean seconds per method, and the speed-up (printed) when there are unpatched images."""
    summary: dict[str, Any] = {}
    for method in ("agentsd", "unpatched"):
        times = [r["seconds"] for r in records if r["method"] == method]
        if times:
            summary[f"{method}_mean_seconds"] = sum(times) / len(times)
    if "unpatched_mean_seconds" in summary:
        summary["speedup"] = summary["unpatched_mean_seconds"] / summary["agentsd_mean_seconds"]
        print(f"AgentSD {summary['speedup']:.2f}x faster than unpatched (mean over {images} image(s))")
    return summary


def _report(
    args: argparse.Namespace,
    model_dir: Path,
    pipe: Any,
    settings: dict[str, Any],
    callback: Any,
    records: list[dict[str, Any]],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The timings.json content: model, settings, environment, one record per image and the summary."""
    return {
        "model": str(model_dir),
        "pipeline": type(pipe).__name__,
        "steps": args.steps,
        "guidance": args.guidance,
        "patch": settings,
        "schedule": {"switch_step": args.switch_step, "late": callback.late} if callback else None,
        "environment": {
            "torch": torch.__version__,
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "images": records,
        **summary,
    }


def run(args: argparse.Namespace) -> int:
    """Generate and time the images, write them and timings.json; 0, or 1 with one error line on bad input."""
    model_dir = Path(args.model)
    try:
        pipe = _load_pipeline(args, model_dir)
        _patch(pipe, args)
    except _BadInput as e:
        return _error(str(e))
    from ..diffusion import AgentSDSchedule, patch_options, remove_patch

    use_schedule = 0 < args.switch_step < args.steps
    callback = AgentSDSchedule(args.switch_step) if use_schedule else None
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = patch_options(pipe)
    records = _generate_all(pipe, args, out_dir, callback, settings)
    remove_patch(pipe)
    summary = _summary(records, len(args.prompt))
    report = _report(args, model_dir, pipe, settings, callback, records, summary)
    atomic_write_text(out_dir / "timings.json", json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'timings.json'}")
    return 0
