"""The native model against transformers' PhiForCausalLM on the same checkpoint."""

import pytest
import torch

from phikit.checkpoint import load_model
from phikit.models.common import attention

VARIANTS = [
    {},
    {"partial_rotary_factor": 0.4},
    {"partial_rotary_factor": 1.0},
    {"qk_layernorm": True},
    {"qk_layernorm": True, "partial_rotary_factor": 0.4, "num_hidden_layers": 3},
    {"num_key_value_heads": 2},
]


def random_ids(n: int, vocab: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "base")
def test_logits_match_transformers(checkpoint_factory, overrides):
    folder, hf = checkpoint_factory(**overrides)
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = random_ids(17, hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_parameter_names_match_transformers(checkpoint_factory):
    for overrides in ({}, {"qk_layernorm": True}):
        folder, hf = checkpoint_factory(**overrides)
        model = load_model(folder, dtype="fp32", device="cpu")
        assert set(model.state_dict()) == set(hf.state_dict())


def test_fp16_checkpoint_loads_to_requested_dtype(checkpoint_factory):
    folder, hf = checkpoint_factory(dtype=torch.float16)
    for dtype, tol in (("fp32", 1e-5), ("bf16", None)):
        model = load_model(folder, dtype=dtype, device="cpu")
        assert all(p.dtype == model.dtype for p in model.parameters())
        if tol:  # transformers reading the same fp16 file, upcast to fp32
            from transformers import PhiForCausalLM

            ref = PhiForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            ids = random_ids(9, hf.config.vocab_size)
            with torch.no_grad():
                torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=tol)


@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True, "partial_rotary_factor": 0.4}])
def test_cached_decode_matches_full_forward(checkpoint_factory, overrides):
    folder, hf = checkpoint_factory(**overrides)
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = random_ids(20, hf.config.vocab_size)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        pieces = [model(ids[:, :8], torch.arange(8), cache)]  # prefill
        pieces.append(model(ids[:, 8:13], torch.arange(8, 13), cache))  # a chunk on top of a cache
        for t in range(13, 20):  # one token at a time
            pieces.append(model(ids[:, t : t + 1], torch.tensor([t]), cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True, "num_key_value_heads": 2}])
@pytest.mark.parametrize("padded", [False, True])
def test_last_only_prefill_gives_the_last_logits_and_the_same_cache(checkpoint_factory, overrides, padded):
    folder, hf = checkpoint_factory(**overrides)
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = random_ids(12, hf.config.vocab_size)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = not padded  # row 1 left-padded: attention under a mask, not SDPA's causal flag
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = valid if padded else None
    caches = model.new_cache(2, 16), model.new_cache(2, 16)
    with torch.no_grad():
        for cache, last_only in zip(caches, (False, True)):  # a prefill, then a chunk on top of it
            model(ids[:, :7], torch.arange(7), cache, positions[:, :7], mask, last_only=last_only)
            logits = model(ids[:, 7:], torch.arange(7, 12), cache, positions[:, 7:], mask, last_only=last_only)
            if not last_only:
                expected = logits[:, -1:]
    assert logits.shape[1] == 1
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=0, atol=1e-6)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=0, atol=1e-6)
    chunked = model.new_cache(2, 16)  # ``prefill`` in chunks of 5: the same last logits and cache
    with torch.no_grad():
        got = model.prefill(ids, torch.arange(12), chunked, positions, mask, chunk=5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.k, caches[0].k, rtol=0, atol=1e-5)


def test_left_padded_rows_match_unpadded(tiny):
    folder, hf = tiny
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = random_ids(10, hf.config.vocab_size, batch=1)
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    valid = torch.tensor([[False] * pad + [True] * 10])
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids)
        got = model(padded, positions=positions, padding_mask=valid)[:, pad:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_fp16_attention_does_not_overflow():
    # q.k here is about 7e6, far beyond fp16's 65504: naive fp16 scores would be inf.
    q = torch.full((1, 2, 4, 80), 300.0)
    k = torch.full((1, 2, 4, 80), 300.0)
    v = torch.randn(1, 2, 4, 80)
    expected = attention(q, k, v, None, causal=True)
    got = attention(q.half(), k.half(), v.half(), None, causal=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


def test_a_slot_per_row_takes_one_token_per_row(tiny):
    folder, _ = tiny
    model = load_model(folder, dtype="fp32", device="cpu")
    cache = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="one new token per row"):
        model(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[3], [4]]), cache)


def test_kv_cache_bytes_are_what_a_cache_holds(tiny):
    folder, _ = tiny
    model = load_model(folder, dtype="fp32", device="cpu")
    for dtype in (None, torch.float16):
        cache = model.new_cache(3, 40, dtype)
        assert model.kv_cache_bytes(40, 3, dtype) == cache.k.nbytes + cache.v.nbytes
