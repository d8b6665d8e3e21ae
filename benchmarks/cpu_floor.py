"""CPU: what the LoRA linear's extra passes cost when they do no arithmetic at all.

    python benchmarks/cpu_floor.py           # d = k = 1024, r = 8, T = 2048 tokens, fp32, 2 threads

Issue 2 asks for fwd+bwd ≤ 1.10× the frozen base on 2 CPU threads.  This script measures the floor
of designs that run LoRA's work as passes separate from the two big GEMMs.  Each variant below is an
autograd function with the base's two MKL GEMMs; the LoRA products are replaced by plain memory
passes over the same tensors (``t.sum()`` reads t, ``t.add_(1)`` reads and writes it), so the
variants cost what their memory traffic costs and nothing more:

    products  lorakit's design with its real products: u = x Aᵀ, h += s u Bᵀ; v = s g B, ∂B = s gᵀu,
              ∂A = vᵀx, ∂x += v A (the reference for the rows below)
    passes-6  the same six passes, no arithmetic
    passes-4  W' = W + sBA built in forward and kept for backward (d·k memory per layer): read x;
              read g twice, read x
    passes-3  as passes-4 with v and ∂B from one read of g (a fused kernel at best)

Rounds run the variants in random order against the frozen base; the figure is the median of
per-round ratios.  Results and what they mean: benchmarks/RESULTS.md, "Session 4".
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from cpu_lora import CLOCKS, _time, add_layer_args


def _variants(W: torch.Tensor, s: float) -> dict[str, type[torch.autograd.Function]]:
    class Base(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B):
            return x @ W.t()

        @staticmethod
        def backward(ctx, g):
            return g @ W, None, None

    class Products(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B):
            h = x @ W.t()
            u = x @ A.t()
            h.addmm_(u, B.t(), alpha=s)
            ctx.save_for_backward(x, A, B, u)
            return h

        @staticmethod
        def backward(ctx, g):
            x, A, B, u = ctx.saved_tensors
            gx = g @ W
            v = (g @ B).mul_(s)
            gB = (u.t() @ g).mul_(s).t()
            gA = v.t() @ x
            gx.addmm_(v, A)
            return gx, gA, gB

    class Passes6(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B):
            h = x @ W.t()
            x.sum()
            h.add_(1.0)
            ctx.save_for_backward(x, A, B)
            return h

        @staticmethod
        def backward(ctx, g):
            x, A, B = ctx.saved_tensors
            gx = g @ W
            g.sum()
            g.sum()
            x.sum()
            gx.add_(1.0)
            return gx, torch.zeros_like(A), torch.zeros_like(B)

    def merged(g_reads: int) -> type[torch.autograd.Function]:
        class Merged(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, A, B):
                merged_w = W.add(1.0)  # the merge's traffic: read W, write W'
                h = x @ merged_w.t()
                x.sum()
                ctx.save_for_backward(x, A, B, merged_w)
                return h

            @staticmethod
            def backward(ctx, g):
                x, A, B, merged_w = ctx.saved_tensors
                gx = g @ merged_w
                for _ in range(g_reads):
                    g.sum()
                x.sum()
                return gx, torch.zeros_like(A), torch.zeros_like(B)

        return Merged

    return {"frozen base": Base, "products": Products, "passes-6": Passes6, "passes-4": merged(2),
            "passes-3": merged(1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.k, requires_grad=True)
    g = torch.randn(args.tokens, args.d)
    W = torch.randn(args.d, args.k) / args.k**0.5
    A = (torch.randn(args.r, args.k) / args.k**0.5).requires_grad_()
    B = (torch.randn(args.d, args.r) / args.r**0.5).requires_grad_()

    def step(fn):
        def run():
            x.grad = A.grad = B.grad = None
            fn.apply(x, A, B).backward(g)

        return run

    variants = {name: step(fn) for name, fn in _variants(W, 2.0).items()}
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            times[name].append(_time(variants[name], CLOCKS[args.clock]))
    base = times["frozen base"]
    print(f"fwd+bwd, d={args.d}, k={args.k}, r={args.r}, T={args.tokens}, fp32, {args.threads} threads, "
          f"{args.rounds} rounds, {args.clock} clock")
    print(f"{'variant':<12} {'median ms':>10} {'÷ base':>8}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"{name:<12} {1e3 * statistics.median(ts):>10.2f} {ratio:>8.3f}")


if __name__ == "__main__":
    main()
