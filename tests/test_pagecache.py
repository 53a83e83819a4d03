"""The page cache on 2 MB pages (phikit/pagecache.py), judged by what the kernel reports in /proc/self/smaps."""

import os
from pathlib import Path

import pytest
import torch

from phikit import pagecache

SIZE = 72 << 20  # above pagecache.MIN_FILE_BYTES


def small_folio_file(path: Path, data: bytes | None = None) -> Path:
    """A file (``data``, else SIZE random bytes) whose page cache is small folios: written 4 KB at a time, each
    write its own folio, and synced so the pages are clean and can be dropped."""
    data = os.urandom(SIZE) if data is None else data
    with open(path, "wb", buffering=0) as f:
        for start in range(0, len(data), 4096):
            f.write(data[start : start + 4096])
        os.fsync(f.fileno())
    return path


def huge_share(path: Path) -> float | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.huge_fraction(fd, path.stat().st_size)
    finally:
        os.close(fd)


def needs_file_huge_pages(path: Path) -> None:
    if not pagecache.wanted():
        pytest.skip("not Linux, transparent huge pages off, or PHIKIT_KEEP_PAGE_CACHE set")
    if huge_share(path) is None:
        pytest.skip("this kernel does not report FilePmdMapped in /proc/self/smaps")


def test_settle_rereads_a_small_folio_file_onto_2mb_pages(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    path = small_folio_file(tmp_path / "weights.bin")
    needs_file_huge_pages(path)
    if huge_share(path) >= pagecache.ENOUGH:
        pytest.skip("this kernel cached 4 KB writes in large folios: nothing to settle")
    notes = []
    outcome = pagecache.settle(path, notes.append)
    if outcome == "unhelpful":
        pytest.skip("this file system does not read files into 2 MB folios")
    assert outcome == "reread" and len(notes) == 1 and path.name in notes[0]
    assert huge_share(path) >= pagecache.ENOUGH
    assert pagecache.settle(path, notes.append) == "huge" and len(notes) == 1  # nothing read twice


def test_settle_gives_up_once_where_rereading_does_not_help(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pagecache, "wanted", lambda: True)
    monkeypatch.setattr(pagecache, "huge_fraction", lambda fd, size: 0.0)
    drops = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: drops.append(advice), raising=False)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * SIZE)
    assert pagecache.settle(path) == "unhelpful"
    assert os.POSIX_FADV_DONTNEED in drops
    drops.clear()
    assert pagecache.settle(path) == "skipped" and drops == []  # remembered for this kernel and file system
    assert (tmp_path / "cache" / "page-cache.json").is_file()


def test_a_fifo_where_the_memo_goes_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(pagecache, "wanted", lambda: True)
    monkeypatch.setattr(pagecache, "huge_fraction", lambda fd, size: 1.0)
    os.mkfifo(tmp_path / "page-cache.json")  # reading it would wait for a writer forever
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * SIZE)
    assert pagecache.settle(path) == "huge"


def test_settle_leaves_the_page_cache_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_KEEP_PAGE_CACHE", "1")
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * SIZE)
    assert pagecache.settle(path) == "skipped"


def test_bf16_weights_load_mapped_on_2mb_pages(tmp_path, monkeypatch, tokenizer_dir):
    """A bf16 checkpoint loaded as bf16 on the CPU: its weights are views of the file, mapped with 2 MB entries
    even when the file's page cache was small folios before loading, and equal to the stored tensors."""
    from safetensors.torch import load_file

    from phikit.checkpoint import load_model
    from tests.conftest import make_checkpoint

    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=16)
    make_checkpoint(folder, tokenizer_dir, 1024, dtype=torch.bfloat16, **shape)  # 104 MB of bf16
    weights = folder / "model.safetensors"
    assert weights.stat().st_size > pagecache.MIN_FILE_BYTES
    data = weights.read_bytes()
    weights.unlink()
    small_folio_file(weights, data)
    needs_file_huge_pages(weights)
    if huge_share(weights) >= pagecache.ENOUGH:
        pytest.skip("this kernel cached 4 KB writes in large folios: nothing to settle")
    if pagecache.settle(small_folio_file(tmp_path / "probe.bin")) != "reread":
        pytest.skip("this file system does not read files into 2 MB folios")
    model = load_model(folder, dtype="bf16", device="cpu")
    weight = model.model.layers[0].mlp.fc1.weight
    assert pagecache.pmd_mapped(weight.data_ptr()) >= 2 << 20
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, load_file(str(weights))["model.layers.0.mlp.fc1.weight"])
