"""`lorakit train` as users run it, on the 1.14B Llama of gpu_shapes.py: --compile off vs reduce-overhead.

    python3 benchmarks/gpu_cli_train.py                      # GPU; writes gpu_cli_train.json under $OUT
    python3 benchmarks/gpu_cli_train.py --tiny               # a tiny Llama on the CPU: checks the script

Issue #19 asks the command, not only the library, to be fast and lean: the base stays bf16 on CUDA,
peak memory at 1 × 2048 no more than PEFT's with a bf16 base (6.12 GiB in gpu_shapes' run), and
``--compile``'s default on CUDA picked by measurement.  This script saves the model as a bf16 checkpoint
with a character-level tokenizer, writes lines of exactly ``--seq`` tokens, and runs

    lorakit train --task causal-lm --model M --data D -r 16 --targets all-linear --dropout 0
                  --batch-size B --max-steps N --compile MODE

for each batch size and mode, each in its own process (liger kernels and fusing at their defaults).
Figures: the run's steady tokens/s (metrics.json ``steady_tokens_per_s``: after the first steps, which
compile and record CUDA graphs) and its training peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def make_checkpoint(root: Path, tiny: bool) -> Path:
    """A random-weight Llama saved in bf16 (tiny: float32) with a one-character-per-token tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}, " ": 29}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    if tiny:
        cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:  # gpu_shapes.py's 1.14B: hidden 2048, 16 layers, MLP 8192, 16/8 heads, vocab 32000
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                          torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32 if tiny else torch.bfloat16)
    path = root / "model"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_data(path: Path, lines: int, seq: int) -> None:
    letters = "abcdefghijklmnopqrstuvwxyz "
    with open(path, "w") as f:
        for i in range(lines):  # seq characters = seq tokens, truncated by --max-length to exactly seq
            f.write(json.dumps({"text": "".join(letters[(i * 7 + j * j) % 27] for j in range(seq + 8))}) + "\n")


def run(model: Path, data: Path, out: Path, batch: int, steps: int, seq: int, mode: str, tiny: bool) -> dict:
    cmd = [sys.executable, "-m", "lorakit", "train", "--task", "causal-lm", "--model", str(model), "--data", str(data),
           "--eval-data", str(data.with_name("eval.jsonl")), "-r", "16", "--alpha", "32", "--targets", "all-linear",
           "--dropout", "0", "--batch-size", str(batch), "--max-steps", str(steps), "--max-length", str(seq),
           "--compile", mode, "--out", str(out), "--save-every", "0", "--force"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    row = {"batch": batch, "seq": seq, "steps": steps, "compile": mode, "wall_s": round(time.perf_counter() - t0, 1),
           "rc": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout)[-1500:]
        return row
    m = json.loads((out / "metrics.json").read_text())
    row.update({k: m.get(k) for k in ("tokens_per_s", "steady_tokens_per_s", "peak_gpu_GiB", "seconds")})
    row["loss_first_last"] = [m["history"]["train"][0]["loss"], m["history"]["train"][-1]["loss"]]
    row["summary"] = [line for line in proc.stdout.splitlines() if "tokens/s" in line or "compil" in line][-4:]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (checks the script)")
    p.add_argument("--cases", default="1:off,1:reduce-overhead,8:off,8:reduce-overhead",
                   help="BATCH:COMPILE list, run in this order")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    args = p.parse_args(argv)
    seq = args.seq or (32 if args.tiny else 2048)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorakit-cli-bench-") as tmp:
        root = Path(tmp)
        model = make_checkpoint(root, args.tiny)
        write_data(root / "train.jsonl", 256, seq)
        write_data(root / "eval.jsonl", 2, seq)
        for case in args.cases.split(","):
            batch, mode = int(case.split(":")[0]), case.split(":")[1]
            if args.tiny and mode != "off":
                continue  # CUDA graphs need CUDA; compile on the CPU is the test suite's business
            steps = 6 if args.tiny else max(12, 40 // batch)
            row = run(model, root / "train.jsonl", root / f"run-{batch}-{mode}", batch, steps, seq, mode, args.tiny)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "gpu_cli_train.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
