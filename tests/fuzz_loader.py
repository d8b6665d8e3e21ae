"""A seeded mutation fuzzer for adapter loading (``read_adapter``, ``load_adapter``, ``hot_swap``, and
``lorakit inspect``'s report).

Each case starts from a valid adapter directory and applies one mutation: byte flips, truncations,
NaN/inf written into the data, a rewritten safetensors header (dtype, shape, offsets, a duplicated
or dropped key, metadata), or a rewritten adapter_config.json (a field set to a hostile value,
deleted, byte-flipped or truncated).  What must hold for every case:

* a failure is a :class:`lorakit.LorakitError` (never another exception type);
* after a failure the model is exactly as before: state_dict, module tree, requires_grad flags (and a
  failed ``hot_swap`` leaves the slot's weights as they were);
* a success loaded only finite, floating-point LoRA tensors;
* no call takes more than 1 s of CPU time (a hang burns CPU; wall time on a shared machine does not
  say whether the loader or the neighbours were slow).

Used by tests/test_fuzz_loader.py; ``python -m tests.fuzz_loader N [SEED]`` runs N cases and prints
the counts.
"""

from __future__ import annotations

import collections
import copy
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

import lorakit
from lorakit.cli.inspect import describe
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from lorakit.peft_keys import split_lora_key

MAX_CPU_SECONDS = 1.0

_DTYPES = ["F4", "F6_E2M3", "F8_E4M3", "F8_E5M2", "E8M0", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64",
           "BOOL", "C64", "F16", "BF16", "F32", "F64", "XX", "", 5, None]
# dtypes of equal width: the file stays consistent, so only lorakit's own dtype check can refuse it
_SAME_WIDTH = {2: ["F16", "BF16", "I16", "U16"], 4: ["F32", "I32", "U32"], 8: ["F64", "I64", "U64", "C64"],
               1: ["I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]}
_WIDTH = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_RAW = {  # JSON text no json.dumps would write
    "@deep@": "[" * 3000 + "]" * 3000,
    "@deepish@": "[" * 900 + "]" * 900,
    "@huge-int@": "9" * 5000,
    "@big-int@": "9" * 4000,
    "@nan@": "NaN",
    "@inf@": "-Infinity",
}
_VALUES = [None, True, False, 0, -1, 2, 3, 10**30, 1.5, -0.0, 1e308, "x", "", "LORA", "lora", "none", "all", "(?i)q",
           "(a|a)+\\d", "(.+)+\\d\\d\\d\\d", "x{99999999999}", "(q{1000}){1000}", "q_proj", "all-linear", ".*", "[",
           "(?i)q_proj", "(?i:q)_proj", ".*\\.(q|v)_proj", [], {}, ["q_proj"], ["q_proj", "v_proj"], ["nope"], [1],
           [[["q_proj"]]], {"a": 1}, {"(?i)q": 2}, {"q_proj": 0}, {"q_proj": 10**30}, {"q_proj": 4}, {"v_proj": 1.5},
           {"(a|a)+\\d": 2}, {"q_proj": "x"}, ["lm_head"], ["model"], "gaussian", "pissa", "olora", "pissa_niter_0",
           *_RAW]
_CONFIG_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "rank_pattern",
                "alpha_pattern", "modules_to_save", "peft_type", "bias", "init_lora_weights", "use_dora",
                "fan_in_fan_out", "task_type", "base_model_name_or_path", "layers_to_transform", "lora_bias",
                "target_parameters"]
_FINGERPRINTS = ["{", "[]", "5", "null", '{"modules": 5}', '{"modules": {}}', '{"modules": {"a": [1, "x"]}, "checksum": "0"}',
                 '{"modules": {}, "checksum": 5}', '{"modules": {"x": [-1]}, "checksum": "a"}', "[" * 3000,
                 '{"modules": {}, "checksum": "a", "checksum": "b"}', '{"modules": {"model.layers.0.self_attn.q_proj": '
                 '[32, 32]}, "checksum": "0"}', "NaN", '"' + "x" * 1000 + '"']


def build_model():
    from tests.conftest import tiny_llama

    model = tiny_llama()
    # a mix of flags, so that restoring them is checked rather than assumed
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
    return model


def seed_adapters(root: Path) -> list[dict[str, bytes]]:
    """Valid adapter directories (their files' bytes) to mutate."""
    configs = [
        lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        lorakit.LoraConfig(r=2, alpha=8, target_modules=r".*\.(k_proj|o_proj)", rank_pattern={"k_proj": 3},
                           alpha_pattern={"o_proj": 2}, use_rslora=True, modules_to_save=["lm_head"]),
    ]
    seeds = []
    for i, cfg in enumerate(configs):
        model = build_model()
        lorakit.inject(model, cfg)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.lora_B["default"].normal_(generator=torch.Generator().manual_seed(i))
        path = lorakit.save_adapter(model, root / f"seed{i}")
        seeds.append({name: (path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)})
    return seeds


def _split(weights: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", weights[:8])[0]
    return json.loads(weights[8 : 8 + n]), weights[8 + n :]


def _join(header_text: str, data: bytes, rng: random.Random) -> bytes:
    raw = header_text.encode()
    n = len(raw) if rng.random() < 0.9 else rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2**63, len(raw) + len(data)])
    return struct.pack("<Q", n % 2**64) + raw + data


