"""Fuzzing the adapter loader: 2,000 mutated adapter directories per run (LORAKIT_FUZZ_N=100000 for a long
run, LORAKIT_FUZZ_SEED to explore other cases). See tests/fuzz_loader.py for the mutations and checks."""

import os

from tests.fuzz_loader import run


def test_mutated_adapter_files_are_refused_with_typed_errors_and_leave_the_model_unchanged(tmp_path):
    n = int(os.environ.get("LORAKIT_FUZZ_N", "2000"))
    seed = int(os.environ.get("LORAKIT_FUZZ_SEED", "0"))
    result = run(n, seed, tmp_path)
    assert not result["problems"], "\n".join(result["problems"][:20])
    outcomes = dict(result["outcomes"])
    swaps = outcomes.pop("hot_swap ok", 0)
    assert result["untyped"] == 0 and sum(outcomes.values()) == n
    # the mutations reach every stage: loads and hot swaps that succeed and each kind of refusal
    assert {"loaded", "AdapterFileError", "ConfigError", "AdapterMismatchError"} <= set(outcomes) and swaps > 0
