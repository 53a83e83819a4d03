"""CPU kernels (``csrc/cpu_kernels.c``), compiled on first use with the system C compiler and called via ctypes.

A plain C library rather than a torch C++ extension: it compiles in about a second without torch's
headers or ninja, and the call overhead (~1 us) is small next to a matrix-vector product. The library
links the same ``libgomp.so.1`` that torch loaded, so both share one OpenMP thread pool.

Builds: one per instruction set, with explicit flags, never ``-march=native``: ``avx2`` (AVX2 + FMA + F16C,
the baseline) and ``avx512`` (plus AVX-512 F/BW/VL/DQ, and BF16/VNNI where the CPU has them), the widest
the CPU's flags allow picked at run time (``PHIKIT_CPU_ISA=avx2`` forces the baseline). A build is keyed
by the source, the compiler's version and the flags, and cached in ``$PHIKIT_CACHE/kernels`` (default
``~/.cache/phikit/kernels``) only where that folder and the library are the current user's and writable by
no one else; otherwise the library is built in a private temporary folder and loaded from there.

Every call goes through a wrapper that checks each tensor's device, dtype, shape and contiguity (and the
cache slots' range) before any pointer reaches C: a mistake is a ValueError, never a read past a buffer.

Everything here is optional: without an x86-64 AVX2/FMA/F16C CPU or a working C compiler (``CC`` may
hold a command with arguments, e.g. ``ccache gcc``), or with ``PHIKIT_NO_KERNELS=1``, ``available()`` is
False, callers use PyTorch ops instead, and phikit says why once on stderr.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ISA_FLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
}
ISA_CPU_FLAGS = {"avx2": ("avx2", "fma", "f16c"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}
EXTRA_AVX512 = {"avx512_bf16": "-mavx512bf16", "avx512_vnni": "-mavx512vnni"}  # added where the CPU has them
MAX_ROWS = 16  # gemv kernels up to this many activation rows (beats the GEMM there); more use the GEMM
COMPILE_TIMEOUT_S = 300

_lib: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> str | None:
    """The widest build this CPU runs (``avx512`` or ``avx2``), or None for no build at all."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo: ask PyTorch
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())
    levels = [level for level in ("avx2", "avx512") if all(f in flags for f in ISA_CPU_FLAGS[level])]
    if "avx2" not in levels:
        return None
    forced = os.environ.get("PHIKIT_CPU_ISA", "").strip().lower()
    if forced in ISA_FLAGS and forced in levels:
        return forced
    return levels[-1]


def compile_flags(level: str | None = None) -> list[str]:
    """The compiler flags of the ``level`` build (default: this CPU's)."""
    level = level or isa() or "avx2"
    flags = [*BASE_FLAGS, *ISA_FLAGS[level]]
    if level == "avx512":
        present = cpu_flags()
        flags += [flag for name, flag in EXTRA_AVX512.items() if name in present]
    return flags


def cache_dir() -> Path:
    return Path(os.environ.get("PHIKIT_CACHE", Path.home() / ".cache" / "phikit")) / "kernels"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class _Unavailable(Exception):
    """Why the kernels cannot be used here (one line)."""


def _compiler() -> list[str]:
    """The C compiler command (``CC`` split like a shell would, else cc or gcc) and that it runs."""
    if os.environ.get("CC", "").strip():
        try:
            command = shlex.split(os.environ["CC"])
        except ValueError as e:
            raise _Unavailable(f"CC={os.environ['CC']!r} is not a valid command ({e})") from None
    else:
        found = shutil.which("cc") or shutil.which("gcc")
        if found is None:
            raise _Unavailable("no C compiler (install gcc, or set CC)")
        command = [found]
    return command


def _compiler_version(command: list[str]) -> str:
    try:
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"the C compiler {' '.join(command)!r} does not run ({e})") from None
    if result.returncode != 0:
        raise _Unavailable(f"the C compiler {' '.join(command)!r} does not run (exit {result.returncode})")
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""