def _dumps(obj: object) -> str:
    text = json.dumps(obj)
    for placeholder, raw in _RAW.items():
        text = text.replace(json.dumps(placeholder), raw)
    return text


def mutate(files: dict[str, bytes], rng: random.Random) -> tuple[dict[str, bytes], str]:
    """One mutated copy of an adapter directory's files, and a short description of the mutation."""
    files = dict(files)
    kind = rng.choice(["flip", "flip-header", "truncate", "nonfinite", "header", "header", "header", "config",
                       "config", "config-bytes"])
    if kind in ("flip", "flip-header"):
        name = WEIGHTS_NAME if kind == "flip-header" or rng.random() < 0.8 else CONFIG_NAME
        data = bytearray(files[name])
        n_header = 8 + struct.unpack("<Q", files[WEIGHTS_NAME][:8])[0]
        span = min(len(data), n_header) if kind == "flip-header" and name == WEIGHTS_NAME else len(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(span)
            data[i] ^= 1 << rng.randrange(8)
        files[name] = bytes(data)
        return files, f"{kind} {name}"
    if kind == "truncate":
        name = rng.choice([WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME])
        files[name] = files[name][: rng.randrange(len(files[name]))]
        return files, f"truncate {name}"
    if kind == "nonfinite":
        header, data = _split(files[WEIGHTS_NAME])
        key = rng.choice([k for k in header if k != "__metadata__"])
        info = header[key]
        width = _WIDTH[info["dtype"]]
        begin, end = info["data_offsets"]
        value = rng.choice([float("nan"), float("inf"), -float("inf")])
        fmt = {2: "<e", 4: "<f", 8: "<d"}[width]
        packed = struct.pack(fmt, value) if info["dtype"] != "BF16" else struct.pack("<f", value)[2:]
        pos = begin + width * rng.randrange(max(1, (end - begin) // width))
        data = data[:pos] + packed + data[pos + width :]
        files[WEIGHTS_NAME] = _join(json.dumps(header), data, random.Random(0))
        return files, f"nonfinite {key}"
    if kind == "header":
        return _mutate_header(files, rng)
    if kind == "config-bytes":
        text = files[CONFIG_NAME]
        cut = rng.randrange(len(text))
        files[CONFIG_NAME] = text[:cut] + bytes([rng.randrange(256)]) + text[cut + 1 :]
        return files, "config byte"
    config = json.loads(files[CONFIG_NAME])
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        key = rng.choice(_CONFIG_KEYS)
        if rng.random() < 0.15:
            config.pop(key, None)
            what.append(f"-{key}")
        else:
            config[key] = copy.deepcopy(rng.choice(_VALUES))
            what.append(f"{key}={str(config[key])[:30]}")
    files[CONFIG_NAME] = _dumps(config).encode()
    return files, "config " + ", ".join(what)


def _mutate_header(files: dict[str, bytes], rng: random.Random) -> tuple[dict[str, bytes], str]:
    header, data = _split(files[WEIGHTS_NAME])
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    op = rng.choice(["dtype", "dtype-same-width", "shape", "offsets", "duplicate", "drop", "rename", "metadata",
                     "metadata", "entry"])
    text = None
    if op == "dtype":
        header[key]["dtype"] = rng.choice(_DTYPES)
    elif op == "dtype-same-width":
        width = _WIDTH[header[key]["dtype"]]
        if rng.random() < 0.5:  # every tensor at once: e.g. an adapter that is all int32
            for k in keys:
                if _WIDTH.get(header[k]["dtype"]) == width:
                    header[k]["dtype"] = rng.choice(_SAME_WIDTH[width])
        else:
            header[key]["dtype"] = rng.choice(_SAME_WIDTH[width])
    elif op == "shape":
        shape = header[key]["shape"]
        choice = rng.randrange(5)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, -1, 2**31, 2**64, 10**30, "3", None, 1.5])
        elif choice == 1:
            shape.append(1)
        elif choice == 2 and shape:
            shape.pop()
        elif choice == 3 and len(shape) == 2:
            shape.reverse()
        else:
            header[key]["shape"] = rng.choice([[], None, 5, [[2]], [2] * 40])
    elif op == "offsets":
        off = header[key]["data_offsets"]
        choice = rng.randrange(4)
        if choice == 0:
            off[rng.randrange(2)] += rng.choice([-4, -1, 1, 4, 2**40, 2**64])
        elif choice == 1:
            off.reverse()
        elif choice == 2:
            header[key]["data_offsets"] = rng.choice([[], [0], None, [0, 0], [-1, 4], ["0", "4"]])
        else:
            other = rng.choice(keys)
            header[key]["data_offsets"] = list(header[other]["data_offsets"])
    elif op == "duplicate":
        entry = json.dumps(header[rng.choice(keys)])
        body = json.dumps(header)
        text = body[:-1] + f", {json.dumps(key)}: {entry}}}"
    elif op == "drop":
        del header[key]
    elif op == "rename":
        new = rng.choice([key.replace("lora_A", "lora_B"), key.replace("base_model.model.", ""), key + ".x",
                          key.replace("q_proj", "k_proj"), "", "__metadata__x", key.replace(".weight", ".default.weight")])
        header[new] = header.pop(key)
    elif op == "metadata":
        meta = header.setdefault("__metadata__", {})
        choice = rng.randrange(4)
        if choice == 0:
            meta["lorakit_base_fingerprint"] = rng.choice(_FINGERPRINTS)
        elif choice == 1:
            meta.pop("lorakit_base_fingerprint", None)
        elif choice == 2:
            meta[rng.choice(["format", "lorakit_base_fingerprint", "x"])] = rng.choice([5, None, [], {}, "pt"])
        else:
            header["__metadata__"] = rng.choice([None, [], 5, "x", {"__metadata__": {}}])
    else:
        header[key] = rng.choice([None, 5, "x", [], {}, {"dtype": "F32"}, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                                                             "extra": 1}])
    files[WEIGHTS_NAME] = _join(text if text is not None else json.dumps(header), data, rng)
    return files, f"header {op} {key[-40:]}"


