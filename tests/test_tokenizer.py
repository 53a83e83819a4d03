"""Tokenizer ids against transformers' AutoTokenizer and llama.cpp's reference tokenizations of Phi-2;
streaming detokenization."""

import json
import shutil

import pytest

from phikit.errors import PhikitError
from phikit.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "Instruct: Write a detailed analogy between mathematics and a lighthouse.\nOutput:",
    "### Human: Translate 'I love bread and cheese!' into French.### Assistant:",
    "def three_sum(nums):\n    nums.sort()\n\treturn [x for x in nums if x > 0]  # tabs\t\tand  spaces",
    "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600\U0001f680 emoji",
    "before<|endoftext|>after",
    "   leading and trailing spaces   ",
    "",
]

# Runs of spaces and tabs (Phi-2's added tokens) next to characters that byte-level BPE splits across tokens.
WHITESPACE_TEXTS = [
    "def f():\n\t\treturn  1 \t\t  \u65e5\u672c\u8a9e  \U0001f600\t\t\U0001f680   \u00e9",
    "  \U0001f600",
    "\t\t\u65e5\t",
    " " * 40 + "x\t" * 3 + "\t" * 12 + " \t \t",
    "<|endoftext|>  <|endoftext|>\t\t",
]

SLOW_FILES = ("vocab.json", "merges.txt", "added_tokens.json")
REFERENCE_SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def phi2_references(phi2_tokenizer_dir) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 cases for Phi-2: (text, ids of Hugging Face's tokenizer).

    The .inp holds the strings, each followed by ``REFERENCE_SEPARATOR``; the .out one line per string
    with its ids separated by spaces (an empty line for the empty string).
    """
    inp = (phi2_tokenizer_dir / "reference" / "ggml-vocab-phi-2.gguf.inp").read_text(encoding="utf-8")
    out = (phi2_tokenizer_dir / "reference" / "ggml-vocab-phi-2.gguf.out").read_text(encoding="utf-8")
    assert inp.endswith(REFERENCE_SEPARATOR) and out.endswith("\n")
    texts = inp[: -len(REFERENCE_SEPARATOR)].split(REFERENCE_SEPARATOR)
    ids = [[int(i) for i in line.split()] for line in out[:-1].split("\n")]
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids, strict=True))


@pytest.fixture(params=["tokenizer.json", "vocab.json+merges.txt+added_tokens.json"])
def phi2_tokenizer(request, phi2_tokenizer_dir, tmp_path) -> Tokenizer:
    """phikit's Tokenizer of Phi-2, read from tokenizer.json or from the slow-tokenizer files alone."""
    if request.param == "tokenizer.json":
        return Tokenizer(phi2_tokenizer_dir)
    for name in SLOW_FILES:
        shutil.copyfile(phi2_tokenizer_dir / name, tmp_path / name)
    return Tokenizer(tmp_path)


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """The pieces of text the streaming decoder gives for ``ids`` fed one at a time, as generate.py does."""
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_ids_match_transformers_autotokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer(tokenizer_dir)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"])
    assert ours.eos_id == ref.eos_token_id


def test_phi2_known_ids(phi2_tokenizer):
    tok = phi2_tokenizer
    assert tok.vocab_size == 50295
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("  Hello") == [50286, 15496]  # GPT-2 alone: [220, 18435]
    assert tok.encode("<|endoftext|>") == [50256] and tok.eos_id == 50256
    for n in range(2, 32):  # ids as PROVENANCE.md states them: 31 spaces is 50257, 2 tabs 50294
        assert tok.encode(" " * n) == [50288 - n]
    for n in range(2, 10):
        assert tok.encode("\t" * n) == [50296 - n]
    assert tok.encode(" " * 33) == [50257, 50286]  # longest run first, from the left


def test_phi2_reproduces_llamacpp_reference_tokenizations(phi2_tokenizer, phi2_references):
    for text, ids in phi2_references:
        assert phi2_tokenizer.encode(text) == ids, text
        assert phi2_tokenizer.decode(ids) == text
    assert phi2_tokenizer.encode_batch([t for t, _ in phi2_references]) == [ids for _, ids in phi2_references]


def test_phi2_matches_transformers_autotokenizer_on_references(phi2_tokenizer, phi2_tokenizer_dir, phi2_references):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(phi2_tokenizer_dir)
    for text, _ in phi2_references + [(t, None) for t in TEXTS + WHITESPACE_TEXTS]:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert phi2_tokenizer.encode(text) == ids, text
        assert phi2_tokenizer.decode(ids) == ref.decode(ids)
        assert phi2_tokenizer.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_slow_files_build_the_tokenizer_json_of_phi2(phi2_tokenizer_dir, tmp_path):
    """Same added-token flags (whitespace runs normal and normalized, <|endoftext|> special), pre-tokenizer,
    post-processor, decoder and BPE model as microsoft/phi-2's tokenizer.json."""
    for name in SLOW_FILES:
        shutil.copyfile(phi2_tokenizer_dir / name, tmp_path / name)
    built = json.loads(Tokenizer(tmp_path)._tok.to_str())
    saved = json.loads((phi2_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert built[key] == saved[key], key


def test_vocab_merges_fallback_matches_tokenizer_json(tokenizer_dir, tmp_path):
    if not (tokenizer_dir / "merges.txt").is_file():
        pytest.skip("tiny trained tokenizer has no vocab.json/merges.txt")
    for name in SLOW_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    slow, fast = Tokenizer(tmp_path), Tokenizer(tokenizer_dir)
    assert slow.vocab_size == fast.vocab_size
    for text in TEXTS + WHITESPACE_TEXTS:
        assert slow.encode(text) == fast.encode(text), text


def test_added_tokens_with_a_gap_in_their_ids_are_refused(phi2_tokenizer_dir, tmp_path):
    for name in SLOW_FILES[:2]:
        shutil.copyfile(phi2_tokenizer_dir / name, tmp_path / name)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"  ": 50300}))
    with pytest.raises(PhikitError, match=r"added_tokens.json: token '  ' has id 50300, but .* give it 50257"):
        Tokenizer(tmp_path)


def test_stream_decoder_pieces_join_to_full_text_without_broken_characters(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    for text in TEXTS + WHITESPACE_TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_across_whitespace_tokens_and_split_characters(phi2_tokenizer, phi2_references):
    tok = phi2_tokenizer
    texts = [t for t, _ in phi2_references] + WHITESPACE_TEXTS
    all_ids = [tok.encode(t) for t in texts]
    # the cases do exercise both: added whitespace tokens, and characters whose bytes span two tokens
    assert any(i >= 50257 for ids in all_ids for i in ids)
    assert any("\ufffd" in tok.decode([i]) for ids in all_ids for i in ids)
    for text, ids in zip(texts, all_ids, strict=True):
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text, text
        assert not any("\ufffd" in p for p in pieces), text


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(PhikitError, match="no tokenizer found"):
        Tokenizer(tmp_path)
