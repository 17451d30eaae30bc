"""A full StableDiffusionPipeline from tiny components, saved and loaded back, through ``agentattn sd``;
the step schedule; ``agentattn bench sd`` on tiny configs; CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from agentattn.cli.main import main
from agentattn.diffusion import AgentSDSchedule, apply_patch, patch_options, patch_stats, remove_patch

from ._tiny import TINY_SD_UNET, TINY_SDXL_UNET, save_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"agentattn {prog}: error: ") and "Traceback" not in err
    return err


def test_sd_cli_end_to_end(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sd", "--model", str(pipeline_dir), "--prompt", "a photo of a cat", "a red dog", "--steps", "2",
            "--switch-step", "1", "--baseline", "--output", str(out), "--threads", "2"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "timings.json").read_text())
    assert report["pipeline"] == "StableDiffusionPipeline"
    assert report["patch"]["max_downsample"] == 1 and report["schedule"]["switch_step"] == 1
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00-agentsd.png", "00-unpatched.png", "01-agentsd.png", "01-unpatched.png"]
    assert [r["method"] for r in report["images"]] == ["agentsd", "unpatched"] * 2
    assert report["speedup"] > 0 and all(r["seconds"] > 0 for r in report["images"])
    from PIL import Image

    a, b = (Image.open(out / f) for f in ("00-agentsd.png", "00-unpatched.png"))
    assert a.size == (32, 32) and a.tobytes() != b.tobytes()  # the patch changed the image


def test_pipeline_api_with_schedule(pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seen: list[tuple[int, int]] = []

    class Spy(AgentSDSchedule):
        def __call__(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append((step_index, patch_options(pipeline)["sx"]))
            return super().__call__(pipeline, step_index, timestep, callback_kwargs)

    def generate(**kwargs):
        gen = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=3, generator=gen, output_type="np", **kwargs).images

    baseline = generate()
    apply_patch(pipe, ratio=0.4, agent_ratio=0.95, sx=4, sy=4)
    patched = generate(callback_on_step_end=Spy(switch_step=2))
    # steps 0-1 with sx=4 (agents), step 2 with sx=2 (ToMe), then the step-0 settings come back
    assert seen == [(0, 4), (1, 4), (2, 2)] and patch_options(pipe)["sx"] == 4
    stats = patch_stats(pipe)
    assert stats["agent_calls"] == 2 * 3 and stats["merged_calls"] == 3  # 3 patched blocks, CFG in one batch
    assert not (patched == baseline).all()
    remove_patch(pipe)
    assert (generate() == baseline).all()


def test_sd_cli_errors(tmp_path, pipeline_dir, capsys):
    assert main(["sd", "--model", str(tmp_path / "nope")]) == 1
    err = _one_error_line(capsys, "sd")
    assert "nope" in err and "nothing is downloaded" in err
    assert main(["sd", "--model", str(pipeline_dir), "--ratio", "1.0", "--output", str(tmp_path / "o")]) == 1
    assert "ratio must be in [0, 1)" in _one_error_line(capsys, "sd")


def test_bench_sd_on_tiny_configs(monkeypatch, tmp_path, capsys):
    """The benchmark's code path (interleaved timing, ratios, diffs, JSON, plot) on tiny UNets."""
    pytest.importorskip("tomesd")
    import agentattn.bench.sd as bench_sd

    monkeypatch.setitem(bench_sd.MODELS, "sd15", {**TINY_SD_UNET, "cross_attention_dim": 768})
    sdxl = {**TINY_SDXL_UNET, "cross_attention_dim": 2048, "projection_class_embeddings_input_dim": 1280 + 48}
    monkeypatch.setitem(bench_sd.MODELS, "sdxl", sdxl)
    out = tmp_path / "b.json"
    args = [
        "bench",
        "sd",
        "--latents",
        "16",
        "--warmup",
        "0",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "b.png"),
    ]
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, k) for m in ("sd15", "sdxl") for k in ("unpatched", "agentsd", "tomesd")
    ]
    for r in rows:
        assert r["ms"] > 0 and (r["max_abs_diff"] == 0) == (r["method"] == "unpatched")
    assert "did not run" not in capsys.readouterr().out
    assert (tmp_path / "b.png").is_file() or "matplotlib" not in str(pytest)
    assert main(["bench", "sd", "--ratio", "1.0"]) == 1
    assert "ratio must be in [0, 1)" in _one_error_line(capsys, "bench sd")
