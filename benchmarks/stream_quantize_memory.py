"""Peak memory of loading a base for ``lorakit train --quantize nf4``: streamed (what the CLI does,
integrations.local_models.load_quantized) against loading whole then quantising (the path before).

    python benchmarks/stream_quantize_memory.py                        # CPU, a 1.1 GB float32 Llama
    python benchmarks/stream_quantize_memory.py --device cuda --hidden 2048 --layers 16 --vocab 32000 --dtype bfloat16

A random Llama is saved as safetensors shards of --shard-mb in a temporary directory; each path then
runs in a fresh process, which reports its peak resident host memory (VmHWM of /proc/self/status, Linux:
ru_maxrss would carry the parent's peak across fork) and, on CUDA, the peak device memory torch allocated.  Writes stream_quantize_memory.json under $OUT (or ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(path: str, mode: str, device: str) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline, so it counts in neither)

    import lorakit
    from lorakit.integrations.local_models import QuantizedLoad, load_model, load_quantized

    before = peak_rss_mb()
    if mode == "streamed":
        model, _ = load_quantized(path, "AutoModelForCausalLM", QuantizedLoad("nf4", torch.device(device)))
    else:
        model = lorakit.quantize_base(load_model(path, "AutoModelForCausalLM"), "nf4", device=device).to(device)
    print(json.dumps({"mode": mode, "host_peak_mb": peak_rss_mb(), "host_before_load_mb": before,
                      "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
                      "nf4_layers": sum(isinstance(m, lorakit.NF4Linear) for m in model.modules())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--shard-mb", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=max(1, args.hidden // 256), dtype=args.dtype)
        model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
        size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        model.save_pretrained(tmp, max_shard_size=f"{args.shard_mb}MB")
        del model
        rows = []
        for mode in ("streamed", "whole"):
            proc = subprocess.run([sys.executable, __file__, "--child", tmp, mode, args.device], capture_output=True,
                                  text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {"model_mb": size_mb, "shard_mb": args.shard_mb, "device": args.device, "dtype": args.dtype, "runs": rows}
    (out / "stream_quantize_memory.json").write_text(json.dumps(result, indent=1))
    print(f"model {size_mb:.0f} MB ({args.dtype}) in shards of {args.shard_mb} MB, device {args.device}")
    for r in rows:
        dev = f", device peak {r['device_peak_mb']:.0f} MB" if r["device_peak_mb"] is not None else ""
        print(f"  {r['mode']:<8}  host peak {r['host_peak_mb']:.0f} MB (before loading {r['host_before_load_mb']:.0f} MB)"
              f"{dev}; {r['nf4_layers']} NF4 layers")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
