"""Prefill paths on the CPU: each against the dequantized reference, and the choice among them by timing."""

import json

import pytest
import torch
import torch.nn.functional as F

from phikit import kernels
from phikit.backends import autotune
from phikit.quantize import dequantize, quantize_int4, quantize_int8, unpack_nibbles

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
N, K = 192, 256


def weights(kind: str):
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    if kind == "int8":
        t = quantize_int8(w)
        return (t["weight"], t["weight_scale"], None, 0), dequantize("int8", t)
    if kind == "int4":
        t = quantize_int4(w, 64)
        return (t["weight"], t["weight_scale"], t["weight_min"], 64), dequantize("int4", t, 64)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind]
    return (w.to(dtype), None, None, 0), w.to(dtype).float()


@pytest.mark.parametrize("kind,path", [(k, p) for k, paths in autotune.PATHS.items() for p in paths])
def test_every_prefill_path_matches_the_reference(kind, path, monkeypatch):
    if path not in autotune.paths(kind, N):
        pytest.skip(f"{path} needs instructions this CPU (or build) lacks")
    monkeypatch.setattr(autotune, "PANEL_BYTES", 64 * K * 2)  # several panels even for this small weight
    monkeypatch.setattr(autotune, "F32_PANEL_BYTES", 64 * K * 4)
    (weight, scale, minimum, group), dense = weights(kind)
    x, bias = torch.randn(40, K), torch.randn(N)
    got = autotune.run(path, x, kind, weight, scale, minimum, bias, group)
    expected = F.linear(x, dense, bias)
    # paths through bf16 round the activations (and int8/int4/fp16 panels) to bf16: ~0.3% of the output;
    # phikit_vnni rounds them to int8 per block: ~0.5%
    limit = 1e-5 if path in ("phikit_gemm", "torch_f32", "dequant_f32") else 1e-2
    assert ((got - expected).norm() / expected.norm()).item() < limit


def test_the_choice_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PHIKIT_AUTOTUNE", "measure")
    monkeypatch.delenv("PHIKIT_PREFILL_PATH", raising=False)
    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setattr(autotune, "_timings", {})
    path = autotune.choose("int8", N, K)
    assert path in autotune.PATHS["int8"]
    [saved] = list(tmp_path.glob("autotune-*.json"))
    entry = next(iter(json.loads(saved.read_text()).values()))
    assert entry["path"] == path and set(entry["seconds"]) == set(autotune.paths("int8", N))
    assert path == min(entry["seconds"], key=entry["seconds"].get)

    def measured(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune, "_measure", measured)
    monkeypatch.setattr(autotune, "_chosen", {})  # a new process: read from the cache file
    monkeypatch.setattr(autotune, "_used", set())
    monkeypatch.setattr(autotune, "_defaults", {})
    assert autotune.decisions() == {}  # cached decisions this process did not use are not reported
    assert autotune.choose("int8", N, K) == path
    assert next(iter(autotune.decisions().values()))["path"] == path


def test_forcing_and_switching_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setattr(autotune, "_timings", {})
    monkeypatch.setenv("PHIKIT_AUTOTUNE", "measure")
    monkeypatch.setenv("PHIKIT_PREFILL_PATH", "dequant_bf16")
    assert autotune.choose("int4", N, K, 64) == "dequant_bf16"
    assert autotune.choose("f32", N, K) in autotune.PATHS["f32"]  # not a path of fp32 weights: measured
    monkeypatch.setenv("PHIKIT_AUTOTUNE", "0")
    monkeypatch.delenv("PHIKIT_PREFILL_PATH")
    assert autotune.choose("bf16", N, K) == "phikit_gemm"


needs_bf16_dp = pytest.mark.skipif(
    not kernels.has(kernels.FEATURE_BF16_DP), reason="this CPU (or build) has no AVX-512 BF16"
)


@needs_bf16_dp
@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_dot_product_gemv_matches_the_reference(rows):
    torch.manual_seed(0)
    w, x, bias = (torch.randn(N, K) * 0.05).bfloat16(), torch.randn(rows, K), torch.randn(N)
    got = kernels.gemv_bf16_dp(x, w, bias)
    exact = x.bfloat16().float() @ w.float().t() + bias  # the same products, fp32 sums
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


@needs_bf16_dp
@pytest.mark.parametrize("rows,n,k", [(3, 112, 256), (6, 64, 128), (11, 48, 2624), (16, 80, 5120)])
def test_bf16_dot_products_of_a_batch_are_each_rows_own(rows, n, k):
    """Rows of x go through the kernel four at a time (one per 128-bit lane), 6 to 8 rows of W a block, the
    last block shorter: each row's result is the bits it gets alone (batch-invariant decoding) and the
    reference's to rounding."""
    torch.manual_seed(1)
    w, x, bias = (torch.randn(n, k) * 0.05).bfloat16(), torch.randn(rows, k), torch.randn(n)
    got = kernels.gemv_bf16_dp(x, w, bias)
    for i in range(rows):
        assert torch.equal(got[i], kernels.gemv_bf16_dp(x[i : i + 1].contiguous(), w, bias)[0])
    exact = x.bfloat16().float() @ w.float().t() + bias
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


