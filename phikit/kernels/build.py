"""Building, caching and loading the CPU kernel library (``phikit/csrc``), and what the CPU has.

A plain C library rather than a torch C++ extension: it compiles in seconds (7-8 s on a 2-core VM) without torch's
headers or ninja, and the call overhead (~1 us) is small next to a matrix-vector product. The library
links the same ``libgomp.so.1`` that torch loaded, so both share one OpenMP thread pool.

Builds: one per instruction set, with explicit flags, never ``-march=native``: ``avx2`` (AVX2 + FMA + F16C,
the baseline) and ``avx512`` (plus AVX-512 F/BW/VL/DQ, and BF16/VNNI where the CPU has them), the widest
the CPU's flags allow picked at run time (``PHIKIT_CPU_ISA=avx2`` forces the baseline). A build is keyed
by the source, the compiler's version and the flags, and cached in ``$PHIKIT_CACHE/kernels`` (default
``~/.cache/phikit/kernels``) only where that folder and the library are the current user's and writable by
no one else; otherwise the library is built in a private temporary folder and loaded from there.

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

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "cpu_kernels.c"  # the translation unit: it includes every other part of csrc/
HEADER = CSRC / "phikit.h"  # holds the PHIKIT_API block, the exported functions declared once
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


FALSE = ("0", "false", "no", "off")  # what a PHIKIT_* switch reads as off


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", *FALSE)


def _env_off(name: str) -> bool:
    """Whether a switch that is on by default was turned off."""
    return os.environ.get(name, "").strip().lower() in FALSE


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


def source_digest() -> str:
    """SHA-256 of every file of the C source (names and contents): a build's key, with the flags."""
    digest = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in (".c", ".h")):
        digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


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
    key = hashlib.sha256((source_digest() + identity).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{level}-{key}.so"
    if _private(target.parent, directory=True) and _private(target, directory=False):
        try:
            return open_library(target)
        except (OSError, AttributeError):  # 0 bytes, corrupt, or an older build: replace it
            target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="phikit-kernels-") as tmp:  # 0700, removed whatever happens
        built = Path(tmp) / target.name
        # seconds to a minute, once per phikit version and compiler: say so, or the first run looks slow
        print(f"phikit: compiling the CPU kernels ({level}; once, cached in {target.parent}) ...", file=sys.stderr)
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


def signatures(source: Path = HEADER) -> dict[str, tuple]:
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
