"""Generation against transformers' generate and logits processors; stops, streaming, batches, context."""

import pytest
import torch

import phikit
from phikit.checkpoint import load_model
from phikit.errors import PhikitError
from phikit.generate import (
    GenerationConfig,
    SpeculativeStats,
    TextStream,
    generate,
    process_logits,
    sample_next,
    stream,
)
from phikit.templates import get_template
from phikit.tokenizer import Tokenizer

PROMPTS = ["Hello world", "def add(a, b):", "Instruct: Name a colour.\nOutput:", "The"]


@pytest.fixture(scope="module")
def phi(tiny):
    folder, hf = tiny
    return load_model(folder, dtype="fp32", device="cpu"), Tokenizer(folder), hf


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(phi, prompt):
    model, tok, hf = phi
    ids = torch.tensor([tok.encode(prompt)])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.eos_id,
    )[0, ids.shape[1] :].tolist()
    expected = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
    got = generate(model, tok, prompt, max_new_tokens=30)
    assert got.token_ids == expected
    assert got.finish_reason == ("stop" if tok.eos_id in out else "length")
    assert got.text == tok.decode(expected)


def test_batch_generation_equals_one_by_one(phi):
    model, tok, _ = phi
    batch = generate(model, tok, PROMPTS, max_new_tokens=20)
    single = [generate(model, tok, p, max_new_tokens=20) for p in PROMPTS]
    assert [c.token_ids for c in batch] == [c.token_ids for c in single]
    assert [c.text for c in batch] == [c.text for c in single]


def test_batch_generation_matches_transformers_left_padding(phi):
    model, tok, hf = phi
    encoded = [tok.encode(p) for p in PROMPTS[:3]]
    longest = max(map(len, encoded))
    ids = torch.tensor([[tok.eos_id] * (longest - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded])
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tok.eos_id
    )[:, longest:]
    got = generate(model, tok, PROMPTS[:3], max_new_tokens=12)
    for row, c in enumerate(got):
        assert c.token_ids == out[row, : len(c.token_ids)].tolist()


def test_streamed_pieces_join_to_the_completion(phi):
    model, tok, _ = phi
    pieces = list(stream(model, tok, "Hello world", max_new_tokens=25))
    assert "".join(pieces) == generate(model, tok, "Hello world", max_new_tokens=25).text


def test_eos_ends_generation(phi, tiny):
    model, tok, _ = phi
    bias = model.lm_head.bias.detach().clone()
    try:
        model.lm_head.bias.data[tok.eos_id] = 1e4
        c = generate(model, tok, "Hello", max_new_tokens=10)
    finally:
        model.lm_head.bias.data.copy_(bias)
    assert (c.text, c.token_ids, c.finish_reason) == ("", [], "stop")


