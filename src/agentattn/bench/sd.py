"""``agentattn bench sd``: one UNet forward of full-size SD v1.5 and SDXL UNets, unpatched / AgentSD / ToMe.

The UNets are built from their published configs (written out below) with random weights: nothing is
downloaded. For each latent size (64², 96², 128² by default, batch 1, fp32, ``torch.inference_mode``) it times:

- ``unpatched``: the UNet as built (diffusers' default SDPA attention processor);
- ``agentsd``: :func:`agentattn.diffusion.apply_patch` (ratio 0.5, agent_ratio 0.95, sx = sy = 4 by default);
- ``tomesd``: ToMe for SD from PyPI ``tomesd`` with the same ratio and its other defaults (sx = sy = 2), at the
  same level as AgentSD (``max_downsample`` 1 for SD v1.5, 2 for SDXL, whose top level has no attention);

interleaved: ``--warmup`` untimed rounds, then the median of ``--repeats`` timed rounds. It reports the time, the
speed-up over unpatched, the peak memory of the forward (CUDA: peak allocated; CPU: peak resident-set growth,
sampled every 2 ms) and the max |output - unpatched output|, which shows that each patch really ran. Results go
to a JSON file and a plot.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..io import atomic_open

# diffusers UNet2DConditionModel configs of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json), the fields that differ from the defaults.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
MODELS = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
TOME_LEVEL = {"sd15": 1, "sdxl": 2}  # tomesd's max_downsample at AgentSD's default (top attention) level


@dataclass
class Row:
    model: str
    latent: int
    method: str
    ms: float
    speedup: float
    peak_mib: float
    max_abs_diff: float
    ratio: float
    agent_ratio: float | None
    sx: int | None
    sy: int | None


def build_unet(name: str, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """Full-size UNet from its config, with diffusers' default random init."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**MODELS[name]).to(device).eval()


def unet_inputs(name: str, latent: int, batch: int = 1, device: str = "cpu", seed: int = 1) -> dict[str, Any]:
    """Random latents (B, 4, S, S), timestep and text conditioning of the right widths."""
    gen = torch.Generator().manual_seed(seed)
    cfg = MODELS[name]
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, latent, latent, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, cfg["cross_attention_dim"], generator=gen),
    }
    if cfg.get("addition_embed_type") == "text_time":
        size = float(latent * 8)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=gen),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1),
        }
    return _to(inputs, device)


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class PeakMemory:
    """Peak memory growth of a region: CUDA peak allocated, or on CPU the resident set sampled every 2 ms."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._rss()) - self._base


def _forward(unet: torch.nn.Module, inputs: dict[str, Any], device: str) -> torch.Tensor:
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    out = unet(inputs["sample"], inputs["timestep"], **rest).sample  # positional: tomesd's hook reads args[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def _patch(unet: torch.nn.Module, name: str, method: str, opts: dict[str, Any]) -> None:
    if method == "agentsd":
        from ..diffusion import apply_patch

        apply_patch(unet, ratio=opts["ratio"], agent_ratio=opts["agent_ratio"], sx=opts["sx"], sy=opts["sy"])
    elif method == "tomesd":
        import tomesd

        tomesd.apply_patch(unet, ratio=opts["tome_ratio"], max_downsample=TOME_LEVEL[name])


def _unpatch(unet: torch.nn.Module, method: str) -> None:
    if method == "agentsd":
        from ..diffusion import remove_patch

        remove_patch(unet)
    elif method == "tomesd":
        import tomesd

        tomesd.remove_patch(unet)


def bench_latent(
    unet: torch.nn.Module,
    name: str,
    latent: int,
    methods: list[str],
    opts: dict[str, Any],
    batch: int,
    warmup: int,
    repeats: int,
    device: str,
) -> dict[str, tuple[float, float, torch.Tensor]]:
    """{method: (median ms, peak MiB, output)} at one latent size.

    Methods are interleaved: ``warmup`` rounds, then ``repeats`` timed rounds that each run every method once,
    so that a slow spell of a shared machine hits all of them alike.
    """
    inputs = unet_inputs(name, latent, batch, device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for method in methods:
                _patch(unet, name, method, opts)
                try:
                    with PeakMemory(device) as mem:
                        t0 = time.perf_counter()
                        out = _forward(unet, inputs, device)
                        elapsed = time.perf_counter() - t0
                finally:
                    _unpatch(unet, method)
                if round_ >= warmup:
                    times[method].append(elapsed)
                    peaks.setdefault(method, mem.peak_bytes / 2**20)
                    outputs.setdefault(method, out)
    return {m: (statistics.median(times[m]) * 1e3, peaks[m], outputs[m]) for m in methods}


def bench_model(
    name: str,
    latents: list[int],
    methods: list[str],
    opts: dict[str, Any],
    batch: int,
    warmup: int,
    repeats: int,
    device: str,
    log=print,
) -> list[Row]:
    """Time every method at every latent size on one freshly built UNet (``methods[0]`` is ``unpatched``).

    ``opts``: ratio, agent_ratio, sx, sy (AgentSD) and tome_ratio.
    """
    t0 = time.perf_counter()
    unet = build_unet(name, device=device)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"{name}: built from config in {time.perf_counter() - t0:.1f} s, {n_params / 1e6:.0f} M parameters")
    rows: list[Row] = []
    settings = {
        "unpatched": (0.0, None, None, None),
        "agentsd": (opts["ratio"], opts["agent_ratio"], opts["sx"], opts["sy"]),
        "tomesd": (opts["tome_ratio"], None, 2, 2),
    }
    for latent in latents:
        results = bench_latent(unet, name, latent, methods, opts, batch, warmup, repeats, device)
        base_ms, _, reference = results["unpatched"]
        for method, (ms, peak, out) in results.items():
            diff = (out - reference).abs().max().item()
            if method != "unpatched" and diff == 0.0:
                log(f"warning: {method} gave exactly the unpatched output: the patch did not run")
            row = Row(name, latent, method, ms, base_ms / ms, peak, diff, *settings[method])
            rows.append(row)
            log(
                f"  {name} {latent}² {method:9s} {ms / 1e3:8.2f} s  x{row.speedup:.2f}  "
                f"peak +{peak:.0f} MiB  max|diff| {diff:.3g}"
            )
    del unet
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        "| UNet | latent (image) | method | settings | forward (s) | speed-up | peak memory (MiB) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if r.method == "agentsd":
            settings = f"ratio {r.ratio}, agent_ratio {r.agent_ratio}, sx=sy={r.sx}"
        elif r.method == "tomesd":
            settings = f"ratio {r.ratio}, sx=sy={r.sx}"
        else:
            settings = "-"
        model = {"sd15": "SD v1.5", "sdxl": "SDXL"}[r.model]
        lines.append(
            f"| {model} | {r.latent}² ({r.latent * 8}²) | {r.method} | {settings} | {r.ms / 1e3:.2f} | "
            f"{r.speedup:.2f}× | {r.peak_mib:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> bool:
    """Time and peak memory against latent size, one panel pair per UNet. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for method in dict.fromkeys(r.method for r in rows):
            sel = [r for r in rows if r.model == model and r.method == method]
            xs = [r.latent for r in sel]
            axes[i][0].plot(xs, [r.ms / 1e3 for r in sel], "o-", label=method)
            axes[i][1].plot(xs, [r.peak_mib for r in sel], "o-", label=method)
            if method != "unpatched":
                for r in sel:
                    axes[i][0].annotate(f"{r.speedup:.2f}×", (r.latent, r.ms / 1e3), fontsize=8)
        axes[i][0].set(title=f"{model}: one UNet forward", xlabel="latent side", ylabel="seconds")
        axes[i][1].set(title=f"{model}: peak memory growth", xlabel="latent side", ylabel="MiB")
        for ax in axes[i]:
            ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


