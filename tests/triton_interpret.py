"""Running Triton checks on the CPU through Triton's interpreter, in a subprocess.

TRITON_INTERPRET=1 must be set before triton is imported, so a test module runs *itself* as a script in
a subprocess with it set: the script part calls :func:`report` (each check's "" or what went wrong, as one
JSON line), and the test part reads that line through :func:`interpreted`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence


def interpreted(test_file: str, timeout: float = 240) -> dict[str, str]:
    """Run ``test_file`` as a script with TRITON_INTERPRET=1 and lorakit's src on the path; its report."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(checks: Sequence[str], check: Callable[[str], str]) -> None:
    """Print {check: "" or the failure} as one JSON line (the subprocess side)."""
    out = {}
    for name in checks:
        try:
            out[name] = check(name)
        except Exception as exc:  # report, so one failing check does not hide the others
            out[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
