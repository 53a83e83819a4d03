"""The int8 KV cache (``phikit.load(kv_cache="int8")``, issue 23): its rows against their definition, the C
attention over it against PyTorch's SDPA on the dequantized rows, the one-call step against the modules, greedy
tokens against transformers' (equal but where transformers' own choice is a near-tie), and what copies cache
rows (the server's prefix cache and row compaction) and measures it (bench --depth)."""

import time

import pytest
import torch

import phikit
from phikit import kernels
from phikit.checkpoint import load_model
from phikit.errors import PhikitError
from phikit.generate import GenerationConfig, generate_tokens
from phikit.models.common import KVCache, Slots, apply_rope, dequantize_rows, quantize_rows

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
VARIANTS = ["phi2", "phi3-4k", "phi3-128k", "phi4-mini", "phi4"]
# logits apart: a near-tie. These tiny random models' logits spread with a standard deviation of about 1.6; an int8
# cache moves them by 1.7-2.0% in relative norm, up to 0.18-0.31 a logit over 20 cached steps (an fp16 cache by
# 0.1%), whatever the rows' length (scales per 16 values or per row measured the same): a choice flips where the
# top two are that close
NEAR_TIE = 0.3


def test_rows_quantize_to_int8_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 96) * torch.rand(3, 4, 7, 1) * 10
    x[0, 0, 0] = 0
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 4, 7)
    assert torch.equal(scale, x.abs().amax(-1) / 127)
    assert codes.abs().amax(-1)[scale > 0].eq(127).all()  # each row spans the codes
    assert not codes[0, 0, 0].any() and scale[0, 0, 0] == 0  # a zero row stays zero
    error = (dequantize_rows(codes, scale, torch.float32) - x).abs()
    assert (error <= scale[..., None] * (0.5 + 1e-5)).all()


def test_an_int8_cache_stores_chunks_and_rows_and_gives_them_back_dequantized():
    torch.manual_seed(0)
    cache = KVCache(2, 2, 3, 20, 16, torch.int8, "cpu")
    assert cache.nbytes == 2 * (2 * 2 * 3 * 20 * 16) + 2 * (2 * 2 * 3 * 20 * 4)  # codes, then an fp32 scale a row
    k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    slots = Slots.build(torch.zeros(2, 5, dtype=torch.long), torch.arange(5), cache)
    keys, values = cache.update(1, slots, k, v)
    for got, x, codes, scales in ((keys, k, cache.k, cache.scales[0]), (values, v, cache.v, cache.scales[1])):
        want_codes, want_scale = quantize_rows(x)
        assert torch.equal(codes[1, :, :, :5], want_codes) and torch.equal(scales[1, :, :, :5], want_scale)
        assert got.dtype == torch.float32 and torch.equal(got, dequantize_rows(want_codes, want_scale, torch.float32))
    assert not cache.k[0].any() and not cache.scales[0][0].any()  # another layer untouched
    new_k, new_v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)
    per_row = Slots.build(torch.zeros(2, 1, dtype=torch.long), torch.tensor([[5], [9]]), cache)
    keys, _ = cache.update(1, per_row, new_k, new_v)  # one token a row at its own slot: the whole cache back
    assert keys.shape == (2, 3, 20, 16)
    assert torch.equal(keys[1, :, 9], dequantize_rows(*quantize_rows(new_k[1, :, 0]), torch.float32))
    row = cache.rows(1)
    assert [t.data_ptr() for t in row.tensors] == [t[:, 1:].data_ptr() for t in cache.tensors]


