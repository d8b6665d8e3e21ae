"""GPU check of issue 21's pieces in one short run: liger-kernel's fused kernels with lorakit's ops, and the
activation checkpointing modes.

    python benchmarks/gpu_kernels_check.py            # numerics (~10 s of GPU work) + memory/speed at 1B, 8×2048
    python benchmarks/gpu_kernels_check.py --no-speed # numerics only

1. Numerics, bf16, a 4-layer Llama (hidden 1024, MLP 2816, 16/8 heads, vocab 32000), 2×512 tokens, LoRA
   r=16 on all 7 projections with nonzero B, inject + share_inputs + fuse_mlps: the loss and every adapter
   gradient of (a) the unfused bf16 model, (b) the same with ``lorakit.fused_kernels.apply`` (RMSNorm,
   RoPE, fused linear cross-entropy; the MLP is lorakit's fused one), (c) (b) with checkpointing "on",
   (d) (b) with "offload" — each against the same model in float32 without kernels, as ‖x − ref‖/‖ref‖.
   (b)-(d) must be no further from float32 than (a) is (bf16 rounding, 1e-3..1e-2), and (c), (d) must
   equal (b) up to the nondeterminism of bf16 atomics.  Evaluation with labels returns no logits.
2. Memory and speed (unless --no-speed): the #19 model (1.14B: hidden 2048, 16 layers, MLP 8192, 16/8
   heads, vocab 32000), bf16, 8×2048, AdamW over the adapters, 2 warm-up + 3 timed steps, for: no
   kernels/off, liger/off, liger/on, liger/offload — tokens/s of the median step and peak GiB.

Prints a table last; writes gpu_kernels_check.json under $OUT (or ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

import lorakit  # noqa: E402
from lorakit import fused_kernels  # noqa: E402
from lorakit.layer_checkpointing import offload_stats  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=8, vocab_size=32000)


DEVICE = "cuda"


def build(shape: dict, dtype: torch.dtype, kernels: bool, mode: str, notes: list[str], fuse: bool = True
          ) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(dtype)
    torch.manual_seed(1)
    model = lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=g) * 0.02)
    if kernels:
        notes.append(str(fused_kernels.apply(model)))
    groups, fused = (lorakit.share_inputs(model), lorakit.fuse_mlps(model)) if fuse else (0, 0)
    layers = lorakit.checkpointing(model, mode)
    notes.append(f"{groups} shared groups, {fused} fused MLPs, checkpointing {mode} on {layers} layers")
    return model.train()


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.float() for p in model.parameters() if p.requires_grad]
    return loss.detach().float(), grads


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten().double() for t in a]), torch.cat([t.flatten().double() for t in b])
    return float((x - y).norm() / y.norm()) if torch.isfinite(x).all() else float("inf")


def numerics(res: dict, notes: list[str]) -> list[str]:
    ids = torch.randint(0, SMALL["vocab_size"], (2, 512 if DEVICE == "cuda" else 16), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref_loss, ref_grads = loss_and_grads(build(SMALL, torch.float32, False, "off", notes), ids)
    rows, got = [], {}
    for name, kernels, mode, fuse in (("unfused", False, "off", True), ("liger", True, "off", True),
                                      ("liger+on", True, "on", True), ("liger+offload", True, "offload", True),
                                      ("liger-swiglu", True, "off", False)):
        model = build(SMALL, torch.bfloat16, kernels, mode, notes, fuse)
        loss, grads = loss_and_grads(model, ids)
        got[name] = (loss, grads)
        r = {"loss": float(loss), "loss_rel_fp32": abs(float(loss - ref_loss)) / abs(float(ref_loss)),
             "grads_rel_fp32": rel(grads, ref_grads)}
        if name.startswith("liger+"):
            r["grads_rel_liger_off"] = rel(grads, got["liger"][1])
            r["offload"] = offload_stats(model)
        if name == "liger":
            model.eval()
            with torch.no_grad():
                out = model(input_ids=ids, labels=ids)
            r["eval_logits_built"] = out.logits is not None
            r["eval_loss_rel_train"] = abs(float(out.loss) - float(loss)) / abs(float(loss))
        res["numerics"][name] = r
        rows.append(f"  {name:14s} loss {float(loss):.5f} (fp32 {float(ref_loss):.5f}, rel {r['loss_rel_fp32']:.1e}); "
                    f"adapter grads rel to fp32 {r['grads_rel_fp32']:.2e}"
                    + (f"; to liger/off {r['grads_rel_liger_off']:.1e}" if "grads_rel_liger_off" in r else "")
                    + (f"; eval logits built: {r['eval_logits_built']}" if "eval_logits_built" in r else ""))
        del model
        sync_free()
    return rows


def sync_free() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def speed(res: dict, notes: list[str], steps: int, deadline: float) -> list[str]:
    rows = []
    b, t = (8, 2048) if DEVICE == "cuda" else (2, 16)
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (b, t), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for name, kernels, mode in (("none/off", False, "off"), ("liger/off", True, "off"), ("liger/on", True, "on"),
                                ("liger/offload", True, "offload")):
        cuda = DEVICE == "cuda"
        if time.monotonic() > deadline:
            rows.append(f"  {name:14s} skipped (time)")
            continue
        model = build(LLAMA_1B, torch.bfloat16, kernels, mode, notes)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        sync_free()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(2 + steps):
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        tps = ids.numel() / statistics.median(times)
        res["speed"][name] = {"tokens_per_s": tps, "peak_GiB": peak, "step_s": times}
        rows.append(f"  {name:14s} {tps / 1e3:7.1f}k tokens/s  peak {peak:6.2f} GiB")
        del model, opt
        sync_free()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget", type=float, default=90.0, help="seconds after which the speed part stops")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (kernels skipped): checks the script")
    args = p.parse_args()
    if args.cpu_smoke:
        global DEVICE
        DEVICE = "cpu"
        SMALL.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
        LLAMA_1B.update(SMALL)
    t0 = time.monotonic()
    import transformers

    res: dict = {"env": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none"}, "numerics": {}, "speed": {}, "notes": []}
    notes: list[str] = res["notes"]
    os.makedirs(args.out, exist_ok=True)
    lines = ["numerics: bf16, 4-layer Llama, 2×512, LoRA r=16 all 7 projections (B ≠ 0), share_inputs + fuse_mlps:"]
    try:
        lines += numerics(res, notes)
    except Exception as e:  # report and go on to the speed part
        import traceback

        traceback.print_exc()
        lines.append(f"  numerics FAILED: {type(e).__name__}: {e}")
    print("\n".join(lines), flush=True)
    if not args.no_speed:
        lines.append("speed/memory: 1.14B Llama (#19), bf16, 8×2048, AdamW, median of "
                     f"{args.steps} steps after 2 warm-ups:")
        try:
            lines += speed(res, notes, args.steps, t0 + args.budget)
        except Exception as e:
            import traceback

            traceback.print_exc()
            lines.append(f"  speed FAILED: {type(e).__name__}: {e}")
    res["wall_s"] = time.monotonic() - t0
    with open(os.path.join(args.out, "gpu_kernels_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("\n".join(sorted(set(notes))))
    print("\n".join(lines) + f"\nwall {res['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