def build_slot():
    """A model with an adapter slot every seed adapter fits into (rank 8 ≥ theirs), for hot_swap."""
    model = build_model()
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             modules_to_save=["lm_head"]))
    return model


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _same(model, snap) -> str:
    state, names, flags = snap
    if [n for n, _ in model.named_modules()] != names:
        return "module tree changed"
    if [(n, p.requires_grad) for n, p in model.named_parameters()] != flags:
        return "requires_grad flags changed"
    now = model.state_dict()
    if now.keys() != state.keys() or not all(torch.equal(state[k], v) for k, v in now.items()):
        return "state_dict changed"
    if lorakit.adapter_names(model):
        return "an adapter was left behind"
    return ""


def _restore_flags(model, snap) -> None:
    flags = dict(snap[2])
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])


def _silent_acceptance(path: Path) -> str:
    """After a successful load: every LoRA tensor in the file was floating point and finite."""
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if split_lora_key(key) is not None and not t.dtype.is_floating_point:
                return f"accepted a {t.dtype} LoRA tensor {key}"
            if t.is_floating_point() and not torch.isfinite(t).all():
                return f"accepted non-finite values in {key}"
    return ""


def _hot_swap(slot, adapter, slot_state) -> tuple[bool, str]:
    """hot_swap ``adapter`` into ``slot``: (whether it swapped — then it is undone, the problem or "")."""
    try:
        lorakit.hot_swap(slot, "default", adapter, strict=False)
    except lorakit.LorakitError:
        now = slot.state_dict()
        return False, "" if all(torch.equal(slot_state[k], v) for k, v in now.items()) else "a failed hot_swap changed the slot"
    except Exception as err:  # noqa: BLE001
        return False, f"hot_swap: untyped {type(err).__name__}: {str(err)[:200]}"
    slot.load_state_dict(slot_state)
    return True, ""