@needs_kernels
@pytest.mark.parametrize(
    "h, kv, d",
    # the AVX-512 group loops (G = 2..8, chunks of 8, 4, 2 and 1 x 16 dims), one head a KV head (Phi-3-mini's
    # 32/32), Phi-4-mini's 24/8 of 128, and 72 dims (the AVX2 loops)
    [(6, 2, 32), (12, 4, 128), (8, 2, 128), (6, 2, 96), (10, 2, 80), (16, 2, 64), (2, 2, 32), (6, 2, 72), (3, 1, 128)],
)
def test_the_c_attention_over_an_int8_cache_equals_sdpa_on_its_dequantized_rows(h, kv, d):
    """Two rows at their own positions, the second under a sliding window: the C call quantizes the new key
    (after rotary) and value as ``quantize_rows`` does, and attends as SDPA does over the dequantized rows (to
    3e-4: the VNNI scores round the query to 16 bits, where the cache rounds keys to 8)."""
    torch.manual_seed(0)
    b, r, slots = 2, d // 2, 24
    q, k, v = torch.randn(b, h, d), torch.randn(b, kv, d), torch.randn(b, kv, d) * 3
    k_cache, k_scale = quantize_rows(torch.randn(b, kv, slots, d) * 2)
    v_cache, v_scale = quantize_rows(torch.randn(b, kv, slots, d) + 1)
    angles = torch.rand(b, r) * 6
    cos, sin = angles.cos(), angles.sin()
    pos, first = torch.tensor([9, 20]), torch.tensor([0, 13])
    out = kernels.attention_decode(q, k, v, k_cache, v_cache, cos, sin, pos, first, k_scale, v_scale)
    c, s = cos[:, None, None], sin[:, None, None]
    q_rot = apply_rope(q[:, :, None], c, s)[:, :, 0]
    k_rot = apply_rope(k[:, :, None], c, s)[:, :, 0]
    for i in range(b):
        p = pos[i]
        codes, scale = quantize_rows(k_rot[i])  # rotary's last bit may differ (fused multiply-adds): a code by 1
        assert (k_cache[i, :, p].int() - codes.int()).abs().max() <= 1
        torch.testing.assert_close(k_scale[i, :, p], scale, rtol=1e-6, atol=0)
        codes, scale = quantize_rows(v[i])
        assert torch.equal(v_cache[i, :, p], codes) and torch.equal(v_scale[i, :, p], scale)
        keys = dequantize_rows(k_cache[i, :, first[i] : p + 1], k_scale[i, :, first[i] : p + 1], torch.float32)
        values = dequantize_rows(v_cache[i, :, first[i] : p + 1], v_scale[i, :, first[i] : p + 1], torch.float32)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q_rot[i][None, :, None], keys[None], values[None], enable_gqa=True
        )[0, :, 0]
        # with AVX-512 VNNI the scores take the query to 16 bits (1/512 of an int8 step: attention_i8_vnni.h)
        torch.testing.assert_close(out[i], expected, rtol=3e-4, atol=3e-4)


@needs_kernels
def test_a_cache_without_its_scales_is_refused():
    q, k = torch.randn(1, 2, 32), torch.randn(1, 2, 32)
    cache = torch.zeros(1, 2, 8, 32, dtype=torch.int8)
    tables = kernels.step_tables(torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), 0, 1)
    with pytest.raises(ValueError, match="k scale"):
        kernels.attention_decode(q, k, k, cache, cache.clone(), *tables)


