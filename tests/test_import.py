"""`import lorakit` loads the library core only: no application code, no Triton off CUDA, no Dynamo, no transformers."""

import subprocess
import sys


def test_import_lorakit_stays_the_library_core():
    code = ("import sys, lorakit; "
            "print(','.join(m for m in ('lorakit.analysis', 'lorakit.train', 'lorakit.cli', 'lorakit.integrations', "
            "'transformers', 'liger_kernel', 'torch._dynamo', 'triton') if m in sys.modules))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    # this machine has no CUDA, where Triton's kernels cannot run: Triton is not imported either
    assert out.stdout.strip() == ""


def test_application_names_still_resolve_on_first_use():
    import lorakit

    assert callable(lorakit.analysis.analyze_adapter)
