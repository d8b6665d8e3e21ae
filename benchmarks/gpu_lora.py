"""LoRA on one GPU: check lorakit's CUDA path against float64, then time it against the limits and PEFT.

    python benchmarks/gpu_lora.py            # writes gpu_lora.json and gpu_lora.txt under $OUT (or ./bench_out)

One run does, in order:
  1. ceilings: device-to-device copy bandwidth and a bf16 8192³ matmul rate (the two numbers of METHOD.md);
  2. correctness: lorakit's forward and all gradients vs a float64 reference (dropout through an explicit
     mask built from the kernels' own mask), bf16 / fp16 / fp32, p = 0 and 0.05, odd shapes and the benchmark
     shape, torch.compile(fullgraph=True) and activation checkpointing.  Any failure stops the run: a wrong
     kernel is never timed;
  3. one layer, d = k = 4096, r = 16, T = 8192, bf16: frozen limit (base forward + input gradient), full
     fine-tuning, PEFT (fp32 adapters = its default; bf16 adapters), lorakit; with dropout 0.05; inference
     forward unmerged; a per-step breakdown of lorakit's pieces;
  4. end to end: a 1.14B Llama-architecture model, LoRA r=16 on all 7 projections, batch 8 × 2048, AdamW:
     tokens/s and peak memory for the same contenders.
Medians of CUDA-event timings (triton.testing.do_bench).  Results tables: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import lorakit  # noqa: E402
from lorakit.ops import lora_linear, triton_lora  # noqa: E402

OUT = os.environ.get("OUT") or "bench_out"
DEV = torch.device("cuda")
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
def throughput_line(tokens: int, seconds: float, device: torch.device | str) -> str:
    """``"<tokens/s> tokens/s over <tokens> tokens in <s> s[, peak GPU memory <GiB> GiB]"``.

    Peak memory is ``torch.cuda.max_memory_allocated`` on a CUDA device (what the caching allocator
    handed out, the figure that decides whether a batch fits); other devices report none.
    """
    device = torch.device(device)
    rate = tokens / seconds if seconds > 0 else float("nan")
    line = f"{rate:,.0f} tokens/s over {tokens:,} tokens in {seconds:.1f} s"
    if device.type == "cuda" and torch.cuda.is_available():
        line += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return line


results: dict = {"checks": [], "layer": {}, "e2e": {}, "pieces": {}}
lines: list[str] = []


def say(msg: str = "") -> None:
    print(msg, flush=True)
    lines.append(msg)


def med(fn, grad_to_none=None, rep: int = 100) -> float:
    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def graph_time(fn, calls: int = 10) -> float:
    """GPU time of one call of fn in ms: ``calls`` calls captured in a CUDA graph, median replay ÷ calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocations, compilation) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return med(graph.replay) / calls


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------- 1. ceilings
def ceilings() -> None:
    src = torch.randn(2**28, device=DEV, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = med(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 4 / ms / 1e9  # TB/s, bytes read + written
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms2 = med(lambda: a @ b)
    tf = 2 * 8192**3 / ms2 / 1e9
    results["ceilings"] = {"copy_TBps": bw, "bf16_mm_TFLOPs": tf}
    say(f"ceilings: copy {bw:.2f} TB/s (read+write), bf16 8192^3 matmul {tf:.0f} TFLOP/s")
    del src, dst, a, b


# ------------------------------------------------------------------------------------------- 2. correctness
def reference(x, W, bias, A, B, s, keep, p, g):
    """float64 h and grads with an explicit keep-mask."""
    x64 = x.detach().double().requires_grad_()
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    xd = x64 * keep / (1 - p) if p else x64
    h = x64 @ W.double().t() + s * (xd @ A64.t()) @ B64.t()
    if bias is not None:
        h = h + bias.double()
    h.backward(g.double())
    return h.detach(), x64.grad, A64.grad, B64.grad


def check(N, k, d, r, dtype, p, adapter_dtype=torch.float32, bias=True, seed=1234) -> None:
    x = torch.randn(N, k, device=DEV, dtype=dtype).requires_grad_()
    W = torch.randn(d, k, device=DEV, dtype=dtype) / k**0.5
    b = torch.randn(d, device=DEV, dtype=dtype) if bias else None
    A = (torch.randn(r, k, device=DEV, dtype=adapter_dtype) / k**0.5).requires_grad_()
    B = torch.randn(d, r, device=DEV, dtype=adapter_dtype).requires_grad_()  # ≠ 0: the branch must count
    g = torch.randn(N, d, device=DEV, dtype=dtype)
    s = 2.0
    h = lora_linear(x, W, b, A, B, s, p, seed)
    h.backward(g)
    keep = triton_lora.keep_mask(N, k, p, seed, DEV) if p else None
    ref = reference(x, W, b, A, B, s, keep, p, g)
    errs = {name: rel(a, e) for name, a, e in zip(("h", "dx", "dA", "dB"), (h, x.grad, A.grad, B.grad), ref)}
    # The branch alone, so a wrong low-rank term cannot hide under the base product's size.
    lo = lora_linear(x.detach(), None, None, A, B, s, p, seed)
    keepd = keep.double() if p else 1.0
    lo_ref = s * ((x.detach().double() * keepd / (1 - p)) @ A.detach().double().t()) @ B.detach().double().t()
    errs["branch"] = rel(lo, lo_ref)
    tol = TOL[dtype]
    ok = all(e <= tol for e in errs.values())
    if p:
        frac = 1 - keep.float().mean().item()
        ok = ok and abs(frac - p) < 5 * (p * (1 - p) / keep.numel()) ** 0.5 + 1e-4
        errs["drop_fraction"] = frac
    entry = {"N": N, "k": k, "d": d, "r": r, "dtype": str(dtype), "p": p, "adapter_dtype": str(adapter_dtype),
             "errors": errs, "tol": tol, "ok": ok}
    results["checks"].append(entry)
    say(f"  {'ok  ' if ok else 'FAIL'} N={N} k={k} d={d} r={r} {str(dtype)[6:]} p={p} adapters "
        f"{str(adapter_dtype)[6:]}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))


def check_group(N, k, ds, r, dtype) -> None:
    """lora_linear_group (lorakit.share_inputs' op: q/k/v on one input) against float64 math."""
    from lorakit.ops.lora_group import lora_linear_group

    x = torch.randn(N, k, device=DEV, dtype=dtype).requires_grad_()
    Ws = [torch.randn(d, k, device=DEV, dtype=dtype) / k**0.5 for d in ds]
    bs = [None] * len(ds)
    As = [(torch.randn(r, k, device=DEV) / k**0.5).requires_grad_() for _ in ds]
    Bs = [torch.randn(d, r, device=DEV).requires_grad_() for d in ds]
    gs = [torch.randn(N, d, device=DEV, dtype=dtype) for d in ds]
    scales = [2.0, 0.5, 1.0][:len(ds)]
    outs = lora_linear_group(x, Ws, bs, As, Bs, scales)
    torch.autograd.backward(outs, gs)
    x64 = x.detach().double().requires_grad_()
    A64 = [A.detach().double().requires_grad_() for A in As]
    B64 = [B.detach().double().requires_grad_() for B in Bs]
    refs = [x64 @ W.double().t() + s * (x64 @ A.t()) @ B.t() for W, A, B, s in zip(Ws, A64, B64, scales)]
    torch.autograd.backward(refs, [g.double() for g in gs])
    errs = {"dx": rel(x.grad, x64.grad)}
    for i in range(len(ds)):
        errs[f"h{i}"] = rel(outs[i], refs[i])
        errs[f"dA{i}"] = rel(As[i].grad, A64[i].grad)
        errs[f"dB{i}"] = rel(Bs[i].grad, B64[i].grad)
    tol = TOL[dtype]
    ok = all(e <= tol for e in errs.values())
    results["checks"].append({"group": True, "N": N, "k": k, "ds": ds, "r": r, "dtype": str(dtype), "errors": errs,
                              "tol": tol, "ok": ok})
    say(f"  {'ok  ' if ok else 'FAIL'} group N={N} k={k} d={ds} r={r} {str(dtype)[6:]}: max rel err "
        f"{max(errs.values()):.1e}")


def check_compile_and_checkpoint() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 100, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(384, 256, device=DEV, dtype=torch.bfloat16) / 16
    A = torch.randn(16, 256, device=DEV, requires_grad=True)
    B = torch.randn(384, 16, device=DEV, requires_grad=True)
    g = torch.randn(3, 100, 384, device=DEV, dtype=torch.bfloat16)
    outs = []
    for f in (lora_linear, torch.compile(lora_linear, fullgraph=True)):
        h = f(x, W, None, A, B, 0.5, 0.1, 99)
        h.backward(g)
        outs.append([h.detach().clone(), x.grad.clone(), A.grad.clone(), B.grad.clone()])
        x.grad = A.grad = B.grad = None
    err = max(rel(a, b) for a, b in zip(*outs))
    ok = err <= 1e-2
    results["checks"].append({"what": "torch.compile(fullgraph=True) vs eager, dropout 0.1", "err": err, "ok": ok})
    say(f"  {'ok  ' if ok else 'FAIL'} torch.compile(fullgraph=True) matches eager (dropout 0.1): {err:.1e}")

    # Activation checkpointing through a lorakit layer with dropout: the recomputed mask must be the same.
    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(DEV)
    net = lorakit.inject(net, lorakit.LoraConfig(r=8, alpha=16, dropout=0.2, target_modules=["0", "2"]))
    for _, layer in lorakit.lora_layers(net):
        for name in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[name])
    net.train()
    xi = torch.randn(64, 256, device=DEV, requires_grad=True)
    grads = []
    for use_ckpt in (False, True):
        torch.manual_seed(5)
        y = torch.utils.checkpoint.checkpoint(net, xi, use_reentrant=False) if use_ckpt else net(xi)
        y.square().sum().backward()
        grads.append([xi.grad.clone()] + [p.grad.clone() for p in net.parameters() if p.requires_grad])
        xi.grad = None
        net.zero_grad(set_to_none=True)
    err = max(rel(a, b) for a, b in zip(*grads))
    ok = err <= 1e-5
    results["checks"].append({"what": "activation checkpointing, dropout 0.2", "err": err, "ok": ok})
    say(f"  {'ok  ' if ok else 'FAIL'} activation checkpointing gives the same gradients (dropout 0.2): {err:.1e}")

    # The same layers, compiled whole: with dropout the layer draws its seed as a tensor (no graph break).
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(net)(xi).graph_break_count
    y = torch.compile(net, fullgraph=True)(xi)
    y.square().sum().backward()
    finite = all(torch.isfinite(p.grad).all().item() for p in net.parameters() if p.requires_grad)
    ok = breaks == 0 and finite
    net.zero_grad(set_to_none=True)
    results["checks"].append({"what": "LoRA layers with dropout under torch.compile(fullgraph=True)",
                              "graph_breaks": breaks, "ok": ok})
    say(f"  {'ok  ' if ok else 'FAIL'} LoRA layers with dropout compile whole: {breaks} graph breaks, finite gradients")


def correctness() -> bool:
    say("correctness (relative error vs float64; bf16/fp16 ≤ 1e-2, fp32 ≤ 1e-4):")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for p in (0.0, 0.05):
            check(1000 + 13, 520, 392, 16, dtype, p)
            check(777, 1030, 260, 5, dtype, p, adapter_dtype=dtype, bias=False)
    check(8192, 4096, 4096, 16, torch.bfloat16, 0.0, bias=False)
    check(8192, 4096, 4096, 16, torch.bfloat16, 0.05, bias=False)
    for dtype in (torch.bfloat16, torch.float32):
        check_group(1013, 520, [392, 128, 128], 16, dtype)
    check_group(16384, 2048, [2048, 1024, 1024], 16, torch.bfloat16)
    check_compile_and_checkpoint()
    return all(c["ok"] for c in results["checks"])


# ------------------------------------------------------------------------------------------- 3. one layer
def peft_layer(W: torch.Tensor, r: int, p: float, fp32_adapters: bool):
    from peft import LoraConfig, get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=DEV, dtype=W.dtype)
            with torch.no_grad():
                self.lin.weight.copy_(W)

    m = get_peft_model(Wrap(), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["lin"]),
                       autocast_adapter_dtype=fp32_adapters)
    layer = m.base_model.model.lin
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    layer.train()
    return layer, [q for q in layer.parameters() if q.requires_grad]


