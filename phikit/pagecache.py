"""Weight files in the page cache on 2 MB pages, so that weights used where they are mapped stream faster.

A bf16 checkpoint loaded as bf16 on the CPU is used where it lies: its tensors are views of private memory
maps of the files (``map_tensor``), so decoding streams every weight out of the page cache.
How the page cache holds a file decides how fast that is. Linux (6.x, ext4 and others with large folios)
reads a file ahead into large folios, up to 2 MB, and maps a 2 MB folio with one page-table entry; but a
file faulted in at random (as a reader that maps it without advice may) or read back piecemeal after memory
pressure sits in 4 KB folios, mapped 4 KB at a time, and streaming it costs a TLB miss every 4 KB. Measured on
a 2-core AMD EPYC VM: a two-thread read of 2 GB of a file mapped on 2 MB entries ran at 51-63 GB/s against
29-39 GB/s on 4 KB entries (same file, same minutes), and Phi-3-mini bf16 decoded 6.59 tok/s on 2 MB entries
against 5.51 on 4 KB (medians of alternating runs in one process; benchmarks/RESULTS.md, issue 23). llama.cpp
maps its GGUF files the same way, and benefits the same way where they are on 2 MB folios.

``settle(file)`` checks a file before its tensors are mapped: it maps the file advised for huge pages, faults
it in, and asks the kernel (``/proc/self/smaps``' ``FilePmdMapped``) how much of it got 2 MB entries. If
under half, the file's cached pages are mostly small folios (what they become depends on how the file was
read and on memory pressure since): it drops them (``POSIX_FADV_DONTNEED``,
which keeps any page another process maps and never touches the file) and reads the file ahead again, once:
the next loads find it on 2 MB folios. Where that does not help (another file system, an older kernel),
the outcome is remembered for this kernel and file system in ``$PHIKIT_CACHE/page-cache.json``, so a file
is never dropped twice for nothing. ``PHIKIT_KEEP_PAGE_CACHE=1`` leaves the page cache as it is.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from pathlib import Path

import torch

from phikit.kernels.build import _env_true, cache_dir
from phikit.kernels.memory import thp_enabled

MADV_POPULATE_READ = 22  # Linux 5.14+: map a range's pages readable now (no copy-on-write break)
MIN_FILE_BYTES = 64 << 20  # smaller files: a few 4 KB entries more or less do not matter
ENOUGH = 0.5  # share of a file on 2 MB entries that counts as settled (most of it; the ends of a file and what
# was read back under memory pressure may stay on 4 KB pages)
GAVE_NOTHING = 0.05  # after reading again: none on 2 MB pages, so this kernel or file system does not do it


def smaps_entry(address: int) -> dict[str, str] | None:
    """The fields of this process's memory mapping that holds ``address``, as /proc/self/smaps lists them
    (``{"FilePmdMapped": "2048 kB", "VmFlags": "rd wr mr ...", ...}``), or None where there is none or the kernel
    does not say."""
    try:
        with open("/proc/self/smaps") as f:
            fields = None
            for line in f:
                parts = line.split(None, 1)
                if not parts:
                    continue
                head = parts[0]
                if not head.endswith(":") and "-" in head:  # a mapping's first line: its address range
                    if fields is not None:
                        return fields
                    low, high = (int(x, 16) for x in head.split("-"))
                    fields = {} if low <= address < high else None
                elif fields is not None:
                    fields[head[:-1]] = parts[1].strip() if len(parts) > 1 else ""
            return fields
    except (OSError, ValueError):
        return None


def pmd_mapped(address: int) -> int | None:
    """Bytes of the file mapping that contains ``address`` mapped with 2 MB page-table entries
    (``FilePmdMapped`` in /proc/self/smaps), or None where the kernel does not say."""
    value = (smaps_entry(address) or {}).get("FilePmdMapped")
    try:
        return None if value is None else int(value.split()[0]) * 1024
    except (ValueError, IndexError):
        return None


def pmd_mapped_total() -> int:
    """Bytes of files this process maps with 2 MB entries (``FilePmdMapped`` in /proc/self/smaps_rollup), 0
    where the kernel does not say."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("FilePmdMapped:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _map(fd: int, start: int, nbytes: int) -> tuple[mmap.mmap, bool]:
    """A private, writable (copy on write) memory map of the pages holding bytes ``start .. start + nbytes`` of
    an open file, advised for huge pages and populated at once where the OS can (Linux 5.14+:
    MADV_POPULATE_READ reads what the page cache does not hold yet and maps its pages; MAP_POPULATE would copy
    every page of a writable private map); and whether it was populated."""
    base = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(
        fd, start + nbytes - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base
    )
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)  # pages read from disk now go to 2 MB folios
        mapping.madvise(MADV_POPULATE_READ)
    except (OSError, AttributeError, ValueError):
        return mapping, False  # an older kernel (before 5.14) or another OS: pages fault in on first use
    return mapping, True


