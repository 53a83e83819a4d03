"""The OpenAI-shaped request bodies and errors of ``phikit serve``.

Fields of OpenAI's current API that cannot change what this server generates (``store``, ``metadata``,
``user``, ``service_tier``, ``parallel_tool_calls``, ``prompt_cache_key``, ``safety_identifier``,
``verbosity``, ``reasoning_effort``, ``prediction``, ``modalities: ["text"]``, a ``response_format`` of type
text, empty ``tools``, and any optional field sent as null) are accepted and ignored, as SDKs and proxies send
them; fields that would change behaviour and are not supported (tools, audio, web search, suffix) get a 400
naming the field. Unknown fields are rejected (a typo should not pass). Types are strict: an integer is not
a bool, a bool not a string (``"prompt": [true]`` and ``"include_usage": "yes"`` are 400s).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from phikit.generate import GenerationConfig
from phikit.templates import ChatTemplate, Template

MAX_CHOICES = 16  # n (and best_of) per prompt
TOKEN_ID = re.compile(r"[0-9]{1,9}")  # a logit_bias key: ASCII digits only (str.isdigit takes "²" and "١")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def as_written(param: str) -> str:
    """A param as errors name it (``messages.0.content``, as vLLM and OpenAI's ``param``) the way a user writes
    the place in the body: ``messages[0].content``."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", param)


def unsupported(param: str, what: str) -> APIError:
    message = f"{as_written(param)}: {what} is not supported by this server"
    return APIError(400, message, param=param, code="unsupported")


def check_text(text: str, param: str) -> None:
    """Text must encode as UTF-8: a lone surrogate ("\\ud800") is the client's mistake, a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode()
        message = f"{param} contains an unpaired surrogate ({bad}), which is not valid Unicode"
        raise APIError(400, message, param=param) from None


STRICT = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class Limits:
    """What the server allows, against which a body converts itself: the context in tokens, the vocabulary,
    max_tokens when a request gives none."""

    context: int
    vocab: int
    default_max_tokens: int


@dataclass(frozen=True)
class Sampling:
    """One prompt's generation settings, converted from a body: tokens to generate (0 with echo: score
    only), the sampler's config, and the stop strings."""

    max_tokens: int
    config: GenerationConfig
    stops: tuple[str, ...]

    def seeded(self, j: int) -> GenerationConfig:
        """The config of the ``j``-th of several choices: a given seed moves on per choice."""
        if self.config.seed is None or j == 0:
            return self.config
        return replace(self.config, seed=self.config.seed + j)


class ResponseFormat(BaseModel):
    """``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``."""

    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding of streamed chunks: nothing to pad here


class _Common(BaseModel):
    """Fields shared by both endpoints."""

    model_config = STRICT
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # accepted and ignored: they do not change what is generated
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None  # a routing hint for OpenAI's caches; phikit's prefix cache needs none
    safety_identifier: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # for models that take it; Phi ignores it
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    prediction: dict[str, Any] | None = None  # predicted output: a speed hint, never a change to the output
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    kind: ClassVar[str]

    def choices(self) -> tuple[int, int]:
        """(n, best_of): choices returned per prompt and generated per prompt."""
        n = self.n or 1
        best_of = getattr(self, "best_of", None) or n
        if best_of < n:
            raise APIError(400, "best_of must be at least n", param="best_of")
        if self.stream_options is not None and not self.stream:  # as OpenAI answers it
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.stream and best_of > n:
            raise APIError(400, "best_of larger than n cannot be streamed", param="best_of")
        return n, best_of

    def sampling(self, prompt_len: int, limits: Limits) -> Sampling:
        """This body's settings for a prompt of ``prompt_len`` tokens (vLLM's ``to_sampling_params``)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        for s in stops:
            check_text(s, "stop")
        context = limits.context
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is None:
            max_tokens = max(min(limits.default_max_tokens, context - prompt_len), 1)
        if prompt_len >= context or prompt_len + max_tokens > context:
            raise APIError(
                400,
                f"this model's context is {context} tokens; the prompt has {prompt_len} and "
                f"max_tokens is {max(max_tokens, 0)}; shorten the prompt or lower max_tokens",
                param="max_tokens" if prompt_len < context else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens == 0 and not self.echoes():  # completions only: chat's fields are at least 1
            why = "max_tokens must be at least 1 (0 only with echo, to score a prompt)"
            raise APIError(400, why, param="max_tokens")
        temperature = 1.0 if self.temperature is None else self.temperature
        config = GenerationConfig(
            max_new_tokens=max(max_tokens, 1), temperature=temperature, top_p=self.top_p or 1.0, seed=self.seed
        )
        return Sampling(max_tokens, config, tuple(stops))

    def bias(self, vocab: int) -> dict[int, float] | None:
        """logit_bias as token id -> bias; keys are ASCII digits (not "-0", "²", "١" or 4,300 digits, which
        int() takes or chokes on)."""
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            valid = TOKEN_ID.fullmatch(key) is not None and int(key) < vocab
            if not valid or not (math.isfinite(value) and -100 <= value <= 100):
                raise APIError(
                    400, f"logit_bias: {key[:20]!r}: token ids 0..{vocab - 1}, biases -100..100", param="logit_bias"
                )
            out[int(key)] = float(value)
        return out

    def echoes(self) -> bool:
        return False

    def top_logprobs_count(self) -> int | None:
        """Alternatives per generated token to report (0: the chosen token's only; None: no log-probabilities)."""
        raise NotImplementedError

    def check_unsupported(self) -> None:
        if self.audio is not None or "audio" in (self.modalities or []):
            raise unsupported("audio" if self.audio is not None else "modalities", "audio output")
        if self.web_search_options is not None:
            raise unsupported("web_search_options", "web search")
        if self.tools or self.functions:
            raise unsupported("tools" if self.tools else "functions", "tool calling")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tool calling")
        if self.function_call not in (None, "none", "auto"):
            raise unsupported("function_call", "function calling")


class CompletionBody(_Common):
    kind: ClassVar[str] = "completion"
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    def prompts(self) -> list:
        """The prompts: each a text or a list of token ids."""
        prompt = self.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        return prompts

    def echoes(self) -> bool:
        return bool(self.echo)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise unsupported("suffix", "insertion (suffix)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text: a string, or its text parts joined; other parts are a 400."""
        if self.content is None:
            raise APIError(400, f"messages[{index}].content is missing", param=f"messages.{index}.content")
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise unsupported(f"messages.{index}.content.{j}", f"a content part of type {part.type!r}")
            texts.append(part.text)
        return "".join(texts)


class ChatBody(_Common):
    kind: ClassVar[str] = "chat"
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # a reply of at least one token (no echo here)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def prompts(self, template: Template | ChatTemplate) -> list[str]:
        """The conversation rendered for the reply: one prompt."""
        return [render_messages(self.messages, template)]

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def render_messages(messages: list[Message], template: Template | ChatTemplate) -> str:
    """Chat messages through the prompt template (the checkpoint's chat template, or a format template where
    system text joins the next user turn), ready for the reply; a conversation the template cannot write is
    a 400 naming why."""

    def role(m: Message) -> str:  # OpenAI's "developer" is the system role by its newer name
        return "system" if m.role == "developer" and isinstance(template, ChatTemplate) else m.role

    plain = [{"role": role(m), "content": m.text(i)} for i, m in enumerate(messages)]
    try:
        return template.render_messages(plain, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