def _private(path: Path, directory: bool) -> bool:
    """Owned by this user, of the expected kind, not a link, and writable by no one else."""
    try:
        info = path.lstat()
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    return kind_ok and info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _build(command: list[str], flags: list[str], out: Path) -> None:
    try:
        result = subprocess.run(
            [*command, *flags, "-o", str(out), str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"could not run the C compiler ({e})") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise _Unavailable(f"could not compile the CPU kernels ({last[:300]})")


def _remove_stale_parts(cache: Path) -> None:
    """Half-written libraries of processes killed while publishing one (older than ten minutes)."""
    for part in cache.glob(".part-*"):
        try:
            if time.time() - part.lstat().st_mtime > 600 and _private(part, directory=False):
                part.unlink()
        except OSError:
            pass


def _publish(built: Path, target: Path) -> None:
    """Copy a built library into the cache (atomically, mode 0600); silently skipped where it cannot be."""
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private(cache, directory=True):
            return
        _remove_stale_parts(cache)
        fd, part = tempfile.mkstemp(dir=cache, prefix=".part-", suffix=".so")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(built.read_bytes())
            os.replace(part, target)
        except OSError:
            Path(part).unlink(missing_ok=True)
    except OSError:
        pass


def _load() -> ctypes.CDLL:
    level = isa()
    if level is None:
        raise _Unavailable(f"this CPU ({platform.machine()}) has no AVX2/FMA/F16C")
    command = _compiler()
    flags = compile_flags(level)
    identity = "\0".join([*command, _compiler_version(command), *flags])
    key = hashlib.sha256(SOURCE.read_bytes() + identity.encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{level}-{key}.so"
    if _private(target.parent, directory=True) and _private(target, directory=False):
        try:
            return open_library(target)
        except (OSError, AttributeError):  # 0 bytes, corrupt, or an older build: replace it
            target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="phikit-kernels-") as tmp:  # 0700, removed whatever happens
        built = Path(tmp) / target.name
        _build(command, flags, built)
        try:
            lib = open_library(built)  # the mapping outlives the file
        except (OSError, AttributeError) as e:
            raise _Unavailable(f"the compiled CPU kernels do not load ({e})") from None
        _publish(built, target)
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be used (and then, once, the reason on stderr)."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    _tried = True
    if _env_true("PHIKIT_NO_KERNELS"):
        _why_not = "PHIKIT_NO_KERNELS is set"
        return None
    try:
        _lib = _load()
    except _Unavailable as e:
        _why_not = str(e)
        print(f"phikit: CPU kernels unavailable: {e}; using PyTorch's CPU ops (slower)", file=sys.stderr)
    return _lib


def unavailable_reason() -> str | None:
    """Why ``library()`` is None (after it was asked), else None."""
    return _why_not


C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float, "void": None}


def signatures(source: Path = SOURCE) -> dict[str, tuple]:
    """The library's exported functions as its source declares them, once, in the PHIKIT_API block:
    {name: (return ctypes type, [argument ctypes types])}; pointers of any type are ``c_void_p``."""
    text = source.read_text()
    block = text[text.index("/* PHIKIT_API") : text.index("/* END PHIKIT_API */")]
    out = {}
    for line in block.splitlines():
        match = re.fullmatch(r"(int64_t|void) (phikit_\w+)\((.*)\);", line.strip())
        if not match:
            continue
        params = [] if match[3] == "void" else [p.strip() for p in match[3].split(",")]
        types = [ctypes.c_void_p if "*" in p else C_TYPES[p.rsplit(" ", 1)[0].removeprefix("const ")] for p in params]
        out[match[2]] = (C_TYPES[match[1]], types)
    return out


def open_library(path: str | os.PathLike) -> ctypes.CDLL:
    """A compiled kernel library (this one, or a variant a benchmark built) with its C signatures declared
    from the source's PHIKIT_API block (``signatures``), so Python and C never disagree on them."""
    lib = ctypes.CDLL(str(path))
    for name, (result, arguments) in signatures().items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


def available() -> bool:
    return library() is not None


FEATURE_BF16_DP = 1  # the library has phikit_gemv_bf16_dp (an AVX-512 BF16 build)
FEATURE_VNNI = 2  # the library has phikit_gemm_vnni (an AVX-512 VNNI build)


def has(feature: int) -> bool:
    """Whether the loaded library was built with an optional kernel (``FEATURE_*``)."""
    return available() and bool(library().phikit_features() & feature)


