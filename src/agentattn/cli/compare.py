"""``agentattn compare``: train the agent, softmax and linear twins on Fashion-MNIST; write a report.

This is what ``make run`` runs. The default budget (5 epochs per twin) finishes in about a quarter of an hour
on 2 CPU cores; ``--epochs E`` or ``--full`` (30 epochs) run longer. The output directory belongs to one live
run; an earlier comparison's results in it are only replaced with ``--overwrite``. Bad input ends with one
``agentattn compare: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from ..report.compare import COMPARE_MODEL_KWARGS, FULL_EPOCHS, TWINS, CompareConfig, compare, results_table
from .train import parse_model_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``compare`` options."""
    defaults = CompareConfig()
    add = parser.add_argument
    add("--output", default=None, help="report directory (default runs/<timestamp>)")
    add("--overwrite", action="store_true", help="replace the results of an earlier comparison in OUTPUT")
    add("--data", default=defaults.data, help="fashion-mnist (default) or fashion-mnist:DIR")
    add("--model", default=defaults.model, help="a model with a per-stage attn_type (default %(default)s)")
    add(
        "--model-kwargs",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help=f"override the architecture (default {COMPARE_MODEL_KWARGS})",
    )
    add(
        "--twins", nargs="+", default=list(defaults.twins), choices=sorted(TWINS), help="which twins to train"
    )
    add("--epochs", type=int, default=defaults.epochs, help="epochs per twin (default %(default)s)")
    add("--full", action="store_true", help=f"the long run: {FULL_EPOCHS} epochs per twin")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--seed", type=int, default=defaults.seed)
    add("--train-subset", type=int, default=None, help="train on N images (quick looks and tests)")
    add("--eval-subset", type=int, default=None, help="evaluate on N test images")
    add("--max-steps", type=int, default=0, help="stop each twin after this many steps (smoke tests)")
    add("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add("--explain-images", type=int, default=defaults.explain_images, help="test images to draw agents for")
    add("--no-progress", dest="progress", action="store_false")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned for a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the comparison; print the table and the report path. 0, or 1 with one line on stderr."""
    try:
        kwargs = dict(COMPARE_MODEL_KWARGS)
        kwargs.update(parse_model_kwargs(args.model_kwargs))
        config = CompareConfig(
            output=args.output,
            data=args.data,
            model=args.model,
            model_kwargs=kwargs,
            twins=tuple(args.twins),
            epochs=args.epochs,
            full=args.full,
            batch_size=args.batch_size,
            seed=args.seed,
            train_subset=args.train_subset,
            eval_subset=args.eval_subset,
            max_steps=args.max_steps,
            threads=args.threads,
            explain_images=args.explain_images,
            progress=args.progress,
            overwrite=args.overwrite,
        )
        results, output = compare(config)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"agentattn compare: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print()
    print(format_table(*results_table(results, config)))
    print(f"\nreport: {output / 'report.html'} (and report.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
