"""Structured output (``response_format`` json_object / json_schema): each generated token is constrained by a
grammar, through llguidance.

Why llguidance: measured on Phi-2's vocabulary (benchmarks/bench_structured.py, RESULTS.md), it builds a
JSON-schema grammar in about a millisecond (no per-schema index over the vocabulary) and computes a token
mask in tens of microseconds, with complete JSON Schema support; outlines-core first builds a DFA index
over all 51,200 tokens per schema (seconds for nested schemas), and xgrammar needs Triton and transformers
at install. The mask is a bitmap over the vocabulary, applied to a row's logits on whatever device they are
(CPU or GPU) before sampling, inside continuous batching.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from phikit.errors import PhikitError

JSON_OBJECT_SCHEMA = {"type": "object"}
# one space after separators and no other whitespace: a model cannot wander into endless blank lines
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, vocab_size: int, eos_id: int):
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)


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
    message = llguidance.LLMatcher.validate_grammar(grammar, _ll_tokenizer(tokenizer, vocab_size))
    if message and not llguidance.LLMatcher.is_validate_warning(message):
        raise PhikitError(f"the JSON schema cannot be used: {message}")
    return grammar


def _ll_tokenizer(tokenizer, vocab_size: int):
    return _tokenizer(tokenizer._tok.to_str(), vocab_size, tokenizer.eos_id)


class Grammar:
    """One request's constraint: ``mask(logits)`` sets the logits of disallowed tokens to -inf (EOS only
    once the JSON is complete), ``accept(token)`` advances, ``finished()`` once nothing more may follow."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int):
        import llguidance

        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise PhikitError(f"the JSON schema cannot be used: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next."""
        mask = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        return ((mask[:, None] & self.bits) != 0).flatten()[: self.vocab_size]

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
