"""CPU kernels (``csrc/cpu_kernels.c``), compiled on first use with the system C compiler and called via ctypes.

A plain C library rather than a torch C++ extension: it compiles in about a second without torch's
headers or ninja, and the call overhead (~1 us) is small next to a matrix-vector product. The library
links the same ``libgomp.so.1`` that torch loaded, so both share one OpenMP thread pool.

Everything here is optional: without an x86-64 AVX2/FMA/F16C CPU or a C compiler (or with
``PHIKIT_NO_KERNELS=1``) ``available()`` is False and callers use PyTorch ops instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
MAX_ROWS = 16  # gemv kernels up to this many activation rows (beats the GEMM there); more use the GEMM

_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def cache_dir() -> Path:
    return Path(os.environ.get("PHIKIT_CACHE", Path.home() / ".cache" / "phikit")) / "kernels"


def _compile() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, platform.node()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
    if result.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        warnings.warn(
            f"phikit: could not compile CPU kernels, using PyTorch ops:\n{result.stderr[-1000:]}", stacklevel=3
        )
        return None
    os.replace(tmp, target)  # atomic: concurrent processes never load a half-written library
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be used."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("PHIKIT_NO_KERNELS") or not _cpu_supported():
        return None
    path = _compile()
    if path is None:
        return None
    _lib = open_library(path)
    return _lib


def open_library(path: str | os.PathLike) -> ctypes.CDLL:
    """A compiled kernel library (this one, or a variant a benchmark built) with its C signatures declared."""
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("phikit_gemv_f32", "phikit_gemv_bf16", "phikit_gemv_f16", "phikit_gemv_i8"):
        getattr(lib, name).argtypes = [p, i64, i64, p, i64, p, p, p]
    lib.phikit_gemv_i4.argtypes = [p, i64, i64, p, i64, i64, p, p, p, p]
    lib.phikit_gelu_tanh.argtypes = [p, i64]
    lib.phikit_gemm.argtypes = [ctypes.c_int, p, i64, i64, p, i64, p, p, p, i64, p, p]
    lib.phikit_to_bf16.argtypes = [ctypes.c_int, p, i64, p]
    lib.phikit_quantize_i8.argtypes = [ctypes.c_int, p, i64, i64, p, p]
    lib.phikit_quantize_i4.argtypes = [ctypes.c_int, p, i64, i64, i64, p, p, p]
    lib.phikit_attention_decode.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, p, p, i64, p, p, p, i64]
    lib.phikit_decode_layers.argtypes = [p, i64, p, i64, i64, i64, ctypes.c_float, i64, i64, i64, p, p, i64]
    lib.phikit_decode_layers.argtypes += [p, p, i64, i64, p, p, i64]
    return lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv(
    x: torch.Tensor,
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x (M, K) fp32 contiguous with M <= MAX_ROWS, W in format ``kind``
    (f32, bf16, f16, int8, int4); scale/minimum/bias are fp32. Returns (M, N) fp32."""
    lib = library()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if kind == "int4":
        lib.phikit_gemv_i4(
            x.data_ptr(),
            m,
            k,
            weight.data_ptr(),
            n,
            group_size,
            scale.data_ptr(),
            minimum.data_ptr(),
            _ptr(bias),
            y.data_ptr(),
        )
    else:
        fn = {
            "f32": lib.phikit_gemv_f32,
            "bf16": lib.phikit_gemv_bf16,
            "f16": lib.phikit_gemv_f16,
            "int8": lib.phikit_gemv_i8,
        }[kind]
        fn(x.data_ptr(), m, k, weight.data_ptr(), n, _ptr(scale), _ptr(bias), y.data_ptr())
    return y


def step_tables(cos: torch.Tensor, sin: torch.Tensor, start: int | torch.Tensor, batch: int) -> tuple:
    """The arguments a one-token step's C attention takes: cos/sin (B, R) from the model's (B, 1, 1, R)
    tables, and per row the cache slot written (``start``: one for all rows, or one per row) and the first
    slot attended (0)."""
    if isinstance(start, torch.Tensor):
        pos = start.to(torch.long).expand(batch).contiguous()
    else:
        pos = torch.full((batch,), start, dtype=torch.long)
    return cos[:, 0, 0].contiguous(), sin[:, 0, 0].contiguous(), pos, torch.zeros_like(pos)


