"""``agentattn lm {train,eval,sample,compare,merge,mqar,bench}``: byte-level language modelling with causal agent
attention.

agentattn lm train --attn agent [--data kjv|textfile:PATH] [--steps N] [--output DIR] [--overwrite]
agentattn lm eval --checkpoint DIR/model.safetensors [--split val|test]
agentattn lm sample --checkpoint FILE --prompt TEXT [--max-new-tokens N] [--temperature T]
agentattn lm compare [--data ...] [--output runs/<timestamp>] [--overwrite]   (every twin, report.md)
agentattn lm merge A/results.json B/results.json --output DIR  (comparisons of other seeds, as one)
agentattn lm mqar [--d-model 64 128 256] --output DIR           (multi-query associative recall)
agentattn lm bench [--json FILE]                             (speed figures: layer forward, decode, state size)

A run directory (``--output``, also ``--out``) belongs to one live run; an earlier run's results in it are only replaced with
``--overwrite``. Bad input ends with one ``agentattn lm: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..io import one_line
from ..lm.data import ByteCorpus
from ..lm.model import ATTN_TYPES, POSITIONS, AgentLM, AgentLMConfig
from ..lm.train import LMTrainConfig, evaluate_bpb, train_lm
from .options import device_option

# The default `compare`: 1,250 steps × 16 × 256 bytes = 5.1 M training bytes per run, every mixer × conv on/off ×
# 3 seeds, evaluated at 1×, 2× and 4× the context. About 7-9 min per run on 2 CPU cores: 24 runs, some 3-4 hours.
# --seeds 0 --conv-kernels 4 --context-multiples 1 --time-budget-min 18 gives the quick one-seed report.
COMPARE_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256}
COMPARE_TRAIN = {
    "steps": 1250,
    "batch_size": 16,
    "seq_len": 256,
    "lr": 3e-3,
    "warmup_steps": 50,
    "eval_every": 125,
}
COMPARE_SPEED_CONTEXTS = [256, 1024, 4096, 8192]
COMPARE_TIME_BUDGET_MIN = 0.0
COMPARE_SEEDS = [0, 1, 2]
COMPARE_CONTEXT_MULTIPLES = [1, 2, 4]


def _add_agent_num(p: argparse.ArgumentParser) -> None:
    help_text = "agent tokens per head (agent only; --num-agents is its old name)"
    p.add_argument("--agent-num", "--num-agents", dest="agent_num", type=int, default=16, help=help_text)


def _add_model_args(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    p.add_argument("--d-model", type=int, default=defaults.get("d_model", 128))
    p.add_argument("--n-layers", type=int, default=defaults.get("n_layers", 4))
    p.add_argument("--n-heads", type=int, default=defaults.get("n_heads", 4))
    _add_agent_num(p)
    p.add_argument(
        "--chunk-size", type=int, default=32, help="chunk C: the agent's exact window of C..2C tokens"
    )
    p.add_argument(
        "--conv-kernel", type=int, default=4, help="causal depthwise conv on V, 0 = off (every mixer)"
    )
    p.add_argument(
        "--positions", choices=POSITIONS, default="rope", help="softmax: rotary embeddings, or none (NoPE)"
    )
    p.add_argument(
        "--window-positions",
        choices=POSITIONS,
        default="rope",
        help="agent: rotary embeddings on the exact-window logits only (the agent logits stay position-free)",
    )


def _add_train_args(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    p.add_argument("--data", default="kjv", help="kjv (Debian bible-kjv, default) or textfile:PATH")
    p.add_argument("--cache-dir", default=None, help="where the extracted KJV text is cached")
    p.add_argument("--steps", type=int, default=defaults.get("steps", 1000))
    p.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 16))
    p.add_argument("--seq-len", type=int, default=defaults.get("seq_len", 256))
    p.add_argument("--lr", type=float, default=defaults.get("lr", 3e-3))
    p.add_argument("--warmup-steps", type=int, default=defaults.get("warmup_steps", 50))
    p.add_argument("--eval-every", type=int, default=defaults.get("eval_every", 100))
    p.add_argument(
        "--eval-batches",
        type=int,
        default=defaults.get("eval_batches", 8),
        help="val batches per curve point",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def _add_train_command(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("train", formatter_class=fmt, help="train one model, report val bits per byte")
    p.add_argument("--attn", choices=ATTN_TYPES, required=True)
    _add_model_args(p, {})
    _add_train_args(p, {})
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda:LOCAL_RANK when CUDA is there, else cpu), cpu, cuda, cuda:N",
    )
    p.add_argument("--output", "--out", dest="out", help="run directory (default runs/lm/<attn>-<timestamp>)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --output"
    )


def _add_eval_command(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("eval", formatter_class=fmt, help="bits per byte of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="kjv")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--split", choices=["train", "val", "test"], default="val")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default max_seq_len)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)


def _add_sample_command(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("sample", formatter_class=fmt, help="stream a continuation of a prompt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


def _add_compare_command(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "compare",
        formatter_class=fmt,
        help="train every twin (x conv on/off x seeds) on one budget, evaluate val/test at 1x/2x/4x context",
    )
    _add_model_args(p, COMPARE_MODEL)
    _add_train_args(p, COMPARE_TRAIN)
    p.add_argument(
        "--output", "--out", dest="out", default=None, help="run directory (default runs/<timestamp>)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --output"
    )
    p.add_argument("--speed-contexts", type=int, nargs="*", default=COMPARE_SPEED_CONTEXTS)
    p.add_argument("--speed-budget-s", type=float, default=0.5, help="timing budget per speed point")
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=COMPARE_TIME_BUDGET_MIN,
        help="cap --steps (equally for all runs) so that the comparison fits in this many minutes; 0 = no cap",
    )
    p.add_argument(
        "--attn", nargs="+", choices=ATTN_TYPES, default=list(ATTN_TYPES), help="the mixers compared"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=COMPARE_SEEDS, help="weights and data order per seed"
    )
    p.add_argument(
        "--conv-kernels", type=int, nargs="+", default=None,
        help="the causal conv kernels compared (0 = off); default: --conv-kernel, and 0",
    )  # fmt: skip
    p.add_argument(
        "--context-multiples", type=int, nargs="+", default=COMPARE_CONTEXT_MULTIPLES,
        help="evaluate val and test with windows of these multiples of --seq-len",
    )  # fmt: skip
    p.add_argument(
        "--section", default=None, help="also write a `bench report` section JSON (for BENCHMARKS.md)"
    )


def _add_merge_command(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "merge",
        formatter_class=fmt,
        help="merge lm compare results.json files run with different seeds into one comparison",
    )
    p.add_argument("results", nargs="+", help="results.json of each comparison (the same but for the seeds)")
    p.add_argument("--output", "--out", dest="out", required=True, help="where the merged report goes")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier merge in --output"
    )
    p.add_argument(
        "--section", default=None, help="also write a `bench report` section JSON (for BENCHMARKS.md)"
    )


def _add_bench_command(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="speed figures: layer forward, decode latency, state size, crossover",
    )
    p.add_argument("--layer-contexts", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=4, help="layers of the decode model")
    _add_agent_num(p)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--conv-kernel", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=2.0, help="timing budget per point")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--section", default=None, help="also write a `bench report` section JSON")


def _add_mqar_command(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "mqar",
        formatter_class=fmt,
        help="multi-query associative recall (Zoology): accuracy against d_model per mixer",
    )
    p.add_argument("--attn", nargs="+", choices=ATTN_TYPES, default=list(ATTN_TYPES))
    p.add_argument("--d-model", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--agents", nargs="+", default=["16x32"], metavar="NxC", help="agent runs: n agents x chunk C each"
    )
    p.add_argument("--conv-kernel", type=int, default=4, help="causal conv on V of every mixer, 0 = off")
    p.add_argument("--output", "--out", dest="out", default="runs/mqar", help="writes mqar.json and mqar.png")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lm_command", required=True)
    for add_command in (
        _add_train_command,
        _add_eval_command,
        _add_sample_command,
        _add_compare_command,
        _add_merge_command,
        _add_bench_command,
        _add_mqar_command,
    ):
        add_command(sub, parser.formatter_class)


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "agent_num": args.agent_num,
        "chunk_size": args.chunk_size,
        "conv_kernel": args.conv_kernel,
        "positions": args.positions,
        "window_positions": args.window_positions,
        "max_seq_len": args.seq_len,
    }


def _train_config(args: argparse.Namespace) -> LMTrainConfig:
    return LMTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        seed=args.seed,
    )


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    """One model; under torchrun every rank runs this, and rank 0 alone prints and writes."""
    master = os.environ.get("RANK", "0") == "0"
    cfg = AgentLMConfig(attn_type=args.attn, **_model_kwargs(args))
    train_cfg = _train_config(args)
    corpus = ByteCorpus.load(args.data, args.cache_dir, min_split=2)
    out = Path(args.out) if args.out else Path("runs") / "lm" / f"{args.attn}-{_stamp()}"
    device = device_option(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = AgentLM(cfg).to(device)
    if master:
        _log(
            f"{args.attn}: {model.num_params():,} params, data {args.data} "
            f"({corpus.train.numel():,} train bytes), device {device}"
        )
    result = train_lm(
        model, corpus, train_cfg, out, _log, overwrite=args.overwrite, progress=not args.no_progress
    )
    if master:
        print(f"val bpb {result['val_bpb']:.4f}  checkpoint {out / 'model.safetensors'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    model = AgentLM.load(args.checkpoint)
    corpus = ByteCorpus.load(args.data, args.cache_dir)
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len < 1 or seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, {model.config.max_seq_len}], got {seq_len}")
    bpb = evaluate_bpb(
        model,
        corpus.split(args.split),
        seq_len,
        args.batch_size,
        args.max_batches,
        progress=not args.no_progress,
    )
    print(f"{args.split} bpb {bpb:.4f}  ({model.config.attn_type}, {args.data})")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    model = AgentLM.load(args.checkpoint)
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise ValueError("--prompt must not be empty")
    if len(prompt) > model.config.max_seq_len:
        raise ValueError(
            f"--prompt has {len(prompt)} bytes, more than max_seq_len = {model.config.max_seq_len}"
        )
    idx = torch.tensor([list(prompt)], dtype=torch.long)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def emit(token: torch.Tensor) -> None:
        sys.stdout.write(decoder.decode(bytes([int(token[0])])))
        sys.stdout.flush()

    gen = torch.Generator().manual_seed(args.seed)
    model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, gen, callback=emit)
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..lm.compare import run_compare

    corpus = ByteCorpus.load(args.data, args.cache_dir, min_split=2)
    out = Path(args.out) if args.out else Path("runs") / _stamp()
    from_cli = sys.argv[1:2] == ["lm"]
    command = "agentattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if from_cli else ""
    summary = run_compare(
        corpus,
        _model_kwargs(args),
        _train_config(args),
        out,
        args.speed_contexts,
        log=_log,
        command=command,
        speed_budget_s=args.speed_budget_s,
        attn_types=tuple(args.attn),
        time_budget_s=args.time_budget_min * 60 or None,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        seeds=tuple(args.seeds),
        conv_kernels=tuple(args.conv_kernels or dict.fromkeys([args.conv_kernel, 0])),
        context_multiples=tuple(args.context_multiples),
    )
    if args.section:
        from ..lm.compare import write_compare_section
        from ..measure import environment

        write_compare_section(args.section, summary, environment(args.threads))
    for t, bpb in summary["val_bpb"].items():
        print(f"{t:8s} val bpb {bpb:.4f}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..lm.compare import merge_compare

    from_cli = sys.argv[1:2] == ["lm"]
    command = "agentattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if from_cli else ""
    summary = merge_compare([Path(p) for p in args.results], Path(args.out), args.overwrite, command)
    if args.section:
        from ..lm.compare import write_compare_section
        from ..measure import environment

        write_compare_section(args.section, summary, environment(summary["threads"]))
    print(f"merged seeds {summary['seeds']} into {Path(args.out) / 'report.md'}")
    return 0


def _agent_grid(items: list[str]) -> list[tuple[int, int]]:
    grid = []
    for item in items:
        n, sep, c = item.partition("x")
        if not (sep and n.isdigit() and c.isdigit() and int(n) > 0 and int(c) > 0):
            raise ValueError(f"--agents takes NxC pairs of positive ints (e.g. 16x32), got {item!r}")
        grid.append((int(n), int(c)))
    return grid


def _cmd_mqar(args: argparse.Namespace) -> int:
    from ..lm.mqar import MQARConfig, run_mqar

    base = MQARConfig(
        n_layers=args.n_layers, n_heads=args.n_heads, seq_len=args.seq_len, num_pairs=args.pairs,
        vocab_size=args.vocab_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        eval_examples=args.eval_examples, seed=args.seed, model={"conv_kernel": args.conv_kernel},
        device=args.device,
    )  # fmt: skip
    rows = run_mqar(args.attn, args.d_model, base, Path(args.out), _agent_grid(args.agents), log=_log)
    print(f"wrote {Path(args.out) / 'mqar.json'} ({len(rows)} runs)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..lm.bench import run_benchmark

    result = run_benchmark(
        args.layer_contexts, args.decode_contexts, args.d_model, args.n_heads, args.n_layers, args.threads,
        args.budget_s, agent_num=args.agent_num, chunk_size=args.chunk_size, conv_kernel=args.conv_kernel,
    )  # fmt: skip
    for r in result["layer_forward"]:
        print(f"layer T={r['context']:6d}  agent {r['agent_ms']:9.2f} ms  softmax {r['softmax_ms']:9.2f} ms  "
              f"linear {r['linear_ms']:9.2f} ms  softmax/agent {r['agent_speedup_vs_softmax']:.2f}x")  # fmt: skip
    for r in result["decode"]:
        print(f"decode ctx={r['context']:6d}  agent {r['agent_ms_per_token']:.3f} ms/tok  softmax "
              f"{r['softmax_ms_per_token']:.3f} ms/tok  linear {r['linear_ms_per_token']:.3f}  agent/softmax "
              f"{r['agent_latency_ratio_vs_softmax']:.3f}  KV/agent state {r['softmax_kv_over_agent_state']:.1f}x")  # fmt: skip
    print(f"crossover: layer forward T ~ {result['crossover_context_layer_forward']}, "
          f"decode context ~ {result['crossover_context_decode']}")  # fmt: skip
    if args.json:
        from ..io import atomic_write_text

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=1))
        print(f"wrote {path}")
    if args.section:
        from ..bench.section import write_section
        from ..lm.bench import section_markdown, speed_goals
        from ..measure import command_line, environment

        command = command_line("lm", "bench")
        write_section(args.section, "Causal agent attention (language modelling)", command,
                      environment(args.threads), section_markdown(result), speed_goals(result))  # fmt: skip
    return 0


HANDLERS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "sample": _cmd_sample,
    "compare": _cmd_compare,
    "merge": _cmd_merge,
    "bench": _cmd_bench,
    "mqar": _cmd_mqar,
}


def run(args: argparse.Namespace) -> int:
    """Dispatch; return 0, or 1 with one line on stderr for bad input."""
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return HANDLERS[args.lm_command](args)
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        print(f"agentattn lm: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agentattn lm: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn lm", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
