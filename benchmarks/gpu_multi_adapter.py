"""Mixed-adapter batches on one GPU: lorakit's segmented kernels vs PEFT's adapter_names loop.

The case of issue 5: 8 stacked 4096×4096 bf16 linears, r = 16, inference, each sample its own adapter.

    prefill: 32 samples × 128 tokens with 1, 8 and 32 distinct adapters
    decode:  64 samples × 1 token with 64 distinct adapters

Measured in the same run: the base model alone, lorakit (``batch_adapters``; eager and replayed as a
CUDA graph), lorakit's ordinary single-adapter path, and PEFT's mixed batch (``adapter_names=``,
PEFT's default adapter dtype). Every output is first checked against a float32 per-sample reference.
Medians of ``triton.testing.do_bench``. Writes JSON to $OUT (or the current directory).

    PYTHONPATH=src python benchmarks/gpu_multi_adapter.py
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import lorakit  # noqa: E402
from lorakit.mixed_batch import batch_adapters  # noqa: E402

D = int(os.environ.get("BENCH_D", 4096))  # BENCH_D / BENCH_DEVICE: a small CPU smoke run of this script
LAYERS, R, ALPHA = 8, 16, 32
N_ADAPTERS = 64
DT = torch.bfloat16
DEV = os.environ.get("BENCH_DEVICE", "cuda")


def build_base() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(D, D, bias=False) for _ in range(LAYERS)])
    with torch.no_grad():
        for m in model:
            m.weight.normal_(0, D**-0.5)  # keeps activations O(1) through the stack
    return model.to(DEV, DT).eval()


def adapter_weights():
    g = torch.Generator(device=DEV).manual_seed(1)
    # ΔW = s·BA with s = 2 is about 0.2 of W per layer: large enough that a wrong adapter shows
    return {
        f"a{i}": [
            (torch.randn(R, D, device=DEV, generator=g) * D**-0.5, torch.randn(D, R, device=DEV, generator=g) * 0.1 * R**-0.5)
            for _ in range(LAYERS)
        ]
        for i in range(N_ADAPTERS)
    }


def build_lorakit(base, weights):
    model = copy.deepcopy(base)
    targets = [str(i) for i in range(LAYERS)]
    for name in weights:
        lorakit.inject(model, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules=targets), name)
    with torch.no_grad():
        for (qualified, layer) in lorakit.lora_layers(model):
            for name, per_layer in weights.items():
                A, B = per_layer[int(qualified)]
                layer.lora_A[name].copy_(A)
                layer.lora_B[name].copy_(B)
    return model.eval()


def build_peft(base, weights):
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[str(i) for i in range(LAYERS)], init_lora_weights=False)
    names = list(weights)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    with torch.no_grad():
        for i in range(LAYERS):
            layer = model.base_model.model[i]
            for name in names:
                A, B = weights[name][i]
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    return model.eval()


def reference(base, weights, x, names):
    """float32, per sample: h ← h Wᵀ + s (h Aᵀ) Bᵀ with the sample's own A, B."""
    h = x.float()
    s = ALPHA / R
    for i, m in enumerate(base):
        W = m.weight.float()
        A = torch.stack([weights[n][i][0] for n in names])  # (b, R, D)
        B = torch.stack([weights[n][i][1] for n in names])  # (b, D, R)
        h = h @ W.t() + s * torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2))
    return h


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def graphed(fn):
    """fn replayed from a CUDA graph (removes launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]


def host_us_per_layer(fn) -> float:
    """Median host time of one call, µs per layer: what the CPU spends issuing the work (the GPU queue
    is drained first, so the call never waits on it)."""
    times = []
    for _ in range(25):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6 / LAYERS


def kernel_check() -> dict:
    """The Triton forward and backward on this GPU, fp32 (IEEE dots) and bf16, against float64 on the CPU."""
    from lorakit.ops.segmented import segmented_lora

    out = {}
    g = torch.Generator().manual_seed(5)
    n, Rm, k, d = 6, 16, 320, 288
    index = torch.tensor([0, -1, 2, 2, 5, 0, 3, -1, 5])  # adapters 1 and 4 empty
    ranks = torch.tensor([16, 3, 8, 16, 5, 1])
    x = torch.randn(len(index), 37, k, generator=g)
    A, B = torch.randn(n, Rm, k, generator=g), torch.randn(n, d, Rm, generator=g)
    scales, base = torch.rand(n, generator=g) + 0.5, torch.randn(len(index), 37, d, generator=g)
    gout = torch.randn(len(index), 37, d, generator=g)
    ts = [t.double().requires_grad_() for t in (x, A, B)]
    ref = segmented_lora(ts[0], index[:, None], ts[1], ts[2], scales, ranks, base.double())  # torch path, float64
    ref.backward(gout.double())
    for dt in (torch.float32, torch.bfloat16):
        cs = [t.to(DEV, dt).clone().requires_grad_() for t in (x, A, B)]
        h = segmented_lora(cs[0], index[:, None].to(DEV), cs[1], cs[2], scales.to(DEV), ranks.to(DEV), base.to(DEV, dt))
        h.backward(gout.to(DEV, dt))
        errs = [rel(h.cpu(), ref.detach())] + [rel(c.grad.cpu(), t.grad) for c, t in zip(cs, ts)]
        out[str(dt)] = errs
        assert max(errs) <= (1e-5 if dt == torch.float32 else 1e-2), (dt, errs)
    print("kernel check (rel err: out, dx, dA, dB):", out, flush=True)
    return out


def main() -> None:
    import peft
    import triton

    if DEV == "cuda":
        from triton.testing import do_bench

        bench = lambda fn: do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
    else:
        def bench(fn):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return sorted(times)[1]
    t0 = time.time()
    checks = kernel_check() if DEV == "cuda" else {}
    base = build_base()
    weights = adapter_weights()
    ours = build_lorakit(base, weights)
    theirs = build_peft(base, weights)
    print(f"built models in {time.time() - t0:.1f}s", flush=True)
    cases = [("prefill", 32, 128, 1), ("prefill", 32, 128, 8), ("prefill", 32, 128, 32), ("decode", 64, 1, 64)]
    rows = []
    for kind, batch, seq, n in cases:
        torch.manual_seed(2)
        x = torch.randn(batch, seq, D, device=DEV, dtype=DT)
        names = [f"a{i % n}" for i in range(batch)]
        ref = reference(base, weights, x, names)
        row = dict(case=kind, samples=batch, tokens_per_sample=seq, adapters=n)
        with torch.no_grad():
            row["rel_err_base_vs_ref"] = rel(base(x), ref)  # how far the adapters move the output
            with batch_adapters(ours, names):
                row["rel_err_lorakit"] = rel(ours(x), ref)
                row["ms_lorakit"] = bench(lambda: ours(x))
                if DEV == "cuda":
                    row["host_us_per_layer_lorakit"] = host_us_per_layer(lambda: ours(x))
                try:
                    row["ms_lorakit_graph"] = bench(graphed(lambda: ours(x)))
                except Exception as err:  # noqa: BLE001 - record and go on
                    row["graph_error"] = repr(err)[:200]
            row["rel_err_peft"] = rel(theirs(x, adapter_names=names), ref)
            row["ms_peft"] = bench(lambda: theirs(x, adapter_names=names))
            row["ms_base"] = bench(lambda: base(x))
            if DEV == "cuda":
                row["host_us_per_layer_base"] = host_us_per_layer(lambda: base(x))
            try:
                row["ms_base_graph"] = bench(graphed(lambda: base(x)))
            except Exception as err:  # noqa: BLE001
                row["graph_error_base"] = repr(err)[:200]
            if n == 1:  # lorakit's ordinary path, one active adapter
                lorakit.set_adapter(ours, "a0")
                row["rel_err_lorakit_single"] = rel(ours(x), ref)
                row["ms_lorakit_single"] = bench(lambda: ours(x))
        # bf16 through 8 layers: PEFT and lorakit should both sit near bf16's rounding of the base
        assert row["rel_err_lorakit"] <= 2e-2 and row["rel_err_peft"] <= 2e-2, row
        row["lorakit_over_base"] = row["ms_lorakit"] / row["ms_base"]
        row["peft_over_lorakit"] = row["ms_peft"] / row["ms_lorakit"]
        if "ms_lorakit_graph" in row:
            row["lorakit_graph_over_base_graph"] = row["ms_lorakit_graph"] / row["ms_base_graph"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name() if DEV == "cuda" else platform.processor(), torch=torch.__version__, triton=triton.__version__, peft=peft.__version__,
        python=platform.python_version(), shape=f"{LAYERS} x Linear({D},{D}) bf16, r={R}",
    )
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "gpu_multi_adapter.json"), "w") as f:
        json.dump(dict(meta=meta, kernel_check=checks, rows=rows), f, indent=2)
    print(json.dumps(meta))
    print(f"{'case':<8}{'adapters':>9}{'base':>9}{'lorakit':>9}{'graph b/l':>15}{'peft':>9}{'lk/base':>9}{'peft/lk':>9}{'err':>9}")
    for r in rows:
        gl = f"{r.get('ms_base_graph', 0):.3f}/{r.get('ms_lorakit_graph', float('nan')):.3f}"
        print(f"{r['case']:<8}{r['adapters']:>9}{r['ms_base']:>9.3f}{r['ms_lorakit']:>9.3f}{gl:>15}{r['ms_peft']:>9.3f}"
              f"{r['lorakit_over_base']:>9.2f}{r['peft_over_lorakit']:>9.1f}{r['rel_err_lorakit']:>9.1e}")


if __name__ == "__main__":
    main()