def map_tensor(fd: int, start: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor viewing bytes ``start .. start + nbytes`` of an open file through its own memory map (``_map``),
    so first use does not fault page by page. The map lives as long as the tensor: a weight kept as stored
    costs the page cache's pages and nothing more (loading a bf16 checkpoint as bf16 copies nothing), and a
    tensor dropped after quantizing or converting it is unmapped with it. As with llama.cpp's memory-mapped
    models, the file must not be truncated while mapped weights are in use."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    mapping, _ = _map(fd, start, nbytes)
    offset = start % mmap.ALLOCATIONGRANULARITY
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).reshape(shape)


def huge_fraction(fd: int, size: int) -> float | None:
    """Map the whole file as ``map_tensor`` maps weights, fault it in (reading what the page cache lacks, onto
    2 MB folios), and return the share of its bytes the kernel maps with 2 MB entries, or None where it does
    not say (or could not fault it in)."""
    whole, populated = _map(fd, 0, size)
    try:
        if not populated:
            return None
        first = ctypes.c_char.from_buffer(whole)  # the map's address (ctypes needs a writable buffer: it is)
        address = ctypes.addressof(first)
        del first
        mapped = pmd_mapped(address)
        return None if mapped is None else mapped / size
    finally:
        whole.close()


def _memo_file() -> Path:
    return cache_dir().parent / "page-cache.json"


def _memo_key(file: Path) -> str:
    return f"{os.uname().release}:{file.stat().st_dev}"


def _memo() -> dict:
    """What was learned where re-reading did not help (``{kernel release:device: False}``), {} if nothing (or
    something other than a regular file is there: a FIFO would block a read)."""
    path = _memo_file()
    try:
        memo = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _unhelpful(file: Path) -> bool:
    return _memo().get(_memo_key(file)) is False


def _remember_unhelpful(file: Path) -> None:
    from phikit.checkpoint import atomic_write

    memo = {**_memo(), _memo_key(file): False}
    path = _memo_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(memo, indent=1)))
    except OSError:
        pass


def wanted() -> bool:
    """Whether ``settle`` may act here: Linux with transparent huge pages not off, and not
    ``PHIKIT_KEEP_PAGE_CACHE=1``."""
    keep = _env_true("PHIKIT_KEEP_PAGE_CACHE")
    return sys.platform.startswith("linux") and hasattr(os, "posix_fadvise") and not keep and thp_enabled()


def settle(file: Path, notify=None) -> str:
    """Make sure the page cache holds ``file`` on 2 MB folios before its tensors are mapped (see the module's
    docstring). Returns what it found or did: "skipped", "huge" (already), "reread" (dropped and read ahead
    again, now on 2 MB folios), "partial" (read again, but memory too fragmented for most of it: tried again
    next time), "unhelpful" (read again and none on 2 MB folios: remembered, not tried again).
    ``notify(message)`` is told before a file is read again."""
    if not wanted():
        return "skipped"
    try:
        size = file.stat().st_size
        if size < MIN_FILE_BYTES or _unhelpful(file):
            return "skipped"
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return "skipped"
    try:
        try:
            found = huge_fraction(fd, size)
            if found is None:
                return "skipped"  # the kernel does not say how it maps files
            if found >= ENOUGH:
                return "huge"
            if notify is not None:
                notify(f"reading {file.name} into the page cache again, on 2 MB pages (once; decoding reads it faster)")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            again = huge_fraction(fd, size) or 0.0
        except (OSError, ValueError):
            return "skipped"
        if again >= ENOUGH:
            return "reread"
        if again > GAVE_NOTHING:
            return "partial"  # free memory too fragmented for 2 MB folios this time: tried again next load
        _remember_unhelpful(file)
        return "unhelpful"
    finally:
        os.close(fd)