def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    first: torch.Tensor,
) -> torch.Tensor:
    """Rotary embedding, KV-cache write and attention for one new token per row, in one call.

    q (B, H, D), k/v (B, KV, D) fp32 contiguous before rotary; caches (B, KV, S, D) fp32 or fp16, contiguous;
    cos/sin (B, R), pos/first (B,) int64 as ``step_tables`` gives them: write slot and first attended slot.
    Returns (B, H, D)."""
    b, h, d = q.shape
    out = torch.empty_like(q)
    library().phikit_attention_decode(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        b,
        h,
        k.shape[1],
        d,
        cos.shape[-1],
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[2],
        pos.data_ptr(),
        first.data_ptr(),
        out.data_ptr(),
        int(k_cache.dtype == torch.float16),
    )
    return out


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """In-place gelu (tanh form) of a contiguous fp32 tensor; returns it."""
    library().phikit_gelu_tanh(x.data_ptr(), x.numel())
    return x


GEMM_KINDS = {"f32": 0, "bf16": 1, "f16": 2, "int8": 3, "int4": 4}


def gemm(
    x: torch.Tensor,
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for many rows of x (prefill): x (M, K) fp32 contiguous, W as in ``gemv``.
    Returns (M, N) fp32. Needs N % 16 == 0 and K % 64 == 0."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    int4 = kind == "int4"
    library().phikit_gemm(
        GEMM_KINDS[kind],
        x.data_ptr(),
        m,
        k,
        weight.data_ptr(),
        n,
        None if int4 else _ptr(scale),
        _ptr(scale) if int4 else None,
        _ptr(minimum),
        group_size,
        _ptr(bias),
        y.data_ptr(),
    )
    return y


SOURCE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def can_quantize(weight: torch.Tensor, fmt: str, group_size: int) -> bool:
    """Whether ``quantize`` handles this weight (else use quantize.py's PyTorch quantizers)."""
    k = weight.shape[-1]
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.dtype in SOURCE_DTYPES
        and (k % 32 == 0 if fmt == "int8" else fmt == "int4" and k % 64 == 0 and k % group_size == 0)
        and available()
    )


