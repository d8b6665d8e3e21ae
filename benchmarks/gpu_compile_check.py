"""One device call: lorakit's LoRA ops under eager, torch.compile and CUDA graphs, on one GPU.

    PYTHONPATH=src python3 benchmarks/gpu_compile_check.py [--budget SECONDS] [--out DIR]

Sections (each reports and goes on if it fails; later ones are skipped once the time budget is spent):

1. one 4096² layer, bf16, r = 16, fp32 adapters: relative error of h, ∂x, ∂A, ∂B against float64 for both
   backends (torch, Triton) at N = 1024 and 8192; fwd+bwd time, eager (median, synchronised) and as a CUDA
   graph, for the frozen layer, PEFT (bf16 adapters) and lorakit with each backend, at N = 1024, 4096, 8192;
2. host time per LoRA linear forward+backward: a small layer (N = 256, 1024²) issued 40 times with the GPU
   idle, for the frozen layer, PEFT and lorakit with each backend;
3. a 2-layer Llama (hidden 2048, MLP 8192, 16/8 heads, vocab 32k, bf16 base) with LoRA r = 16 on all seven
   projections (lorakit: inject + share_inputs + fuse_mlps): host time of a training step at 1×512 for the
   frozen model, PEFT and lorakit; then eager, torch.compile default and mode="reduce-overhead" (with the
   Triton backend forced too): loss and adapter gradients after three steps against the same model in
   float64, and tokens/s of whole training steps (forward, backward, AdamW) at 1×512; no_grad forwards
   and greedy generation under reduce-overhead against eager.

Prints a table at the end and writes everything to OUT/gpu_compile_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import lorakit
from lorakit.ops import backends, lora_linear

DEV = "cuda"
T0 = time.time()
results: dict = {"checks": [], "layer": {}, "host_us_per_linear": {}, "model": {}, "errors": []}


def say(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel(a, b) -> float:
    a, b = a.double(), b.double().to(a.device)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class forced:
    """Run with one backend: 'triton' (every size) or 'torch' (never Triton)."""

    def __init__(self, which: str | None) -> None:
        self.which = which

    def __enter__(self):
        self.old = backends.TRITON_MIN_ROWS
        if self.which:
            backends.TRITON_MIN_ROWS = 0 if self.which == "triton" else 1 << 60

    def __exit__(self, *exc):
        backends.TRITON_MIN_ROWS = self.old


def section(name: str, budget_left: float):
    def wrap(fn):
        def run(*a, **k):
            if time.time() - T0 > budget_left:
                say(f"SKIP {name}: time budget spent")
                results["errors"].append(f"{name}: skipped (budget)")
                return None
            say(f"== {name}")
            try:
                return fn(*a, **k)
            except Exception as exc:  # report and go on: one device call must bring back every section it can
                say(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:1500]}")
                traceback.print_exc()
                results["errors"].append(f"{name}: {type(exc).__name__}: {str(exc)[:3000]}")
                return None
        return run
    return wrap


def gpu_ms(fn, reps: int = 20) -> float:
    """Median ms of fn() over reps, synchronised around each (eager wall time on the GPU's clock)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of one replay of a CUDA graph of fn() (GPU time, no host)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return gpu_ms(g.replay, reps)


def peft_layer(W: torch.Tensor, r: int, A: torch.Tensor, B: torch.Tensor, scale: float):
    from peft import LoraConfig, get_peft_model

    d, k = W.shape
    base = torch.nn.Sequential(torch.nn.Linear(k, d, bias=False, device=DEV, dtype=W.dtype))
    base[0].weight.data.copy_(W)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=scale * r, target_modules=["0"], lora_dropout=0.0),
                           autocast_adapter_dtype=False)
    layer = model.base_model.model[0]
    layer.lora_A["default"].weight.data.copy_(A)
    layer.lora_B["default"].weight.data.copy_(B)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


