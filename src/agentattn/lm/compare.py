"""``agentattn lm compare``: train the twins on one budget, over seeds and with the causal conv on and off, and
evaluate them on the whole validation and test splits at 1×, 2× and 4× the training context.

Each twin gets the same data order (seed), the same number of training tokens and the same architecture except
for the attention mixer; parameter counts must agree within 2 % (per conv setting). A run is one (mixer, conv
kernel, seed); its sub-directory is named ``MIXER[-convK][-seedS]`` (the parts only when more than one value is
compared). The run directory gets ``report.md`` (mean ± standard deviation over seeds), ``results.json``,
``loss_curves.png``, ``speed_vs_context.png`` and the runs' sub-directories (metrics.jsonl, model.safetensors,
result.json). The run holds the directory for its whole life (each run its own sub-directory) and refuses to start
over an earlier comparison's results unless ``overwrite``, which removes those files (nothing else).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io import lock_run_directory
from ..train.record_checks import prepare_output
from .bench import crossover, layer_forward
from .compare_report import _write_outputs, render_report, write_compare_section
from .data import ByteCorpus, random_batch
from .model import ATTN_TYPES, AgentLM, AgentLMConfig
from .train import RUN_FILES, LMTrainConfig, evaluate_bpb, train_lm

# The report's rendering lives in compare_report; its public names stay importable from here.
__all__ = [
    "COMPARE_FILES",
    "EVAL_SPLITS",
    "PARAM_TOLERANCE",
    "check_param_parity",
    "merge_compare",
    "render_report",
    "run_compare",
    "run_name",
    "write_compare_section",
]

PARAM_TOLERANCE = 0.02
# The files a comparison writes: what overwrite removes, and nothing else (the twins' runs for every attention).
COMPARE_FILES = (
    "results.json",
    "report.md",
    "loss_curves.png",
    "speed_vs_context.png",
    *(f"{t}/{name}" for t in ATTN_TYPES for name in RUN_FILES),
)
EVAL_SPLITS = ("val", "test")


def run_name(attn_type: str, conv_kernel: int, seed: int, several_convs: bool, several_seeds: bool) -> str:
    """``MIXER[-convK][-seedS]``: the sub-directory of one run."""
    return (
        attn_type
        + (f"-conv{conv_kernel}" if several_convs else "")
        + (f"-seed{seed}" if several_seeds else "")
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def check_param_parity(params: dict[str, int], tolerance: float = PARAM_TOLERANCE) -> float:
    """Largest relative deviation from the softmax twin; raise ValueError beyond ``tolerance``."""
    ref = params["softmax"]
    worst = max(abs(p - ref) / ref for p in params.values())
    if worst > tolerance:
        raise ValueError(f"parameter counts differ by {worst:.1%} > {tolerance:.0%}: {params}")
    return worst


def _steps_for_budget(
    configs: dict[str, AgentLMConfig],
    corpus: ByteCorpus,
    cfg: LMTrainConfig,
    budget_s: float,
    start: float,
    log: Callable[[str], None],
) -> int:
    """Largest step count <= cfg.steps whose estimated run time fits in ``budget_s`` (from ``start``).

    Times a few training steps and eval forwards of throw-away copies of every twin, then solves
    Σ_twins [steps · t_step + (curve evals + final eval) · t_eval] + speed section <= 85 % of what is left.
    The result is the same for all twins, so they still see the same number of tokens.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = random_batch(corpus.train, cfg.batch_size, cfg.seq_len, gen)
    per_step = per_eval = 0.0
    for c in configs.values():
        model = AgentLM(c)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        per_step += min(times[1:])
        with torch.no_grad():
            t0 = time.perf_counter()
            model(x)
            per_eval += time.perf_counter() - t0
    final_eval_batches = math.ceil(corpus.val.numel() / cfg.seq_len / cfg.batch_size)
    left = 0.85 * (budget_s - (time.perf_counter() - start)) - 60.0  # 60 s for the speed section and plots
    fixed = final_eval_batches * per_eval
    per_train_step = per_step + per_eval * cfg.eval_batches / cfg.eval_every
    steps = int(max(0.0, left - fixed) / per_train_step)
    steps = max(1, min(cfg.steps, steps))
    log(f"time budget {budget_s / 60:.0f} min: {per_step:.2f} s per step of all twins, {per_eval:.2f} s per eval "
        f"batch -> {steps} steps (asked {cfg.steps})")  # fmt: skip
    return steps