def quantize(weight: torch.Tensor, fmt: str, group_size: int = 64) -> dict[str, torch.Tensor]:
    """int8 / int4 quantization of a CPU weight, equal bit for bit to quantize.py's PyTorch quantizers
    (same fp32 arithmetic and rounding) in one pass per row; see ``can_quantize``."""
    w = weight.contiguous()
    n, k = w.shape
    dtype = SOURCE_DTYPES[w.dtype]
    if fmt == "int8":
        q, scale = empty_weight((n, k), torch.int8), torch.empty(n, dtype=torch.float32)
        library().phikit_quantize_i8(dtype, w.data_ptr(), n, k, q.data_ptr(), scale.data_ptr())
        return {"weight": q, "weight_scale": scale}
    packed = empty_weight((n, k // 2), torch.uint8)
    scale = torch.empty(n, k // group_size, dtype=torch.float16)
    minimum = torch.empty_like(scale)
    library().phikit_quantize_i4(
        dtype, w.data_ptr(), n, k, group_size, packed.data_ptr(), scale.data_ptr(), minimum.data_ptr()
    )
    return {"weight": packed, "weight_scale": scale, "weight_min": minimum}


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
_libc: ctypes.CDLL | None = None


def empty_weight(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, for weights: from 2 MB up, placed at a 2 MB boundary
    with its whole 2 MB pages advised to be transparent huge pages (Linux; must be called before the memory
    is first written, as the advice applies to pages faulted in afterwards).

    Why: loading faults in every page of the model, one 2 MB fault instead of 512 4 KB ones. On this
    project's 2-core VM (benchmarks/RESULTS.md) loading Phi-2 in int8/int4 became 1.5-1.8x faster (bf16
    1.0-1.1x); decoding, which streams every weight per token, read them no faster or slower beyond the
    VM's noise in a same-process A/B. The tensor is a view into a storage up to 2 MB longer;
    the unused part is never touched, so it costs address space, not memory. The tail short of a whole
    2 MB page keeps 4 KB pages, so no page is rounded up. ``PHIKIT_NO_HUGE_PAGES=1``: plain ``torch.empty``.
    """
    global _libc
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < HUGE_PAGE or not sys.platform.startswith("linux") or os.environ.get("PHIKIT_NO_HUGE_PAGES"):
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise(raw.data_ptr() + offset, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)  # advice only
    except (OSError, AttributeError):
        pass
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def to_bf16(t: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``t.to(torch.bfloat16)`` for a contiguous fp32/fp16 CPU tensor: the same bits (finite values; NaN
    stays NaN), several times faster than PyTorch's conversion from fp16. ``in_place`` converts an fp16
    tensor inside its own memory (no new pages to fault in) and returns a bf16 view of it; ``t`` is then
    garbage. Other inputs: ``t.to``."""
    convertible = t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16) and t.is_contiguous()
    if not (convertible and available()):
        return t.to(torch.bfloat16)
    if in_place and t.dtype == torch.float16:
        out = t.view(torch.bfloat16)
    else:
        out = empty_weight(t.shape, torch.bfloat16)
    library().phikit_to_bf16(SOURCE_DTYPES[t.dtype], t.data_ptr(), t.numel(), out.data_ptr())
    return out


class _Linear(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("kind", "n", "k", "group")] + [
        (name, ctypes.c_void_p) for name in ("w", "scale", "minimum", "bias")
    ]


PROJECTIONS = ("q", "k", "v", "dense", "fc1", "fc2")


class _Layer(ctypes.Structure):
    _fields_ = [("ln_weight", ctypes.c_void_p), ("ln_bias", ctypes.c_void_p)] + [(n, _Linear) for n in PROJECTIONS]


def plan_array(plan: list[list]) -> ctypes.Array:
    """The ctypes array ``phikit_decode_layers`` reads: per layer, the LayerNorm's (weight, bias) and six
    linears as (kind, weight, scale, minimum, fp32 bias, group size), q k v dense fc1 fc2."""
    array = (_Layer * len(plan))()
    for entry, (norm, *linears) in zip(array, plan, strict=True):
        entry.ln_weight, entry.ln_bias = norm[0].data_ptr(), norm[1].data_ptr()
        for name, (kind, weight, scale, minimum, bias, group) in zip(PROJECTIONS, linears, strict=True):
            k = weight.shape[1] * (2 if kind == "int4" else 1)
            fields = (GEMM_KINDS[kind], weight.shape[0], k, group, weight.data_ptr(), _ptr(scale), _ptr(minimum))
            setattr(entry, name, _Linear(*fields, _ptr(bias)))
    return array


def decode_layers(
    plan: ctypes.Array, x: torch.Tensor, config, cos: torch.Tensor, sin: torch.Tensor, cache, start: int | torch.Tensor
) -> torch.Tensor:
    """One decoding step through every decoder layer: x (B, 1, hidden) fp32 -> the last layer's output.

    cos/sin (B, 1, 1, rotary_dim) at each row's position; ``cache`` a KVCache (or a view of its first rows)
    whose k/v are fp32 or fp16 with each layer contiguous, written at slot ``start`` (an int, or one slot per row as
    in continuous batching); every slot up to it is attended."""
    x = x.contiguous().clone()
    b = x.shape[0]
    cos, sin, pos, first = step_tables(cos, sin, start, b)
    library().phikit_decode_layers(
        ctypes.addressof(plan),
        len(plan),
        x.data_ptr(),
        b,
        config.hidden_size,
        config.intermediate_size,
        config.layer_norm_eps,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        cos.shape[-1],
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        cache.k.shape[3],
        cache.k.stride(0),
        pos.data_ptr(),
        first.data_ptr(),
        int(cache.k.dtype == torch.float16),
    )
    return x
