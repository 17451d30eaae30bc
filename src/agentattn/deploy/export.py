"""Export a model to ONNX or to a ``torch.export`` program, with weights from any checkpoint the zoo loads.

    checkpoint ─ load_model ─ folded_agent_biases ─ torch.export.export (batch dynamic or fixed) ─┬─ torch.export.save (.pt2)
                                                                                                 └─ torch.onnx.export (.onnx)

The agent op records explicit matmuls, softmaxes and pooling under ``torch.export`` (``agentattn.ops`` and
``agentattn.layers`` switch path when ``torch.compiler.is_exporting()``), and every agent layer's resolved
(B1, B2) biases are computed once, eagerly, for the export resolution and enter the graph as constants, so
the ONNX file holds MatMul/Softmax/AveragePool/Conv nodes and no bias interpolation. Only the batch axis is
dynamic; the image size is fixed at export (the biases and position embeddings are resolved for it).

Every writer goes through :func:`atomic_output`: a failed export leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..io import atomic_path, one_line, quote
from ..layers.agent_attention import AgentAttentionBase
from ..models import check_model_name
from ..models.pretrained import load_pretrained
from ..models.record import check_model_fits_weights
from ..train.restore import read_checkpoint

__all__ = [
    "DEFAULT_OPSET",
    "ModelSpec",
    "atomic_output",
    "export_onnx",
    "export_program",
    "export_torch",
    "folded_agent_biases",
    "load_exported",
    "load_model",
]

DEFAULT_OPSET = 18  # the torch.onnx (dynamo) exporter's own opset; the issue asks for ≥ 17
MIN_OPSET = 17
MAX_BATCH = 4096  # upper bound of the dynamic batch axis


@dataclass
class ModelSpec:
    """What a model was built from: enough to rebuild it and to make its inputs."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    data: str | None = None  # the data a training checkpoint was trained on


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def _is_zoo_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("agentattn.models")