# ------------------------------------------------------------------------------------------------ 1. one layer
def layer_section() -> None:
    d = k = 4096
    r, s = 16, 2.0
    gen = torch.Generator(device=DEV).manual_seed(0)
    W = (torch.randn(d, k, device=DEV, generator=gen) / k**0.5).bfloat16()
    A = (torch.randn(r, k, device=DEV, generator=gen) / k**0.5).requires_grad_()
    B = (torch.randn(d, r, device=DEV, generator=gen) * 0.02).requires_grad_()
    for N in (1024, 8192):
        x = torch.randn(N, k, device=DEV, generator=gen).bfloat16().requires_grad_()
        g = torch.randn(N, d, device=DEV, generator=gen).bfloat16()
        x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))  # float64 on the GPU
        h64 = x64 @ W.double().t() + s * (x64 @ A64.t()) @ B64.t()
        h64.backward(g.double())
        for which in ("torch", "triton"):
            with forced(which):
                h = lora_linear(x, W, None, A, B, s)
                h.backward(g)
            errs = [rel(h, h64), rel(x.grad, x64.grad), rel(A.grad, A64.grad), rel(B.grad, B64.grad)]
            x.grad = A.grad = B.grad = None
            ok = max(errs) <= 2e-2
            results["checks"].append({"what": f"layer N={N} {which}", "errors": errs, "ok": ok})
            say(f"  {'ok  ' if ok else 'FAIL'} layer N={N} backend={which}: h/∂x/∂A/∂B rel err "
                + " ".join(f"{e:.1e}" for e in errs))
    A16, B16 = A.detach().bfloat16(), B.detach().bfloat16()
    for N in (1024, 2048, 4096, 8192, 16384):
        x = torch.randn(N, k, device=DEV, generator=gen).bfloat16().requires_grad_()
        g = torch.randn(N, d, device=DEV, generator=gen).bfloat16()
        row = results["layer"][N] = {}
        model, pparams = peft_layer(W, r, A16, B16, s)

        def step(f, params):
            def run():
                f().backward(g)
                x.grad = None
                for p in params:
                    p.grad = None
            return run

        cases = {"frozen": step(lambda: F.linear(x, W), []), "peft_bf16": step(lambda: model(x), pparams)}
        for which in ("torch", "triton"):
            def run_l(which=which):
                with forced(which):
                    lora_linear(x, W, None, A, B, s).backward(g)
                x.grad = A.grad = B.grad = None
            cases[f"lorakit_{which}"] = run_l
        for name, fn in cases.items():
            row[name] = {"eager_ms": gpu_ms(fn)}
            try:
                pass  # (a failed capture leaves the CUDA generator unusable: eager only)
            except Exception as exc:  # noqa: BLE001 - a case that cannot be captured reports why
                row[name]["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        say(f"  N={N}: " + "; ".join(f"{n} eager {v['eager_ms']:.3f} graph {v.get('graph_ms', float('nan')):.3f} ms"
                                     for n, v in row.items()))
        del model, pparams


# ------------------------------------------------------------------------------------------------ 2. host time
def host_section() -> None:
    N, d, k, r, s = 256, 1024, 1024, 16, 2.0
    W = (torch.randn(d, k, device=DEV) / 32).bfloat16()
    A = (torch.randn(r, k, device=DEV) / 32).requires_grad_()
    B = (torch.randn(d, r, device=DEV) / 32).requires_grad_()
    x = torch.randn(N, k, device=DEV).bfloat16().requires_grad_()
    g = torch.randn(N, d, device=DEV).bfloat16()
    model, pparams = peft_layer(W, r, A.detach().bfloat16(), B.detach().bfloat16(), s)
    cases = {"frozen": lambda: F.linear(x, W).backward(g), "peft_bf16": lambda: model(x).backward(g)}
    for which in ("torch", "triton"):
        def run_l(which=which):
            with forced(which):
                lora_linear(x, W, None, A, B, s).backward(g)
        cases[f"lorakit_{which}"] = run_l
    out = results["host_us_per_linear"]
    for name, fn in cases.items():
        samples = []
        for _ in range(7):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(40):
                fn()
            samples.append((time.perf_counter() - t) / 40 * 1e6)
            torch.cuda.synchronize()
        out[name] = statistics.median(samples)
    say("  host µs per fwd+bwd (N=256, 1024²): " + "; ".join(f"{n} {v:.0f}" for n, v in out.items()))