def test_stop_string_cuts_the_text(phi):
    model, tok, _ = phi
    full = generate(model, tok, "Hello world", max_new_tokens=30)
    assert len(full.text) > 12
    stop = full.text[5:9]
    cut = generate(model, tok, "Hello world", max_new_tokens=30, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_text_stream_holds_back_a_partial_stop_marker(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    text_stream = TextStream(tok, get_template("guanaco").stop)
    shown = [text_stream.push(i) for i in tok.encode("Paris is the capital.### Human: next")]
    shown.append(text_stream.finish())
    assert "".join(shown) == "Paris is the capital."
    assert not any("#" in piece for piece in shown)
    assert text_stream.stopped


def test_templates_render_and_stop():
    assert get_template("instruct").render("Hi") == "Instruct: Hi\nOutput:"
    assert get_template("guanaco").render("Hi") == "### Human: Hi### Assistant:"
    custom = get_template("User: {prompt}\\nBot:")
    assert custom.render("Hi") == "User: Hi\nBot:" and custom.stop == ("User:",)
    chat = get_template("guanaco").render_chat([("Hi", " Hello!")], "Bye")
    assert chat == "### Human: Hi### Assistant: Hello!### Human: Bye### Assistant:"
    with pytest.raises(PhikitError, match="unknown template"):
        get_template("alpacca")


def test_an_unknown_setting_is_a_one_line_error(phi):
    model, tok, _ = phi
    with pytest.raises(PhikitError, match=r"unknown generation setting\(s\) bogus; known: max_new_tokens"):
        generate(model, tok, "Hi", bogus=1)


def test_prompt_longer_than_context(phi):
    model, tok, _ = phi
    context = model.config.max_position_embeddings
    long_prompt = "word " * (context + 10)
    with pytest.raises(PhikitError, match="exceeds the model's context.*--truncate"):
        generate(model, tok, long_prompt, max_new_tokens=8)
    c = generate(model, tok, long_prompt, max_new_tokens=8, truncate=True)
    assert c.prompt_tokens == context - 8
    with pytest.raises(PhikitError, match="leaves no room"):
        generate(model, tok, "Hi", max_new_tokens=context)


def test_sampling_is_seeded_and_top_k_1_is_greedy(phi):
    model, tok, _ = phi
    a = generate(model, tok, "Hello", max_new_tokens=15, temperature=1.0, seed=7)
    b = generate(model, tok, "Hello", max_new_tokens=15, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids
    greedy = generate(model, tok, "Hello", max_new_tokens=15)
    assert (
        generate(model, tok, "Hello", max_new_tokens=15, temperature=0.8, top_k=1, seed=3).token_ids == greedy.token_ids
    )


@pytest.mark.parametrize(
    "temperature,top_k,top_p,penalty", [(0.7, 10, 0.8, 1.3), (1.0, 0, 0.5, 1.0), (1.5, 3, 1.0, 0.8), (0.0, 0, 1.0, 1.2)]
)
def test_logit_processing_matches_transformers(temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    history = torch.randint(0, 50, (3, 6))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    if temperature > 0:
        expected = TemperatureLogitsWarper(temperature)(history, expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(history, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(history, expected)
    config = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    got = process_logits(logits, config, seen)
    torch.testing.assert_close(got, expected)
    if temperature == 0:
        assert sample_next(logits, config, seen, None).tolist() == expected.argmax(-1).tolist()
    else:
        draws = torch.stack([sample_next(logits, config, seen, torch.Generator().manual_seed(s)) for s in range(50)])
        assert torch.isfinite(expected.gather(1, draws.T)).all()


def test_public_load_api(tiny):
    folder, _ = tiny
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    c = phi.generate("Hello", max_new_tokens=5, template="instruct")
    assert isinstance(c, phikit.Completion) and c.prompt_tokens == len(phi.tokenizer.encode("Instruct: Hello\nOutput:"))
    assert "".join(phi.stream("Hello", max_new_tokens=5, template="instruct")) == c.text


REPETITIVE = ["one two three four five one two three four five one two three", "def f(x):\n    return x\ndef f(x):"]


@pytest.mark.parametrize("prompt", REPETITIVE + PROMPTS[:2])
def test_prompt_lookup_output_equals_greedy(phi, prompt):
    model, tok, _ = phi
    stats = SpeculativeStats()
    fast = generate(model, tok, prompt, max_new_tokens=40, prompt_lookup=True, stats=stats)
    assert fast.token_ids == generate(model, tok, prompt, max_new_tokens=40).token_ids
    assert stats.steps > 0 and stats.accepted <= stats.drafted


def test_draft_model_output_equals_greedy(phi, checkpoint_factory):
    model, tok, _ = phi
    other = load_model(checkpoint_factory(seed=1)[0], dtype="fp32", device="cpu")
    for draft, draft_tokens in ((model, 4), (other, 3), (other, 7)):  # itself: every draft accepted
        stats = SpeculativeStats()
        for prompt in PROMPTS[:3]:
            fast = generate(model, tok, prompt, max_new_tokens=30, draft=draft, draft_tokens=draft_tokens, stats=stats)
            assert fast.token_ids == generate(model, tok, prompt, max_new_tokens=30).token_ids
        if draft is model:
            assert stats.accepted == stats.drafted > 0


def test_speculative_decoding_is_greedy_only(phi):
    model, tok, _ = phi
    with pytest.raises(PhikitError, match="greedy only"):
        generate(model, tok, "Hi", max_new_tokens=5, prompt_lookup=True, temperature=0.7)


def test_compiled_static_decode_equals_eager(tiny):
    from phikit.generate import compile_decode

    folder, _ = tiny
    eager = load_model(folder, dtype="fp32", device="cpu")
    static = compile_decode(load_model(folder, dtype="fp32", device="cpu"), backend="eager")
    tok = Tokenizer(folder)
    for prompts in (["Hello world"], PROMPTS):  # one row, and left-padded rows
        got = generate(static, tok, prompts, max_new_tokens=12)
        expected = generate(eager, tok, prompts, max_new_tokens=12)
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]


class _Pieces:
    """A stand-in tokenizer whose "tokens" are indexes into a list of text pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def stream_decoder(self):
        pieces = self.pieces

        class Decoder:
            def push(self, i):
                return pieces[i]

            def flush(self):
                return ""

        return Decoder()


def _reference_stream(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    """Stop matching by rescanning the text after each piece (the earlier, quadratic implementation)."""
    text, emitted, out = "", 0, []
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s, max(0, emitted - max(map(len, stops)))) for s in stops) if i >= 0]
        if hits:
            text = text[: min(hits)]
            out.append(text[emitted:])
            return out, True
        end = len(text) - max(max((k for k in range(1, len(s)) if text.endswith(s[:k])), default=0) for s in stops)
        out.append(text[emitted:end])
        emitted = max(emitted, end)
    out.append(text[emitted:])
    return out, False


def test_incremental_stop_matching_equals_rescanning_the_text():
    import random

    rng = random.Random(0)
    alphabet = "ab#H "
    for _ in range(400):
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 12))]
        stops = tuple(
            {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))}
        )
        stream = TextStream(_Pieces(pieces), stops)
        got = [stream.push(i) for i in range(len(pieces)) if not stream.stopped] + [stream.finish()]
        expected, stopped = _reference_stream(pieces, stops)
        assert "".join(got) == "".join(expected) and stream.stopped == stopped, (pieces, stops)
        assert all(g == e for g, e in zip(got, expected)), (pieces, stops, got, expected)


def test_long_stop_strings_hold_back_only_a_possible_start():
    stop = "### Human: " + "x" * 100_000
    stream = TextStream(_Pieces(["Hello", " ###", " Hum", "an: xx", "x"]), (stop,))
    assert [stream.push(i) for i in range(5)] == ["Hello", " ", "", "", ""]
    assert stream.finish() == "### Human: xxx" and not stream.stopped


def test_sampling_draws_tokens_with_their_probabilities():
    """sample_next inverts each row's cumulative distribution: over many draws each token's share is its
    probability (transformers' multinomial draw would give the same distribution), a token filtered out
    (top-k) is never drawn, and a seeded generator repeats its draws."""
    from phikit.generate import GenerationConfig, sample_next

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]]).repeat(20000, 1)
    config = GenerationConfig(temperature=1.0)
    tokens = sample_next(logits, config, None, torch.Generator().manual_seed(0))
    shares = torch.bincount(tokens, minlength=6).double() / len(tokens)
    torch.testing.assert_close(shares, logits[0].softmax(-1).double(), atol=0.01, rtol=0)
    assert shares[4] == 0
    top2 = sample_next(
        logits[:2000], GenerationConfig(temperature=1.0, top_k=2), None, torch.Generator().manual_seed(1)
    )
    assert set(top2.tolist()) == {0, 1}
    again = sample_next(logits, config, None, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
