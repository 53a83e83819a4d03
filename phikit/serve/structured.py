"""Structured output (``response_format`` json_object / json_schema): each generated token is constrained by a
grammar, through llguidance.

Why llguidance: measured on Phi-2's vocabulary with the tests' 10 JSON schemas (benchmarks/bench_structured.py,
RESULTS.md; 2-core AVX-512 EPYC, busy), it compiles a schema in under a millisecond (median 0.7 ms, max 0.9)
and gives the allowed-token bitmap in ~0.2 ms per token, with full JSON Schema support. outlines-core first
builds an index over the whole vocabulary per schema (median 117 ms, max 723 ms) and hands back token
lists that take ~20 ms per token to turn into a mask where most tokens are allowed (inside strings);
xgrammar needs Triton and transformers at install. The mask is a bitmap over the vocabulary, applied to a
row's logits on whatever device they are (CPU or GPU) before sampling, inside continuous batching.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import torch

from phikit.errors import PhikitError

JSON_OBJECT_SCHEMA = {"type": "object"}
# one space after separators and no other whitespace: a model cannot wander into endless blank lines;
# lenient: keywords llguidance does not implement (uniqueItems, unknown formats) are warnings, not errors
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a phikit Tokenizer, made once per tokenizer (serializing the vocabulary
    for it takes ~0.1 s: not something to do per request)."""
    import llguidance

    key = (vocab_size, tokenizer.eos_id)
    made = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if key not in made:
        made[key] = llguidance.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_id)
    return made[key]


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def compile_schema(schema: dict, tokenizer, vocab_size: int) -> str:
    """The llguidance grammar of a JSON schema; an unusable schema is a PhikitError naming the problem."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=COMPACT)
    except (ValueError, TypeError, RuntimeError) as e:
        raise PhikitError(f"the JSON schema cannot be used: {e}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, _ll_tokenizer(tokenizer, vocab_size)
    )
    if failed:  # unsatisfiable or invalid (an empty enum, minimum > maximum, an unknown type)
        raise PhikitError(f"the JSON schema cannot be used: {'; '.join(messages) or 'invalid'}")
    return grammar


class Grammar:
    """One request's constraint: ``mask(logits)`` sets the logits of disallowed tokens to -inf (EOS only
    once the JSON is complete), ``accept(token)`` advances, ``finished()`` once nothing more may follow."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int):
        import llguidance

        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise PhikitError(f"the JSON schema cannot be used: {self.matcher.get_error()}")
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next. The bitmap is unpacked by numpy (a few
        microseconds; torch's bitwise ops on 51,200 small elements took milliseconds on a busy CPU)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].view(np.bool_))

    def mask(self, logits: torch.Tensor) -> None:
        allowed = self.allowed().to(logits.device)
        logits[: allowed.numel()].masked_fill_(~allowed, float("-inf"))
        logits[allowed.numel() :] = float("-inf")

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    def finished(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()


def grammar_for(response_format, tokenizer, vocab_size: int) -> str | None:
    """The grammar text for a request's ``response_format`` (None for plain text)."""
    if response_format is None or response_format.type == "text":
        return None
    if not available():
        raise PhikitError("structured output needs the llguidance package: pip install llguidance")
    if response_format.type == "json_object":
        return compile_schema(JSON_OBJECT_SCHEMA, tokenizer, vocab_size)
    spec = response_format.json_schema or {}
    schema = spec.get("schema", spec if "type" in spec or "properties" in spec else None)
    if not isinstance(schema, dict):
        raise PhikitError('response_format.json_schema needs a "schema" object')
    return compile_schema(schema, tokenizer, vocab_size)
