"""Publish weights the way timm users load them: a Hugging Face Hub directory with timm's files.

``save_for_hub(model, DIR)`` writes ``config.json`` (architecture, ``model_args``, pretrained cfg),
``model.safetensors`` and a ``README.md`` model card with the fields timm's ``push_to_hf_hub`` writes. The
directory loads with ``timm.create_model("local-dir:DIR", pretrained=True)``, and once uploaded (``hf upload
USER/NAME DIR``) with ``timm.create_model("hf-hub:USER/NAME", pretrained=True)``. Nothing here touches the
network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import save_for_hf
from timm.models._hub import generate_readme
from torch import nn

from ..io import atomic_write_text

__all__ = ["model_card", "save_for_hub"]

_CITATION = """@inproceedings{han2024agent,
  title={Agent Attention: On the Integration of Softmax and Linear Attention},
  author={Han, Dongchen and Ye, Tianzhu and Han, Yizeng and Xia, Zhuofan and Pan, Siyuan and Wan, Pengfei and
    Song, Shiji and Huang, Gao},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2024}
}"""


def model_card(model: nn.Module, repo_id: str | None = None) -> dict[str, Any]:
    """timm's model-card dict (``details``, ``usage``, ``citation``) for an agent model built by timm."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    name = cfg.get("architecture") or type(model).__name__
    params = sum(p.numel() for p in model.parameters())
    size = cfg.get("input_size", (3, 224, 224))
    source = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH"
    return {
        "license": cfg.get("license", "apache-2.0"),
        "description": (
            f"{name}: an Agent Attention model (Han et al., ECCV 2024), in timm's format through agentattn."
        ),
        "details": {
            "Model Type": "Image classification / feature backbone",
            "Model Stats": {"Params (M)": f"{params / 1e6:.1f}", "Image size": f"{size[-2]} x {size[-1]}"},
            "Papers": {
                "Agent Attention: On the Integration of Softmax and Linear Attention": (
                    "https://arxiv.org/abs/2312.08874"
                )
            },
            "Dataset": "ImageNet-1k",
            "Original": cfg.get("origin_url", "https://github.com/LeapLabTHU/Agent-Attention"),
        },
        "usage": (
            "```python\nimport timm\nimport agentattn  # registers the agent models with timm\n\n"
            f'model = timm.create_model("{source}", pretrained=True).eval()\n'
            "config = timm.data.resolve_data_config({}, model=model)\n"
            "transform = timm.data.create_transform(**config)\n```\n"
        ),
        "citation": _CITATION,
    }


def save_for_hub(
    model: nn.Module,
    directory: str | Path,
    *,
    model_args: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` for ``model`` into ``directory``.

    Args:
        model: a model made by ``timm.create_model`` (its ``pretrained_cfg`` names the architecture).
        directory: created if missing; files of the same names are replaced.
        model_args: constructor kwargs that differ from the registered variant's (recorded in ``config.json`` so
            that loading rebuilds the same architecture).
        repo_id: the Hub repository the card's usage example should name (default: a local directory).

    Returns:
        the directory.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not cfg.get("architecture"):
        raise ValueError(
            "model must be built with timm.create_model (it has no pretrained_cfg['architecture'])"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(directory), model_args=model_args, safe_serialization=True)
    card = generate_readme(model_card(model, repo_id), cfg["architecture"])
    atomic_write_text(directory / "README.md", card)
    return directory
