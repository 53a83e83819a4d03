"""Tokenizer ids against transformers' AutoTokenizer on the same files; streaming detokenization."""

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


def test_ids_match_transformers_autotokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer(tokenizer_dir)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"])
    assert ours.eos_id == ref.eos_token_id


def test_real_tokenizer_known_ids(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    if tok.vocab_size < 50257:
        pytest.skip("shared GPT-2 tokenizer not present; using the tiny trained one")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256] and tok.eos_id == 50256


def test_vocab_merges_fallback_matches_tokenizer_json(tokenizer_dir, tmp_path):
    if not (tokenizer_dir / "merges.txt").is_file():
        pytest.skip("tiny trained tokenizer has no vocab.json/merges.txt")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    slow, fast = Tokenizer(tmp_path), Tokenizer(tokenizer_dir)
    for text in TEXTS:
        assert slow.encode(text) == fast.encode(text), text


def test_stream_decoder_pieces_join_to_full_text_without_broken_characters(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        decoder = tok.stream_decoder()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(PhikitError, match="no tokenizer found"):
        Tokenizer(tmp_path)
