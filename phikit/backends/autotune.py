"""Prefill and decode paths on the CPU, chosen by what the CPU has: the same on every machine of a kind.

Which matrix product is fastest depends on the CPU far more than on anything else: on an AVX2 CPU phikit's
own GEMM (fp32 FMAs, weights unpacked as it goes) leads; where the CPU has bf16 dot products (AVX-512 BF16),
PyTorch's bf16 matmul (oneDNN) was measured 2.6x faster for bf16 weights, and with AVX-512 VNNI phikit's
int8-activation GEMM 0.56-0.71x the time of the next path for int8/int4 weights (benchmarks/RESULTS.md,
issue 14). Where AVX-512 lacks BF16 (an Intel Xeon whose VM hides it), PyTorch's bf16 matmul emulates it at
60 GFLOP/s, phikit's GEMM runs 120-160 and PyTorch's fp32 sgemm on 16 MB panels of the weight unpacked to
fp32 200-250 (512 rows; level with phikit's GEMM at 32 rows): that is the default there for longer prompts.
The paths round activations differently (fp32, bf16, int8), so a choice made by timing on the
machine could differ between two runs of the same CPU and flip a near-tie in greedy output. So by default
the path is a fixed function of the weight format, the CPU's capabilities and (there) the prompt's length
bucket (``default_path``, documented below); ``PHIKIT_AUTOTUNE=measure`` times every candidate per format,
shape and prompt-length bucket (up to 64 rows; longer) on first use instead and caches the choice per CPU
model, flags, thread count, PyTorch and kernel-library version in ``$PHIKIT_CACHE/autotune-<key>.json`` (for
benchmarks and new CPUs).

| weights | AVX-512 with BF16 and VNNI | AVX-512 BF16, no VNNI | AVX-512 and VNNI, no BF16 | AVX2 |
|---|---|---|---|---|
| f32 | phikit_gemm | phikit_gemm | phikit_gemm | phikit_gemm |
| bf16 | torch_bf16 (decode: bf16_dp) | torch_bf16 (decode: bf16_dp) | dequant_f32 (a) | phikit_gemm |
| f16 | dequant_bf16 | dequant_bf16 | dequant_f32 (a) | phikit_gemm |
| int8, int4 | phikit_vnni (b) | dequant_bf16 | phikit_vnni (b) | phikit_gemm |

(a) over 64 rows, else phikit_gemm; (b) where N % 32 == 0, else dequant_bf16 with BF16 and phikit_gemm
without; decoding takes phikit_gemv wherever the table does not say otherwise.

Candidates (``PATHS``): ``phikit_gemm`` (the C GEMM, fp32 activations, any format); ``torch_f32`` (fp32
weights: PyTorch's sgemm); ``torch_bf16`` (bf16 weights: activations rounded to bf16, PyTorch's bf16
matmul, the numerics of transformers in bf16); ``dequant_bf16`` (fp16/int8/int4: panels of weight rows
unpacked to bf16 by a C kernel, up to 64 MB at a time, through PyTorch's bf16 matmul); ``dequant_f32``
(bf16/fp16 weights: panels of rows copied to fp32, 16 MB at a time, through PyTorch's fp32 sgemm: fp32
activations and exact weights, as phikit_gemm, summed in another order); ``phikit_vnni``
(int8/int4 where the CPU has AVX-512 VNNI: activations quantized to int8 per block, integer dot products,
as llama.cpp's prefill; ``paths`` leaves it out where the library or the shape cannot take it).
Paths that round activations to bf16 are candidates only for weights narrower than fp32.
``PHIKIT_PREFILL_PATH=<name>`` forces one path where it applies; ``PHIKIT_AUTOTUNE=0`` keeps phikit_gemm
(and phikit's gemv for decoding) everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import statistics
import threading
import time
from pathlib import Path

import torch

from phikit import kernels
from phikit.kernels.build import FALSE

PATHS = {
    "f32": ("phikit_gemm", "torch_f32"),
    "bf16": ("phikit_gemm", "torch_bf16", "dequant_f32"),
    "f16": ("phikit_gemm", "dequant_bf16", "dequant_f32"),
    "int8": ("phikit_gemm", "dequant_bf16", "phikit_vnni"),
    "int4": ("phikit_gemm", "dequant_bf16", "phikit_vnni"),
}
# Prompt lengths are bucketed: a 20-token prompt and a 500-token one can want different paths (unpacking a
# whole weight pays off only over enough rows). Each bucket is timed at its representative row count.
BUCKETS = ((64, 32), (None, 128))  # (most rows in the bucket or None, rows of the timing runs)
ROWS = 128  # rows of the timing runs of the last bucket (kept for callers that time one size)
# bf16 weight rows per panel of dequant_bf16. Measured on a 2-core AVX-512 EPYC (512 x 2560 x 10240):
# 4 MB panels took 0.38-0.43 s against 0.25-0.26 s for one panel of the whole weight (52 MB), as each
# oneDNN call re-packs the activations and synchronizes its threads; so one panel up to 64 MB, in a
# buffer reused by every call of the thread (no fresh pages per call).
PANEL_BYTES = 64 << 20
# fp32 weight rows per panel of dequant_f32 (PyTorch's sgemm packs the weight itself, so a panel that stays in
# the caches helps). Intel Xeon, 2 cores, AVX-512 without BF16, 512 x 3072 x 9216: 4 MB 129 ms, 16 MB 117, 64
# MB 132, the whole weight 145; at 128 rows 38 / 35 / 55 / 67 ms.
F32_PANEL_BYTES = 16 << 20
F32_MIN_ROWS = 64  # dequant_f32 by default only above this many rows (unpacking pays off over enough rows)

_chosen: dict[str, str] = {}
_timings: dict[str, dict[str, float]] = {}
_used: set[str] = set()  # keys asked for in this process (the cache file may hold other shapes)
_defaults: dict[str, str] = {}  # the default paths this process took (for benchmarks' reports)
_scratch = threading.local()  # .panel_bfloat16 / .panel_float32: this thread's buffers for the dequant paths
_lock = threading.Lock()


def _machine_key() -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = " ".join(sorted(kernels.cpu_flags()))
    source = kernels.source_digest()[:12]
    text = "|".join([cpu, flags, str(torch.get_num_threads()), torch.__version__, source, kernels.isa() or "none"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file() -> Path:
    return kernels.cache_dir().parent / f"autotune-{_machine_key()}.json"


def _load() -> None:
    """Earlier decisions from the cache file: only a regular file (a FIFO there would block a read), and only
    entries whose path this weight format and this CPU's library can run; the rest are measured again."""
    path = _cache_file()
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return
        saved = json.loads(path.read_text())
        for key, value in saved.items():
            if isinstance(value, dict) and _runnable(key, value.get("path")):
                _chosen[key] = value["path"]
                _timings[key] = value.get("seconds", {})
    except (OSError, ValueError, AttributeError, TypeError):
        pass


