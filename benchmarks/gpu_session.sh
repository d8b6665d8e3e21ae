#!/usr/bin/env bash
# Every GPU benchmark of one session in one device call (≤ 10 minutes), most important first.
#
#   bash benchmarks/gpu_session.sh            # on the device, from the repository root, OUT set
#
# Each step has its own time limit, so one that runs long or fails cannot take the others' figures;
# everything a step writes goes under $OUT/<step>/, and the end packs it into $OUT/results.tar (the
# device returns at most 8 files). The correctness checks run inside the first step of each script
# (gpu_shapes' lorakit-vs-PEFT check, gpu_qlora's kernel checks); later gpu_shapes steps reuse the
# first step's check (--no-check) since they time the same code.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then   # liger-kernel and bitsandbytes, carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    mkdir -p "$OUT/$name"
    OUT="$OUT/$name" timeout "$limit" "$@" --out "$OUT/$name" 2>&1 | tail -n 60
    echo "=== $name exit ${PIPESTATUS[0]}"
    pack
}
pack() { tar -cf "$OUT/results.tar" -C "$OUT" --exclude=results.tar --exclude=log.txt . 2>/dev/null; }
shapes() { step "$1" "$2" python3 benchmarks/gpu_shapes.py --warmup 2 --steps 5 "${@:3}"; }
# 1. issue 19: frozen limit, PEFT, lorakit at every shape, eager (with the correctness check and eager decode)
shapes s19_eager 110 --timeout 50 --contenders frozen,peft,lorakit --modes eager
# 2. issue 19: CUDA graphs (reduce-overhead) at 1×1024 with compiled decode; torch.compile at 8×2048
shapes s19_graphs 130 --timeout 60 --no-check --contenders frozen,peft,lorakit --modes reduce-overhead --shapes 1x1024
shapes s19_compile 85 --timeout 60 --no-check --no-decode --contenders frozen,lorakit --modes compile --shapes 8x2048
# 3. issue 21: the fused-kernel limit and lorakit with liger in each checkpointing mode, 8×2048 and 1×2048
shapes s21_liger 80 --timeout 30 --no-check --no-decode --contenders frozen-liger,peft-liger,lorakit-liger,lorakit-liger-ckpt,lorakit-liger-offload --modes eager --shapes 1x2048,8x2048
# 4. issue 18: DoRA against LoRA and PEFT's DoRA
shapes s18_dora 45 --timeout 20 --no-check --no-decode --contenders lorakit-plain,dora,peft-dora --modes eager --shapes 1x2048,8x2048
# 5. issue 17: NF4 kernel checks, QLoRA vs bf16 LoRA vs PEFT+bitsandbytes, the 70B-architecture step
OUT_Q="$OUT/s17_qlora"; mkdir -p "$OUT_Q"
echo "=== s17_qlora $(date -u +%H:%M:%S)"
OUT="$OUT_Q" timeout 80 python3 benchmarks/gpu_qlora.py --parts check,a,c --shapes 1x2048,8x2048 --steps 5 2>&1 | tail -n 40
pack
# 6. issue 16: Trainer + lorakit vs Trainer + PEFT
echo "=== s16_trainer $(date -u +%H:%M:%S)"
mkdir -p "$OUT/s16_trainer"
OUT="$OUT/s16_trainer" timeout 45 python3 benchmarks/gpu_trainer.py --budget 35 2>&1 | tail -n 20
pack
