"""``lorakit sweep``: the same training at several ranks (and α); metric against trainable parameters."""

from __future__ import annotations

import argparse
from ..jsonfile import dumps
from pathlib import Path

EXAMPLES = """\
examples:
  # ranks 1..64 at α = 2r on the offline code-search demo; everything after -- goes to every
  # `lorakit train` run unchanged
  lorakit sweep --ranks 1 2 4 8 16 32 64 --alpha-ratio 2 --metric mrr --out sweeps/code-search \\
      -- --task code-search --max-steps 300 --seed 0
  # two fixed α values at each rank
  lorakit sweep --ranks 4 16 64 --alphas 16 64 --metric accuracy --out sweeps/cls \\
      -- --task classification --model ./bert-base --data reviews.jsonl --epochs 3
  # only plot runs trained before (any `lorakit train --out` directories)
  lorakit sweep --collect runs/r4 runs/r16 runs/r64 --metric eval_loss --plots plots/

Each run lands in OUT/r{R}-a{A}/ (adapter/, metrics.json, train.log); runs with a metrics.json are
reused, so an interrupted sweep continues. The knee is the cheapest run within --tolerance (1 %)
of the best. Afterwards, `lorakit analyze OUT/r4-a8/adapter OUT/r64-a128/adapter` shows whether
the small rank learned the large one's directions.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep", help="train at several ranks / α and plot metric vs trainable parameters",
        description="Run `lorakit train` once per (r, α) with the same arguments, collect each run's final metric "
                    "from its metrics.json, and show metric against trainable parameters with the knee marked.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ranks", type=int, nargs="+", metavar="R", help="ranks to train, e.g. 2 4 8 16")
    alpha = parser.add_mutually_exclusive_group()
    alpha.add_argument("--alphas", type=float, nargs="+", metavar="A", help="α values, each tried at every rank")
    alpha.add_argument("--alpha-ratio", type=float, metavar="X", help="α = X·r at each rank (e.g. 2)")
    parser.add_argument("--metric", required=True, help="final eval metric to compare (a key of metrics.json's 'after')")
    parser.add_argument("--lower-is-better", dest="lower", action="store_true", default=None,
                        help="lower metric is better (default: guessed from the name: loss/ppl/error → lower)")
    parser.add_argument("--higher-is-better", dest="lower", action="store_false")
    parser.add_argument("--tolerance", type=float, default=0.01, help="knee: within this relative gap of the best (0.01)")
    parser.add_argument("--out", metavar="DIR", help="sweep directory; one sub-directory per run")
    parser.add_argument("--collect", nargs="+", metavar="RUN_DIR", help="do not train: read these finished run directories")
    parser.add_argument("--force", action="store_true", help="re-train runs that already have metrics.json")
    parser.add_argument("--plots", metavar="DIR", help="write sweep.png into DIR (default: the sweep directory)")
    parser.add_argument("--json", metavar="FILE", help="write the runs and the knee as JSON")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_ARGS",
                        help="arguments for every `lorakit train` run, after --")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..analysis import AnalysisError, collect_runs, run_sweep, sweep_grid
    from ..analysis.plots import plot_sweep
    from ..analysis.report import table

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.collect:
        result = collect_runs(args.collect, metric=args.metric, lower=args.lower, tolerance=args.tolerance)
    else:
        if not args.ranks or not args.out:
            raise AnalysisError("a sweep needs --ranks and --out (or --collect RUN_DIR... to read finished runs)")
        if not train_args:
            raise AnalysisError("give the `lorakit train` arguments after --, e.g. -- --task code-search --max-steps 300")
        grid = sweep_grid(args.ranks, args.alphas, args.alpha_ratio)
        result = run_sweep(train_args, grid, args.out, metric=args.metric, lower=args.lower,
                           tolerance=args.tolerance, force=args.force)
    rows = [[run.r, run.alpha, run.trainable_parameters, run.value, str(run.out)]
            for run in sorted(result.runs, key=lambda run: (run.trainable_parameters, run.alpha or 0))]
    print(table(["r", "α", "trainable", args.metric, "run"], rows))
    print("\n" + result.conclusion())
    plots = args.plots or args.out
    if plots:
        print(f"plot: {plot_sweep(result, Path(plots) / 'sweep.png')}")
    if args.json:
        Path(args.json).write_text(dumps(result.to_dict(), indent=1) + "\n")  # strict JSON: NaN → null
        print(f"json: {args.json}")
    return 0