@needs_bf16_dp
def test_a_batched_bf16_step_gives_each_row_the_logits_it_gets_alone(tiny, monkeypatch):
    """What continuous batching promises with the AVX-512 BF16 kernel (the default path for bf16 weights):
    a row's logits from an 11-row decoding step (the kernel's batched lanes, layers in one C call, the head)
    are the bits of the same row stepped alone (the one-row path)."""
    import phikit

    monkeypatch.setenv("PHIKIT_AUTOTUNE", "1")
    monkeypatch.delenv("PHIKIT_DECODE_PATH", raising=False)
    monkeypatch.setattr(autotune, "_defaults", {})  # the choices this load records stay this test's
    folder, _ = tiny
    model = phikit.load(folder, dtype="bf16", device="cpu").model
    from phikit.backends import cpu

    layers = [cpu._layer_args(layer) for layer in model.model.layers]  # the one-call step's linears
    assert all(args[0] == "bf16_dp" for _, _, linears in layers for args in linears)
    rows = 11
    ids = torch.randint(0, 300, (rows, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        cache = model.new_cache(rows, 16)
        for r in range(rows):
            model.prefill(ids[r : r + 1, :8], torch.arange(8), cache.rows(r))
        alone = [model.decode_step(ids[r : r + 1, 8:], torch.tensor([8]), cache.rows(r))[0] for r in range(rows)]
        together = model.decode_step(ids[:, 8:], torch.tensor([8]), cache)
    for r in range(rows):
        assert torch.equal(together[r], alone[r])


@needs_bf16_dp
def test_decoding_with_bf16_dot_products_matches_the_fp32_activation_path(tiny, monkeypatch):
    """The decode choice for bf16 weights, forced to bf16_dp: the one-call step and the module path agree,
    and stay within bf16 rounding of phikit's default (fp32 activations)."""
    import phikit

    folder, _ = tiny
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))

    def decode(path: str, fused: bool) -> torch.Tensor:
        monkeypatch.setenv("PHIKIT_AUTOTUNE", "1")
        monkeypatch.setenv("PHIKIT_DECODE_PATH", path)
        model = phikit.load(folder, dtype="bf16", device="cpu").model
        one = model.decode_step if fused else model.forward
        cache = model.new_cache(2, 16)
        with torch.inference_mode():
            model(ids[:, :6], torch.arange(6), cache)
            return torch.cat([one(ids[:, t : t + 1], torch.tensor([t]), cache) for t in range(6, 10)], dim=1)

    dp = decode("bf16_dp", True)
    torch.testing.assert_close(dp, decode("bf16_dp", False), rtol=0, atol=1e-3)
    reference = decode("phikit_gemv", True)
    assert ((dp - reference).norm() / reference.norm()).item() < 1e-2


def test_the_decode_choice_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PHIKIT_AUTOTUNE", "measure")
    monkeypatch.delenv("PHIKIT_DECODE_PATH", raising=False)
    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setattr(autotune, "_timings", {})
    monkeypatch.setattr(autotune, "_defaults", {})  # what other tests' default-mode loads recorded
    assert autotune.choose_decode("int8", N, K) == "phikit_gemv"  # a single candidate: nothing to measure
    path = autotune.choose_decode("bf16", N, K)
    assert path in autotune.decode_paths("bf16")
    if len(autotune.decode_paths("bf16")) > 1:
        [entry] = [v for k, v in autotune.decisions().items() if k.startswith("decode-bf16")]
        assert set(entry["seconds"]) == {"phikit_gemv", "bf16_dp"}


needs_vnni = pytest.mark.skipif(not kernels.has(kernels.FEATURE_VNNI), reason="this CPU (or build) has no AVX-512 VNNI")


