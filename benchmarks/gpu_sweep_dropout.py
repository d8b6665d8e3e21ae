"""Block-size sweep of the two dropout kernels of the one-layer case (N = 8192, k = d = 4096, r = 16, bf16).

    PYTHONPATH=src python3 benchmarks/gpu_sweep_dropout.py      # one device call, ≈ 2 min; JSON to $OUT

The kernels: ``xa`` (u = (x⊙m) Aᵀ, one pass over x) and ``tall_product`` with A (∂A = vᵀ(x⊙m) and the
branch's input gradient m⊙(v A), one read and one write of an (N, k) tensor).  Each configuration is
checked against the default configuration's result before it is timed (GPU time: 10 calls per CUDA
graph, median of replays).  The floor of each is its bytes at the measured copy bandwidth.
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from gpu_lora import graph_time as gpu  # this directory is on sys.path when the script runs
from lorakit.ops import triton_lora as T

OUT = os.environ.get("OUT", ".")


def main() -> None:
    N, k, r, p, dt = 8192, 4096, 16, 0.05, torch.bfloat16
    x = torch.randn(N, k, device="cuda", dtype=dt)
    v = torch.randn(N, r, device="cuda", dtype=dt)
    A = torch.randn(r, k, device="cuda") / k**0.5
    src = torch.empty_like(x)
    res: dict = {"copy (N,k) read+write": gpu(lambda: src.copy_(x))}
    print(f"copy of one (N, k) bf16 tensor (64 MiB read + 64 MiB write): {res['copy (N,k) read+write'] * 1e3:.1f} µs")

    ref_u = T.xa(x, A, p, 7)
    rows = res["xa"] = []
    for bm, bk, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4)):
        try:
            u = T.xa(x, A, p, 7, block_m=bm, block_k=bk, num_warps=w, num_stages=s)
            err = ((u.float() - ref_u.float()).norm() / ref_u.float().norm()).item()
            ms = gpu(lambda: T.xa(x, A, p, 7, block_m=bm, block_k=bk, num_warps=w, num_stages=s)) if err < 1e-2 else None
        except Exception as e:  # out of shared memory etc.
            err, ms = type(e).__name__, None
        rows.append({"block_m": bm, "block_k": bk, "warps": w, "stages": s, "err": err, "ms": ms})
    ref = T.tall_product(x, v, 1.0, p, 7, A)
    rows2 = res["tall_with_gx"] = []
    for bm, bc, w, s in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        try:
            ga, gx, _ = T.tall_product(x, v, 1.0, p, 7, A, block_m=bm, block_c=bc, num_warps=w, num_stages=s)
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in ((ga, ref[0]), (gx, ref[1])))
            ms = gpu(lambda: T.tall_product(x, v, 1.0, p, 7, A, block_m=bm, block_c=bc, num_warps=w,
                                            num_stages=s)) if err < 1e-2 else None
        except Exception as e:
            err, ms = type(e).__name__, None
        rows2.append({"block_m": bm, "block_c": bc, "warps": w, "stages": s, "err": err, "ms": ms})
    for name, table in (("xa", rows), ("tall_with_gx", rows2)):
        timed = sorted((r for r in table if r["ms"] is not None), key=lambda r: r["ms"])
        print(f"\n{name}: {len(timed)} of {len(table)} configurations valid; fastest 8 (µs):")
        for row in timed[:8]:
            print("  ", {kk: vv for kk, vv in row.items() if kk not in ("ms", "err")}, f"{row['ms'] * 1e3:.1f}")
    res["defaults_us"] = {"xa": gpu(lambda: T.xa(x, A, p, 7)) * 1e3,
                          "tall_with_gx": gpu(lambda: T.tall_product(x, v, 1.0, p, 7, A)) * 1e3}
    print("\ndefaults (µs):", res["defaults_us"])
    with open(os.path.join(OUT, "gpu_sweep_dropout.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
