"""QLoRA on one GPU: lorakit's NF4 base against its own bf16 LoRA and against PEFT + bitsandbytes.

    python benchmarks/gpu_qlora.py                       # everything: check, a, b, c
    python benchmarks/gpu_qlora.py --parts check,a --shapes 1x2048,8x2048

Writes gpu_qlora.json and gpu_qlora.txt under $OUT (or ./bench_out).  Parts:
  check  the Triton NF4 kernels on the GPU: dequantisation bit-exact against bitsandbytes' CUDA
         dequantize_4bit on bitsandbytes' own quantised state (and against lorakit's torch reference), Ŵ + s·BA,
         the fused GEMV and the training route's forward and gradients against float64; then kernel timings
         (dequantisation bandwidth; decode GEMV at N = 1, 4, 16: the fused NF4 gemv, with and without LoRA,
         against triton_nf4.dequantize + F.linear and against a bf16 cuBLAS F.linear; one 4096² LoRA layer's
         step on NF4 vs bf16).  A failed check stops the run: a wrong kernel is never timed.
  sweep  triton_nf4.gemv's tile keywords (block_d, block_k, num_warps, programs) at N=1 on the four GEMV
         shapes; prints the fastest per shape (run after check: it compares with the defaults' output).
  a      the 1.14B Llama of gpu_lora.py, r=16 on all 7 projections, AdamW, eager: lorakit NF4, lorakit bf16,
         PEFT + bitsandbytes NF4 (double quant, bf16 compute) at the --shapes (default 1x512,1x2048,2x1024,8x2048):
         tokens/s and peak memory.
  b      decode, batch 1, KV cache, greedy: tokens/s of the NF4 model with an unmerged adapter (lorakit), the
         bf16 model (plain, and with lorakit's unmerged adapter) and PEFT + bitsandbytes NF4.
  c      a 70B-architecture Llama (hidden 8192, 80 layers, MLP 28672, 64/8 heads, vocab 32000), random weights
         made and quantised layer by layer on the GPU (never whole in bf16), r=16 on all 7 projections,
         activation checkpointing per decoder layer (torch.utils.checkpoint): one QLoRA training step at 1x2048
         (AdamW), its time and peak memory.
bitsandbytes' CUDA build must be importable for PEFT's contender and the bitsandbytes check (the device has
no network: pip install --no-deps the wheel you carry).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import lorakit  # noqa: E402
from lorakit.ops import lora_linear, triton_nf4  # noqa: E402
from lorakit.ops.nf4 import dequantize_nf4_reference, nf4_lora_linear, quantize_nf4  # noqa: E402
from lorakit.nf4_linear import NF4Linear, nf4_from_bnb  # noqa: E402

OUT = os.environ.get("OUT") or "bench_out"
DEV = torch.device("cuda")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
results: dict = {"checks": {}, "kernels": {}, "a": {}, "b": {}, "c": {}}
lines: list[str] = []


def say(msg: str = "") -> None:
    print(msg, flush=True)
    lines.append(msg)


def med(fn, rep: int = 100) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import failure means: no bitsandbytes contender
        return False


# ------------------------------------------------------------------------------------------------ check
def check() -> bool:
    ok = True

    def record(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok &= passed
        results["checks"][name] = {"ok": passed, "detail": detail}
        say(f"  {'ok ' if passed else 'BAD'} {name}: {detail}")

    say("check: Triton NF4 kernels on the GPU")
    gen = torch.Generator(device=DEV).manual_seed(0)
    for shape in ((4096, 4096), (1000, 330), (28672, 1024)):
        W = (torch.randn(shape, generator=gen, device=DEV) * 0.02).to(torch.bfloat16)
        t = quantize_nf4(W)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            got = triton_nf4.dequantize(t, dtype)
            ref = dequantize_nf4_reference(t, dtype)
            record(f"dequantize {shape} {str(dtype)[6:]} == torch reference", torch.equal(got, ref),
                   f"{(got != ref).sum().item()} of {got.numel()} differ")
        if bnb_available():
            import bitsandbytes.functional as F

            q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            theirs = F.dequantize_4bit(q, state)
            try:
                tb, _ = nf4_from_bnb(state.as_dict(packed=True), q, "bitsandbytes CUDA state")
            except lorakit.LorakitError as err:
                record(f"read bitsandbytes CUDA state {shape}", False, str(err))
                continue
            got = triton_nf4.dequantize(tb, torch.bfloat16)
            record(f"dequantize {shape} bf16 == bitsandbytes CUDA", torch.equal(got, theirs),
                   f"{(got != theirs).sum().item()} of {got.numel()} differ")
            mine = dequantize_nf4_reference(t, torch.bfloat16)
            results["checks"][f"quantize {shape}: lorakit vs bitsandbytes CUDA quantiser"] = {
                "ok": True, "detail": f"{(mine != theirs).sum().item()} of {mine.numel()} dequantised values differ "
                                      "(information: lorakit's quantiser follows bitsandbytes' CPU build)"}
    d, k, r = 1000, 704, 16
    t = quantize_nf4(torch.randn(d, k, generator=gen, device=DEV) * 0.02)
    Wd = dequantize_nf4_reference(t, torch.float64)
    A = torch.randn(r, k, generator=gen, device=DEV) / k**0.5
    B = torch.randn(d, r, generator=gen, device=DEV) * 0.01
    e = rel(triton_nf4.merged(t, B, A, 2.0, torch.bfloat16), Wd + 2.0 * B.double() @ A.double())
    record("merged Ŵ + s·BA bf16", e < 1e-2, f"rel {e:.1e}")
    for N, dtype, kw in ((1, torch.bfloat16, {}), (4, torch.bfloat16, {}), (16, torch.bfloat16, {}),
                         (16, torch.bfloat16, {"dot_tokens": 17}), (3, torch.float16, {"dot_tokens": 1}),
                         (1, torch.float32, {}), (16, torch.float32, {})):
        x = torch.randn(N, k, generator=gen, device=DEV).to(dtype)
        b = torch.randn(d, generator=gen, device=DEV)
        got = triton_nf4.gemv(x, t, b, A, B, 2.0, **kw)
        ref = (x.double() @ dequantize_nf4_reference(t, dtype).double().t()
               + 2.0 * (x.double() @ A.to(dtype).double().t()) @ B.double().t() + b.double())
        e = rel(got, ref)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        record(f"gemv N={N} {str(dtype)[6:]} {kw}", e < tol and got.dtype == dtype, f"rel {e:.1e}")
    for p, N in ((0.0, 2048), (0.05, 2048), (0.0, 4096), (0.05, 4096)):  # torch_lora / triton_lora pieces
        x = torch.randn(N, k, generator=gen, device=DEV).to(torch.bfloat16).requires_grad_()
        A_ = A.clone().requires_grad_()
        B_ = B.clone().requires_grad_()
        h = nf4_lora_linear(x, t, None, A_, B_, 2.0, p, 11)
        g = torch.randn_like(h)
        h.backward(g)
        x2, A2, B2 = (v.detach().clone().requires_grad_() for v in (x, A, B))
        ref = lora_linear(x2, Wd.to(torch.bfloat16), None, A2, B2, 2.0, p, 11)  # same kernels' mask, bf16 base
        ref.backward(g)
        errs = [rel(h, ref), rel(x.grad, x2.grad), rel(A_.grad, A2.grad), rel(B_.grad, B2.grad)]
        record(f"NF4 LoRA linear N={N} p={p} vs bf16 LoRA on Ŵ", max(errs) < 2e-2,
               "rel h, ∂x, ∂A, ∂B " + ", ".join(f"{v:.1e}" for v in errs))
    return ok


def kernel_timings() -> None:
    say("\nkernels (median ms):")
    K = results["kernels"]
    t = quantize_nf4(torch.randn(28672, 8192, device=DEV) * 0.02)
    ms = med(lambda: triton_nf4.dequantize(t, torch.bfloat16))
    n = 28672 * 8192
    gbs = n * (4.127 / 8 + 2) / ms / 1e6
    K["dequant_28672x8192_ms"], K["dequant_GBps"] = ms, gbs
    say(f"  dequantise 28672x8192 -> bf16: {ms:.3f} ms, {gbs:.0f} GB/s (0.52 B read + 2 B written a weight)")
    say("  decode GEMV, bf16 x (N, k) times the (d, k) weight, µs: NF4 fused gemv (with LoRA r=16) | "
        "triton_nf4.dequantize + F.linear | bf16 cuBLAS F.linear [| fused gemv without tl.dot]")
    for d, k in GEMV_SHAPES:
        t = quantize_nf4(torch.randn(d, k, device=DEV) * 0.02)
        W = dequantize_nf4_reference(t, torch.bfloat16)
        A = torch.randn(16, k, device=DEV, dtype=torch.bfloat16) / k**0.5
        B = torch.randn(d, 16, device=DEV, dtype=torch.bfloat16) * 0.01
        for N in (1, 4, 16):
            x = torch.randn(N, k, device=DEV, dtype=torch.bfloat16)
            row = {"nf4_fused_ms": med(lambda: triton_nf4.gemv(x, t)),
                   "nf4_fused_lora_ms": med(lambda: triton_nf4.gemv(x, t, None, A, B, 2.0)),
                   "nf4_dequant_linear_ms": med(lambda: torch.nn.functional.linear(x, triton_nf4.dequantize(t))),
                   "bf16_cublas_ms": med(lambda: torch.nn.functional.linear(x, W))}
            if N > 1:  # the other multiply: tl.dot (N ≥ dot_tokens, the default 4) against one token at a time
                row["nf4_fused_elementwise_ms"] = med(lambda: triton_nf4.gemv(x, t, dot_tokens=N + 1))
            K[f"gemv_{d}x{k}_N{N}"] = row
            say(f"  {d}x{k} N={N:2d}: fused {row['nf4_fused_ms'] * 1e3:7.1f} ({row['nf4_fused_lora_ms'] * 1e3:7.1f}) | "
                f"dequant+linear {row['nf4_dequant_linear_ms'] * 1e3:7.1f} | cuBLAS {row['bf16_cublas_ms'] * 1e3:7.1f}"
                + (f" | fused elementwise {row['nf4_fused_elementwise_ms'] * 1e3:7.1f}" if N > 1 else ""))
    d = k = 4096
    N, r = 8192, 16
    W = (torch.randn(d, k, device=DEV) * 0.02).to(torch.bfloat16)
    t = quantize_nf4(W)
    x = torch.randn(N, k, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, k, device=DEV) / 64).requires_grad_()
    B = (torch.randn(d, r, device=DEV) / 64).requires_grad_()
    g = torch.randn(N, d, device=DEV, dtype=torch.bfloat16)
    a = med(lambda: nf4_lora_linear(x, t, None, A, B, 2.0).backward(g))
    b = med(lambda: lora_linear(x, W, None, A, B, 2.0).backward(g))
    K["layer_4096_N8192_step"] = {"nf4_ms": a, "bf16_ms": b}
    say(f"  one LoRA layer 4096², N=8192, fwd+bwd: NF4 {a:.3f} ms, bf16 {b:.3f} ms ({a / b:.2f}x)")


GEMV_SHAPES = ((2048, 2048), (8192, 2048), (2048, 8192), (8192, 8192))


def gemv_sweep() -> None:
    """triton_nf4.gemv's tile keywords at N=1, bf16, every shape of GEMV_SHAPES: µs, checked against the
    defaults' output first."""
    say("\ngemv sweep, N=1 bf16 (µs; programs = per SM × SMs): " + ", ".join(f"{d}x{k}" for d, k in GEMV_SHAPES))
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    cases = []
    for d, k in GEMV_SHAPES:
        t = quantize_nf4(torch.randn(d, k, device=DEV) * 0.02)
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        cases.append((t, x, triton_nf4.gemv(x, t).double()))
    best: dict = {}
    for block_d in (16, 32, 64):
        for block_k in (256, 512, 1024):
            for num_warps in (4, 8):
                if block_d * block_k // 2 > 64 * 32 * num_warps:  # > 64 bytes a thread: spills, not a contender
                    continue
                for per_sm in (2, 4, 8, 16):
                    kw = dict(block_d=block_d, block_k=block_k, num_warps=num_warps, programs=per_sm * sms)
                    times = []
                    for (d, k), (t, x, ref) in zip(GEMV_SHAPES, cases):
                        try:
                            e = rel(triton_nf4.gemv(x, t, **kw), ref)
                        except Exception as err:  # noqa: BLE001 - a tile that does not compile is reported, not fatal
                            say(f"  {kw}: {type(err).__name__}: {str(err)[:200]}")
                            e = float("inf")
                        times.append(med(lambda: triton_nf4.gemv(x, t, **kw), rep=20) if e < 1e-2 else float("nan"))
                        if times[-1] < best.get((d, k), (float("inf"),))[0]:
                            best[(d, k)] = (times[-1], kw)
                    name = f"bd{block_d}_bk{block_k}_w{num_warps}_p{per_sm}"
                    results["kernels"].setdefault("gemv_sweep", {})[name] = times
                    say(f"  {name:22s} " + " ".join(f"{v * 1e3:7.1f}" for v in times))
    for (d, k), (ms, kw) in best.items():
        say(f"  best {d}x{k}: {ms * 1e3:.1f} µs with {kw}")