def int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to int8 per block as the kernels do (scale = block max / 127, fp32 reciprocal, round half
    to even): (codes as float64, scales as float64), shapes (M, K) and (M, K / block)."""
    blocks = x.reshape(x.shape[0], -1, block)
    scale = blocks.abs().amax(dim=-1) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(blocks * inverse[..., None])
    return codes.reshape(x.shape).double(), scale.double()


@needs_vnni
@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)])
@pytest.mark.parametrize("rows,k", [(1, 256), (7, 512), (40, 320 + 192)])
def test_vnni_gemm_computes_the_int8_activation_products_exactly(kind, group, rows, k):
    """gemm_vnni = the sum over activation blocks of (int8 codes of x) . (weight codes), scaled, in float64
    (only the float rounding of the block sums differs), and within the int8 rounding of x (<1%) of the
    fp32 product with the dequantized weight. Rows that are not a multiple of the kernel's 6, several 256-k
    slices, bias and no bias."""
    if k % (group or 64):
        pytest.skip("group does not divide k")
    torch.manual_seed(rows)
    n = 96
    w, x, bias = torch.randn(n, k) * 0.05, torch.randn(rows, k), torch.randn(n)
    x[0, :64] = 0  # an all-zero block: scale 0
    if kind == "int8":
        t = quantize_int8(w)
        q, block = t["weight"].double(), 64
    else:
        t = quantize_int4(w, group)
        q, block = unpack_nibbles(t["weight"]).double(), group
    codes, scales = int8_blocks(x, block)
    products = torch.einsum("mbk,nbk->mnb", codes.reshape(rows, -1, block), q.reshape(n, -1, block))
    if kind == "int8":
        exact = (products * scales[:, None, :]).sum(-1) * t["weight_scale"].double()
    else:
        s, low = t["weight_scale"].double(), t["weight_min"].double()
        sums = codes.reshape(rows, -1, block).sum(-1) * scales  # x as rounded
        exact = (products * scales[:, None, :] * s[None]).sum(-1) + sums @ low.t()
    for b in (bias, None):
        got = kernels.gemm_vnni(x, kind, t["weight"], t["weight_scale"], t.get("weight_min"), b, group)
        expected = exact + (0 if b is None else b.double())
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
        dense = F.linear(x, dequantize(kind, t, group or 64), b)
        assert ((got - dense).norm() / dense.norm()).item() < 1e-2


@needs_vnni
def test_vnni_gemm_refuses_what_it_cannot_take():
    t = quantize_int8(torch.randn(48, 256))
    with pytest.raises(ValueError, match="out_features % 32"):
        kernels.gemm_vnni(torch.randn(3, 256), "int8", t["weight"], t["weight_scale"])
    with pytest.raises(ValueError, match="int8 or int4"):
        kernels.gemm_vnni(torch.randn(3, 256), "bf16", torch.randn(64, 256).bfloat16(), None)


def test_cached_decisions_this_machine_cannot_run_are_measured_again_and_a_fifo_is_skipped(tmp_path, monkeypatch):
    """A cache entry naming a path of another format (phikit_vnni for bf16 weights, torch_f32 for int8, a
    path of no name) or one this CPU's library lacks is not used; a FIFO at the cache's path is not read."""
    import os

    monkeypatch.setenv("PHIKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PHIKIT_AUTOTUNE", "measure")
    monkeypatch.delenv("PHIKIT_PREFILL_PATH", raising=False)
    for store in ("_chosen", "_timings", "_used"):
        monkeypatch.setattr(autotune, store, {} if store != "_used" else set())
    threads = torch.get_num_threads()
    bad = {
        f"bf16:{N}x{K}:g0:r64:t{threads}": "phikit_vnni",
        f"int8:{N}x{K}:g0:r64:t{threads}": "torch_f32",
        f"f32:{N}x{K}:g0:r64:t{threads}": "warp_drive",
        f"decode-int8:{N}x{K}:t{threads}": "bf16_dp",
    }
    cache = autotune._cache_file()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: {"path": v, "seconds": {}} for k, v in bad.items()}))
    assert autotune.choose("bf16", N, K, rows=32) in autotune.paths("bf16", N)
    assert autotune.choose("int8", N, K, rows=32) in autotune.paths("int8", N)
    assert autotune.choose("f32", N, K, rows=32) in autotune.paths("f32", N)
    assert autotune.choose_decode("int8", N, K) == "phikit_gemv"
    cache.unlink()
    os.mkfifo(cache)
    monkeypatch.setattr(autotune, "_chosen", {})
    assert autotune.choose("int8", N, K, rows=32) in autotune.paths("int8", N)  # a FIFO would block a read


def test_by_default_the_path_is_a_function_of_the_format_and_the_cpu(monkeypatch):
    """Paths round activations differently (fp32, bf16, int8): the default is fixed by what the CPU has, never
    by a timing, so two runs on one kind of CPU give the same greedy output."""
    monkeypatch.delenv("PHIKIT_PREFILL_PATH", raising=False)
    monkeypatch.setenv("PHIKIT_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_measure", lambda *a: pytest.fail("timed by default"))
    monkeypatch.setattr(autotune, "_measure_decode", lambda *a: pytest.fail("timed by default"))
    bf16 = kernels.has(kernels.FEATURE_BF16_DP)
    vnni = kernels.has(kernels.FEATURE_VNNI)
    assert autotune.choose("f32", N, K) == "phikit_gemm"
    f32_panels = not bf16 and kernels.isa() == "avx512"  # AVX-512 without BF16: sgemm on fp32 panels
    assert autotune.choose("bf16", N, K) == ("torch_bf16" if bf16 else "dequant_f32" if f32_panels else "phikit_gemm")
    assert autotune.choose("bf16", N, K, rows=64) == ("torch_bf16" if bf16 else "phikit_gemm")
    assert autotune.choose("f16", N, K) == ("dequant_bf16" if bf16 else "dequant_f32" if f32_panels else "phikit_gemm")
    assert autotune.choose("int4", N, K, 64) == ("phikit_vnni" if vnni else "dequant_bf16" if bf16 else "phikit_gemm")
    assert autotune.choose_decode("bf16", N, K) == ("bf16_dp" if bf16 else "phikit_gemv")
    monkeypatch.setenv("PHIKIT_AUTOTUNE", "0")
    assert autotune.choose("bf16", N, K) == "phikit_gemm" and autotune.choose_decode("bf16", N, K) == "phikit_gemv"