# ------------------------------------------------------------------------------------------------ 3. a model
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(seed: int = 0, dtype=torch.bfloat16, device=DEV):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def lorakit_model(device=DEV, dtype=torch.bfloat16, dropout: float = 0.0):
    model = lorakit.inject(llama(0, dtype, device),
                           lorakit.LoraConfig(r=16, alpha=32, dropout=dropout, target_modules=TARGETS))
    torch.manual_seed(1)
    for _, layer in lorakit.lora_layers(model):
        for B in layer.lora_B.values():
            torch.nn.init.normal_(B, std=0.02)  # B ≠ 0 so the branches count
    if device == DEV:
        lorakit.share_inputs(model)
        lorakit.fuse_mlps(model)
    return model.train()


def adapter_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def ids_for(batch: int, seq: int, seed: int = 0):
    return torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEV)


def model_section(budget: float) -> None:
    """Correctness against float64 and tokens/s of a training step (forward, backward, AdamW) at 1×512, per mode."""
    import copy

    res = results["model"]["tokens_per_s_1x512"] = {}
    ids = ids_for(1, 512)
    ref = copy.deepcopy(lorakit_model()).to(torch.float64)  # the same weights, in float64 (torch backend)
    loss64 = ref(input_ids=ids, labels=ids).loss
    loss64.backward()
    g64 = adapter_grads(ref)
    del ref
    say(f"  float64 reference loss {loss64.item():.6f}, {len(g64)} adapter tensors")
    variants = [("eager", None, 0.0), ("eager", "triton", 0.0), ("reduce-overhead", None, 0.0),
                ("default", None, 0.0), ("reduce-overhead", None, 0.05), ("reduce-overhead", "triton", 0.0),
                ("default", "triton", 0.0)]
    for mode, which, dropout in variants:
        tag = f"{mode} backend={which or 'auto'}" + (f" dropout={dropout}" if dropout else "")
        if time.time() - T0 > budget:
            results["errors"].append(f"{tag}: skipped (budget)")
            continue
        try:
            with forced(which):
                torch._dynamo.reset()
                model = lorakit_model(dropout=dropout)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
                run = model if mode == "eager" else torch.compile(model, mode=mode)
                t = time.time()
                for _ in range(3):  # compiled: the first calls record/warm up; the third is a replay
                    torch.compiler.cudagraph_mark_step_begin()
                    model.zero_grad(set_to_none=True)
                    loss = run(input_ids=ids, labels=ids).loss
                    loss.backward()
                results["model"][f"first_3_steps_s_{mode}_{which or 'auto'}"] = time.time() - t
                grads = adapter_grads(model)
                worst = max(rel(grads[n], g64[n]) for n in g64)
                lerr = abs(loss.item() - loss64.item()) / abs(loss64.item())
                ok = lerr <= 1e-2 and worst <= 5e-2 and len(grads) == len(g64)
                if dropout:  # other masks than the reference's: finite, close in loss, gradients not identical
                    ok = len(grads) == len(g64) and all(torch.isfinite(t).all() for t in grads.values()) \
                        and lerr <= 5e-2 and worst > 1e-3
                results["checks"].append({"what": f"model {tag}", "loss_rel": lerr, "worst_grad_rel": worst, "ok": ok})
                say(f"  {'ok  ' if ok else 'FAIL'} model {tag}: loss rel {lerr:.1e}, worst adapter-grad rel {worst:.1e}")
                times = []
                for _ in range(8):
                    torch.compiler.cudagraph_mark_step_begin()
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    run(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                res[tag] = 512 / statistics.median(times[2:])
                say(f"  {tag}: {res[tag]:.0f} tokens/s at 1×512 (step {statistics.median(times[2:]) * 1e3:.2f} ms)")
                del model, opt, run
        except Exception as exc:  # noqa: BLE001 - report and go on
            say(f"FAIL {tag}: {type(exc).__name__}: {str(exc)[:1500]}")
            traceback.print_exc()
            results["errors"].append(f"{tag}: {type(exc).__name__}: {str(exc)[:3000]}")


def host_step_section() -> None:
    """Host time of a training step (forward + backward issued, GPU idle before) at 1×512, and its wall time."""
    from peft import LoraConfig, get_peft_model

    ids = ids_for(1, 512)
    res = results["model"]["host_step_ms_1x512"] = {}
    wall = results["model"]["wall_step_ms_1x512"] = {}
    frozen = llama(0)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.train()
    peft = get_peft_model(llama(0), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0),
                          autocast_adapter_dtype=False).train()
    models = {"frozen": frozen, "peft_bf16": peft, "lorakit": lorakit_model()}

    def step(m):
        m(input_ids=ids, labels=ids).loss.backward()

    # the frozen limit still runs backward through every layer: the embeddings' output asks for a gradient
    frozen.model.embed_tokens.register_forward_hook(lambda mod, inp, out: out.requires_grad_())
    for name, m in models.items():
        host, walls = [], []
        for i in range(12):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step(m)
            host.append(time.perf_counter() - t)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
        res[name], wall[name] = statistics.median(host[4:]) * 1e3, statistics.median(walls[4:]) * 1e3
    per = {n: (res[n] - res["frozen"]) / 14 * 1e3 for n in ("peft_bf16", "lorakit")}
    results["model"]["host_us_per_lora_linear_1x512"] = per
    say("  host ms per step 1×512: " + "; ".join(f"{n} {v:.2f} (wall {wall[n]:.2f})" for n, v in res.items())
        + f"; per LoRA linear over frozen: PEFT {per['peft_bf16']:.0f} µs, lorakit {per['lorakit']:.0f} µs")