def environment(device: str) -> dict[str, Any]:
    import diffusers

    from ..measure import environment as machine_environment

    env = {
        **machine_environment(),  # cpu, cpu_count, timm, date
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        from importlib.metadata import version

        import tomesd  # noqa: F401

        env["tomesd"] = version("tomesd")
    except ImportError:
        pass
    return env


def sd_goals(rows: list[Row]) -> list[dict]:
    """The issue's speed goals for SD v1.5 at 128² latents, checked against one run."""

    def find(method: str) -> Row | None:
        return next((r for r in rows if r.model == "sd15" and r.latent == 128 and r.method == method), None)

    agent, tome = find("agentsd"), find("tomesd")
    goals = [
        {
            "goal": "SD v1.5 UNet at 128² latents: AgentSD ≥ 1.6× faster than unpatched",
            "value": f"{agent.speedup:.2f}×" if agent else "–",
            "met": None if agent is None else agent.speedup >= 1.6,
        }
    ]
    goals.append({"goal": "… and faster than tomesd (ratio 0.5) in the same run",
                  "value": f"{agent.speedup:.2f}× vs {tome.speedup:.2f}×" if agent and tome else "–",
                  "met": None if not (agent and tome) else agent.ms < tome.ms})  # fmt: skip
    return goals


def section_markdown(rows: list[Row], args: Any) -> str:
    """The section's text: how the rows were measured (``args``: the run's settings, with the attributes batch,
    threads, device, warmup, repeats, ratio, agent_ratio, sx and tome_ratio), then the table."""
    return (
        f"Full-size UNets from their published configs, random weights, batch {args.batch}, fp32, "
        f"{args.threads} threads on {args.device}; {args.warmup} warm-up and the median of {args.repeats} timed "
        "forwards per case, interleaved. AgentSD: ratio {r}, agent_ratio {a}, sx = sy = {sx}; tomesd: ratio {t}, "
        "its other defaults.\n\n".format(r=args.ratio, a=args.agent_ratio, sx=args.sx,
                                          t=args.ratio if args.tome_ratio is None else args.tome_ratio)
        + format_table(rows)
    )  # fmt: skip
