"""CPU: fwd+bwd of one LoRA linear ÷ the frozen base alone, lorakit vs PEFT, same run.

    python benchmarks/cpu_lora.py            # d = k = 1024, r = 8, T = 2048 tokens, fp32, 2 threads

The frozen base is what LoRA cannot avoid: y = x Wᵀ forward and ∂L/∂x = g W backward (4·T·d·k
FLOPs).  Rounds interleave the variants and the reported figure is the median of per-round ratios,
so background load affects numerator and denominator alike.  Appends a dated line to RESULTS.md
with --record.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import lorakit


class One(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(k, d, bias=False)

    def forward(self, x):
        return self.lin(x)


def _step(model, x, g):
    def run():
        x.grad = None
        model(x).backward(g)

    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def add_layer_args(ap: argparse.ArgumentParser) -> None:
    """The layer shape and timing options, shared with cpu_floor.py."""
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time (needs a quiet machine); cpu: this process's CPU time "
                         "(use with --threads 1 on a loaded machine, where wall time is noise)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap)
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.k, requires_grad=True)
    g = torch.randn(args.tokens, args.d)
    base = One(args.d, args.k).requires_grad_(False)
    variants = {"frozen base": _step(base, x, g)}
    for p in (0.0, 0.05):
        ours = lorakit.inject(One(args.d, args.k), lorakit.LoraConfig(r=args.r, alpha=16, dropout=p, target_modules=["lin"]))
        variants[f"lorakit p={p}"] = _step(ours.train(), x, g)
        try:
            import peft

            theirs = peft.get_peft_model(One(args.d, args.k), peft.LoraConfig(r=args.r, lora_alpha=16, lora_dropout=p,
                                                                              target_modules=["lin"]))
            variants[f"PEFT p={p}"] = _step(theirs.train(), x, g)
        except ImportError:
            pass
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(_time(fn, CLOCKS[args.clock]))
    base_t = times["frozen base"]
    flops = 4 * args.tokens * args.d * args.k
    print(f"fwd+bwd, d=k={args.d}, r={args.r}, T={args.tokens}, fp32, {args.threads} threads, {args.rounds} rounds, "
          f"{args.clock} clock")
    print(f"{'variant':<16} {'median ms':>10} {'÷ base':>8}")
    ratios = {}
    for name, ts in times.items():
        ratios[name] = statistics.median(t / b for t, b in zip(ts, base_t))
        print(f"{name:<16} {1e3 * statistics.median(ts):>10.2f} {ratios[name]:>8.3f}")
    print(f"frozen base: {flops / statistics.median(base_t) / 1e9:.1f} GFLOP/s")
    if args.record:
        line = (
            f"| {datetime.date.today()} | {platform.processor() or platform.machine()}, {args.threads} threads, {args.clock} clock, "
            f"torch {torch.__version__} "
            f"| {1e3 * statistics.median(base_t):.1f} ms | {ratios['lorakit p=0.0']:.3f}× | {ratios['lorakit p=0.05']:.3f}× "
            f"| {ratios.get('PEFT p=0.0', float('nan')):.3f}× | {ratios.get('PEFT p=0.05', float('nan')):.3f}× |\n"
        )
        path = Path(__file__).with_name("RESULTS.md")
        text = path.read_text(encoding="utf-8")
        anchor = "| PEFT p=0 | PEFT p=0.05 |\n|---|---|---|---|---|---|---|\n"  # this benchmark's table
        cut = text.index(anchor) + len(anchor)
        while text[cut:].startswith("| 20"):  # after the rows already there
            cut = text.index("\n", cut) + 1
        path.write_text(text[:cut] + line + text[cut:], encoding="utf-8")
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
