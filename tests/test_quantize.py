"""Quantized layers against the dequantized-reference matmul; NF4 against bitsandbytes; save/reload."""

import sys

import pytest
import torch
import torch.nn.functional as F

import phikit
from phikit import kernels
from phikit.backends import bind_kernel
from phikit.backends.cpu import DenseLinear
from phikit.errors import PhikitError
from phikit.quantize import (
    QuantizedLinear,
    QuantSpec,
    dequantize,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_nf4,
    unpack_nibbles,
)

N, K = 96, 256


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(N, K) * 0.05


@pytest.fixture(params=["kernels", "torch"])
def backend(request, monkeypatch):
    """Run each layer test with our CPU kernels and with PyTorch's ops only."""
    if request.param == "kernels" and not kernels.available():
        pytest.skip("CPU kernels unavailable on this machine")
    if request.param == "torch":
        monkeypatch.setattr(kernels.build, "_tried", True)  # as if the library could not be built
        monkeypatch.setattr(kernels.build, "_lib", None)
    return request.param


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (4, 64))
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q.to(torch.uint8))


def test_int8_and_int4_round_trip_within_half_a_step(weight):
    t = quantize_int8(weight)
    assert (dequantize("int8", t) - weight).abs().max() <= t["weight_scale"].max() / 2 + 1e-7
    for group in (32, 64, 128):
        t = quantize_int4(weight, group)
        err = (dequantize("int4", t, group) - weight).abs().reshape(N, K // group, group).amax(-1)
        assert (err <= t["weight_scale"] / 2 + 1e-6).all()


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)])
def test_kernel_quantizer_gives_the_reference_bits(weight, dtype, fmt, group):
    w = (weight * torch.linspace(0.1, 3, N)[:, None]).to(dtype)
    w[0, :64] = 0.5  # constant groups: zero range, the 1e-7 floor of the scale
    w[1] = 0
    assert kernels.can_quantize(w, fmt, group or 64)
    ours = kernels.quantize(w, fmt, group or 64)
    reference = quantize_int8(w) if fmt == "int8" else quantize_int4(w, group)
    assert ours.keys() == reference.keys()
    for name, t in reference.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


@pytest.mark.parametrize("fmt,group", [("int8", 64), ("int4", 32), ("int4", 128), ("nf4", 64)])
@pytest.mark.parametrize("n,k", [(3, 256), (40, 512), (300, 4608)])  # nf4: 12, 320, 21,600 blocks of 64
def test_the_shells_shapes_are_the_quantizers(fmt, group, n, k):
    from phikit.quantize import QuantizedLinear, quantize_weight, quantized_shapes

    made = quantize_weight(torch.randn(n, k), fmt, group)
    said = quantized_shapes(fmt, n, k, group)
    assert {name: (tuple(t.shape), t.dtype) for name, t in made.items()} == said
    shell = QuantizedLinear.empty(k, n, fmt, group, bias=True)  # what a quantized checkpoint loads into
    assert {name: (tuple(t.shape), t.dtype) for name, t in shell.tensors().items()} == said
    assert shell.weight.device.type == "meta" and shell.bias.shape == (n,)


def test_nf4_matches_bitsandbytes(weight):
    bnb = pytest.importorskip("bitsandbytes.functional")
    ours = quantize_nf4(weight)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    bytes_ = packed.flatten()
    theirs = torch.stack([bytes_ >> 4, bytes_ & 0x0F], dim=1).reshape(N, K)  # high nibble first
    agree = (unpack_nibbles(ours["weight"]) == theirs).float().mean()
    assert agree > 0.999
    reference = bnb.dequantize_4bit(packed, state)
    torch.testing.assert_close(dequantize("nf4", ours), reference, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    "fmt,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256), ("nf4", 0)]
)
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_quantized_linear_matches_dequantized_matmul(weight, backend, fmt, group, rows):
    bias = torch.randn(N)
    layer = bind_kernel(QuantizedLinear.from_weight(weight, bias, fmt, group or 64))
    x = torch.randn(2, rows, K)
    expected = F.linear(x, layer.dequantized(), bias)
    with torch.no_grad():
        got = layer(x)
    # int4 kernels quantize activations to int8 per 32 values (as llama.cpp does), PyTorch's int8/int4
    # CPU kernels take bf16 activations: both about 0.5% of the output range
    approximate = fmt == "int4" and backend == "kernels" and rows * 2 <= kernels.MAX_ROWS
    approximate |= fmt in ("int8", "int4") and backend == "torch"
    tol = 2e-2 if approximate else 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 33, 600])