def _create(
    name: str, num_classes: int, in_chans: int, img_size: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    """``timm.create_model`` at ``img_size`` where the model is built for a size (not every timm model is)."""
    check_model_name(name)
    if img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(
                name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
            )
        except (ValueError, AssertionError) as err:
            raise ValueError(f"img_size {img_size} does not work for {name}: {one_line(err, 300)}") from err
        except TypeError as err:
            if "img_size" not in str(err):  # else a fully convolutional model (pvt_v2): any size runs
                raise ValueError(f"model {name!r} rejects the model kwargs {kwargs}: {err}") from err
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model {name!r} rejects the model kwargs {kwargs}: {err}") from err


def _build_settings(
    name: str,
    path: Path | None,
    state: dict[str, torch.Tensor] | None,
    meta: dict[str, Any],
    kwargs: dict[str, Any],
    num_classes: int | None,
    in_chans: int | None,
    img_size: int | None,
) -> tuple[dict[str, Any], int | None, int | None, int | None]:
    """(kwargs, num_classes, in_chans, build size) from a training checkpoint's fields, else the arguments'."""
    if meta:
        if meta["model_name"] != name:
            raise ValueError(
                f"checkpoint {path} is a checkpoint of {quote(meta['model_name'])}, not {name!r}"
            )
        trained = (meta["num_classes"], meta["in_chans"])
        given = (num_classes or trained[0], in_chans or trained[1])
        if given != trained:
            raise ValueError(
                f"checkpoint {path} was trained for {trained[0]} classes / {trained[1]} channels, not {given}"
            )
        return {**meta["model_kwargs"], **kwargs}, trained[0], trained[1], meta["img_size"]
    if state is not None and num_classes is None and "head.weight" in state and state["head.weight"].dim():
        num_classes = int(state["head.weight"].shape[0])
    return kwargs, num_classes, in_chans, img_size


def _load_weights(
    model: nn.Module, name: str, path: Path, state: dict[str, torch.Tensor], trained: bool, use_ema: bool
) -> None:
    """Load a training checkpoint's ``state`` (``trained``) or the official / safetensors file at ``path``."""
    try:
        if trained:
            model.load_state_dict(state)
        elif _is_zoo_model(model):
            model.load_pretrained(str(path), use_ema=use_ema)  # official layout -> resampled biases
        else:
            load_pretrained(model, path, use_ema=use_ema)
    except RuntimeError as err:
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise ValueError(
            f"checkpoint {path} does not fit model {name!r} ({detail[:200]}); pass the matching "
            "model_kwargs / num_classes / in_chans"
        ) from err


def load_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    use_ema: bool = False,
) -> tuple[nn.Module, ModelSpec]:
    """Build a registered timm model (``import agentattn`` registers the agent ones) in eval mode, with weights.

    Args:
        name: registered model name.
        checkpoint: an ``agentattn train`` checkpoint (its recorded model kwargs, classes, channels and image
            size are used; ``name`` must match it), an official ``.pth`` or a ``.safetensors`` file. Official
            agent checkpoints go through the model's ``load_pretrained`` (bias tables resampled to the model's
            resolution); the classifier size comes from the file's ``head.weight`` unless ``num_classes`` is set.
            None: random weights (the official init).
        img_size: resolution of the exported graph; default the checkpoint's (training) or the model's.
        model_kwargs: extra ``timm.create_model`` kwargs, over those a training checkpoint recorded.
        num_classes, in_chans: override the classifier size and the input channels.
        use_ema: load the EMA weights.

    Returns:
        (model, spec).

    Raises:
        ValueError: unknown name, unreadable or mismatching checkpoint, or a bad image size.
    """
    if img_size is not None and (not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1):
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    kwargs = dict(model_kwargs or {})
    state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None:
        state, meta = read_checkpoint(path, use_ema)
    kwargs, num_classes, in_chans, build_size = _build_settings(
        name, path, state, meta, kwargs, num_classes, in_chans, img_size
    )
    args = (name, num_classes or 1000, in_chans or 3, build_size, kwargs)
    if meta:  # the file's fields may describe a model far larger than its weights
        check_model_fits_weights(lambda: _create(*args), state, f"checkpoint {path}")
    model = _create(*args)
    if path is not None and state is not None:
        _load_weights(model, name, path, state, bool(meta), use_ema)
    model.eval()
    cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
    spec = ModelSpec(
        name=name,
        num_classes=int(getattr(model, "num_classes", num_classes or 1000)),
        in_chans=in_chans or 3,
        img_size=img_size or build_size or int(kwargs.get("img_size", cfg_size)),
        model_kwargs={k: v for k, v in kwargs.items() if k != "img_size"},
        checkpoint=None if path is None else str(path),
        data=meta.get("data"),
    )
    return model, spec