def one_layer() -> None:
    N, k, d, r = 8192, 4096, 4096, 16
    dt = torch.bfloat16
    flop_base = 2 * N * k * d
    say(f"\none layer: N={N} k={k} d={d} r={r} bf16. base GEMM {flop_base / 1e9:.0f} GFLOP; "
        f"one (N,k) pass {N * k * 2 / 2**20:.0f} MiB")
    x = torch.randn(N, k, device=DEV, dtype=dt, requires_grad=True)
    g = torch.randn(N, d, device=DEV, dtype=dt)
    W = (torch.randn(d, k, device=DEV, dtype=dt) / k**0.5)
    Wp = torch.nn.Parameter(W.clone())
    A = torch.nn.Parameter(torch.randn(r, k, device=DEV) / k**0.5)
    B = torch.nn.Parameter(torch.randn(d, r, device=DEV) * 0.01)
    A16, B16 = torch.nn.Parameter(A.detach().to(dt)), torch.nn.Parameter(B.detach().to(dt))
    res = results["layer"]

    def train_step(fwd, params, key=None):
        """Eager median (host included); with a key, also the replayed-CUDA-graph time into gpu_rows[key]."""
        def step():
            fwd().backward(g)
        eager = med(step, grad_to_none=[x, *params])
        if key is not None:
            try:
                gpu_rows[key] = graph_step(step, params)
            except Exception as e:  # a capture failure must not cost the rest of the run
                say(f"  CUDA graph of {key} failed: {type(e).__name__}: {e}")
        return eager

    def graph_step(step, params) -> float:
        """The step captured once as a CUDA graph and replayed: GPU time without the host's launch cost."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for t in (x, *params):
                    t.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        for t in (x, *params):
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = med(graph.replay)
        for t in (x, *params):
            t.grad = None
        return ms

    for p in (0.0, 0.05):
        row = res[f"train_p{p}"] = {}
        gpu_rows = res[f"train_p{p}_gpu_graph"] = {}
        row["frozen_limit"] = train_step(lambda: F.linear(x, W), [], "frozen_limit")
        row["full_finetune"] = train_step(lambda: F.linear(x, Wp), [Wp], "full_finetune")
        for fp32, key in ((True, "peft_fp32_adapters"), (False, "peft_bf16_adapters")):
            layer, params = peft_layer(W, r, p, fp32)
            row[key] = train_step(lambda: layer(x), params, key)
            del layer, params
        row["lorakit_fp32_adapters"] = train_step(lambda: lora_linear(x, W, None, A, B, 2.0, p, 7), [A, B],
                                                  "lorakit_fp32_adapters")
        row["lorakit_bf16_adapters"] = train_step(lambda: lora_linear(x, W, None, A16, B16, 2.0, p, 7), [A16, B16],
                                                  "lorakit_bf16_adapters")

    row = res["inference"] = {}
    gpu_rows = res["inference_gpu_graph"] = {}

    def infer(key, fn):
        row[key] = med(fn)
        try:
            graph = torch.cuda.CUDAGraph()
            fn()
            with torch.cuda.graph(graph):
                fn()
            gpu_rows[key] = med(graph.replay)
        except Exception as e:
            say(f"  CUDA graph of {key} failed: {type(e).__name__}: {e}")

    with torch.no_grad():
        infer("frozen_limit", lambda: F.linear(x, W))
        layer, _ = peft_layer(W, r, 0.0, True)
        layer.eval()
        infer("peft_fp32_adapters", lambda: layer(x))
        infer("lorakit_fp32_adapters", lambda: lora_linear(x, W, None, A, B, 2.0, 0.0, 0))
        del layer

    # Pieces of lorakit's step, each timed alone as GPU time (10 calls captured in a CUDA graph, replayed).
    pc = results["pieces"]
    A_, B_ = A.detach().to(dt), B.detach().to(dt)
    xd = x.detach()
    u = triton_lora.xa(xd, A_)
    v = torch.mm(g, B_)

    gpu = graph_time

    pc["base GEMM x Wᵀ"] = gpu(lambda: F.linear(xd, W))
    pc["merge W + sBA, torch.addmm"] = gpu(lambda: torch.addmm(W, B_, A_, alpha=2.0))
    pc["merge W + sBA, triton (fp32 factors)"] = gpu(lambda: triton_lora.merged_weight(W, B, A, 2.0))
    pc["u = x Aᵀ, triton"] = gpu(lambda: triton_lora.xa(xd, A))
    pc["u = x Aᵀ, cuBLAS"] = gpu(lambda: torch.mm(xd, A_.t()))
    pc["u = (x⊙m) Aᵀ, triton p=0.05"] = gpu(lambda: triton_lora.xa(xd, A, 0.05, 7))
    pc["v = g B, cuBLAS"] = gpu(lambda: torch.mm(g, B_))
    pc["uᵀ g (∂B), cuBLAS"] = gpu(lambda: torch.mm(u.t(), g))
    pc["gᵀ u (∂B), triton tall_product"] = gpu(lambda: triton_lora.tall_product(g, u, 2.0, transpose_out=True))
    pc["vᵀ x (∂A), cuBLAS"] = gpu(lambda: torch.mm(v.t(), xd))
    pc["vᵀ x (∂A), triton tall_product"] = gpu(lambda: triton_lora.tall_product(xd, v))
    pc["vᵀ(x⊙m) + m⊙vA, triton p=0.05"] = gpu(lambda: triton_lora.tall_product(xd, v, 1.0, 0.05, 7, A))
    h0 = torch.mm(u, B_.t())
    pc["h.addmm_(x, Wᵀ) (β=1)"] = gpu(lambda: h0.addmm_(xd, W.t()))
    pc["h = u Bᵀ (write N×d)"] = gpu(lambda: torch.mm(u, B_.t()))
    # Inference decomposed (the CUDA graph of merge + GEMM measured ≈ 60 µs over the base, the merge ≈ 20).
    Wm = triton_lora.merged_weight(W, B, A, 2.0, dt)
    pc["inference: GEMM x W'ᵀ with a merged W' made beforehand"] = gpu(lambda: F.linear(xd, Wm))
    pc["inference: merge, then GEMM x W'ᵀ (10 per graph)"] = gpu(
        lambda: F.linear(xd, triton_lora.merged_weight(W, B, A, 2.0, dt)))
    for key, fn in (("base", lambda: F.linear(xd, W)),
                    ("merge + GEMM", lambda: F.linear(xd, triton_lora.merged_weight(W, B, A, 2.0, dt)))):
        graph = torch.cuda.CUDAGraph()
        fn()
        with torch.cuda.graph(graph):
            fn()
        pc[f"inference: {key}, 1 per graph, replay timed one by one"] = med(graph.replay)
    pc["merge W + sBA, triton BD=64 BK=128 (run-3 default)"] = gpu(
        lambda: triton_lora.merged_weight(W, B, A, 2.0, block_d=64, block_k=128))

    # Host cost per call: a small layer, where launching is all there is to time.
    xs = torch.randn(64, 256, device=DEV, dtype=dt, requires_grad=True)
    gs = torch.randn(64, 256, device=DEV, dtype=dt)
    Ws = torch.randn(256, 256, device=DEV, dtype=dt)
    As = torch.nn.Parameter(torch.randn(16, 256, device=DEV))
    Bs = torch.nn.Parameter(torch.randn(256, 16, device=DEV))
    small_peft, small_params = peft_layer(Ws, 16, 0.0, False)

    def host(f, params):
        def run():
            for _ in range(20):
                f().backward(gs)
        return med(run, grad_to_none=[xs, *params]) / 20
    pc["host, small layer fwd+bwd: frozen F.linear"] = host(lambda: F.linear(xs, Ws), [])
    pc["host, small layer fwd+bwd: PEFT bf16"] = host(lambda: small_peft(xs), small_params)
    pc["host, small layer fwd+bwd: lorakit p=0"] = host(lambda: lora_linear(xs, Ws, None, As, Bs, 2.0, 0.0, 0),
                                                        [As, Bs])
    pc["host, small layer fwd+bwd: lorakit p=0.05"] = host(lambda: lora_linear(xs, Ws, None, As, Bs, 2.0, 0.05, 3),
                                                           [As, Bs])
    del small_peft, small_params

    # A kernel-level profile of one lorakit training step per case.
    from torch.profiler import ProfilerActivity, profile
    for p in (0.0, 0.05):
        for _ in range(3):
            lora_linear(x, W, None, A, B, 2.0, p, 7).backward(g)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                lora_linear(x, W, None, A, B, 2.0, p, 7).backward(g)
                x.grad = A.grad = B.grad = None  # as do_bench's grad_to_none: no accumulation kernels
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
        results["pieces"][f"profile_p{p}"] = table
        say(f"\nprofile, lorakit fwd+bwd, p={p}, 5 steps:\n{table}")
    del x, g


# ------------------------------------------------------------------------------------------- 4. end to end
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def e2e_case(name: str, build, steps: int = 20, warm: int = 4) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    model, params = build()
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    ids = torch.randint(0, 32000, (8, 2048), device=DEV)
    torch.cuda.reset_peak_memory_stats()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    tokens = steps * ids.numel()
    peak = torch.cuda.max_memory_allocated() / 2**30
    results["e2e"][name] = {"tokens_per_s": tokens / sec, "peak_GiB": peak, "loss": float(loss),
                            "trainable": sum(q.numel() for q in params)}
    say(f"  {name:28s} {throughput_line(tokens, sec, DEV)}  (loss {float(loss):.3f})")
    del model, params, opt


def e2e() -> None:
    from peft import LoraConfig, get_peft_model

    say("\nend to end: Llama 1.14B, 16 layers, batch 8x2048, bf16, AdamW, sdpa:")

    def frozen():
        m = llama()
        m.requires_grad_(False)
        m.enable_input_require_grads()  # backward through every layer, no weight gradient
        return m, []

    def full():
        m = llama()
        return m, list(m.parameters())

    def peft(fp32: bool):
        def build():
            m = get_peft_model(llama(), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
                               autocast_adapter_dtype=fp32)
            return m, [q for q in m.parameters() if q.requires_grad]
        return build

    def ours(p: float, fused_mlp: bool = False, shared: bool = False):
        def build():
            m = lorakit.inject(llama(), lorakit.LoraConfig(r=16, alpha=32, dropout=p, target_modules=TARGETS))
            m.train()
            if fused_mlp:  # down_proj keeps gate/up instead of silu(gate)·up (docs/gpu-notes.md, Memory)
                say(f"  fused MLPs: {lorakit.fuse_mlps(m)}")
            if shared:  # q/k/v and gate/up: one pass over their input (lorakit.share_inputs)
                say(f"  shared-input groups: {lorakit.share_inputs(m)}")
            return m, [q for q in m.parameters() if q.requires_grad]
        return build

    e2e_case("frozen_limit", frozen)
    if "quick" not in sys.argv:  # measured identically in three earlier runs (docs/gpu-notes.md)
        e2e_case("full_finetune", full)
        e2e_case("peft_fp32_adapters", peft(True))
    e2e_case("peft_bf16_adapters", peft(False))
    e2e_case("lorakit", ours(0.0))
    e2e_case("lorakit_fused_mlp", ours(0.0, fused_mlp=True))
    e2e_case("lorakit_shared_inputs", ours(0.0, shared=True))
    e2e_case("lorakit_shared_fused", ours(0.0, fused_mlp=True, shared=True))
    e2e_case("lorakit_dropout0.05", ours(0.05))


# ---------------------------------------------------------------------------------------------------- main
def table() -> None:
    say("\n==== summary (ms, median; × = over the frozen limit) ====")
    lay = results["layer"]
    for case, row in lay.items():
        lim = row["frozen_limit"]
        say(f"{case:12s} " + "  ".join(f"{k}={v:.3f}ms({v / lim:.2f}×)" for k, v in row.items()))
    say("pieces (ms): " + "; ".join(f"{k}={v:.4f}" for k, v in results["pieces"].items() if isinstance(v, float)))
    e = results["e2e"]
    if e:
        lim = e["frozen_limit"]["tokens_per_s"]
        for k, v in e.items():
            say(f"e2e {k:24s} {v['tokens_per_s'] / 1e3:7.1f}k tok/s ({v['tokens_per_s'] / lim:.2f}× limit) "
                f"peak {v['peak_GiB']:.1f} GiB")


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    import peft
    import transformers
    results["env"] = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                      "triton": triton.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    say(f"env: {results['env']}")
    ceilings()
    ok = correctness()
    if not ok:
        say("CORRECTNESS FAILED: not timing a wrong kernel")
    else:
        stages = [a for a in sys.argv[1:] if a != "quick"] or ["layer", "e2e"]
        if "layer" in stages:
            one_layer()
        if "e2e" in stages:
            e2e()
        table()
    with open(os.path.join(OUT, "gpu_lora.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(OUT, "gpu_lora.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