def test_dense_linear_matches_torch(backend, dtype, rows):
    torch.manual_seed(1)
    linear = torch.nn.Linear(K, N).to(dtype).requires_grad_(False)
    fast = DenseLinear.from_linear(linear)
    x = torch.randn(rows, K).to(dtype)
    with torch.no_grad():
        expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        got = fast(x)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("kind", ["f32", "bf16", "int8", "int4"])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(weight, kind):
    x = torch.randn(6, K)
    tensors = {
        "f32": {"weight": weight},
        "bf16": {"weight": weight.bfloat16()},
        "int8": quantize_int8(weight),
        "int4": quantize_int4(weight, 64),
    }[kind]
    args = (tensors["weight"], tensors.get("weight_scale"), tensors.get("weight_min"), None, 64)
    batch = kernels.gemv(x, kind, *args)
    for row in range(6):
        assert torch.equal(kernels.gemv(x[row : row + 1].contiguous(), kind, *args)[0], batch[row])


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("k", [192, 256])
def test_the_bf16_gemv_matches_torch(k):
    """AVX-512 builds read 32 bf16 weights a load and split each 32-bit lane into its two weights."""
    torch.manual_seed(3)
    weight, x = torch.randn(N, k).bfloat16(), torch.randn(6, k)
    expected = F.linear(x, weight.float())
    batch = kernels.gemv(x, "bf16", weight)
    torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-4)
    for row in range(6):
        assert torch.equal(kernels.gemv(x[row : row + 1].contiguous(), "bf16", weight)[0], batch[row])


