"""Fixtures: tiny random Phi checkpoints written by transformers itself, and a real tokenizer.

The tokenizer is Phi-2's own (GPT-2's BPE plus 38 whitespace-run tokens, 50,295 in all) from
``../shared/data/phi2-tokenizer`` when that folder exists (``PHIKIT_SHARED_DATA`` names another data folder),
else a tiny byte-level BPE trained here, so the suite passes in a fresh clone without ``../shared``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PHIKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_TOKENIZER = SHARED_DATA / "phi2-tokenizer"
PHI3_TOKENIZER = SHARED_DATA / "phi3-tokenizer"
PHI4_MINI_TOKENIZER = SHARED_DATA / "phi4-mini-tokenizer"

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the cores shared out, not N x oversubscribed
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

TINY = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    partial_rotary_factor=0.5,
    rope_theta=10000.0,
    initializer_range=0.2,
    bos_token_id=50256,
    eos_token_id=50256,
)

TRAINING_TEXT = [
    "Hello world! This is a tiny tokenizer trained for phikit's tests.",
    "def add(a, b):\n    return a + b\n",
    "Instruct: Write a poem about the sea.\nOutput: The sea is wide and deep and blue.",
    "### Human: What is the capital of France?### Assistant: Paris.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u65e5\u672c\u8a9e \U0001f600 emoji and unicode text.",
] * 20


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 2048,
            }
        )
    )


@pytest.fixture(scope="session")
def phi2_tokenizer_dir() -> Path:
    """The shared Phi-2 tokenizer folder itself (with ``reference/``); skips the test where it is absent."""
    if not SHARED_TOKENIZER.is_dir():
        pytest.skip(f"Phi-2's tokenizer is not at {SHARED_TOKENIZER} (set PHIKIT_SHARED_DATA to its data folder)")
    return SHARED_TOKENIZER


def fill_tokenizer_dir(folder: Path) -> Path:
    """``folder`` with tokenizer.json (+ vocab.json/merges.txt/added_tokens.json where real) and
    tokenizer_config.json, its files only (checkpoints copy all of them): Phi-2's own where ../shared has it,
    else the tiny byte-level BPE trained here."""
    if SHARED_TOKENIZER.is_dir():
        for f in SHARED_TOKENIZER.iterdir():
            if f.is_file() and f.name != "PROVENANCE.md":
                shutil.copyfile(f, folder / f.name)
    else:
        _tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return fill_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def vocab_size(tokenizer_dir) -> int:
    return _vocab_rows(tokenizer_dir)


def make_checkpoint(
    folder: Path,
    tokenizer_dir: Path,
    vocab_size: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides,
):
    """Save a random transformers PhiForCausalLM (and the tokenizer) to ``folder``; return the HF model (fp32)."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=vocab_size, **{**TINY, **overrides})
    model = PhiForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    model.float()
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, folder / f.name)
    return model


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory, tokenizer_dir, vocab_size):
    """``factory(**overrides) -> (folder, hf_model)``, cached per distinct overrides."""
    made: dict[str, tuple[Path, object]] = {}

    def factory(**overrides):
        key = json.dumps(overrides, sort_keys=True, default=str)
        if key not in made:
            folder = tmp_path_factory.mktemp("ckpt")
            made[key] = (folder, make_checkpoint(folder, tokenizer_dir, vocab_size, **overrides))
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_small_vocab(tmp_path_factory):
    """A tiny checkpoint with the small byte-level tokenizer (640 rows), for tests whose subject is not the
    vocabulary: a GGUF of it is read by gguf-py in a fraction of a second, not the 4 s of Phi-2's 50k tokens.
    (folder, transformers model in fp32)."""
    tokenizer = tmp_path_factory.mktemp("small-tokenizer")
    _tiny_tokenizer(tokenizer)
    folder = tmp_path_factory.mktemp("small-vocab")
    return folder, make_checkpoint(folder, tokenizer, 640)


@pytest.fixture(scope="session")
def tiny(checkpoint_factory):
    """The default tiny checkpoint: (folder, transformers model in fp32)."""
    return checkpoint_factory()


# Prefill paths are chosen by timing on the machine (phikit.backends.autotune); tests compare against
# references with tolerances per path, so by default they take phikit's own GEMM, and tests/test_autotune.py
# runs every path and the choosing itself.
os.environ.setdefault("PHIKIT_AUTOTUNE", "0")


@pytest.fixture(scope="module")
def phi(tiny):
    """The tiny checkpoint loaded by phikit in fp32 on the CPU (tests/test_generate.py has its own)."""
    import phikit

    return phikit.load(tiny[0], dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def server(phi):
    """``phi`` served over HTTP (guanaco template, 8 slots, queue 32), for the module's tests."""
    pytest.importorskip("uvicorn")
    from serving import Server

    from phikit.serve import create_app

    with Server(create_app(phi.model, phi.tokenizer, "tiny", "guanaco", max_batch=8, max_queue=32)) as s:
        yield s


# ---- the Phi-3 family ----

# Phi-3-mini-4k-instruct's chat template (as ../shared/data/phi3-tokenizer ships it), for the fallback tokenizer
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor "
    "%}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_CHAT_TOKENS = ["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]

PHI3_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    original_max_position_embeddings=256,
    initializer_range=0.2,
)