def generation_section() -> None:
    """no_grad forwards and greedy decoding under mode="reduce-overhead" against eager."""
    torch._dynamo.reset()
    model = lorakit_model().eval()
    ids = ids_for(1, 128)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(input_ids=ids).logits
        err = rel(out, ref)
        ok = err <= 2e-2
        results["checks"].append({"what": "no_grad forward reduce-overhead", "err": err, "ok": ok})
        say(f"  {'ok  ' if ok else 'FAIL'} no_grad forward under reduce-overhead: rel err {err:.1e}")
        eager_tokens = model.generate(ids, max_new_tokens=16, do_sample=False)
        # A static cache makes transformers compile the decoding forward itself (fullgraph, "reduce-overhead").
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        t = time.time()
        for _ in range(2):
            got = model.generate(ids, max_new_tokens=16, do_sample=False, cache_implementation="static")
        graphs = counters["stats"]["unique_graphs"] - before
        same = int((got == eager_tokens).sum()), eager_tokens.numel()
        results["checks"].append({"what": "greedy generate, static cache (transformers compiles it)",
                                  "same_tokens": same, "graphs_compiled": graphs, "ok": graphs > 0,
                                  "s": time.time() - t})
        say(f"  {'ok  ' if graphs else 'FAIL'} greedy generation with a static cache: {graphs} graphs compiled, "
            f"{same[0]}/{same[1]} tokens as eager")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=280.0, help="seconds after which remaining sections are skipped")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    results["env"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                      "triton_min_rows": backends.TRITON_MIN_ROWS}
    try:
        import peft
        import transformers
        import triton
        results["env"].update(peft=peft.__version__, transformers=transformers.__version__, triton=triton.__version__)
    except ImportError as exc:
        results["errors"].append(str(exc))
    say(results["env"])
    section("host time per linear", args.budget)(host_section)()
    section("one layer", args.budget)(layer_section)()
    section("host time of a model step", args.budget)(host_step_section)()
    section("model: correctness and tokens/s, eager and compiled", args.budget)(model_section)(args.budget * 0.8)
    section("generation under reduce-overhead", args.budget)(generation_section)()
    with open(os.path.join(args.out, "gpu_compile_check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    say("==== summary")
    for c in results["checks"]:
        say(("ok   " if c["ok"] else "FAIL ") + json.dumps(c))
    say("host µs/linear:", json.dumps(results["host_us_per_linear"]))
    say("model:", json.dumps(results["model"]))
    for e in results["errors"]:
        say("ERROR", e[:600])
    return 0 if all(c["ok"] for c in results["checks"]) and not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
