"""CPU kernels (``phikit/csrc``), compiled on first use with the system C compiler and called via ctypes.

A plain C library (why, and how it is built and cached per instruction set: ``build``'s docstring).

Where things are (one concern per module; ``from phikit import kernels`` gives all of them):

- ``build``: what the CPU has (``isa``, ``cpu_flags``), building, caching and loading the library
  (``library``, ``available``, ``has``), its C signatures read once from ``csrc/phikit.h`` (``signatures``);
- ``ops``: the operations, each a checked wrapper of one C entry point (``gemv``, ``gemm``, ``gemm_vnni``,
  ``attention_decode``, ``rms_norm``, ``silu_mul``, ``gelu_tanh_``, ``dequant_bf16``) and the one-call
  decoding step (``plan_array``, ``decode_layers``);
- ``memory``: weight memory (``empty_weight`` and huge pages), quantizing while loading (``quantize``),
  bf16 conversion (``to_bf16``).

The C side has the same map: ``csrc/cpu_kernels.c`` lists its parts, one file per operation, generic
AVX2 code with AVX-512 overrides beside it in ``csrc/avx512/``. A new operation: its C function in the
part it belongs to, one line in ``phikit.h``'s PHIKIT_API block, a checked wrapper in ``ops.py``.

Every call is checked before any pointer reaches C (``ops``), and everything here is optional: where the
library cannot be built, ``available()`` is False and callers use PyTorch ops (``build``).
"""

from phikit.kernels.build import (
    FEATURE_BF16_DP,
    FEATURE_VNNI,
    MAX_ROWS,
    SOURCE,
    available,
    cache_dir,
    compile_flags,
    cpu_flags,
    has,
    isa,
    library,
    open_library,
    signatures,
    source_digest,
    unavailable_reason,
)
from phikit.kernels.memory import (
    HUGE_PAGE,
    can_quantize,
    empty_weight,
    huge_pages_wanted,
    quantize,
    thp_enabled,
    to_bf16,
)
from phikit.kernels.ops import (
    CACHE_KINDS,
    GEMM_KINDS,
    LAYER_KINDS,
    PLAN_KINDS,
    attention_decode,
    check,
    check_linear,
    decode_layers,
    dequant_bf16,
    gelu_tanh_,
    gemm,
    gemm_vnni,
    gemv,
    gemv_bf16_dp,
    plan_array,
    rms_norm,
    silu_mul,
    step_tables,
)

__all__ = [
    "CACHE_KINDS",
    "FEATURE_BF16_DP",
    "FEATURE_VNNI",
    "GEMM_KINDS",
    "HUGE_PAGE",
    "LAYER_KINDS",
    "MAX_ROWS",
    "PLAN_KINDS",
    "SOURCE",
    "attention_decode",
    "available",
    "cache_dir",
    "can_quantize",
    "check",
    "check_linear",
    "compile_flags",
    "cpu_flags",
    "decode_layers",
    "dequant_bf16",
    "empty_weight",
    "gelu_tanh_",
    "gemm",
    "gemm_vnni",
    "gemv",
    "gemv_bf16_dp",
    "has",
    "huge_pages_wanted",
    "thp_enabled",
    "isa",
    "library",
    "open_library",
    "plan_array",
    "quantize",
    "rms_norm",
    "signatures",
    "silu_mul",
    "source_digest",
    "step_tables",
    "to_bf16",
    "unavailable_reason",
]