def _runnable(key: str, path) -> bool:
    """Whether a cached decision names a path for its key's weight format and shape that this machine runs:
    ``decode-<kind>:NxK:...`` a decoding candidate, ``<kind>:NxK:...`` a prefill one (or, for a few rows, a
    decoding one too)."""
    try:
        kind, shape = key.removeprefix("decode-").split(":")[:2]
        n = int(shape.split("x")[0])
        if kind not in PATHS or not isinstance(path, str):
            return False
        if key.startswith("decode-"):
            return path in decode_paths(kind)
        return path in paths(kind, n)
    except (ValueError, IndexError):
        return False


def _save() -> None:
    from phikit.checkpoint import atomic_write

    data = {k: {"path": path, "seconds": _timings.get(k, {})} for k, path in _chosen.items()}
    try:
        atomic_write(_cache_file(), lambda tmp: tmp.write_text(json.dumps(data, indent=1)))
    except OSError:
        pass  # a read-only cache: measure again next time


def paths(kind: str, n: int) -> tuple[str, ...]:
    """The prefill candidates for a ``kind`` weight with ``n`` output rows on this machine."""
    vnni = kernels.has(kernels.FEATURE_VNNI) and n % 32 == 0
    return tuple(p for p in PATHS[kind] if p != "phikit_vnni" or vnni)


