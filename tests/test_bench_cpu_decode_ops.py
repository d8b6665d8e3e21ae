"""benchmarks/cpu_decode_ops.py: what lorakit adds to a decode step, counted in kernel-launching ops.

The count is the decode-speed model RESULTS.md uses under CUDA graphs (time follows the kernel count), so it is
pinned here: an unmerged adapter may add to each decoder layer only its low-rank products and accumulations, plus
the casts of float32 factors to the model's dtype; a change that adds kernels to the inference path fails here.
"""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_decode_ops.py"

# per decoder layer (q, k, v and gate, up in shared-input groups; the MLP's down-projection fused):
LOW_RANK = {"aten::cat": 2, "aten::linear": 4, "aten::addmm_": 7,  # x A_catᵀ per group, u Bᵀ accumulated into h
            "aten::mul": -1, "aten::mul_": 1}  # the fused MLP's silu(gate) ⊙ up, in place
FACTOR_CASTS = {"aten::to": 14}  # A and B of 7 linears, float32 → bf16


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cpu_decode_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _added(bench, name: str) -> dict[str, int]:
    frozen, frozen_outside = bench.layer_kernels("frozen")
    layer, outside = bench.layer_kernels(name)
    assert outside == frozen_outside  # nothing outside the decoder layers changes
    diff = collections.Counter(layer)
    diff.subtract(frozen)
    return {op: n for op, n in diff.items() if n}


def test_float32_adapters_add_their_products_and_casts(bench):
    assert _added(bench, "lorakit") == {**LOW_RANK, **FACTOR_CASTS}


def test_adapters_in_the_model_dtype_add_only_their_products(bench):
    assert _added(bench, "lorakit-bf16") == LOW_RANK