def run_compare(
    corpus: ByteCorpus,
    model_cfg: dict[str, Any],
    train_cfg: LMTrainConfig,
    out_dir: Path,
    speed_contexts: list[int],
    attn_types: tuple[str, ...] = ATTN_TYPES,
    log: Callable[[str], None] = print,
    command: str = "",
    speed_budget_s: float = 0.5,
    time_budget_s: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    seeds: tuple[int, ...] = (0,),
    conv_kernels: tuple[int, ...] | None = None,
    context_multiples: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    """Train every (mixer, conv kernel, seed), evaluate, time, and write the report (a tqdm bar per run with
    ``progress``). Returns the results dict.

    Args:
        seeds: each seed draws the initial weights and the data order, the same for every mixer.
        conv_kernels: the causal conv kernels to compare (0 = off); default ``model_cfg["conv_kernel"]`` alone.
        context_multiples: evaluate the whole val and test splits with windows of these multiples of the
            training context (length extrapolation); the models are built with ``max_seq_len`` for the largest.
        time_budget_s: cap the step count (the same for every run) so that the whole comparison fits: see
            :func:`_steps_for_budget`.

    Raises:
        ValueError: bad input, or ``out_dir`` holds an earlier comparison's results (and not ``overwrite``).
        RunDirectoryInUse: another live run holds ``out_dir`` or a run's sub-directory (an ``OSError``).
    """
    convs = tuple(conv_kernels) if conv_kernels else (model_cfg.get("conv_kernel", 4),)
    seeds, multiples = tuple(seeds), tuple(context_multiples)
    for name, values in (("seeds", seeds), ("conv_kernels", convs), ("context_multiples", multiples)):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{name} must be distinct values, at least one, got {values}")
    if any(k < 0 for k in convs) or any(m < 1 for m in multiples):
        raise ValueError(f"conv_kernels must be >= 0 and context_multiples >= 1, got {convs} and {multiples}")
    names = [
        run_name(t, k, s, len(convs) > 1, len(seeds) > 1) for s in seeds for k in convs for t in attn_types
    ]
    files = (*COMPARE_FILES, *(f"{n}/{f}" for n in names for f in RUN_FILES))
    out_dir = Path(out_dir)
    with lock_run_directory(out_dir):  # for the run's whole life
        prepare_output(out_dir, files, overwrite)
        return _run_compare(corpus, model_cfg, train_cfg, out_dir, speed_contexts, attn_types, log, command,
                            speed_budget_s, time_budget_s, progress, seeds, convs, multiples)  # fmt: skip


def _run_compare(
    corpus: ByteCorpus,
    model_cfg: dict[str, Any],
    train_cfg: LMTrainConfig,
    out_dir: Path,
    speed_contexts: list[int],
    attn_types: tuple[str, ...],
    log: Callable[[str], None],
    command: str,
    speed_budget_s: float,
    time_budget_s: float | None,
    progress: bool,
    seeds: tuple[int, ...],
    convs: tuple[int, ...],
    multiples: tuple[int, ...],
) -> dict[str, Any]:
    """The body of :func:`run_compare`, in the locked and prepared ``out_dir``."""
    start = time.perf_counter()
    max_len = train_cfg.seq_len * max(multiples)
    configs = {
        (t, k): AgentLMConfig(attn_type=t, **{**model_cfg, "conv_kernel": k, "max_seq_len": max_len})
        for k in convs
        for t in attn_types
    }
    params, parity = _twin_params(configs, attn_types, convs)
    requested_steps = train_cfg.steps
    if time_budget_s:
        every_run = {f"{key}-{s}": c for key, c in configs.items() for s in seeds}
        train_cfg = replace(
            train_cfg, steps=_steps_for_budget(every_run, corpus, train_cfg, time_budget_s, start, log)
        )
    log(f"parameters: {params} (max deviation {parity:.2%}); {train_cfg.steps} steps of "
        f"{train_cfg.batch_size}x{train_cfg.seq_len} tokens each; {len(configs) * len(seeds)} runs")  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        for k in convs:
            for t in attn_types:
                name = run_name(t, k, seed, len(convs) > 1, len(seeds) > 1)
                log(f"== training {name}")
                torch.manual_seed(
                    seed
                )  # the same initial weights (shared parts) and data order for every mixer
                model = AgentLM(configs[(t, k)])
                result = train_lm(
                    model, corpus, replace(train_cfg, seed=seed), out_dir / name, log, progress=progress
                )
                evals = _evaluate_run(model, corpus, result["val_bpb"], train_cfg.seq_len, multiples)
                log(f"   {name}: " + "  ".join(f"{key} {v:.4f}" for key, v in evals.items()))
                results[name] = {**result, "attn_type": t, "conv_kernel": k, "seed": seed, "eval": evals}
    speed_rows = _speed_rows(speed_contexts, model_cfg, speed_budget_s, log)
    summary = {
        "data": corpus.source,
        "command": command,
        "model_config": model_cfg,
        "train_config": asdict(train_cfg),
        "requested_steps": requested_steps,
        "time_budget_s": time_budget_s,
        "seeds": list(seeds),
        "conv_kernels": list(convs),
        "context_multiples": list(multiples),
        "params": params,
        "param_max_deviation": parity,
        **_run_tables(results, attn_types, convs),
        "speed": speed_rows,
        "speed_crossover_context": crossover(speed_rows, "agent_ms", "softmax_ms") if speed_rows else None,
        "threads": torch.get_num_threads(),
        "wall_time_s": time.perf_counter() - start,
    }
    _write_outputs(out_dir, summary, results)
    log(f"report: {out_dir / 'report.md'} ({summary['wall_time_s'] / 60:.1f} min)")
    return summary


def _twin_params(
    configs: dict[tuple[str, int], AgentLMConfig], attn_types: tuple[str, ...], convs: tuple[int, ...]
) -> tuple[dict[str, int], float]:
    """Parameter count of every (mixer, conv) twin and the largest deviation from the softmax twin (checked)."""
    params = {
        run_name(t, k, 0, len(convs) > 1, False): AgentLM(c).num_params() for (t, k), c in configs.items()
    }
    parity = 0.0
    if "softmax" in attn_types:
        for k in convs:
            group = {t: params[run_name(t, k, 0, len(convs) > 1, False)] for t in attn_types}
            parity = max(parity, check_param_parity(group))
    return params, parity


def _evaluate_run(
    model: AgentLM, corpus: ByteCorpus, val_bpb: float, seq_len: int, multiples: tuple[int, ...]
) -> dict[str, float]:
    """Bits per byte of one trained run on the whole val and test splits at every context multiple."""
    evals = {}
    for split in EVAL_SPLITS:
        for m in multiples:
            if split == "val" and m == 1:
                evals["val@1x"] = val_bpb  # train_lm's final eval: the same windows
                continue
            tokens = corpus.split(split)
            evals[f"{split}@{m}x"] = evaluate_bpb(model, tokens, seq_len * m, batch_size=8)
    return evals


def _speed_rows(
    speed_contexts: list[int], model_cfg: dict[str, Any], speed_budget_s: float, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """One-layer forward time of every mixer at each context (none without ``speed_contexts``)."""
    speed_rows: list[dict[str, Any]] = []
    if speed_contexts:
        log(f"== speed vs context {speed_contexts}")
        speed_rows = layer_forward(
            speed_contexts,
            model_cfg.get("d_model", 128),
            model_cfg.get("n_heads", 4),
            budget_s=speed_budget_s,
            **{k: model_cfg[k] for k in ("agent_num", "chunk_size", "conv_kernel") if k in model_cfg},
        )
    return speed_rows


def _run_tables(
    results: dict[str, dict[str, Any]], attn_types: tuple[str, ...], convs: tuple[int, ...]
) -> dict[str, Any]:
    """The per-run figures, the (mixer, conv) table of mean ± std over seeds, and the quality goal."""
    table = {}  # (mixer, conv) -> eval key -> (mean, std) over seeds
    for k in convs:
        for t in attn_types:
            runs = [r for r in results.values() if r["attn_type"] == t and r["conv_kernel"] == k]
            table[f"{t}|{k}"] = {key: _mean_std([r["eval"][key] for r in runs]) for key in runs[0]["eval"]}
    out: dict[str, Any] = {
        "tokens": {n: r["tokens"] for n, r in results.items()},
        "val_bpb": {n: r["val_bpb"] for n, r in results.items()},
        "eval": {n: r["eval"] for n, r in results.items()},
        "train_time_s": {n: r["train_time_s"] for n, r in results.items()},
        "table": {key: {e: list(v) for e, v in row.items()} for key, row in table.items()},
    }
    if {"agent", "softmax", "linear"} <= set(attn_types):
        mean = {t: table[f"{t}|{convs[0]}"]["val@1x"][0] for t in attn_types}
        out["agent_over_softmax"] = mean["agent"] / mean["softmax"]
        baselines = [t for t in ("linear", "retention") if t in mean]
        out["quality_pass"] = bool(
            out["agent_over_softmax"] <= 1.0 and all(mean["agent"] < mean[t] for t in baselines)
        )
    return out


# What must agree between comparisons that are merged (the seed is what differs).
_MERGE_SAME = ("data", "model_config", "conv_kernels", "context_multiples", "params")


def merge_compare(
    paths: list[Path], out_dir: Path, overwrite: bool = False, command: str = ""
) -> dict[str, Any]:
    """Merge the ``results.json`` of comparisons run with different seeds (one machine after another, or several
    machines) into one comparison over all their seeds: the same report, table (mean ± std over every seed) and
    ``results.json`` as one ``lm compare --seeds ...`` run would write into ``out_dir``.

    The files are data: each must be a JSON object with the fields a comparison writes, with finite numbers, and
    they must agree on the data, the model and training configuration (but the seed), the conv kernels, the context
    multiples, the parameter counts and the mixers; their seeds must not overlap.

    Raises:
        ValueError: a file that is not such a comparison, disagreeing files, or overlapping seeds.
    """
    if len(paths) < 2:
        raise ValueError(f"merge needs at least two results.json files, got {len(paths)}")
    loaded = [_load_results(Path(p)) for p in paths]
    first = loaded[0]
    for path, other in zip(paths[1:], loaded[1:], strict=True):
        for key in _MERGE_SAME:
            if other[key] != first[key]:
                raise ValueError(
                    f"{path}: {key} differs from {paths[0]}'s: cannot merge different comparisons"
                )
        if _without_seed(other["train_config"]) != _without_seed(first["train_config"]):
            raise ValueError(f"{path}: train_config differs (other than the seed) from {paths[0]}'s")
    seeds = [s for r in loaded for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the files share seeds ({seeds}): each seed must come from one file only")
    convs = tuple(first["conv_kernels"])
    attn_types = tuple(dict.fromkeys(_run_of(n, first)[0] for n in first["eval"]))
    results: dict[str, dict[str, Any]] = {}
    for path, r in zip(paths, loaded, strict=True):
        if tuple(dict.fromkeys(_run_of(n, r)[0] for n in r["eval"])) != attn_types:
            raise ValueError(f"{path}: compares other mixers than {paths[0]}")
        for name in r["eval"]:
            t, k, seed = _run_of(name, r)
            results[run_name(t, k, seed, len(convs) > 1, True)] = {
                "attn_type": t, "conv_kernel": k, "seed": seed, "eval": r["eval"][name],
                "val_bpb": r["val_bpb"][name], "tokens": r["tokens"][name], "train_time_s": r["train_time_s"][name],
                "history": r.get("history", {}).get(name, []),
            }  # fmt: skip
    order = {s: i for i, s in enumerate(sorted(seeds))}
    results = dict(sorted(results.items(), key=lambda kv: order[kv[1]["seed"]]))
    summary = {
        **{key: first[key] for key in ("data", "model_config", "requested_steps", "time_budget_s")},
        "command": command,
        "merged_from": [r.get("command", "") for r in loaded],
        "train_config": {**first["train_config"], "seed": sorted(seeds)[0]},
        "seeds": sorted(seeds),
        "conv_kernels": list(convs),
        "context_multiples": first["context_multiples"],
        "params": first["params"],
        "param_max_deviation": max(r["param_max_deviation"] for r in loaded),
        **_run_tables(results, attn_types, convs),
        "speed": next((r["speed"] for r in loaded if r.get("speed")), []),
        "threads": first["threads"],
        "wall_time_s": sum(r["wall_time_s"] for r in loaded),
    }
    summary["speed_crossover_context"] = (
        crossover(summary["speed"], "agent_ms", "softmax_ms") if summary["speed"] else None
    )
    out_dir = Path(out_dir)
    with lock_run_directory(out_dir):
        prepare_output(out_dir, COMPARE_FILES, overwrite)
        _write_outputs(out_dir, summary, results)
    return summary


def _without_seed(train_config: dict[str, Any]) -> dict[str, Any]:
    """``train_config`` without its seed: what merged comparisons must share."""
    return {k: v for k, v in train_config.items() if k != "seed"}


def _run_of(name: str, results: dict[str, Any]) -> tuple[str, int, int]:
    """(mixer, conv kernel, seed) of a run name in one comparison's results."""
    convs, seeds = results["conv_kernels"], results["seeds"]
    for seed in seeds:
        for k in convs:
            for t in ATTN_TYPES:
                if run_name(t, k, seed, len(convs) > 1, len(seeds) > 1) == name:
                    return t, k, seed
    raise ValueError(f"run {name!r} is not a run of this comparison (conv kernels {convs}, seeds {seeds})")


def _load_results(path: Path) -> dict[str, Any]:
    """One comparison's results.json, checked field by field (a file is data, never trusted)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({type(err).__name__})") from None
    fields = {"data": str, "model_config": dict, "train_config": dict, "seeds": list, "conv_kernels": list,
              "context_multiples": list, "params": dict, "eval": dict, "val_bpb": dict, "tokens": dict,
              "train_time_s": dict, "param_max_deviation": float, "threads": int, "wall_time_s": float}  # fmt: skip
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an lm compare results.json (a JSON object)")
    for key, kind in fields.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise ValueError(
                f"{path}: not an lm compare results.json ({key!r} missing or not a {kind.__name__})"
            )
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in data["seeds"] + data["conv_kernels"]):
        raise ValueError(f"{path}: seeds and conv_kernels must be integers")
    for name, evals in data["eval"].items():
        try:
            _run_of(name, data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        values = [*evals.values(), data["val_bpb"].get(name), data["train_time_s"].get(name)]
        if not isinstance(evals, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ValueError(f"{path}: run {name!r} has a missing or non-finite figure")
        if not isinstance(data["tokens"].get(name), int):
            raise ValueError(f"{path}: run {name!r} has no token count")
    history = data.get("history", {})
    points = (
        [r for runs in history.values() for r in (runs if isinstance(runs, list) else [None])]
        if isinstance(history, dict)
        else []
    )
    if not isinstance(history, dict) or not all(
        isinstance(r, dict) and all(isinstance(r.get(k), int | float) for k in ("tokens", "train_bpb"))
        for r in points
    ):
        raise ValueError(
            f"{path}: 'history' must map each run to a list of {{tokens, train_bpb, ...}} points"
        )
    return data