# --------------------------------------------------------------------------------------- models (a, b)
def llama(layers: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def to_bnb(model: nn.Module) -> nn.Module:
    """Every linear but the head as bitsandbytes' Linear4bit: NF4, double quant, bf16 compute (QLoRA's setup)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and m is not head:
            new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4").to(DEV)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def build(kind: str):
    cfg = lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS)
    if kind == "lorakit_nf4":
        m = lorakit.quantize_base(lorakit.inject(llama(), cfg), "nf4")
    elif kind == "lorakit_bf16":
        m = lorakit.inject(llama(), cfg)
    elif kind == "peft_bnb_nf4":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(to_bnb(llama()), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    elif kind == "bf16_plain":
        m = llama()
    else:
        raise ValueError(kind)
    free()
    return m


def train_case(kind: str, batch: int, seq: int, steps: int, warm: int = 3) -> dict:
    free()
    model = build(kind)  # built from a bf16 model: the peak below is training's, not the conversion's
    torch.cuda.reset_peak_memory_stats()
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, 32000, (batch, seq), device=DEV)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
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
    out = {"tokens_per_s": steps * ids.numel() / sec, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
           "loss": float(loss)}
    del model, opt, params
    free()
    return out


def part_a(shapes: list[tuple[int, int]], steps: int) -> None:
    kinds = ["lorakit_nf4", "lorakit_bf16"] + (["peft_bnb_nf4"] if bnb_available() else [])
    say(f"\n(a) training, 1.14B Llama, r=16 all 7 projections, AdamW, eager ({steps} timed steps)")
    for b, s in shapes:
        for kind in kinds:
            res = train_case(kind, b, s, steps)
            results["a"].setdefault(f"{b}x{s}", {})[kind] = res
            say(f"  {b}x{s:<5d} {kind:14s} {res['tokens_per_s'] / 1e3:7.1f}k tokens/s  peak {res['peak_GiB']:5.1f} GiB")


def decode_case(kind: str, new_tokens: int, prompt: int = 64) -> dict:
    free()
    model = build(kind).eval()
    ids = torch.randint(0, 32000, (1, prompt), device=DEV)
    with torch.no_grad():
        def run(n):
            out = model(input_ids=ids, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        # Warm over every KV length the timed run will see: SDPA's cuDNN backend builds an execution plan per new
        # shape and keeps it for the process, so a model timed first would pay for the plans of every model after it.
        run(new_tokens)
        sec = run(new_tokens)
    del model
    free()
    return {"tokens_per_s": new_tokens / sec}


def part_b(new_tokens: int) -> None:
    say(f"\n(b) decode, batch 1, {new_tokens} new tokens after a 64-token prompt, KV cache, eager")
    kinds = ["lorakit_nf4", "lorakit_bf16", "bf16_plain"] + (["peft_bnb_nf4"] if bnb_available() else [])
    for kind in kinds:
        res = decode_case(kind, new_tokens)
        results["b"][kind] = res
        say(f"  {kind:14s} {res['tokens_per_s']:7.1f} tokens/s")


def part_bprof(tokens: int = 16, sdpa: str = "default") -> None:
    """Where a decode token's time goes: ``tokens`` decode steps of each model profiled (host ops, kernels).
    ``sdpa`` "no-cudnn" keeps SDPA off cuDNN's backend (flash / memory-efficient / math only)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    def backends():
        allowed = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return sdpa_kernel(allowed) if sdpa == "no-cudnn" else contextlib.nullcontext()

    say(f"\n(b-profile) {tokens} decode steps profiled (SDPA backends: {sdpa}): the top host-side ops and the kernel time")
    for kind in ("lorakit_nf4", "lorakit_bf16"):
        free()
        model = build(kind).eval()
        ids = torch.randint(0, 32000, (1, 64), device=DEV)
        with torch.no_grad(), backends():
            for warm in (True, False):  # the warm pass sees every KV length the profiled one will (cuDNN plans)
                out = model(input_ids=ids, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                for _ in range(4 + tokens if warm else 4):
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(tokens):
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                sec = time.perf_counter() - t0
        events = prof.key_averages()
        gpu = [e for e in events if e.device_type.name == "CUDA"]
        host = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)
        res = {"ms_per_token_profiled": 1e3 * sec / tokens,
               "kernels_per_token": sum(e.count for e in gpu) / tokens,
               "kernel_ms_per_token": sum(e.self_device_time_total for e in gpu) / 1e3 / tokens,
               "host_top": [{"name": e.key[:80], "count": e.count // tokens,
                             "self_us_per_token": round(e.self_cpu_time_total / tokens, 1)} for e in host[:20]]}
        results.setdefault("b_profile", {})[f"{kind}/sdpa-{sdpa}"] = res
        say(f"  {kind}: {res['ms_per_token_profiled']:.1f} ms a token (profiled), {res['kernels_per_token']:.0f} kernels "
            f"{res['kernel_ms_per_token']:.2f} ms; top host ops:")
        for h in res["host_top"][:12]:
            say(f"    {h['name']:80s} x{h['count']:<5d} {h['self_us_per_token']:9.1f} us")
        del model
        free()


# ------------------------------------------------------------------------------------------------ (c) 70B
def llama70b_qlora(layers: int = 80, hidden: int = 8192, mlp: int = 28672, heads: int = 64, kv_heads: int = 8,
                   vocab: int = 32000):
    """The 70B architecture with random bf16 weights made and quantised one linear at a time on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    with lorakit.empty_weights():
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator(device=DEV).manual_seed(0)
    head = model.get_output_embeddings()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and m is not head:
            w = (torch.randn(m.out_features, m.in_features, generator=gen, device=DEV, dtype=torch.bfloat16) * 0.02)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.from_weight(w, None))
            del w
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            owner, _, pname = name.rpartition(".")
            mod = model.get_submodule(owner)
            if "norm" in owner:
                value = torch.ones(p.shape, device=DEV, dtype=torch.bfloat16)
            else:
                value = torch.randn(p.shape, generator=gen, device=DEV, dtype=torch.bfloat16) * 0.02
            setattr(mod, pname, nn.Parameter(value, requires_grad=False))
    model.to(DEV)  # the buffers (rotary tables)
    model.requires_grad_(False)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    return model


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (torch.utils.checkpoint, non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = (lambda f: lambda *a, **kw: checkpoint(f, *a, use_reentrant=False, **kw))(inner)


def part_c(layers: int = 80) -> None:
    say(f"\n(c) 70B-architecture Llama ({layers} layers), NF4 base built layer by layer on the GPU, r=16 all 7, "
        "activation checkpointing per decoder layer, AdamW, 1x2048")
    free()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = llama70b_qlora(layers)
    torch.cuda.synchronize()
    built = time.perf_counter() - t0
    checkpoint_layers(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    nf4_bytes = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
                    for b in (m.weight, m.absmax, m.nested_absmax, m.offset))
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, 32000, (1, 2048), device=DEV)
    after_build = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()  # the step's own peak from here (the build's transients are above)
    times = []
    for _ in range(2):  # the first step also allocates AdamW's state; the second is the step time
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    results["c"] = {"layers": layers, "build_s": built, "peak_after_build_GiB": after_build, "peak_GiB": peak,
                    "step_s": times[-1], "first_step_s": times[0], "nf4_GiB": nf4_bytes / 2**30,
                    "trainable": sum(p.numel() for p in params), "loss": float(loss)}
    say(f"  built in {built:.1f} s (NF4 weights {nf4_bytes / 2**30:.1f} GiB, peak while building {after_build:.1f} GiB, "
        "one bf16 linear and its quantisation temporaries at a time)")
    say(f"  step {times[-1]:.2f} s (first {times[0]:.2f} s), peak {peak:.1f} GiB, loss {float(loss):.3f}, "
        f"trainable {results['c']['trainable'] / 1e6:.0f}M")
    del model, opt, params
    free()


def dump() -> None:
    """Results so far, after every part: a run stopped at its time limit still leaves them under $OUT."""
    with open(os.path.join(OUT, "gpu_qlora.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(OUT, "gpu_qlora.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="check,a,c,b")
    ap.add_argument("--shapes", default="1x512,1x2048,2x1024,8x2048")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--layers-70b", type=int, default=80)
    ap.add_argument("--sdpa", choices=("default", "no-cudnn"), default="default",
                    help="part bprof: SDPA backends allowed in the profiled decode")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    import peft
    import transformers
    import triton

    say(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"transformers {transformers.__version__} | peft {peft.__version__} | bitsandbytes "
        f"{__import__('bitsandbytes').__version__ if bnb_available() else 'absent'}")
    try:
        for part in args.parts.split(","):  # in the order given
            if part == "check":
                if not check():
                    say("a check failed: nothing is timed")
                    return 1
                dump()
                kernel_timings()
            elif part == "sweep":
                gemv_sweep()
            elif part == "a":
                part_a([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")], args.steps)
            elif part == "b":
                part_b(args.decode_tokens)
            elif part == "bprof":
                part_bprof(sdpa=args.sdpa)
            elif part == "c":
                part_c(args.layers_70b)
            else:
                raise SystemExit(f"--parts: unknown part {part!r} (check, sweep, a, b, bprof, c)")
            dump()
    finally:
        dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