def test_spec_errors():
    with pytest.raises(PhikitError, match="unknown quantization 'int3'"):
        QuantSpec("int3")
    with pytest.raises(PhikitError, match="group size must be"):
        QuantSpec("int4", group_size=48)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quantized_while_loading_equals_quantizing_after(tiny, fmt):
    folder, _ = tiny
    on_load = phikit.load(folder, dtype="fp32", device="cpu", quantize=fmt)
    after = phikit.load(folder, dtype="fp32", device="cpu")
    from phikit.quantize import quantize_model

    quantize_model(after.model, QuantSpec(fmt))
    assert on_load.model.state_dict().keys() == after.model.state_dict().keys()
    for name, tensor in on_load.model.state_dict().items():
        assert torch.equal(tensor, after.model.state_dict()[name]), name
    assert isinstance(on_load.model.lm_head, QuantizedLinear)
    assert not isinstance(on_load.model.model.embed_tokens, QuantizedLinear)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_saved_quantized_checkpoint_reloads_identically(tiny, tmp_path, fmt):
    folder, _ = tiny
    phi = phikit.load(folder, dtype="bf16", device="cpu", quantize=fmt, group_size=32 if fmt == "int4" else None)
    out = phikit.save_quantized(phi, tmp_path / "q")
    again = phikit.load(out, dtype="bf16", device="cpu")
    assert again.quantization == phi.quantization
    ids = torch.randint(0, min(500, phi.model.config.vocab_size), (1, 12))
    with torch.no_grad():
        assert torch.equal(phi.model(ids), again.model(ids))
    assert phi.generate("Hello", max_new_tokens=10).token_ids == again.generate("Hello", max_new_tokens=10).token_ids
    with pytest.raises(PhikitError, match="already exists"):
        phikit.save_quantized(phi, out)
    from transformers import AutoModelForCausalLM, PhiForCausalLM

    with pytest.raises(ValueError, match="phikit_quantized_phi"):  # other tools refuse, loudly
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(OSError):
        PhiForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quantized_model_matches_transformers_with_dequantized_weights(tiny, fmt):
    folder, hf = tiny
    quant = phikit.load(folder, dtype="fp32", device="cpu", quantize=fmt)
    reference = type(hf)(hf.config).eval()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    for name, module in quant.model.named_modules():
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = module.dequantized()
    reference.load_state_dict(state)
    ids = torch.randint(0, min(500, hf.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids).logits, quant.model(ids)
    # decode-sized inputs run the int4 kernel, which quantizes activations to int8 per group (as
    # llama.cpp does); on this random tiny model that moves logits by a few percent
    limit = 0.05 if fmt == "int4" and kernels.available() else 1e-4
    assert ((got - expected).norm() / expected.norm()).item() < limit
    with torch.no_grad():
        one = quant.model(ids[:1, :1])
        assert ((one - reference(ids[:1, :1]).logits).norm() / one.norm()).item() < limit


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_one_call_decode_step_matches_layer_by_layer_and_transformers(tiny, precision):
    """The C decoding step (every layer in one call) against the module-by-module path, and in fp32 against
    transformers; a weight replaced or a hook added, once the model says so (``changed``), is seen by the
    next step."""
    from phikit.models import changed

    folder, hf = tiny
    quantize = precision if precision.startswith("int") else None
    model = phikit.load(folder, dtype="fp32" if quantize else precision, device="cpu", quantize=quantize).model
    step = model.decode_step
    ids = torch.randint(0, min(500, hf.config.vocab_size), (2, 12), generator=torch.Generator().manual_seed(0))

    def decode(fused: bool) -> torch.Tensor:
        one = step if fused else model.forward
        cache = model.new_cache(2, 16)
        with torch.inference_mode():
            logits = [model(ids[:, :8], torch.arange(8), cache)]
            logits += [one(ids[:, t : t + 1], torch.tensor([t]), cache) for t in range(8, 12)]
        return torch.cat(logits, dim=1)

    fused = decode(True)
    assert step.array is not None  # the one-call step ran
    # LayerNorm in C differs from PyTorch's in the last bits; int8's 15-bit and int4's 8-bit activation
    # rounding can carry such a bit to one step (~2e-5 to 3e-5 of these logits, which reach ~9)
    torch.testing.assert_close(fused, decode(False), rtol=0, atol=1e-3 if quantize else 1e-5)
    if precision == "fp32":
        with torch.no_grad():
            torch.testing.assert_close(fused, hf(ids).logits, rtol=0, atol=1e-4)
            fc2 = model.model.layers[0].mlp.fc2
            fc2.weight = torch.nn.Parameter(fc2.weight * 2, requires_grad=False)  # new memory
        changed(model)
        torch.testing.assert_close(decode(True), decode(False), rtol=0, atol=1e-5)
        calls = []
        hook = model.model.layers[1].register_forward_hook(lambda *args: calls.append(1))
        changed(model)
        decode(True)  # a hooked layer is run as a module
        hook.remove()
        assert len(calls) == 5 and step.array is None


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_one_call_decode_step_with_a_slot_per_row(tiny, quantize):
    """Continuous batching's step (rows at their own cache slots, a view of the first rows of a larger cache)
    through the C decoding step: the module path's logits, and (fp32) transformers' for each row's sequence.
    int8: an fp16 KV cache, read by both paths."""
    folder, hf = tiny
    model = phikit.load(folder, dtype="fp32", device="cpu", quantize=quantize).model
    assert model.kv_cache_dtype == (torch.float16 if quantize else None)
    ids = torch.randint(0, min(500, hf.config.vocab_size), (2, 12), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([5, 9])

    def step(fused: bool) -> torch.Tensor:
        one = model.decode_step if fused else model.forward
        cache = model.new_cache(3, 16)
        with torch.inference_mode():
            for row, n in enumerate(lengths.tolist()):
                model(ids[row : row + 1, :n], torch.arange(n), cache.rows(row))
            tokens = ids[[0, 1], lengths][:, None]
            return one(tokens, lengths[:, None], cache.rows(0, 2))[:, -1]

    fused = step(True)
    assert model.decode_step.array is not None
    torch.testing.assert_close(fused, step(False), rtol=0, atol=1e-3 if quantize else 1e-5)
    if quantize:
        return
    with torch.no_grad():
        for row, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(fused[row], hf(ids[row : row + 1, : n + 1]).logits[0, -1], rtol=0, atol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kernel_quantizer_bits_on_a_weight_in_huge_page_memory(fmt, monkeypatch):
    monkeypatch.setenv("PHIKIT_HUGE_PAGES", "1")
    torch.manual_seed(0)
    w = (torch.randn(1024, 4096) * 0.05).to(torch.bfloat16)  # codes of 4 MB (int8) and 2 MB (int4)
    ours = kernels.quantize(w, fmt, 64)
    reference = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 64)
    if sys.platform.startswith("linux"):
        assert ours["weight"].data_ptr() % kernels.HUGE_PAGE == 0
    for name, t in reference.items():
        assert torch.equal(ours[name], t), name


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_narrow_weights_get_an_fp16_kv_cache_that_decodes_like_an_fp32_one(tiny, precision):
    """bf16/int4 weights on the CPU: an fp16 KV cache (half the bytes per token of a long context) gives the
    logits of an fp32 cache within fp16's rounding (bf16: the same greedy tokens); fp32 weights keep fp32."""
    from phikit.generate import GenerationConfig, generate_tokens

    folder, hf = tiny
    assert phikit.load(folder, dtype="fp32", device="cpu").model.new_cache(1, 4).k.dtype == torch.float32
    quantize = precision if precision == "int4" else None
    model = phikit.load(folder, dtype="bf16" if quantize is None else "fp32", device="cpu", quantize=quantize).model
    assert model.new_cache(1, 4).k.dtype == torch.float16
    ids = torch.randint(0, min(500, hf.config.vocab_size), (2, 24), generator=torch.Generator().manual_seed(2))

    def run(cache_dtype) -> tuple[torch.Tensor, list]:
        model.kv_cache_dtype = cache_dtype
        cache = model.new_cache(2, 32)
        with torch.no_grad():
            logits = [model(ids[:, :16], torch.arange(16), cache)]
            logits += [model(ids[:, t : t + 1], torch.tensor([t]), cache) for t in range(16, 24)]
        config = GenerationConfig(max_new_tokens=12)
        tokens = [step.tolist() for step in generate_tokens(model, [ids[0].tolist()], config, 50256)]
        return torch.cat(logits, dim=1), tokens

    made = []
    new_cache = model.new_cache
    model.new_cache = lambda *args: made.append(new_cache(*args)) or made[-1]
    list(generate_tokens(model, [ids[0, :5].tolist(), ids[1].tolist()], GenerationConfig(max_new_tokens=2), 0))
    del model.new_cache
    assert made[0].k.dtype == torch.float16  # padded rows decode in the one C call too, each from its first slot

    half, half_tokens = run(torch.float16)
    full, full_tokens = run(None)
    if precision == "int4":  # its kernels round activations to 8 bits per group: fp16's rounding becomes
        # whole steps there, enough to flip near-tied tokens of this random model
        assert ((half - full).norm() / full.norm()).item() < 2e-2
    else:
        assert ((half - full).norm() / full.norm()).item() < 2e-3
        assert half_tokens == full_tokens


@pytest.mark.parametrize("fmt, width, multiple", [("nf4", 160, 64), ("int4", 96, 64), ("int8", 48, 32)])
def test_a_width_a_format_cannot_pack_is_a_clear_error(fmt, width, multiple):
    """NF4 packs its codes in blocks of 64 (a 160-wide layer once failed deep in the packing)."""
    with pytest.raises(PhikitError, match=f"in_features must be a multiple of {multiple}"):
        QuantizedLinear.from_weight(torch.randn(64, width), None, fmt)
