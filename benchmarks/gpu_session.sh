#!/usr/bin/env bash
# The GPU benchmarks of the open issues, as named steps, most important first.
#
#   bash benchmarks/gpu_session.sh                      # every step (more than one 10-minute call)
#   bash benchmarks/gpu_session.sh s19_eager s19_graphs  # only these steps
#
# Each step has its own time limit, so one that runs long or fails cannot take the others' figures;
# everything a step writes goes under $OUT/<step>/, and each step's end packs it all into
# $OUT/results.tar (the device returns at most 8 files). The correctness checks run inside the first
# step of each script (gpu_shapes' lorakit-vs-PEFT check, gpu_qlora's kernel checks); later gpu_shapes
# steps time the same code with --no-check.
#
# Sizing, from the two 2026-12-03 sessions on one H200: a gpu_shapes contender costs 5-20 s to build;
# eager cells take seconds; a regional compile costs 50-75 s per contender and mode (the first
# reduce-overhead cell's warm-up), and reduce-overhead records CUDA graphs per shape on top; s19_main
# (3 contenders x eager + reduce-overhead x 4 shapes + decode) took 460 s. gpu_cli_train saves the 1.14B
# checkpoint (~25 s) before its first run, and each compiled run compiles again.
# Measured so far (see RESULTS.md): s19_main, s19_peft, s17_gemv (second session); s16_ac2, s17_decode, s17_bprof,
# s18_dora4, s19_ro3, s19_cli_ro1, s16_trainer8, s21_8b, s21_small, s19_peftc8 (third); s17_decode and s17_bprof (decode
# now warmed over every KV length), s21_hprof, s17_shapes, s19_compile, s19_decodec, s21_compile (fourth); s19_decode
# (through transformers' compiled generate), s19_decodec2, s21_qlora8, s21_8b_modes, s21_small_compiled, s19_peftc2b
# (fifth; s17_compile, s19_peftc2 and s17_compile8 were cut off while compiling).  Sizing lessons: reduce-overhead
# compiles again for every shape (~75-100 s each), so one shape per contender fits ~130 s; compile mode recompiles
# once more at the first new shape (20-35 s); some hosts compile QLoRA's and PEFT + bitsandbytes' layers for over
# 150 s; machines differ by up to 1.5x in host speed, so every ratio must come from one step.  Not yet measured:
#   s21_qlora8 s17_shapes   (QLoRA's memory and speed after the fifth session's fix: share_inputs / fuse_mlps now
#                            work over NF4; issues 17 and 21)
#   s19_decode_bf16         (#19: decode with CUDA graphs, adapters cast to bf16 for serving)
#   s19_guards              (#19: the CUDA-graph step without guards on module attributes, as lorakit train compiles)
#   s17_decode_graphs       (#17: QLoRA decode with CUDA graphs, the NF4 linear now a custom op)
#   s17_compile8            (#17: QLoRA and PEFT + bitsandbytes compiled; give it a call of its own)
#   s21_offload_compiled    (#21: offloaded checkpointing compiled, which until the sixth session ran eagerly)
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a crashing worker prints its Python stack
if ls .whl/*.whl >/dev/null 2>&1; then   # liger-kernel and bitsandbytes, carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    mkdir -p "$OUT/$name"
    OUT="$OUT/$name" timeout "$limit" "$@" --out "$OUT/$name" 2>&1 | tee "$OUT/$name/log.txt" | tail -n 60
    echo "=== $name exit ${PIPESTATUS[0]}"
    pack
}
pack() { tar -cf "$OUT/results.tar" -C "$OUT" --exclude=results.tar --exclude=log.txt . 2>/dev/null; }
shapes() { step "$1" "$2" python3 benchmarks/gpu_shapes.py --warmup 2 --steps 5 "${@:3}"; }
run_step() {
    case $1 in
    # issue 19, one build per contender: eager and CUDA graphs at every shape, decode in both (with the check)
    s19_main) shapes s19_main 570 --timeout 190 --contenders frozen,peft,lorakit --modes eager,reduce-overhead ;;
    # PEFT alone (its worker crashed in the s19_main run: exit -11 before its first cell), and compiled decode
    s19_peft) shapes s19_peft 180 --timeout 175 --no-check --contenders peft --modes eager,reduce-overhead ;;
    # compiled decode, and where a CUDA-graph step's GPU time goes (kernel profile) at 2×1024
    s19_prof) shapes s19_prof 200 --timeout 98 --no-check --profile --contenders frozen,lorakit --modes reduce-overhead \
        --shapes 2x1024 ;;
    # issue 19: the command users run, --compile off vs reduce-overhead (decides the default on CUDA)
    s19_cli)
        mkdir -p "$OUT/s19_cli"; echo "=== s19_cli $(date -u +%H:%M:%S)"
        OUT="$OUT/s19_cli" timeout 180 python3 benchmarks/gpu_cli_train.py --cases 1:off,1:reduce-overhead,8:reduce-overhead,8:off 2>&1 | tee "$OUT/s19_cli/log.txt" | tail -n 12
        pack ;;
    # lorakit's CUDA-graph step profiled at 2×1024, with the torch backend and with Triton's (reduce-overhead
    # compiles again for each shape, ~75-100 s: one shape per contender)
    s19_ro3) shapes s19_ro3 270 --timeout 134 --no-check --no-decode --profile --contenders lorakit,lorakit-triton \
        --modes reduce-overhead --shapes 2x1024 ;;
    # issue 16: lorakit's eager step without and with bf16 autocast (as Trainer(bf16=True) runs), profiled, one call
    s16_ac2)
        shapes s16_ac2a 45 --timeout 42 --no-check --no-decode --profile --contenders lorakit --modes eager --shapes 1x2048
        shapes s16_ac2b 45 --timeout 42 --no-check --no-decode --profile --autocast --contenders lorakit --modes eager \
            --shapes 1x2048 ;;
    # issue 19: the command with CUDA graphs at batch 1 alone
    s19_cli_ro1)
        mkdir -p "$OUT/s19_cli_ro1"; echo "=== s19_cli_ro1 $(date -u +%H:%M:%S)"
        OUT="$OUT/s19_cli_ro1" timeout 150 python3 benchmarks/gpu_cli_train.py --cases 1:reduce-overhead 2>&1 | tee "$OUT/s19_cli_ro1/log.txt" | tail -n 12
        pack ;;
    # issue 18 at every shape of the batch-shape benchmark
    s18_dora4) shapes s18_dora4 150 --timeout 40 --no-decode --contenders lorakit-plain,dora,peft-dora \
        --modes eager ;;
    # issue 19: decode with CUDA graphs (static KV cache), the merged reference (frozen) and lorakit unmerged
    s19_decode) shapes s19_decode 240 --timeout 118 --no-check --contenders frozen,lorakit --modes reduce-overhead \
        --shapes none ;;
    # issue 19: PEFT under torch.compile (its reduce-overhead crashed), every shape
    s19_peftc) shapes s19_peftc 200 --timeout 195 --no-check --no-decode --contenders peft --modes compile ;;
    s19_peftc8) shapes s19_peftc8 125 --timeout 120 --no-check --no-decode --contenders peft --modes compile \
        --shapes 8x2048 ;;
    # issue 21: the small shapes of the fused-kernel rows, and QLoRA with the kernels
    s21_small) shapes s21_small 170 --timeout 45 --no-check --no-decode --profile --modes eager --shapes 1x512,2x1024 \
        --contenders frozen-liger,peft-liger,lorakit-liger,qlora-liger ;;
    # issue 21's 8B memory table (offload mode, bf16 and NF4)
    s21_8b) step s21_8b 150 python3 benchmarks/gpu_shapes.py --model 8b --warmup 1 --steps 2 --timeout 72 --no-check \
        --no-decode --modes eager --shapes 1x2048,8x2048 --contenders lorakit-liger-offload,qlora-liger-offload ;;
    # issue 17: decode through the dequantise route (GEMV_MAX_TOKENS = 0)
    s17_decode)
        mkdir -p "$OUT/s17_decode"; echo "=== s17_decode $(date -u +%H:%M:%S)"
        OUT="$OUT/s17_decode" timeout 130 python3 benchmarks/gpu_qlora.py --parts b 2>&1 | tee "$OUT/s17_decode/log.txt" | tail -n 12
        pack ;;
    s17_bprof)
        mkdir -p "$OUT/s17_bprof"; echo "=== s17_bprof $(date -u +%H:%M:%S)"
        OUT="$OUT/s17_bprof" timeout 80 python3 benchmarks/gpu_qlora.py --parts bprof 2>&1 | tee "$OUT/s17_bprof/log.txt" | tail -n 32
        pack ;;
    s17_bprof2)  # the same without cuDNN's SDPA backend (the NF4 model spent 36 ms a token in it)
        mkdir -p "$OUT/s17_bprof2"; echo "=== s17_bprof2 $(date -u +%H:%M:%S)"
        OUT="$OUT/s17_bprof2" timeout 70 python3 benchmarks/gpu_qlora.py --parts bprof --sdpa no-cudnn 2>&1 | tee "$OUT/s17_bprof2/log.txt" | tail -n 32
        pack ;;
    s16_trainer8)
        mkdir -p "$OUT/s16_trainer8"; echo "=== s16_trainer8 $(date -u +%H:%M:%S)"
        OUT="$OUT/s16_trainer8" timeout 170 python3 benchmarks/gpu_trainer.py --budget 150 --batches 8 1 \
            --contenders lorakit peft 2>&1 | tee "$OUT/s16_trainer8/log.txt" | tail -n 14
        pack ;;
    s17_gemv)
        mkdir -p "$OUT/s17_gemv"; echo "=== s17_gemv $(date -u +%H:%M:%S)"
        OUT="$OUT/s17_gemv" timeout 130 python3 benchmarks/gpu_qlora.py --parts check,b 2>&1 | tee "$OUT/s17_gemv/log.txt" | tail -n 40
        pack ;;
    s19_eager) shapes s19_eager 170 --timeout 60 --contenders frozen,peft,lorakit --modes eager ;;
    # issue 19: CUDA graphs (reduce-overhead) at the small shapes with compiled decode; torch.compile at 8×2048
    s19_graphs) shapes s19_graphs 300 --timeout 100 --no-check --contenders frozen,peft,lorakit \
        --modes reduce-overhead --shapes 1x512,1x1024 ;;
    s19_compile) shapes s19_compile 340 --timeout 112 --no-check --no-decode --contenders frozen,peft,lorakit \
        --modes compile ;;
    # issue 21: the fused-kernel limit and lorakit with liger in each checkpointing mode
    s21_liger) shapes s21_liger 230 --timeout 45 --no-check --no-decode --modes eager --shapes 1x2048,8x2048 \
        --contenders frozen-liger,peft-liger,lorakit-liger,lorakit-liger-ckpt,lorakit-liger-offload ;;
    # issue 18: DoRA against LoRA and PEFT's DoRA (the DoRA check runs: dora is in the run)
    s18_dora) shapes s18_dora 130 --timeout 40 --no-decode --contenders lorakit-plain,dora,peft-dora \
        --modes eager --shapes 1x2048,8x2048 ;;
    # issue 17: NF4 kernel checks, QLoRA vs bf16 LoRA vs PEFT+bitsandbytes, the 70B-architecture step, decode
    s17_qlora)
        mkdir -p "$OUT/s17_qlora"; echo "=== s17_qlora $(date -u +%H:%M:%S)"
        OUT="$OUT/s17_qlora" timeout 150 python3 benchmarks/gpu_qlora.py --parts check,a,c,b --steps 5 2>&1 | tail -n 40
        pack ;;
    # issue 16: Trainer + lorakit vs Trainer + PEFT at 1×2048 and 8×2048
    s16_trainer)
        mkdir -p "$OUT/s16_trainer"; echo "=== s16_trainer $(date -u +%H:%M:%S)"
        OUT="$OUT/s16_trainer" timeout 200 python3 benchmarks/gpu_trainer.py --budget 180 2>&1 | tail -n 20
        pack ;;
    # fourth session: where liger's extra eager host time goes (lorakit with and without it, profiled, one call)
    s21_hprof) shapes s21_hprof 110 --timeout 52 --no-check --no-decode --profile --modes eager --shapes 2x1024 \
        --contenders lorakit,lorakit-liger ;;
    # issue 17 at every shape: QLoRA (lorakit's NF4) against PEFT + bitsandbytes, eager
    s17_shapes) shapes s17_shapes 130 --timeout 62 --no-check --no-decode --modes eager --contenders qlora,peft-bnb ;;
    # issue 21: the fused-kernel limit and its peers compiled (regional torch.compile), and QLoRA compiled
    s21_compile) shapes s21_compile 185 --timeout 90 --no-check --no-decode --modes compile --shapes 8x2048 \
        --contenders frozen-liger,lorakit-liger ;;
    # issue 19: decode under torch.compile without CUDA graphs (reduce-overhead's decode fails on the static cache)
    s19_decodec) shapes s19_decodec 130 --timeout 64 --no-check --contenders frozen,lorakit --modes compile \
        --shapes none ;;
    s19_decodec2) shapes s19_decodec2 125 --timeout 120 --no-check --contenders lorakit --modes compile --shapes none ;;
    # still unmeasured after the fourth session, one step per missing figure (about two calls in all)
    s21_8b_modes) step s21_8b_modes 300 python3 benchmarks/gpu_shapes.py --model 8b --warmup 1 --steps 2 --timeout 74 \
        --no-check --no-decode --modes eager --shapes 1x2048,8x2048 \
        --contenders lorakit-liger,lorakit-liger-ckpt,qlora-liger,qlora-liger-ckpt ;;
    s21_small_compiled) shapes s21_small_compiled 270 --timeout 132 --no-check --no-decode --modes compile \
        --shapes 1x512,2x1024 --contenders peft-liger,lorakit-liger ;;
    # PEFT compiled at 2x1024, and (s17_compile8) QLoRA vs PEFT + bitsandbytes compiled, with room for a slow host's
    # compile: the first tries (s19_peftc2, 112 s; s17_compile, 132 s a contender) were cut off on 2026-12-03
    s19_peftc2b) shapes s19_peftc2b 250 --timeout 245 --no-check --no-decode --contenders peft --modes compile \
        --shapes 2x1024 ;;
    # issue 19: decode with CUDA graphs, adapters as trained (float32) and cast to bf16 for serving, one machine
    s19_decode_bf16) shapes s19_decode_bf16 280 --timeout 130 --no-check --contenders frozen,lorakit,lorakit-bf16 \
        --modes reduce-overhead --shapes none ;;
    # issue 19: the CUDA-graph step at 2x1024 with every Dynamo guard and as lorakit train compiles (no guards on
    # module attributes), frozen and lorakit, one call
    s19_guards)
        shapes s19_guards_all 260 --timeout 128 --no-check --no-decode --contenders frozen,lorakit \
            --modes reduce-overhead --shapes 2x1024
        shapes s19_guards_run 260 --timeout 128 --no-check --no-decode --no-module-guards --contenders frozen,lorakit \
            --modes reduce-overhead --shapes 2x1024 ;;
    # issue 17: decode with CUDA graphs (transformers' compiled generate), bf16 LoRA and QLoRA, now that the NF4
    # linear compiles without a graph break; one call
    s17_decode_graphs) shapes s17_decode_graphs 280 --timeout 130 --no-check --contenders frozen,lorakit,qlora \
        --modes reduce-overhead --shapes none ;;
    s17_compile8) shapes s17_compile8 300 --timeout 148 --no-check --no-decode --modes compile --shapes 8x2048 \
        --contenders qlora,peft-bnb ;;
    s21_qlora8) shapes s21_qlora8 70 --timeout 66 --no-check --no-decode --modes eager --shapes 8x2048 \
        --contenders qlora-liger ;;
    # issue 21: offloaded checkpointing compiled (inside the checkpoint since the sixth session; before, a compiled
    # offloaded layer ran eagerly) against eager, 8x2048, one machine
    s21_offload_compiled) shapes s21_offload_compiled 260 --timeout 128 --no-check --no-decode --modes eager,compile \
        --shapes 8x2048 --contenders lorakit-liger-offload ;;
    *) echo "unknown step $1 (steps: $ALL)" >&2; return 2 ;;
    esac
}
ALL="s19_main s19_peft s19_compile s19_decode s19_ro3 s19_cli s16_trainer s18_dora4 s17_qlora s21_liger s21_small s21_8b"
for s in ${@:-$ALL}; do run_step "$s"; done