def longrope(rotary_dim: int, original: int = 32, maximum: int = 256) -> dict:
    """LongRoPE settings in the layout the Hub's Phi-3-128k configs use (``rope_scaling``)."""
    half = rotary_dim // 2
    return dict(
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + 0.9 * i for i in range(half)],
        },
        original_max_position_embeddings=original,
        max_position_embeddings=maximum,
    )


# The four configurations: a 4k-like one with a small sliding window, a 128k-like one with LongRoPE
# and a small original context, a Phi-4-mini-like one (GQA, partial rotary 0.75, tied embeddings, o200k,
# LongRoPE) and a Phi-4-like one (GQA, rope_theta 250000).
PHI3_VARIANTS = {
    "phi3-4k": dict(sliding_window=16),
    "phi3-128k": longrope(16),
    "phi4-mini": dict(num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True, **longrope(12)),
    "phi4": dict(num_key_value_heads=1, rope_theta=250000.0),
}


def _phi3_fallback_tokenizer(folder: Path, tokenizer_class: str | None = None) -> None:
    """The tiny BPE with Phi-3's chat tokens and template, where ../shared is absent (``tokenizer_class``:
    GPT2Tokenizer for Phi-4-mini's stand-in, a byte-level BPE as its o200k is)."""
    from tokenizers import Tokenizer

    _tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(PHI3_CHAT_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = PHI3_CHAT_TEMPLATE
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def phi3_tokenizer_dir(tmp_path_factory) -> Path:
    """Phi-3's tokenizer (Llama-2's SentencePiece + chat tokens) from ../shared, else the fallback."""
    folder = tmp_path_factory.mktemp("phi3-tokenizer")
    if PHI3_TOKENIZER.is_dir():
        for f in PHI3_TOKENIZER.iterdir():
            if f.is_file() and f.name != "PROVENANCE.md":
                shutil.copyfile(f, folder / f.name)
    else:
        _phi3_fallback_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def phi4_mini_tokenizer_dir(tmp_path_factory) -> Path:
    """Phi-4-mini's o200k tokenizer from ../shared (tokenizer.json gunzipped), else the Phi-3 fallback."""
    import gzip

    folder = tmp_path_factory.mktemp("phi4-mini-tokenizer")
    if not PHI4_MINI_TOKENIZER.is_dir():
        _phi3_fallback_tokenizer(folder, "GPT2Tokenizer")
        return folder
    for f in PHI4_MINI_TOKENIZER.iterdir():
        if f.name == "tokenizer.json.gz":
            (folder / "tokenizer.json").write_bytes(gzip.decompress(f.read_bytes()))
        elif f.is_file() and f.suffix in (".json",):
            shutil.copyfile(f, folder / f.name)
    return folder


def _vocab_rows(tokenizer_dir: Path) -> int:
    """Embedding rows for a tokenizer: padded to a multiple of 64, like Phi's 51200 rows for 50295 tokens."""
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    return ((n + 63) // 64) * 64


def make_phi3_checkpoint(folder: Path, tokenizer_dir: Path, *, seed: int = 0, dtype=torch.float32, **overrides):
    """Save a random transformers Phi3ForCausalLM (and the tokenizer) to ``folder``; return the HF model (fp32)."""
    from tokenizers import Tokenizer
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    settings = {**PHI3_TINY, "vocab_size": _vocab_rows(tokenizer_dir), **overrides}
    settings.setdefault("bos_token_id", eos)
    settings.update(eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**settings)).eval()
    model.to(dtype).save_pretrained(folder)
    model.float()
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, folder / f.name)
    return model


@pytest.fixture(scope="session")
def phi3_factory(tmp_path_factory, phi3_tokenizer_dir, phi4_mini_tokenizer_dir):
    """``factory(variant, **overrides) -> (folder, hf_model)``, a variant of ``PHI3_VARIANTS``, cached."""
    made: dict[str, tuple[Path, object]] = {}

    def factory(variant: str = "phi3-4k", **overrides):
        key = json.dumps([variant, overrides], sort_keys=True, default=str)
        if key not in made:
            folder = tmp_path_factory.mktemp(variant)
            tokenizer = phi4_mini_tokenizer_dir if variant == "phi4-mini" else phi3_tokenizer_dir
            made[key] = (folder, make_phi3_checkpoint(folder, tokenizer, **{**PHI3_VARIANTS[variant], **overrides}))
        return made[key]

    return factory


def _step_against_modules(model, ids: torch.Tensor, steps: int = 4):
    """Continuous batching, both ways: two rows prefilled to 20 and 25 tokens of ``ids`` (2, >= 25 + steps) in
    two caches, then ``steps`` single tokens, each row at its own slot, through the model's ``decode_step`` on
    one cache and its modules' forward on the other. Returns ([(step logits, forward logits) per step], the
    step's cache, the forward's cache)."""
    with torch.no_grad():
        cache, ref = model.new_cache(2, 40), model.new_cache(2, 40)
        for c in (cache, ref):
            model(ids[:1, :20], torch.arange(20), c.rows(0))
            model(ids[1:, :25], torch.arange(25), c.rows(1))
        pairs = []
        for step in range(steps):
            pos = torch.tensor([[20 + step], [25 + step]])
            new = torch.stack([ids[0, 20 + step], ids[1, 25 + step]])[:, None]
            pairs.append((model.decode_step(new, pos, cache), model(new, pos, ref)))
    return pairs, cache, ref


@pytest.fixture
def step_against_modules():
    """``_step_against_modules``: the one-call decoding step against the modules on the same cache contents."""
    return _step_against_modules