def run(path: str, x: torch.Tensor, kind: str, weight, scale, minimum, bias32, group_size: int) -> torch.Tensor:
    """y = x @ W.T + bias for x (M, K) fp32 through ``path``; (M, N) fp32."""
    if path == "phikit_gemm":
        return kernels.gemm(x, kind, weight, scale, minimum, bias32, group_size)
    if path == "phikit_vnni":
        return kernels.gemm_vnni(x, kind, weight, scale, minimum, bias32, group_size)
    if path == "torch_f32":
        y = x @ weight.t()
    elif path == "torch_bf16":
        y = (x.to(torch.bfloat16) @ weight.t()).float()
    elif path == "dequant_f32":

        def f32_rows(first: int, last: int, panel: torch.Tensor) -> torch.Tensor:
            return panel[: (last - first) * x.shape[1]].view(last - first, -1).copy_(weight[first:last])

        y = _by_panels(x, weight.shape[0], F32_PANEL_BYTES, torch.float32, f32_rows)
    else:  # dequant_bf16

        def bf16_rows(first: int, last: int, panel: torch.Tensor) -> torch.Tensor:
            return kernels.dequant_bf16(kind, weight, scale, minimum, group_size, first, last, out=panel)

        y = _by_panels(x.to(torch.bfloat16), weight.shape[0], PANEL_BYTES, torch.bfloat16, bf16_rows)
    if bias32 is not None:
        y += bias32
    return y


def _by_panels(x: torch.Tensor, n: int, panel_bytes: int, dtype: torch.dtype, rows) -> torch.Tensor:
    """y (M, n) fp32 = x @ W.T one panel of W's rows at a time: ``rows(first, last, panel)`` writes rows
    first:last of W into this thread's ``dtype`` buffer and returns them as a (last - first, K) tensor."""
    k = x.shape[1]
    block = max(64, panel_bytes // (dtype.itemsize * k) // 64 * 64)
    panel = _panel(min(block, n) * k, dtype)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for first in range(0, n, block):
        last = min(first + block, n)
        y[:, first:last] = x @ rows(first, last, panel).t()
    return y


def _panel(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's scratch buffer of at least ``numel`` elements of ``dtype`` (grown, never shrunk)."""
    name = f"panel_{str(dtype).removeprefix('torch.')}"
    panel = getattr(_scratch, name, None)
    if panel is None or panel.numel() < numel:
        panel = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, panel)
    return panel


def bucket(rows: int) -> tuple[str, int]:
    """(key part, rows to time) of the prompt-length bucket ``rows`` activation rows fall in."""
    for most, timed in BUCKETS:
        if most is None or rows <= most:
            return (f"r{most}" if most else "rlong"), timed
    raise AssertionError("the last bucket takes every length")


def _sample_weight(kind: str, n: int, k: int, group_size: int) -> tuple:
    """Random weights of this format and shape, as ``run`` takes them."""
    w = torch.randn(n, k) * 0.02
    if kind in ("int8", "int4"):
        t = kernels.quantize(w.contiguous(), kind, group_size or 64)
        return t["weight"], t["weight_scale"], t.get("weight_min"), group_size or 64
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind]
    return w.to(dtype).contiguous(), None, None, 0


def _measure(kind: str, n: int, k: int, group_size: int, rows: int = ROWS) -> dict[str, float]:
    weight, scale, minimum, group = _sample_weight(kind, n, k, group_size)
    x = torch.randn(rows, k)
    seconds = {}
    for path in paths(kind, n):
        run(path, x, kind, weight, scale, minimum, None, group)  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run(path, x, kind, weight, scale, minimum, None, group)
            times.append(time.perf_counter() - started)
        seconds[path] = statistics.median(times)
    return seconds


def _mode() -> str:
    """``PHIKIT_AUTOTUNE``: "off" (phikit's own kernels), "measure" (time the candidates), else "default"."""
    value = os.environ.get("PHIKIT_AUTOTUNE", "").strip().lower()
    if value in FALSE:
        return "off"
    return "measure" if value == "measure" else "default"


