"""What ``phikit serve`` answers, in OpenAI's shapes: a choice's state as the engine's events arrive
(``Choice``), and, per endpoint, the full answer's choices and the streamed chunks (``ChatOutput`` for
/v1/chat/completions, ``CompletionOutput`` for /v1/completions: one class per shape instead of tests of the
endpoint's kind throughout)."""

from __future__ import annotations

from dataclasses import dataclass, field

from phikit.serve.engine import Request
from phikit.tokenizer import Tokenizer


@dataclass
class Choice:
    """What one generation has produced so far."""

    index: int
    request: Request
    echo: str = ""
    pieces: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    entries: list = field(default_factory=list)  # logprob entries of the generated tokens
    prompt_entries: list | None = None
    reason: str | None = None
    submitted: bool = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def best(choices: list[Choice], prompts: int, n: int, best_of: int) -> list[Choice]:
    """Per prompt, the ``n`` choices with the highest total log-probability (all of them when best_of == n)."""
    if best_of == n:
        return choices
    kept = []
    for p in range(prompts):
        group = choices[p * best_of : (p + 1) * best_of]
        kept += sorted(group, key=lambda c: -c.request.cumulative_logprob)[:n]
    return kept


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


class CompletionOutput:
    """/v1/completions: ``text`` choices with legacy log-probabilities (tokens, token_logprobs, top_logprobs,
    text_offset)."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer: Tokenizer, logprobs: int | None):
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def opening(self, choices: list[Choice]) -> list[dict]:
        """Chunks sent before any token."""
        return []

    def choice(self, choice: Choice, index: int, echo: bool) -> dict:
        lp = self._legacy(choice, echo) if self.logprobs is not None else None
        return {"index": index, "text": choice.echo + choice.text, "finish_reason": choice.reason, "logprobs": lp}

    def delta(self, choice: Choice, piece: str, token: int | None, entry) -> dict:
        lp = None
        if self.logprobs is not None and token is not None:
            text = _token_text(self.tokenizer, token)
            top = self._top(text, entry)
            lp = {"tokens": [text], "token_logprobs": [entry[0]], "top_logprobs": [top], "text_offset": [0]}
        return {"index": choice.index, "text": piece, "finish_reason": None, "logprobs": lp}

    def end(self, index: int, reason: str | None) -> dict:
        return {"index": index, "text": "", "finish_reason": reason, "logprobs": None}

    def _legacy(self, choice: Choice, echo: bool) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        pairs = []
        if echo and choice.prompt_entries is not None:
            pairs += list(zip(choice.request.prompt_ids, choice.prompt_entries))
        pairs += list(zip(choice.tokens, choice.entries))
        for token, entry in pairs:
            text = _token_text(self.tokenizer, token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(entry[0])
                out["top_logprobs"].append(self._top(text, entry))
        return out

    def _top(self, text: str, entry) -> dict[str, float]:
        """The most likely tokens' log-probabilities and always the chosen token's (up to logprobs + 1 entries,
        as OpenAI's legacy completions give them); two tokens of one text keep the likelier."""
        top: dict[str, float] = {}
        for t, lp in entry[1]:
            top.setdefault(_token_text(self.tokenizer, t), lp)
        top.setdefault(text, entry[0])
        return top


class ChatOutput:
    """/v1/chat/completions: assistant ``message`` choices, a role chunk first when streaming, and chat
    log-probabilities."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer: Tokenizer, logprobs: int | None):
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def opening(self, choices: list[Choice]) -> list[dict]:
        return [
            {"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for c in choices
        ]

    def choice(self, choice: Choice, index: int, echo: bool) -> dict:
        lp = self._logprobs(choice.tokens, choice.entries) if self.logprobs is not None else None
        message = {"role": "assistant", "content": choice.text}
        return {"index": index, "message": message, "finish_reason": choice.reason, "logprobs": lp}

    def delta(self, choice: Choice, piece: str, token: int | None, entry) -> dict:
        lp = self._logprobs([token], [entry]) if self.logprobs is not None and token is not None else None
        return {"index": choice.index, "delta": {"content": piece}, "finish_reason": None, "logprobs": lp}

    def end(self, index: int, reason: str | None) -> dict:
        return {"index": index, "delta": {}, "finish_reason": reason, "logprobs": None}

    def _logprobs(self, tokens: list[int], entries: list) -> dict:
        """``bytes`` are each token's own bytes, also for a token that holds part of a UTF-8 character (its
        text alone is U+FFFD; joining the bytes of consecutive tokens gives the character)."""
        tok = self.tokenizer
        content = []
        for token, entry in zip(tokens, entries):
            top = [
                {"token": _token_text(tok, t), "logprob": lp, "bytes": list(tok.token_bytes(t))} for t, lp in entry[1]
            ]
            text, raw = _token_text(tok, token), list(tok.token_bytes(token))
            content.append({"token": text, "logprob": entry[0], "bytes": raw, "top_logprobs": top})
        return {"content": content}


OUTPUTS = {"completion": CompletionOutput, "chat": ChatOutput}
