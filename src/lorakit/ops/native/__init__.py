"""Native CPU kernels for the skinny LoRA products, each one pass over its big operand.

    xat(x, A)            u = x Aᵀ                          x: (N, k)  A: (r, k)  → (N, r)
    g_pass(g, B, u, s)   v = s · g B,  ∂B = s · gᵀ u       g: (N, d)  B: (d, r)  u: (N, r)  → (N, r), (d, r)
    xt_pass(x, v)        ∂A = vᵀ x                         x: (N, k)  v: (N, r)  → (r, k)
    g_pass(..., A=A)     also ∂x_low = v A (N, k), written while v is made
    xat_expand(x, A, w, b)  u = x Aᵀ and h = b + u w in one pass
    expand(c, w, b)      b + c w  (N, r) × (r, D): one write of the result

MKL runs these (N × k by k × r) shapes far below memory speed; ``lora_cpu.c`` streams the big
operand once per call, and ``g_pass`` gets v and ∂B from the same read of g.

The C file is compiled on first use with the system C compiler into a per-user cache
(``$LORAKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``), under a name
that hashes the source, the flags and the platform, and is loaded with ctypes.  It is linked
against the OpenMP runtime torch has already loaded, so both share one thread pool (two runtimes on
a small machine spin against each other).  ``LORAKIT_NATIVE=0`` disables it; when no compiler is
found or the build or load fails, one warning says why and every function computes the same
product with torch instead.  Each function also falls back to torch for inputs the kernels do not
take (not CPU, not float32/float64, not contiguous).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("lora_cpu.c")
_ABI_VERSION = 3
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}

# Flag sets tried in order: the first is fastest on x86 (gcc keeps AVX-512 code at 256-bit lanes
# unless told), the second builds with any gcc or clang on any CPU.
_FLAG_SETS = (
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)

calls = 0  # how many products the native kernels computed (tests check that the native path ran)

_lib: ctypes.CDLL | None = None
_state: str | None = None  # None: not tried yet; "ok"; or the reason it is unavailable
_lock = threading.Lock()


def available() -> bool:
    """True when the native kernels are built and loaded (builds them on the first call)."""
    if _state is None:
        with _lock:
            if _state is None:
                _load()
    return _state == "ok"


def unavailable_reason() -> str | None:
    """Why the native kernels are not used (None when they are, or have not been tried yet)."""
    return None if _state in (None, "ok") else _state


def cache_dir() -> Path:
    """Where built libraries are kept: $LORAKIT_CACHE_DIR, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE_DIR"):
        return Path(os.environ["LORAKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorakit"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if name:
            found = shutil.which(name.split()[0])  # sysconfig's CC may carry flags ("gcc -pthread")
            if found:
                return found
    return None


def _loaded_openmp() -> str | None:
    """Path of the libgomp already mapped into this process (torch's), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1]
                if "libgomp" in os.path.basename(path) and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def _fail(reason: str) -> None:
    global _state
    _state = reason
    warnings.warn(f"lorakit: native CPU kernels disabled ({reason}); using torch for the skinny LoRA products",
                  RuntimeWarning, stacklevel=3)


def _load() -> None:
    global _lib, _state
    if os.environ.get("LORAKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state = "LORAKIT_NATIVE=0"  # asked for: no warning
        return
    cc = _compiler()
    if cc is None:
        _fail("no C compiler found: install gcc or clang, or set CC")
        return
    gomp = _loaded_openmp()
    # With torch's runtime: compile with -fopenmp, link to that very file (not the compiler's own
    # libgomp, which would be a second runtime).  Without one: SIMD only, one thread.
    omp_compile = ["-fopenmp"] if gomp else ["-fopenmp-simd"]
    omp_link = [gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}"] if gomp else []
    source = _SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags + omp_compile + omp_link).encode(), cc.encode(),
                        sys.version.encode(), platform.platform().encode(), str(_ABI_VERSION).encode()])
        ).hexdigest()[:20]
        target = cache_dir() / f"lora_cpu-{key}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
        try:
            try:
                lib = _open(target)
            except OSError:  # not built yet, or a damaged file left in the cache: (re)build it once
                _build(cc, flags + omp_compile, omp_link, target)
                lib = _open(target)
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
            continue
        _declare(lib)
        _lib, _state = lib, "ok"
        return
    _fail("; ".join(errors))


def _open(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    try:
        version = lib.lk_abi_version()
    except AttributeError as err:
        raise OSError(f"{target} is not a lorakit kernel library") from err
    if version != _ABI_VERSION:
        raise OSError(f"{target} has ABI {version}, expected {_ABI_VERSION}")
    return lib


def _build(cc: str, compile_flags: list[str], link: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = os.path.join(tmp, "lora_cpu.o"), os.path.join(tmp, target.name)
        # Two steps: a one-step `cc -fopenmp -shared` would also link the compiler's libgomp.
        for cmd in ([cc, "-std=c11", "-ffp-contract=fast", "-fPIC", *compile_flags, "-c", str(_SOURCE), "-o", obj],
                    [cc, "-shared", obj, *link, "-o", lib]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise OSError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-400:]}")
        os.replace(lib, target)  # atomic: a concurrent process sees the old state or the whole file


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suf in _DTYPES.values():
        getattr(lib, f"lk_xat_{suf}").argtypes = [p, p, p, i64, i64, i64, c_int]
        getattr(lib, f"lk_g_pass_{suf}").argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, dbl, dbl, c_int]
        getattr(lib, f"lk_xat_expand_{suf}").argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, c_int]
        getattr(lib, f"lk_expand_{suf}").argtypes = [p, p, p, p, i64, i64, i64, c_int]
        getattr(lib, f"lk_xt_pass_{suf}").argtypes = [p, p, p, i64, i64, i64, c_int]


def _native_ok(*tensors: Tensor) -> bool:
    """The kernels take CPU tensors of one dtype (float32/float64), contiguous."""
    t0 = tensors[0]
    if t0.dtype not in _DTYPES or t0.device.type != "cpu" or not available():
        return False
    return all(t.dtype == t0.dtype and t.device == t0.device and t.is_contiguous() for t in tensors)


def _run(name: str, dtype: torch.dtype, *args: int | float) -> None:
    """Calls lk_<name>_<f32|f64> with data pointers / sizes / scales, then the thread count."""
    global calls
    code = getattr(_lib, f"lk_{name}_{_DTYPES[dtype]}")(*args, torch.get_num_threads())
    if code:
        raise RuntimeError(f"lorakit native kernel {name} failed with code {code} (out of memory or "
                           f"fewer OpenMP threads than requested); set LORAKIT_NATIVE=0 to use torch")
    calls += 1


def xat(x: Tensor, A: Tensor) -> Tensor:
    """u = x Aᵀ: x (N, k), A (r, k) → (N, r), one read of x."""
    if not _native_ok(x, A):
        return x @ A.t()
    (N, k), r = x.shape, A.shape[0]
    u = torch.empty(N, r, dtype=x.dtype)
    _run("xat", x.dtype, x.data_ptr(), A.data_ptr(), u.data_ptr(), N, k, r)
    return u


def xat_expand(x: Tensor, A: Tensor, sBt: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """u = x Aᵀ (N, r) and h = bias + u sBt (N, d): x (N, k), A (r, k), sBt (r, d), bias (d,) or None.

    One read of x; each block of h is written while its rows of u are hot.
    """
    tensors = (x, A, sBt) if bias is None else (x, A, sBt, bias)
    if not _native_ok(*tensors):
        u = x @ A.t()
        return u, (torch.addmm(bias, u, sBt) if bias is not None else u @ sBt)
    (N, k), r, d = x.shape, A.shape[0], sBt.shape[1]
    u, h = torch.empty(N, r, dtype=x.dtype), torch.empty(N, d, dtype=x.dtype)
    _run("xat_expand", x.dtype, x.data_ptr(), A.data_ptr(), sBt.data_ptr(),
         bias.data_ptr() if bias is not None else None, u.data_ptr(), h.data_ptr(), N, k, d, r)
    return u, h


def expand(coef: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """bias + coef w: coef (N, r), w (r, D), bias (D,) or None → (N, D), one write of the result."""
    tensors = (coef, w) if bias is None else (coef, w, bias)
    if not _native_ok(*tensors):
        return torch.addmm(bias, coef, w) if bias is not None else coef @ w
    (N, r), D = coef.shape, w.shape[1]
    out = torch.empty(N, D, dtype=coef.dtype)
    _run("expand", coef.dtype, coef.data_ptr(), w.data_ptr(), bias.data_ptr() if bias is not None else None,
         out.data_ptr(), N, D, r)
    return out


def g_pass(g: Tensor, B: Tensor, u: Tensor, s_v: float, s_b: float,
           A: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """v = s_v · g B (N, r), ∂B = s_b · gᵀ u (d, r; a transposed (r, d) buffer) and, if A (r, k) is
    given, v A (N, k) — all from one read of g (N, d)."""
    Bt = B.t().contiguous()  # (r, d): the kernel wants B's columns contiguous; it is tiny
    tensors = (g, Bt, u) if A is None else (g, Bt, u, A)
    if not _native_ok(*tensors):
        v = (g @ B).mul_(s_v)
        return v, (u.t() @ g).mul_(s_b).t(), (v @ A if A is not None else None)  # uᵀg: the faster GEMM shape
    (N, d), r = g.shape, B.shape[1]
    k = A.shape[1] if A is not None else 0
    v, dBt = torch.empty(N, r, dtype=g.dtype), torch.empty(r, d, dtype=g.dtype)
    gx = torch.empty(N, k, dtype=g.dtype) if A is not None else None
    _run("g_pass", g.dtype, g.data_ptr(), Bt.data_ptr(), u.data_ptr(), A.data_ptr() if A is not None else None,
         v.data_ptr(), dBt.data_ptr(), gx.data_ptr() if gx is not None else None, N, d, k, r, float(s_v), float(s_b))
    return v, dBt.t(), gx


def xt_pass(x: Tensor, v: Tensor) -> Tensor:
    """∂A = vᵀ x: x (N, k), v (N, r) → (r, k), one read of x."""
    if not _native_ok(x, v):
        return v.t() @ x
    (N, k), r = x.shape, v.shape[1]
    dA = torch.empty(r, k, dtype=x.dtype)
    _run("xt_pass", x.dtype, x.data_ptr(), v.data_ptr(), dA.data_ptr(), N, k, r)
    return dA
