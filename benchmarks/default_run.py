"""The default `lorakit train` run, timed end to end: load, build data, eval before, train, eval after, save.

Target (issue 3): ≤ 5 minutes on 2 CPU cores, held-out recall@1 up by ≥ 5 points.

    python benchmarks/default_run.py                 # the real default run
    python benchmarks/default_run.py -- --max-steps 5   # extra `lorakit train` options after --

It runs `lorakit train --out <tmp>` in a fresh process (so imports and model loading count), reads
<tmp>/metrics.json, prints a table and appends a dated line to benchmarks/RESULTS.md under
"## Default run (CPU)".  Other processes on the machine slow it down: the load average at start and
end and the run's CPU seconds are recorded beside the wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Default run (CPU)"
BUDGET_S = 300.0
GAIN_POINTS = 5.0


def append_result(line: str) -> None:
    """Add ``line`` at the end of the section, creating the file or the section if needed."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + (
            f"\n\n{SECTION}\n\n`python benchmarks/default_run.py` — whole `lorakit train` (load, data, eval, train, eval, save).\n\n"
            "| date | host | cores | load avg start→end | steps × batch | wall s | CPU s | R@1 before → after | MRR before → after | versions | ok |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
    head, _, tail = text.partition(SECTION)
    # The section ends at the next "## " heading; the new row goes after its last table row.
    body, sep, rest = tail.partition("\n## ")
    body = body.rstrip("\n") + "\n" + line + "\n"
    RESULTS.write_text(head + SECTION + body + (("\n## " + rest) if sep else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("extra", nargs="*", help="options passed to `lorakit train` (after --)")
    args = parser.parse_args()
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="lorakit-default-run-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "lorakit", "train", "--out", str(out), *args.extra]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime  # CPU seconds of the run: what contention cannot inflate much
        load1 = os.getloadavg()[0]
        if proc.returncode != 0:
            print(f"lorakit train failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
        metrics = json.loads((out / "metrics.json").read_text())
        produced = sorted(p.name for p in out.iterdir())
    before, after = metrics["before"], metrics["after"]
    cfg = metrics.get("config", {}).get("train", {})
    r1b, r1a = before["recall@1"], after["recall@1"]
    gain = 100 * (r1a - r1b)
    ok = wall <= BUDGET_S and gain >= GAIN_POINTS
    print()
    print(f"{'wall time':<22}{wall:8.1f} s   (budget {BUDGET_S:.0f} s)")
    print(f"{'CPU time':<22}{cpu:8.1f} s   (÷ {torch.get_num_threads()} threads = {cpu / torch.get_num_threads():.1f} s if alone)")
    print(f"{'recall@1':<22}{r1b:8.4f} → {r1a:.4f}   ({gain:+.1f} points, need ≥ +{GAIN_POINTS:.0f})")
    print(f"{'MRR':<22}{before['mrr']:8.4f} → {after['mrr']:.4f}")
    print(f"{'outputs':<22}{', '.join(produced)}")
    print(f"{'target met':<22}{'yes' if ok else 'NO'}")
    if not args.no_record:
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}, py {platform.python_version()}"
        steps = f"{metrics['steps']} × {cfg.get('batch_size', '?')}"
        extra = f" (`{' '.join(args.extra)}`)" if args.extra else ""
        append_result(
            f"| {date} | {platform.machine()} {platform.node()[:12]} | {os.cpu_count()} | {load0:.1f}→{load1:.1f} | {steps}{extra} "
            f"| {wall:.1f} | {cpu:.1f} | {r1b:.4f} → {r1a:.4f} ({gain:+.1f}) | {before['mrr']:.4f} → {after['mrr']:.4f} | {versions} "
            f"| {'yes' if ok else 'no'} |"
        )
        print(f"appended to {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
