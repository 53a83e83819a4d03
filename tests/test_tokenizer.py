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


# ---- the Phi-3 family's tokenizers and chat templates ----

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke\nabout cats."},
    ],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "Caf\u00e9 \U0001f600"}],
]


def _shared(name: str):
    from conftest import SHARED_DATA

    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{name} is not at {folder} (set PHIKIT_SHARED_DATA to its data folder)")
    return folder


def test_phi3_reproduces_llamacpp_reference_tokenizations(phi3_tokenizer_dir):
    """llama.cpp's 46 test strings for microsoft/Phi-3-mini-4k-instruct, as the tokenizer file is shipped."""
    reference = _shared("phi3-tokenizer") / "reference"
    inp = (reference / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8")
    out = (reference / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8")
    texts = inp[: -len(REFERENCE_SEPARATOR)].split(REFERENCE_SEPARATOR)
    expected = [[int(i) for i in line.split()] for line in out[:-1].split("\n")]
    assert len(texts) == len(expected) == 46
    tok = Tokenizer(phi3_tokenizer_dir)
    for text, ids in zip(texts, expected, strict=True):
        assert tok.encode(text) == ids, text
    assert tok.eos_id == 32000 and tok.stop_ids >= {32000, 32007} and tok.vocab_size == 32011


def test_phi4_mini_tokenizer_equals_tiktoken_o200k(phi4_mini_tokenizer_dir):
    """The 233 verification strings (multilingual, code, emoji, whitespace runs, special tokens in text)
    against tiktoken's o200k_base with Phi-4-mini's special tokens."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    shared = _shared("phi4-mini-tokenizer")
    texts = json.loads((shared / "reference" / "verify-strings.json").read_text(encoding="utf-8"))
    added = json.loads((shared / "added_tokens.json").read_text(encoding="utf-8"))
    specials = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018, **added}
    pattern = "|".join(
        [
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"\p{N}{1,3}",
            r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        ]
    )
    reference = tiktoken.Encoding(
        "o200k_phi4_mini",
        pat_str=pattern,
        mergeable_ranks=load_tiktoken_bpe(str(shared / "o200k_base.tiktoken")),
        special_tokens=specials,
    )
    tok = Tokenizer(phi4_mini_tokenizer_dir)
    assert len(texts) == 233
    for text in texts:
        assert tok.encode(text) == reference.encode(text, allowed_special="all"), text
    assert tok.encode("Hello world") == [13225, 2375]
    assert tok.eos_id == 199999 and 200020 in tok.stop_ids


@pytest.mark.parametrize("which", ["phi3", "phi4-mini"])
def test_chat_template_renders_as_transformers_apply_chat_template(which, phi3_tokenizer_dir, phi4_mini_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    from phikit.templates import get_template

    folder = phi3_tokenizer_dir if which == "phi3" else phi4_mini_tokenizer_dir
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        chat_template=settings["chat_template"],
        eos_token=settings.get("eos_token"),
        bos_token=settings.get("bos_token"),
    )
    tok = Tokenizer(folder)
    template = get_template("chat", tok)
    for messages in CONVERSATIONS:
        for generation in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert template.render_messages(messages, add_generation_prompt=generation) == expected


def test_phi3_chat_ids_and_reply_segments(phi3_tokenizer_dir):
    """PROVENANCE.md's worked example: the ids of a rendered conversation, and what fine-tuning trains on:
    each reply with its <|end|> (and the final EOS), never the prompt's turns."""
    from phikit.data import encode
    from phikit.templates import get_template

    _shared("phi3-tokenizer")
    tok = Tokenizer(phi3_tokenizer_dir)
    template = get_template("chat", tok)
    messages = [*CONVERSATIONS[1][:3]]
    assert tok.encode(template.render_messages(messages, add_generation_prompt=False)) == [
        32006, 887, 526, 8444, 29889, 32007, 32010, 6324, 727, 32007, 32001, 15043, 29991, 32007, 32000,
    ]  # fmt: skip
    example = encode(template.conversation_segments(messages), tok, responses_only=True)
    assert example.ids[-1] == 32000 and example.ids.count(32000) == 1  # the template's EOS, not a second one
    trained = [i for i, label in zip(example.ids, example.labels) if label != -100]
    assert trained == [15043, 29991, 32007, 32000]  # "Hello!" <|end|> <|endoftext|>


def test_chat_templates_are_sandboxed_and_their_errors_are_values(phi3_tokenizer_dir):
    from phikit.templates import ChatTemplate

    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="chat template"):
        evil.render_messages([{"role": "user", "content": "x"}])
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    with pytest.raises(ValueError, match="user first"):
        strict.render_messages([{"role": "assistant", "content": "x"}])
    with pytest.raises(PhikitError, match="not a valid Jinja"):
        ChatTemplate("{% for %}")