def checkpoint(request, variant):
    """(folder, transformers model) of Phi-2's tiny checkpoint or a Phi-3-family variant."""
    if variant == "phi2":
        return request.getfixturevalue("tiny")
    return request.getfixturevalue("phi3_factory")(variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_with_an_int8_cache_are_transformers_but_at_near_ties(request, variant):
    """48 greedy tokens from a 20-token prompt (past Phi-3-4k's window of 16 and LongRoPE's switch, where both
    prefill again) with an int8 cache, through the CPU backend's one C call and through PyTorch's modules: the
    same tokens as transformers' fp32 generate, or the same up to a step where transformers' top two logits
    are within NEAR_TIE of each other and the int8 cache takes the second."""
    folder, hf = checkpoint(request, variant)
    prompt = torch.randint(0, min(hf.config.vocab_size, 500), (1, 20), generator=torch.Generator().manual_seed(3))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(
            prompt, max_new_tokens=48, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
        )
    expected, scores = out.sequences[0, 20:].tolist(), torch.cat(out.scores)
    modules = load_model(folder, dtype="fp32", device="cpu")
    modules.kv_cache_dtype = torch.int8
    models = {"modules": modules}
    if kernels.available():
        models["one C call"] = phikit.load(folder, dtype="fp32", device="cpu", kv_cache="int8").model
        assert models["one C call"].decode_step.plan() is not None
    for name, model in models.items():
        got = [int(t) for t in generate_tokens(model, prompt.tolist(), GenerationConfig(max_new_tokens=48), pad_id=0)]
        if got != expected:
            step = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            top = scores[step].topk(2)
            assert top.values[0] - top.values[1] < NEAR_TIE, (name, step, top)
            assert got[step] == top.indices[1], (name, step)


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_one_call_step_over_an_int8_cache_equals_the_modules(request, variant, step_against_modules):
    """Two rows at their own positions (continuous batching), four steps past the window: the C step's logits
    and the rows it writes against the modules' forward (PyTorch's update: the same quantization) on a copy of
    the same cache."""
    if not kernels.available():
        pytest.skip("CPU kernels unavailable")
    folder, hf = checkpoint(request, variant)
    model = phikit.load(folder, dtype="fp32", device="cpu", kv_cache="int8").model
    assert model.new_cache(1, 1).k.dtype == torch.int8
    ids = torch.randint(0, min(hf.config.vocab_size, 500), (2, 30), generator=torch.Generator().manual_seed(1))
    pairs, cache, ref = step_against_modules(model, ids)
    for got, want in pairs:
        assert float((got - want).norm() / want.norm()) < 1e-3
    for mine, theirs in ((cache.k, ref.k), (cache.v, ref.v)):  # the rows the steps wrote, every layer
        written = (mine[:, 0, :, 20:24].int() - theirs[:, 0, :, 20:24].int()).abs()
        # the C and PyTorch projections and rotary differ in the last bit: a code moves by 1, rarely
        assert written.max() <= 1 and (written > 0).float().mean() < 0.01


def test_the_server_shares_prefixes_and_moves_rows_of_an_int8_cache(tiny):
    """An engine of three rows with the prefix cache: prompts sharing a 40-token prefix (the later ones copy
    its blocks, codes and scales, from the arena) and replies of different lengths (rows compacted): every
    reply is the one ``generate`` gives alone with the same int8 cache."""
    from phikit.serve.engine import Engine, Request

    phi = phikit.load(tiny[0], dtype="fp32", device="cpu", kv_cache="int8")
    engine = Engine(phi.model, phi.tokenizer, max_batch=3, max_queue=8, prefix_cache_bytes=64 * 2**20)
    assert engine.cache.k.dtype == torch.int8
    shared = " ".join(["alpha beta gamma delta"] * 10)
    prompts = [shared + tail for tail in (" one", " two two", " three", " four four four")]
    budgets = [9, 3, 6, 4]
    replies = {i: [] for i in range(len(prompts))}
    with torch.inference_mode():
        for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
            deliver = lambda event, i=i: replies[i].append(event[1][0]) if event[0] == "token" else None  # noqa: E731
            config = GenerationConfig(max_new_tokens=budget)
            engine.submit(Request(phi.tokenizer.encode(prompt), budget, config, (), deliver, time.time() + 60))
            if i == 0:  # the first prompt prefilled and stored before the others arrive
                engine._admit()
                engine._decode_step()
        engine._admit()
        while any(engine.slots):
            engine._decode_step()
            engine._admit()
    assert engine.prefix_cache.hits >= 2 and engine.prefix_cache.bytes > 0
    assert len(engine.prefix_cache.parts) == 4  # keys, values and their scales
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        assert [t for t in replies[i] if t is not None] == phi.generate(prompt, max_new_tokens=budget).token_ids


def test_an_unknown_kv_cache_type_is_a_clear_error(tiny):
    with pytest.raises(PhikitError, match="kv_cache 'int4': must be one of"):
        phikit.load(tiny[0], dtype="fp32", device="cpu", kv_cache="int4")


def test_bench_and_generate_report_an_int8_cache(tiny, capsys):
    """``phikit bench --kv-cache int8 --depth``: decodes after a filled int8 cache, its megabytes and type
    reported (about half fp16's); ``generate --kv-cache int8`` names it in its statistics."""
    from phikit.bench import BenchSettings, measure_phikit
    from phikit.cli import main

    folder, _ = tiny
    common = dict(prompt_tokens=20, new_tokens=4, repeats=1, depths=[64])
    int8 = measure_phikit(BenchSettings(str(folder), ["fp32"], "cpu", kv_cache="int8", **common), "bf16")
    fp16 = measure_phikit(BenchSettings(str(folder), ["fp32"], "cpu", kv_cache="fp16", **common), "bf16")
    assert int8["kv_cache_dtype"] == "int8" and fp16["kv_cache_dtype"] == "float16"
    assert int8["decode_at_depth_tok_s"]["64"] > 0
    head_dim = phikit.load(folder, dtype="fp32", device="cpu").model.config.head_dim
    ratio = int8["kv_cache_mb_at_depth"]["64"] / fp16["kv_cache_mb_at_depth"]["64"]
    assert ratio == pytest.approx((head_dim + 4) / (2 * head_dim))
    assert main(["generate", "--model", str(folder), "--device", "cpu", "-n", "3", "--kv-cache", "int8", "Hi"]) == 0
    assert "tokens (int8)" in capsys.readouterr().err