def example_input(spec: ModelSpec, batch: int = 2) -> torch.Tensor:
    """A random (batch, in_chans, S, S) image batch for ``spec`` (seeded, so runs repeat)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, generator=gen)


def check_runs(model: nn.Module, spec: ModelSpec) -> None:
    """One eager forward at the export size; ValueError naming ``img_size`` when the model rejects it."""
    try:
        with torch.no_grad():
            out = model(example_input(spec, 1))
    except (ValueError, RuntimeError, AssertionError, IndexError) as err:
        raise ValueError(
            f"img_size {spec.img_size} does not work for {spec.name}: {one_line(err, 300)}"
        ) from err
    if out.shape != (1, spec.num_classes):
        raise ValueError(
            f"{spec.name} at img_size {spec.img_size} returns shape {tuple(out.shape)}, not logits "
            f"(1, {spec.num_classes}); export a classifier"
        )


# ---------------------------------------------------------------------------------------------------------------
# Export.


@contextlib.contextmanager
def folded_agent_biases(model: nn.Module, example: torch.Tensor) -> Iterator[int]:
    """Inside the block, each agent layer returns constant (B1, B2) buffers resolved for ``example``'s grids.

    One eager forward records the biases every :class:`AgentAttentionBase` computes (its own ``biases()``,
    overrides included); they are stored as non-persistent buffers, which ``torch.export`` lifts as constants
    (ONNX initializers). A forward on another grid raises. Yields the number of folded layers; the model is
    restored on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, AgentAttentionBase)]
    seen: dict[AgentAttentionBase, tuple[tuple, tuple, tuple[torch.Tensor, torch.Tensor]]] = {}

    def recorder(layer: AgentAttentionBase):
        original = layer.biases

        def record(key_grid, query_grid):
            biases = original(key_grid, query_grid)
            seen[layer] = (tuple(key_grid), tuple(query_grid), biases)
            return biases

        return record

    for layer in layers:
        layer.biases = recorder(layer)  # instance attribute: shadows the method until deleted
    try:
        with torch.no_grad():
            model(example)
    finally:
        for layer in layers:
            del layer.biases

    def folded(layer: AgentAttentionBase, grids: tuple[tuple, tuple]):
        def biases(key_grid, query_grid):
            if (tuple(key_grid), tuple(query_grid)) != grids:
                raise ValueError(
                    f"biases were folded for (key, query) grids {grids}, got {(key_grid, query_grid)}: "
                    "export at the resolution the example input has"
                )
            return layer._folded_bias1, layer._folded_bias2

        return biases

    try:
        for layer, (key_grid, query_grid, (bias1, bias2)) in seen.items():
            layer.register_buffer("_folded_bias1", bias1.detach().clone(), persistent=False)
            layer.register_buffer("_folded_bias2", bias2.detach().clone(), persistent=False)
            layer.biases = folded(layer, (key_grid, query_grid))
        yield len(seen)
    finally:
        for layer in seen:
            layer.__dict__.pop("biases", None)
            for name in ("_folded_bias1", "_folded_bias2"):
                layer._buffers.pop(name, None)


def export_program(
    model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` on ``example`` (B, C, H, W), agent biases folded.

    With ``dynamic_batch`` the batch axis is symbolic (1 … 4096; the example needs B ≥ 2, since torch.export
    specialises sizes 0 and 1); H and W are fixed to the example's. Returns the program (eval mode, no grad).
    """
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError(f"a dynamic batch needs an example with batch ≥ 2, got shape {tuple(example.shape)}")
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    model.eval()
    with torch.no_grad(), folded_agent_biases(model, example):
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`agentattn.io.atomic_path` with the export checks: a temp path that replaces ``path`` on success.

    Raises:
        ValueError: the directory of ``path`` does not exist, or ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")
    with atomic_path(path) as tmp:
        yield tmp


def export_torch(program: torch.export.ExportedProgram, out: str | os.PathLike) -> Path:
    """Save ``program`` with ``torch.export.save`` to ``out`` (atomically); load it with :func:`load_exported`."""
    with atomic_output(out) as tmp:
        torch.export.save(program, tmp)  # not-atomic: the temp file atomic_output renames into place
    return Path(out)


def export_onnx(
    program: torch.export.ExportedProgram, out: str | os.PathLike, opset: int = DEFAULT_OPSET
) -> Path:
    """Convert ``program`` to ONNX (``torch.onnx.export``, dynamo exporter) and write one file to ``out``.

    Input ``images`` (B, C, H, W) float32, output ``logits`` (B, num_classes); the batch axis is dynamic when
    the program's is. Weights are stored inside the file (models under 2 GB).
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int ≥ {MIN_OPSET}, got {opset!r}")
    with contextlib.redirect_stdout(None):  # the exporter prints its progress
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
        )
    with atomic_output(out) as tmp:
        onnx_program.save(tmp, external_data=False)
    return Path(out)


def load_exported(path: str | os.PathLike) -> nn.Module:
    """``torch.export.load(path).module()``: a callable module running the saved program."""
    return torch.export.load(str(path)).module()