def default_path(kind: str, n: int, rows: int = ROWS) -> str:
    """The prefill path for ``rows`` activation rows through ``kind`` weights with ``n`` output rows on this
    CPU (the module docstring's table)."""
    if kind in ("int8", "int4") and "phikit_vnni" in paths(kind, n):
        return "phikit_vnni"
    if kernels.has(kernels.FEATURE_BF16_DP):  # a library built with AVX-512 BF16: the CPU has bf16 dot products
        return {"bf16": "torch_bf16", "f32": "phikit_gemm"}.get(kind, "dequant_bf16")
    if kind in ("bf16", "f16") and kernels.isa() == "avx512" and rows > F32_MIN_ROWS:
        return "dequant_f32"
    return "phikit_gemm"


def choose(kind: str, n: int, k: int, group_size: int = 0, rows: int = ROWS) -> str:
    """The prefill path for ``rows`` activation rows through a weight of ``kind`` and shape (n, k): forced,
    the CPU's default, or (``PHIKIT_AUTOTUNE=measure``) cached for its length bucket or measured now."""
    forced = os.environ.get("PHIKIT_PREFILL_PATH", "").strip()
    if forced in paths(kind, n):
        return forced
    mode = _mode()
    if mode == "off":
        return "phikit_gemm"
    length, timed = bucket(rows)
    if mode == "default":
        _defaults[f"{kind}:{n}x{k}:g{group_size}:{length}"] = path = default_path(kind, n, rows)
        return path
    key = f"{kind}:{n}x{k}:g{group_size}:{length}:t{torch.get_num_threads()}"
    with _lock:
        _used.add(key)
        if not _chosen:
            _load()
        if key not in _chosen:
            _timings[key] = _measure(kind, n, k, group_size, timed)
            _chosen[key] = min(_timings[key], key=_timings[key].get)
            _save()
        return _chosen[key]


def decode_paths(kind: str) -> tuple[str, ...]:
    """Candidates for a decoding step's matrix-vector products of ``kind``: phikit's gemv (AVX2 FMAs, fp32
    activations) and, for bf16 weights where the library has AVX-512 BF16, ``bf16_dp`` (activations
    rounded to bf16, vdpbf16ps: a third of the instructions per weight)."""
    if kind == "bf16" and kernels.has(kernels.FEATURE_BF16_DP):
        return ("phikit_gemv", "bf16_dp")
    return ("phikit_gemv",)


def _measure_decode(kind: str, n: int, k: int) -> dict[str, float]:
    weight = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, k)
    runs = {"phikit_gemv": lambda: kernels.gemv(x, "bf16", weight), "bf16_dp": lambda: kernels.gemv_bf16_dp(x, weight)}
    seconds = {}
    for path in decode_paths(kind):
        runs[path]()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            runs[path]()
            times.append(time.perf_counter() - started)
        seconds[path] = statistics.median(times)
    return seconds


def choose_decode(kind: str, n: int, k: int) -> str:
    """The matrix-vector product for decoding through a ``kind`` weight of shape (n, k): forced
    (``PHIKIT_DECODE_PATH``), the CPU's default (bf16_dp where the library has it), or (measure mode) cached
    or measured now; phikit_gemv where there is no other candidate."""
    paths = decode_paths(kind)
    forced = os.environ.get("PHIKIT_DECODE_PATH", "").strip()
    if forced in paths:
        return forced
    if len(paths) == 1 or _mode() == "off":
        return "phikit_gemv"
    if _mode() == "default":
        _defaults[f"decode-{kind}:{n}x{k}"] = paths[-1]  # bf16_dp: the library has it only with AVX-512 BF16
        return paths[-1]
    key = f"decode-{kind}:{n}x{k}:t{torch.get_num_threads()}"
    with _lock:
        _used.add(key)
        if not _chosen:
            _load()
        if key not in _chosen:
            _timings[key] = _measure_decode(kind, n, k)
            _chosen[key] = min(_timings[key], key=_timings[key].get)
            _save()
        return _chosen[key]


def decisions() -> dict[str, dict]:
    """The decisions this process used: {"int4:10240x2560:g64:t2": {"path": ..., "seconds": {path: s}}}
    (for benchmarks; measured now or read from the cache)."""
    measured = {k: {"path": path, "seconds": _timings.get(k, {})} for k, path in _chosen.items() if k in _used}
    return {**{k: {"path": path, "seconds": {}} for k, path in _defaults.items()}, **measured}