def run(n: int, seed: int = 0, workdir: Path | None = None, report_every: int = 0) -> dict:
    """Run ``n`` cases; returns counts and the problems found (empty when the loader holds).
    ``report_every``: print the running counts (and each problem at once) to stderr every so many cases."""
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name if tmp else workdir)
    seeds = seed_adapters(root)
    model = build_model()
    snap = _state(model)
    slot = build_slot()
    slot_state = {k: v.clone() for k, v in slot.state_dict().items()}
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    slowest = (0.0, "")
    case_dir = root / "case"
    case_dir.mkdir()
    describe(root / "seed0")  # imports what the report needs (peft) before any call is timed
    wall0 = time.monotonic()
    for i in range(n):
        files, what = mutate(seeds[rng.randrange(len(seeds))], rng)
        for name, data in files.items():
            (case_dir / name).write_bytes(data)
        outcome, problem = "loaded", ""
        t0 = time.process_time()
        swapped = ""
        try:
            adapter = lorakit.read_adapter(case_dir)
            describe(case_dir)  # lorakit inspect's report
            ok, swapped = _hot_swap(slot, adapter, slot_state)
            counts["hot_swap ok"] += ok
            lorakit.load_adapter(model, case_dir)
        except lorakit.LorakitError as err:
            outcome = type(err).__name__
            problem = _same(model, snap)
            if "\n" in str(err):
                problem = problem or f"multi-line message {str(err)[:100]!r}"
        except Exception as err:  # noqa: BLE001 — the point: nothing else may escape
            outcome = "untyped"
            problem = f"untyped {type(err).__name__}: {str(err)[:200]}"
        cpu = time.process_time() - t0
        if swapped:  # hot_swap raised something other than a LorakitError, or changed the slot when it failed
            problem = problem or swapped
            counts["untyped"] += swapped.startswith("hot_swap: untyped")
        if outcome == "loaded":
            problem = _silent_acceptance(case_dir)
            lorakit.delete_adapter(model, "default")
            _restore_flags(model, snap)
            problem = problem or _same(model, snap)
        if cpu > slowest[0]:
            slowest = (cpu, what)
        if cpu > MAX_CPU_SECONDS:
            problem = problem or f"took {cpu:.2f} s of CPU"
        counts[outcome] += 1
        if problem:
            problems.append(f"case {i} (seed {seed}, {what}): {problem}")
            if report_every:
                print(problems[-1], file=sys.stderr, flush=True)
        if report_every and (i + 1) % report_every == 0:
            print(f"{i + 1} cases, {len(problems)} problems, {dict(counts)}, slowest {slowest[0]:.4f} s CPU "
                  f"({slowest[1]}), {time.monotonic() - wall0:.0f} s", file=sys.stderr, flush=True)
            model, snap = build_model(), None
            snap = _state(model)
    if tmp:
        tmp.cleanup()
    return {"cases": n, "seed": seed, "outcomes": dict(counts), "problems": problems, "untyped": counts["untyped"],
            "slowest_cpu_s": round(slowest[0], 4), "slowest_case": slowest[1],
            "wall_s": round(time.monotonic() - wall0, 1)}


if __name__ == "__main__":
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, int(sys.argv[2]) if len(sys.argv) > 2 else 0,
                 report_every=1000)
    problems = result.pop("problems")
    print(json.dumps(result, indent=1))
    for line in problems[:50]:
        print(line)
    print(f"{len(problems)} problem(s)")
    sys.exit(1 if problems else 0)
