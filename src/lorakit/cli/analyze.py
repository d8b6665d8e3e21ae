"""``lorakit analyze``: what an adapter learned, and which rank it needs."""

from __future__ import annotations

import argparse
from ..jsonfile import dumps
from pathlib import Path

EXAMPLES = """\
examples:
  # spectrum of every module's ΔW = s·BA, per-type summary and a rank suggestion
  lorakit analyze out/r16/adapter
  # also ‖ΔW‖/‖W‖ against the base model's weights, pictures and JSON
  lorakit analyze out/r16/adapter --base models/Qwen2.5-0.5B --plots plots/ --json analysis.json
  # do rank 4 and rank 64 learn the same directions? (LoRA paper, Fig. 3)
  lorakit analyze out/r4/adapter out/r64/adapter --plots plots/

Reading the output: "eff95" is the fewest singular directions holding 95 % of ‖ΔW‖²_F; a type
whose eff95 equals its r is "at ceiling" and may want more rank. The suggestion is a rank_pattern
to paste into adapter_config.json / LoraConfig (α chosen to keep the trained scale s = α/r).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze", help="spectrum of ΔW, subspace overlap between ranks, rank suggestion, plots",
        description="Analyse trained LoRA adapters: singular values of ΔW = s·BA per module, effective and stable "
                    "rank, a per-module-type rank suggestion; with two adapters, the normalised subspace similarity "
                    "φ(i, j) between them.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER",
                        help="adapter directory (or a `lorakit train` output directory holding adapter/); give two to compare them")
    parser.add_argument("--base", metavar="MODEL_DIR", help="base model directory (*.safetensors) for ‖ΔW‖/‖W‖")
    parser.add_argument("--energy", type=float, default=0.95, help="energy share the rank suggestion keeps (default 0.95)")
    parser.add_argument("--side", choices=("input", "output"), default="input",
                        help="compare right (input, the paper's choice) or left (output) singular vectors (default input)")
    parser.add_argument("--plots", metavar="DIR", help="write PNG pictures into DIR")
    parser.add_argument("--json", metavar="FILE", help="write all numbers as JSON to FILE")
    parser.add_argument("--brief", action="store_true", help="omit the per-module table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..analysis import AnalysisError, analyze_adapter, compare_adapters, suggest_ranks
    from ..analysis.report import format_analysis, format_comparison, format_suggestion

    from .inspect import adapter_dir

    if len(args.adapters) > 2:
        raise AnalysisError(f"give one adapter to analyse or two to compare, not {len(args.adapters)}")
    paths = [adapter_dir(path) for path in args.adapters]
    analyses = [analyze_adapter(path, args.base) for path in paths]
    suggestions = [suggest_ranks(a, energy=args.energy) for a in analyses]
    out: dict = {"adapters": []}
    for analysis, suggestion in zip(analyses, suggestions):
        print(format_analysis(analysis, modules=not args.brief and len(analyses) == 1))
        print()
        print(format_suggestion(suggestion))
        print()
        trained_on = analysis.config.base_model_name_or_path if analysis.config is not None else None
        if args.base is None and trained_on and Path(trained_on).is_dir():
            print(f"hint: add --base {trained_on} for ‖ΔW‖/‖W‖ and the amplification factor\n")
        out["adapters"].append({**analysis.to_dict(), "suggestion": suggestion.to_dict()})
    comparison = compare_adapters(*paths, side=args.side) if len(paths) == 2 else None
    if comparison is not None:
        print(format_comparison(comparison))
        out["comparison"] = comparison.to_dict()
    if args.plots:
        from ..analysis import plots

        folder = Path(args.plots)
        written = []
        for i, analysis in enumerate(analyses):
            tag = "" if len(analyses) == 1 else f"_{'ab'[i]}"
            written.append(plots.plot_spectra(analysis, folder / f"spectra{tag}.png"))
            written.append(plots.plot_energy(analysis, folder / f"energy{tag}.png"))
        if comparison is not None:
            written.append(plots.plot_similarity(comparison, folder / "similarity.png"))
        print("\nplots: " + ", ".join(str(p) for p in written))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumps(out, indent=1) + "\n")  # strict JSON: NaN → null
        print(f"json: {args.json}")
    return 0
