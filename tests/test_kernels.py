"""The C kernel library: checked calls, per-ISA builds, and a trustworthy cache that falls back cleanly."""

import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phikit import kernels
from phikit.quantize import quantize_int4, quantize_int8

REPO = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")


def probe(tmp_path, **env) -> subprocess.CompletedProcess:
    """A fresh Python that asks for the library with ``env`` (PHIKIT_CACHE in tmp_path unless given)."""
    full = {**os.environ, "PHIKIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    full.pop("PHIKIT_NO_KERNELS", None)
    full.pop("CC", None)
    full.update(env)
    code = "from phikit import kernels; print(kernels.available())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def seeded(tmp_path) -> Path:
    """The library this test run compiled, copied into tmp_path's cache as a build would leave it (the
    suite compiles once; tests that need a rebuild still get one)."""
    folder = tmp_path / "cache" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    source = Path(kernels.library()._name)
    if not source.exists():  # this process compiled it: a temporary file, gone; the copy it put in the cache
        source = kernels.cache_dir() / source.name
    library = folder / source.name
    library.write_bytes(source.read_bytes())
    library.chmod(0o600)
    return library


COMPILING = "phikit: compiling the CPU kernels"


def notices(result) -> list[str]:
    """What phikit said on stderr besides that it compiles the kernels (once, where no cached build serves)."""
    return [line for line in result.stderr.splitlines() if line.startswith("phikit:") and COMPILING not in line]


@needs_kernels
def test_calls_with_wrong_tensors_are_refused_before_c():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    t4, t8 = quantize_int4(w, 64), quantize_int8(w)
    x = torch.randn(1, 128)
    kernels.gemv(x, "int4", t4["weight"], t4["weight_scale"], t4["weight_min"], None, 64)  # fine
    bad = [
        ("int4", t4["weight"], t4["weight_scale"].view(torch.uint8), t4["weight_min"], 64),  # a uint8 scale
        ("int4", t4["weight"], t4["weight_scale"][:, :1], t4["weight_min"], 64),  # too few groups
        ("int4", t4["weight"], t4["weight_scale"], t4["weight_min"], 48),  # a group size that does not divide
        ("int8", t8["weight"], None, None, 0),  # no scale
        ("int8", t8["weight"].float(), t8["weight_scale"], None, 0),  # not int8 codes
        ("bf16", w.t(), None, None, 0),  # transposed: not contiguous, wrong shape
    ]
    for kind, weight, scale, minimum, group in bad:
        with pytest.raises(ValueError, match="phikit CPU kernel"):
            kernels.gemv(x, kind, weight, scale, minimum, None, group)
    with pytest.raises(ValueError, match="input"):
        kernels.gemv(torch.randn(1, 64), "f32", w)  # K mismatch
    with pytest.raises(ValueError, match="rows"):
        kernels.gemv(torch.randn(kernels.MAX_ROWS + 1, 128), "f32", w)


@needs_kernels
def test_attention_slots_outside_the_cache_are_refused():
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    cache = torch.zeros(1, 2, 8, 16)
    cos, sin = torch.ones(1, 8), torch.zeros(1, 8)
    ok = torch.tensor([3]), torch.tensor([0])
    kernels.attention_decode(q, k, k.clone(), cache, cache.clone(), cos, sin, *ok)
    for pos in (8, -1):
        with pytest.raises(ValueError, match="slots"):
            kernels.attention_decode(q, k, k.clone(), cache, cache.clone(), cos, sin, torch.tensor([pos]), ok[1])


def test_builds_use_explicit_isa_flags():
    assert "-march=native" not in kernels.compile_flags("avx2")
    assert {"-mavx2", "-mfma", "-mf16c"} <= set(kernels.compile_flags("avx2"))
    assert "-mavx512f" in kernels.compile_flags("avx512") and "-mavx512f" not in kernels.compile_flags("avx2")
    if kernels.available():
        assert kernels.isa() in ("avx2", "avx512")


@needs_kernels
def test_the_baseline_build_is_chosen_when_forced(tmp_path):
    result = probe(tmp_path, PHIKIT_CPU_ISA="avx2")
    assert result.stdout.strip() == "True"
    assert [p.name.split("-")[1] for p in (tmp_path / "cache" / "kernels").glob("*.so")] == ["avx2"]


@pytest.mark.slow
@needs_kernels
def test_cache_is_private_and_a_planted_library_is_refused(tmp_path):
    library = seeded(tmp_path)
    folder = library.parent
    assert probe(tmp_path).stdout.strip() == "True" and list(folder.glob("*.so")) == [library]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and not library.stat().st_mode & 0o022
    planted = b"not a library, and writable by everyone"
    library.write_bytes(planted)
    library.chmod(0o666)
    result = probe(tmp_path)
    assert result.stdout.strip() == "True" and not notices(result)
    assert library.read_bytes() != planted and not library.stat().st_mode & 0o022  # rebuilt in its place
    folder.chmod(0o777)  # a folder others can write to: its libraries are not used, nothing is written there
    library.write_bytes(b"")
    library.chmod(0o600)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert probe(tmp_path).stdout.strip() == "True"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.slow
@needs_kernels
def test_an_empty_or_corrupt_cached_library_is_rebuilt(tmp_path):
    library = seeded(tmp_path)
    for content in (b"", b"\x7fELF garbage"):
        library.write_bytes(content)
        result = probe(tmp_path)
        assert result.stdout.strip() == "True" and not notices(result)
        assert library.stat().st_size > 1000
        assert result.stderr.count(COMPILING) == 1  # the user hears why this run starts slowly
    assert COMPILING not in probe(tmp_path).stderr  # and not when the cached build serves


@needs_kernels
@pytest.mark.parametrize(
    "env,available",
    [
        ({"CC": "gcc -w"}, True),  # a compiler command with arguments
        ({"PHIKIT_NO_KERNELS": "0"}, True),
        ({"PHIKIT_NO_KERNELS": "1"}, False),
        ({"CC": "/nonexistent/cc"}, False),
        ({"CC": "gcc '-w"}, False),  # not a valid command line
    ],
)
def test_compiler_settings(tmp_path, env, available):
    result = probe(tmp_path, PHIKIT_CPU_ISA="avx2", **env)  # the baseline build: compiles in half the time
    assert result.returncode == 0 and result.stdout.strip() == str(available)
    assert len(notices(result)) == (0 if available or env.get("PHIKIT_NO_KERNELS") else 1)


@needs_kernels
def test_a_library_of_another_user_is_refused(tmp_path):
    if os.getuid() != 0:
        pytest.skip("only root can give a file to another user")
    library = seeded(tmp_path)
    library.write_bytes(b"planted")
    os.chown(library, 12345, -1)
    assert probe(tmp_path).stdout.strip() == "True"
    assert library.stat().st_uid == os.getuid() and library.read_bytes() != b"planted"


@pytest.mark.slow
@needs_kernels
def test_unwritable_cache_and_a_killed_compiler_fall_back_cleanly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # a cache that cannot be created, even by root (the baseline build: what is built is not the subject)
    result = probe(tmp_path, PHIKIT_CACHE=str(blocker / "cache"), PHIKIT_CPU_ISA="avx2")
    assert result.stdout.strip() == "True" and not notices(result)
    killer = tmp_path / "cc"
    killer.write_text(
        "#!/bin/sh\nprev=\n"
        'for a in "$@"; do [ "$a" = --version ] && { echo fake 1.0; exit 0; }; '
        '[ "$prev" = -o ] && touch "$a"; prev=$a; done\nkill -9 $$\n'
    )
    killer.chmod(0o755)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = probe(tmp_path, CC=str(killer), TMPDIR=str(tmpdir))
    assert result.returncode == 0 and result.stdout.strip() == "False" and len(notices(result)) == 1
    assert list(tmpdir.iterdir()) == [] and not list((tmp_path / "cache").rglob("*.so"))


def test_a_cpu_without_avx2_falls_back_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(kernels.build.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(kernels.build, "_tried", False)
    monkeypatch.setattr(kernels.build, "_lib", None)
    monkeypatch.delenv("PHIKIT_NO_KERNELS", raising=False)
    assert kernels.library() is None and kernels.library() is None
    err = capsys.readouterr().err
    assert err.count("phikit: CPU kernels unavailable") == 1 and "aarch64" in err


def test_the_c_signatures_are_declared_once_and_match_the_definitions():
    """Every function the C source defines is declared in its PHIKIT_API block (whose lines the compiler
    checks against the definitions), and the library's ctypes signatures are those lines."""
    import re

    csrc = kernels.SOURCE.parent
    parts = [p for p in sorted(csrc.rglob("*")) if p.suffix in (".c", ".h")]
    source = "\n".join(p.read_text() for p in parts if p.name != "phikit.h")
    header = (csrc / "phikit.h").read_text()
    assert header.count("/* PHIKIT_API") == 1 and "/* PHIKIT_API" not in source  # declared once, in the header
    defined = set(re.findall(r"^(?:void|int64_t) (phikit_\w+)\(", source, re.M))
    defined |= set(re.findall(r"^DEFINE_GEMV\((phikit_\w+),", source, re.M))
    included = set(re.findall(r'^#include "([\w/.]+)"', source + header, re.M))  # every part is built
    assert included == {p.relative_to(csrc).as_posix() for p in parts if p.name != "cpu_kernels.c"}
    declared = kernels.signatures()
    assert defined == set(declared)
    assert declared["phikit_decode_layers"][0] is ctypes.c_int64 and len(declared["phikit_gemm"][1]) == 12
    if kernels.available():
        lib = kernels.library()
        for name, (result, arguments) in declared.items():
            assert getattr(lib, name).argtypes == arguments and getattr(lib, name).restype == result, name


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
def test_an_unknown_weight_kind_in_the_decode_step_is_an_error_not_int4():
    from types import SimpleNamespace

    from phikit.models.common import KVCache

    hidden, heads, dim = 64, 4, 16
    w = torch.zeros(hidden, hidden)
    linears = [("f32", w, None, None, None, 0)] * 4 + [("f32", torch.zeros(128, hidden), None, None, None, 0)]
    linears += [("f32", torch.zeros(hidden, 128), None, None, None, 0)]
    plan = kernels.plan_array([("phi", (torch.ones(hidden), torch.zeros(hidden)), linears)])
    plan[0].fc1.kind = 9  # what no gemv takes
    config = SimpleNamespace(
        hidden_size=hidden,
        intermediate_size=128,
        norm_eps=1e-5,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=dim,
        sliding_window=None,
    )
    cache = KVCache(1, 1, heads, 8, dim, torch.float32, "cpu")
    x = torch.randn(1, 1, hidden)
    with pytest.raises(ValueError, match="unknown weight kind"):
        kernels.decode_layers(plan, x, config, torch.ones(1, 1, 1, dim), torch.zeros(1, 1, 1, dim), cache, 0)
    plan[0].fc1.kind = 0
    plan[0].arch = 7  # a layer kind the library does not know
    with pytest.raises(ValueError, match="unknown weight kind|unknown layer"):
        kernels.decode_layers(plan, x, config, torch.ones(1, 1, 1, dim), torch.zeros(1, 1, 1, dim), cache, 0)


@needs_kernels
def test_rms_norm_and_swiglu_equal_pytorch():
    from phikit.models.common import RMSNorm

    torch.manual_seed(0)
    x, norm = torch.randn(3, 96) * 3, RMSNorm(96, eps=1e-6)
    norm.weight.data.normal_(1, 0.2)
    with torch.no_grad():
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight.data, 1e-6), norm(x), rtol=1e-6, atol=1e-6)
    gate_up = torch.randn(3, 2 * 80) * 4
    gate_up[0, :5] = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])  # far tails of the exponential
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), up * torch.nn.functional.silu(gate), rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "h, kv, d",
    # groups of 3 (Phi-4-mini's 24/8), 4 (Phi-4's 40/10), 2, 5 and 8 query heads a KV head, heads of 32 to 128
    # dims (the AVX-512 loops' chunks of 8, 4, 2 and 1 x 16 dims), one head a KV head, and 72 dims (AVX2 loop)
    [(6, 2, 32), (12, 4, 128), (8, 2, 128), (4, 2, 96), (10, 2, 80), (16, 2, 64), (2, 2, 32), (6, 2, 72)],
)
def test_grouped_query_attention_with_a_window_equals_pytorch(cache_dtype, h, kv, d):
    """Two rows at their own positions, query heads in groups on fewer KV heads, rotary on half the dims, the
    second row under a sliding window (first attended slot > 0): the C step against rotary + SDPA over the
    same slots."""
    from phikit.models.common import apply_rope

    torch.manual_seed(0)
    b, r, slots = 2, d // 2, 24
    q, k, v = torch.randn(b, h, d), torch.randn(b, kv, d), torch.randn(b, kv, d)
    k_cache = torch.randn(b, kv, slots, d).to(cache_dtype)
    v_cache = torch.randn(b, kv, slots, d).to(cache_dtype)
    ref_k, ref_v = k_cache.float().clone(), v_cache.float().clone()
    angles = torch.rand(b, r) * 6
    cos, sin = angles.cos(), angles.sin()
    pos, first = torch.tensor([9, 20]), torch.tensor([0, 13])
    out = kernels.attention_decode(q, k, v, k_cache, v_cache, cos, sin, pos, first)
    c, s = cos[:, None, None], sin[:, None, None]  # (b, 1, 1, r): apply_rope's layout
    q_rot = apply_rope(q[:, :, None], c, s)[:, :, 0]
    k_rot = apply_rope(k[:, :, None], c, s)[:, :, 0]
    for i in range(b):
        ref_k[i, :, pos[i]], ref_v[i, :, pos[i]] = k_rot[i], v[i]
        keys = ref_k[i, :, first[i] : pos[i] + 1].to(cache_dtype).float()
        values = ref_v[i, :, first[i] : pos[i] + 1].to(cache_dtype).float()
        expected = torch.nn.functional.scaled_dot_product_attention(
            q_rot[i][None, :, None], keys[None], values[None], enable_gqa=True
        )[0, :, 0]
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_cache[i, :, pos[i]].float(), k_rot[i].to(cache_dtype).float())
