"""Which backend computes a LoRA linear: chosen from the input alone (device, dtype, size), never by the caller.

Both backends have the same plain functions (``lora_forward``, ``lora_backward`` and the pieces grouped
callers compose), so every op — the single linear, the shared-input group, the fused SwiGLU
down-projection, eager or compiled — runs the one definition of the math its backend has:

* ``triton_lora``: cuBLAS for the big products against the merged weight W + s·B A, Triton passes for
  the skinny ones.  Fewest bytes moved, but every Triton launch costs host time (tens of µs).
* ``torch_lora``: aten ops only.  Used off CUDA, for float64, and on CUDA below ``TRITON_MIN_ROWS``
  tokens, where the step is bound by the host, not by passes over memory: there fewer, cheaper launches
  win (and under ``torch.compile`` Inductor fuses the small products with their neighbours).

The choice depends on x's row count, which forward and backward see identically, so a backward always
runs the backend its forward ran.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import torch_lora

#: Triton kernels run on CUDA, or in Triton's CPU interpreter (tests). Anywhere else importing Triton would
#: only make ``import lorakit`` slower (≈ 0.3–0.5 s), so the Triton modules are imported only where they can run.
TRITON_USABLE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
if TRITON_USABLE:
    from . import triton_lora
else:
    triton_lora = None

# Below this many rows (tokens) CUDA runs the torch backend.  Measured on the H200 (benchmarks/RESULTS.md,
# gpu_compile_check, 2026-12-03): one 4096² layer's eager forward+backward, torch / Triton backend, took
# 0.58 / 0.78 ms at 1024 rows, 0.60 / 0.89 at 4096, 1.03 / 1.12 at 8192 and 1.97 / 1.89 at 16384; the
# host time of a small layer's forward+backward is 565 µs with the torch backend, 881 with Triton.
TRITON_MIN_ROWS = 16384

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will record an op on ``tensors``: grad mode is on and one of them requires grad.
    Ops whose call records nothing (decode, evaluation) skip their autograd node and its host time."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backend_for(x: Tensor):
    """The backend module (``triton_lora`` or ``torch_lora``) for a LoRA linear whose (N, k) input is ``x``."""
    if (triton_lora is not None and x.is_cuda and x.dtype in _TRITON_DTYPES and x.shape[0] >= TRITON_MIN_ROWS
            and triton_lora.available()):
        return triton_lora
    return torch_lora