def gemv_bf16_dp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = bf16(x) @ W.T (+ bias) for bf16 W (N, K) with AVX-512 BF16 dot products: x (M, K) fp32,
    M <= MAX_ROWS, is rounded to bf16 first. Only where ``has(FEATURE_BF16_DP)``. Returns (M, N) fp32."""
    if not has(FEATURE_BF16_DP):
        raise ValueError("phikit CPU kernel: this library has no AVX-512 BF16 kernels")
    n, k = check_linear("gemv_bf16_dp", "bf16", weight, None, None, bias, 0)
    m = x.shape[0] if x.dim() == 2 else -1
    check("gemv input", x, torch.float32, (m, k))
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"phikit CPU kernel: gemv takes 1 to {MAX_ROWS} rows, got {m}")
    y = torch.empty(m, n, dtype=torch.float32)
    library().phikit_gemv_bf16_dp(x.data_ptr(), m, k, weight.data_ptr(), n, _ptr(bias), y.data_ptr())
    return y


# ---- checks before any pointer reaches C ----


def check(what: str, t: torch.Tensor | None, dtypes, shape: tuple | None = None, optional: bool = False) -> None:
    """``t`` is a contiguous CPU tensor of one of ``dtypes`` (a dtype or a tuple) and, if given, ``shape``;
    else a ValueError naming ``what``."""
    if t is None and optional:
        return
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    problem = None
    if not isinstance(t, torch.Tensor):
        problem = f"got {type(t).__name__}"
    elif t.device.type != "cpu":
        problem = f"on {t.device}"
    elif t.dtype not in dtypes:
        problem = f"dtype {t.dtype}"
    elif shape is not None and tuple(t.shape) != tuple(shape):
        problem = f"shape {tuple(t.shape)}"
    elif not t.is_contiguous():
        problem = "not contiguous"
    if problem:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"phikit CPU kernel: {what} must be a contiguous CPU {names} tensor of shape {shape}: {problem}"
        )


WEIGHT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "int8": torch.int8}


def check_linear(what: str, kind: str, weight, scale, minimum, bias, group_size: int) -> tuple[int, int]:
    """A linear layer's tensors as the kernels read them; returns (N, K). Shapes as ``gemv`` documents."""
    if kind not in (*WEIGHT_DTYPES, "int4"):
        raise ValueError(f"phikit CPU kernel: unknown weight kind {kind!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"phikit CPU kernel: {what} weight must be a 2-D tensor")
    n, k = weight.shape[0], weight.shape[1] * (2 if kind == "int4" else 1)
    if k % 64 or n % 16:
        raise ValueError(f"phikit CPU kernel: {what} needs in_features % 64 == 0 and out_features % 16 == 0")
    check(
        f"{what} weight",
        weight,
        torch.uint8 if kind == "int4" else WEIGHT_DTYPES[kind],
        (n, k // 2 if kind == "int4" else k),
    )
    check(f"{what} bias", bias, torch.float32, (n,), optional=True)
    if kind == "int8":
        check(f"{what} scale", scale, torch.float32, (n,))
    elif kind == "int4":
        if group_size not in (32, 64, 128, 256) or k % group_size:
            raise ValueError(f"phikit CPU kernel: {what} int4 group size {group_size} does not divide {k}")
        check(f"{what} scale", scale, torch.float16, (n, k // group_size))
        check(f"{what} minimum", minimum, torch.float16, (n, k // group_size))
    return n, k


def _check_slots(pos: torch.Tensor, first: torch.Tensor, batch: int, slots: int) -> None:
    check("slots", pos, torch.int64, (batch,))
    check("first slots", first, torch.int64, (batch,))
    if batch and not (bool((first >= 0).all()) and bool((first <= pos).all()) and bool((pos < slots).all())):
        raise ValueError(f"phikit CPU kernel: cache slots {pos.tolist()} outside 0..{slots - 1}")


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
    """y = x @ W.T (+ bias) for x (M, K) fp32 with M <= MAX_ROWS and W (N, K) in format ``kind``: f32, bf16,
    f16, int8 (+ fp32 scale (N,)) or int4 (uint8 (N, K/2) + fp16 scale and minimum (N, K/group)); bias fp32
    (N,). Returns (M, N) fp32. Needs K % 64 == 0 and N % 16 == 0."""
    lib = library()
    n, k = check_linear("gemv", kind, weight, scale, minimum, bias, group_size)
    m = x.shape[0] if x.dim() == 2 else -1
    check("gemv input", x, torch.float32, (m, k))
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"phikit CPU kernel: gemv takes 1 to {MAX_ROWS} rows, got {m}")
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


def step_tables(
    cos: torch.Tensor, sin: torch.Tensor, start: int | torch.Tensor, batch: int, window: int | None = None
) -> tuple:
    """The arguments a one-token step's C attention takes: cos/sin (B, R) from the model's (B, 1, 1, R)
    tables, and per row the cache slot written (``start``: one for all rows, or one per row) and the first
    slot attended (0, or under a sliding ``window`` the slot window - 1 before it, as ``Slots``)."""
    if isinstance(start, torch.Tensor):
        pos = start.to(torch.long).expand(batch).contiguous()
    else:
        pos = torch.full((batch,), start, dtype=torch.long)
    first = (pos - window + 1).clamp(min=0) if window else torch.zeros_like(pos)
    return cos[:, 0, 0].contiguous(), sin[:, 0, 0].contiguous(), pos, first


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
    b, h, d = q.shape if q.dim() == 3 else (0, 0, 0)
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    check("q", q, torch.float32, (b, h, d))
    check("k", k, torch.float32, (b, kv_heads, d))
    check("v", v, torch.float32, (b, kv_heads, d))
    check("k cache", k_cache, (torch.float32, torch.float16), (b, kv_heads, slots, d))
    check("v cache", v_cache, k_cache.dtype, (b, kv_heads, slots, d))
    check("cos", cos, torch.float32, (b, cos.shape[-1]))
    check("sin", sin, torch.float32, tuple(cos.shape))
    if d % 8 or d > 128 or h % kv_heads or cos.shape[-1] > d or cos.shape[-1] % 2:
        raise ValueError(f"phikit CPU kernel: attention needs head_dim % 8 == 0 and <= 128, got {d}")
    _check_slots(pos, first, b, slots)
    out = torch.empty_like(q)
    status = library().phikit_attention_decode(
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
    if status != 0:
        raise MemoryError("phikit CPU kernel: attention out of memory")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of a contiguous fp32 (..., n) tensor, n % 8 == 0, with an fp32 weight (n,)."""
    n = x.shape[-1]
    check("RMSNorm input", x, torch.float32, tuple(x.shape))
    check("RMSNorm weight", weight, torch.float32, (n,))
    if n % 8:
        raise ValueError(f"phikit CPU kernel: RMSNorm needs a width % 8 == 0, got {n}")
    out = torch.empty_like(x)
    library().phikit_rms_norm(x.data_ptr(), x.numel() // n, n, weight.data_ptr(), float(eps), out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate|up projection: (..., 2n) fp32 contiguous -> up * silu(gate), (..., n); n % 8 == 0."""
    two_n = gate_up.shape[-1]
    check("SwiGLU input", gate_up, torch.float32, tuple(gate_up.shape))
    if two_n % 16:
        raise ValueError(f"phikit CPU kernel: SwiGLU needs a width % 16 == 0, got {two_n}")
    out = torch.empty(*gate_up.shape[:-1], two_n // 2, dtype=torch.float32)
    library().phikit_silu_mul(gate_up.data_ptr(), gate_up.numel() // two_n, two_n // 2, out.data_ptr())
    return out


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """In-place gelu (tanh form) of a contiguous fp32 tensor; returns it."""
    check("gelu input", x, torch.float32, tuple(x.shape))
    library().phikit_gelu_tanh(x.data_ptr(), x.numel())
    return x


GEMM_KINDS = {"f32": 0, "bf16": 1, "f16": 2, "int8": 3, "int4": 4}
PLAN_KINDS = {**GEMM_KINDS, "bf16_dp": 5}  # the decoding step's linears: bf16 also through gemv_bf16_dp


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
    return _gemm("gemm", library().phikit_gemm, x, kind, weight, scale, minimum, bias, group_size)


def gemm_vnni(
    x: torch.Tensor,
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for int8 or int4 W with AVX-512 VNNI integer dot products, x quantized to int8
    per block (64 values; int4: per weight group) as llama.cpp does. Arguments as ``gemm``; needs
    N % 32 == 0 and ``has(FEATURE_VNNI)``."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"phikit CPU kernel: gemm_vnni takes int8 or int4 weights, not {kind}")
    if not has(FEATURE_VNNI):
        raise ValueError("phikit CPU kernel: this library has no AVX-512 VNNI kernels")
    if weight.dim() == 2 and weight.shape[0] % 32:
        raise ValueError(f"phikit CPU kernel: gemm_vnni needs out_features % 32 == 0, got {weight.shape[0]}")
    return _gemm("gemm_vnni", library().phikit_gemm_vnni, x, kind, weight, scale, minimum, bias, group_size)


def _gemm(what: str, function, x, kind, weight, scale, minimum, bias, group_size) -> torch.Tensor:
    """Check the arguments of a GEMM entry point (``phikit_gemm``'s signature) and call it."""
    n, k = check_linear(what, kind, weight, scale, minimum, bias, group_size)
    m = x.shape[0] if x.dim() == 2 else -1
    check(f"{what} input", x, torch.float32, (m, k))
    y = torch.empty(m, n, dtype=torch.float32)
    int4 = kind == "int4"
    function(
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


def dequant_bf16(
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    minimum: torch.Tensor | None,
    group_size: int,
    first: int,
    last: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``first:last`` of a weight in format ``kind`` (as ``gemv`` takes it) as a bf16 (rows, K) tensor,
    written into ``out`` when given (contiguous, at least that big)."""
    n, k = check_linear("dequant", kind, weight, scale, minimum, None, group_size)
    if not 0 <= first <= last <= n:
        raise ValueError(f"phikit CPU kernel: rows {first}:{last} outside 0:{n}")
    rows = last - first
    if out is None:
        out = torch.empty(rows, k, dtype=torch.bfloat16)
    elif out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < rows * k or out.device.type != "cpu":
        raise ValueError("phikit CPU kernel: dequant output must be a contiguous CPU bf16 tensor large enough")
    int4 = kind == "int4"
    library().phikit_dequant_bf16(
        GEMM_KINDS[kind],
        weight.data_ptr(),
        None if int4 else _ptr(scale),
        _ptr(scale) if int4 else None,
        _ptr(minimum),
        group_size,
        k,
        first,
        last,
        out.data_ptr(),
    )
    return out.view(-1)[: rows * k].view(rows, k)


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
    if not can_quantize(weight, fmt, group_size):
        raise ValueError(f"phikit CPU kernel: cannot quantize a {tuple(weight.shape)} {weight.dtype} weight to {fmt}")
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


def _advise_huge(address: int, nbytes: int) -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise(address, nbytes, MADV_HUGEPAGE)  # advice only
    except (OSError, AttributeError):
        pass


def huge_pages_wanted() -> bool:
    """Whether weights go on transparent huge pages: only with ``PHIKIT_HUGE_PAGES=1``. Measured on two
    2-core VMs, they helped on one (int8/int4 loading 1.5-1.8x faster, reads one at a time) and hurt on
    the other (bf16 loading 10-12 s with them, 4.6-6.3 s without, two reads in flight; int8 6-7 s vs
    5.4 s; int4 level: benchmarks/RESULTS.md), and a quick fill test there predicted the opposite of the
    real load, so phikit does not guess: off unless asked for."""
    return sys.platform.startswith("linux") and _env_true("PHIKIT_HUGE_PAGES")


def empty_weight(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, for weights: from 2 MB up and where transparent huge
    pages are wanted (``huge_pages_wanted``), placed at a 2 MB boundary with its whole 2 MB pages
    advised to be huge pages (Linux; before the memory is first written, as the advice applies to pages
    faulted in afterwards): loading faults in every page of the model, one 2 MB fault instead of 512 4 KB
    ones. Decoding, which streams every weight per token, read them no faster or slower beyond the noise
    in a same-process A/B. The tensor is a view into a storage up to 2 MB longer; the unused part is never
    touched, so it costs address space, not memory. The tail short of a whole 2 MB page keeps 4 KB pages.
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_wanted():
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    _advise_huge(raw.data_ptr() + offset, nbytes // HUGE_PAGE * HUGE_PAGE)
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
# The C step's layer kinds and, per kind, its linears in the order the plan lists them (the C struct's names:
# Phi-3's fused qkv_proj sits in q, o_proj in dense, gate_up_proj in fc1, down_proj in fc2).
LAYER_KINDS = {"phi": (0, PROJECTIONS), "phi3": (1, ("q", "dense", "fc1", "fc2"))}


class _Layer(ctypes.Structure):
    _fields_ = [("arch", ctypes.c_int64)] + [(n, ctypes.c_void_p) for n in ("ln_weight", "ln_bias", "ln2_weight")]
    _fields_ += [(n, _Linear) for n in PROJECTIONS]


def plan_array(plan: list[tuple]) -> ctypes.Array:
    """The ctypes array ``phikit_decode_layers`` reads, from one ``(kind, norms, linears)`` per layer: kind "phi"
    (norms: the LayerNorm's weight and bias; linears q k v dense fc1 fc2) or "phi3" (norms: the two RMSNorm
    weights; linears qkv_proj o_proj gate_up_proj down_proj), each linear as (kind, weight, scale, minimum, fp32
    bias, group size)."""
    array = (_Layer * len(plan))()
    for i, (entry, (arch, norms, linears)) in enumerate(zip(array, plan, strict=True)):
        code, names = LAYER_KINDS[arch]
        entry.arch = code
        hidden = norms[0].numel()
        for j, norm in enumerate(norms):
            check(f"layer {i} norm weight {j}", norm, torch.float32, (hidden,))
        entry.ln_weight = norms[0].data_ptr()
        setattr(entry, "ln_bias" if arch == "phi" else "ln2_weight", norms[1].data_ptr())
        for name, (kind, weight, scale, minimum, bias, group) in zip(names, linears, strict=True):
            if kind == "bf16_dp" and not has(FEATURE_BF16_DP):
                raise ValueError("phikit CPU kernel: this library has no AVX-512 BF16 kernels")
            format_kind = "bf16" if kind == "bf16_dp" else kind
            n, k = check_linear(f"layer {i} {name}", format_kind, weight, scale, minimum, bias, group)
            fields = (PLAN_KINDS[kind], n, k, group, weight.data_ptr(), _ptr(scale), _ptr(minimum))
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
    b, hidden = x.shape[0], config.hidden_size
    cos, sin, pos, first = step_tables(cos, sin, start, b, config.sliding_window)
    check("hidden states", x, torch.float32, (b, 1, hidden))
    check("cos", cos, torch.float32, (b, cos.shape[-1]))
    check("sin", sin, torch.float32, tuple(cos.shape))
    layers, kv, d = len(plan), config.num_key_value_heads, config.head_dim
    slots = cache.k.shape[3]
    for name, t in (("k cache", cache.k), ("v cache", cache.v)):
        layer_ok = t.dim() == 5 and t[0].is_contiguous() and t.stride() == cache.k.stride()
        if not layer_ok or tuple(t.shape) != (layers, b, kv, slots, d) or t.dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"phikit CPU kernel: {name} must be fp32/fp16 ({layers}, {b}, {kv}, S, {d}), each layer contiguous"
            )
    if cache.v.dtype != cache.k.dtype or d % 8 or d > 128 or cos.shape[-1] > d:
        raise ValueError("phikit CPU kernel: decode step needs head_dim % 8 == 0 and <= 128 and one cache dtype")
    _check_slots(pos, first, b, slots)
    status = library().phikit_decode_layers(
        ctypes.addressof(plan),
        len(plan),
        x.data_ptr(),
        b,
        config.hidden_size,
        config.intermediate_size,
        config.norm_eps,
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
    if status != 0:
        raise (MemoryError if status == -1 else ValueError)(
            "phikit CPU kernel: decode step "
            + ("out of memory" if status == -1 else "met an unknown weight kind or layer kind")
        )
    return x
