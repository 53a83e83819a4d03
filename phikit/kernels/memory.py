"""Weight memory: allocating weights (optionally on transparent huge pages), quantizing them while loading,
and converting them to bf16, with the CPU kernels where available and PyTorch otherwise."""

from __future__ import annotations

import ctypes
import sys

import torch

from phikit.kernels.build import _env_off, available, library

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
    from phikit.quantize import quantized_shapes

    w = weight.contiguous()
    n, k = w.shape
    dtype = SOURCE_DTYPES[w.dtype]
    out = {  # the codes on 2 MB pages where they are large
        name: (empty_weight if name == "weight" else torch.empty)(shape, dtype=t)
        for name, (shape, t) in quantized_shapes(fmt, n, k, group_size).items()
    }
    if fmt == "int8":
        library().phikit_quantize_i8(
            dtype, w.data_ptr(), n, k, out["weight"].data_ptr(), out["weight_scale"].data_ptr()
        )
        return out
    pointers = (out[name].data_ptr() for name in ("weight", "weight_scale", "weight_min"))
    library().phikit_quantize_i4(dtype, w.data_ptr(), n, k, group_size, *pointers)
    return out


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


def thp_enabled() -> bool:
    """Whether Linux offers transparent huge pages here (``enabled`` is ``always`` or ``madvise``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_wanted() -> bool:
    """Whether weights go on transparent huge pages: on Linux where they are offered, unless
    ``PHIKIT_HUGE_PAGES=0``. Decoding streams every weight per token, and one TLB entry per 2 MB instead of 512
    lets it stream faster: on a 2-core AMD EPYC VM, Phi-3-mini int4 decoded 16.3 tok/s against 14.4 (medians
    of 12 alternating runs in one process, 11 of 12 pairs faster), Phi-2 int8 15.1 against 13.3, and a plain
    two-thread read of 2 GB ran at 36 against 28-29 GB/s; int8/int4 loaded as fast or faster (benchmarks/
    RESULTS.md, issue 23). The checkpoint reader's buffers are the exception (``empty_weight(huge=False)``).
    """
    return sys.platform.startswith("linux") and not _env_off("PHIKIT_HUGE_PAGES") and thp_enabled()


def empty_weight(shape: tuple[int, ...], dtype: torch.dtype, huge: bool = True) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, for weights: from 2 MB up and where transparent huge
    pages are wanted (``huge_pages_wanted``), placed at a 2 MB boundary with its whole 2 MB pages advised to be
    huge pages (Linux; before the memory is first written, as the advice applies to pages faulted in
    afterwards): loading faults in every page of the model, one 2 MB fault instead of 512 4 KB ones, and
    decoding streams them faster. The tensor is a view into a storage up to 2 MB longer; the unused part is
    never touched, so it costs address space, not memory. The tail short of a whole 2 MB page keeps 4 KB pages.
    ``huge=False``: plain 4 KB pages whatever is wanted (see the checkpoint reader's buffers).
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge or not huge_pages_wanted():
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
