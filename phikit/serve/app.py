"""The HTTP side of ``phikit serve``: OpenAI's API over the batching engine (``engine.py``).

POST /v1/completions (a prompt as text, token ids, or a list of either; ``echo``, ``logprobs``, ``n``,
``best_of``, penalties, ``logit_bias``) and /v1/chat/completions (``logprobs``/``top_logprobs``, ``n``,
text content parts, the ``developer`` role), both streamed as server-sent events on request, and both
with ``response_format`` json_object / json_schema; GET /v1/models (the base and each adapter),
/health and /metrics (Prometheus). Every error is OpenAI-shaped JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from phikit.errors import PhikitError
from phikit.generate import GenerationConfig
from phikit.models import CausalLM
from phikit.serve import structured
from phikit.serve.engine import Engine, Request
from phikit.serve.schemas import APIError, ChatBody, CompletionBody, _Common, check_text, render_messages
from phikit.serve.tokenize import PromptTokenizer
from phikit.templates import get_template
from phikit.tokenizer import Tokenizer

TOKEN_ID = re.compile(r"[0-9]{1,9}")  # a logit_bias key: ASCII digits only (str.isdigit takes "²" and "١")
ROUTES = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/completions",
    "/v1/chat/completions",
    "/docs",
    "/openapi.json",
)


def route_label(path: str) -> str:
    """The route template a request path belongs to, for metric labels: a bounded set whatever clients send
    (5,000 distinct unknown paths must not make 5,000 series)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets 413, one that stalls for more than
    ``timeout`` seconds between chunks gets 408 (a slow upload cannot hold a connection forever); both
    as OpenAI-shaped errors. Raised from the body read itself; the app's HTTPException handler answers."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def _too_large(self) -> APIError:
        size = f"{self.max_bytes / 2**20:g} MB"
        return APIError(413, f"request body larger than {size} (phikit serve --max-body-mb)", code="too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), timeout=self.timeout)
            except asyncio.TimeoutError:
                raise _BodyError(APIError(408, f"request body not received within {self.timeout:g} s")) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyError(self._too_large())
            return message

        await self.app(scope, limited, send)


class APIKeyCheck:
    """ASGI middleware: /v1 requests need ``Authorization: Bearer KEY`` (the scheme in any case). Plain ASGI
    rather than FastAPI's http middleware, under which a route cannot see its client disconnect."""

    def __init__(self, app, key: str, protect_metrics: bool = False):
        self.app, self.key, self.protect_metrics = app, key.encode(), protect_metrics

    async def __call__(self, scope, receive, send):
        guarded = scope["type"] == "http" and (
            scope["path"].startswith("/v1") or (self.protect_metrics and scope["path"] == "/metrics")
        )
        if guarded:
            header = dict(scope.get("headers") or []).get(b"authorization", b"").strip()
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.key):
                error = APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class CountRequests:
    """ASGI middleware: every response counted by path and status (``phikit_requests``)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route_label(scope["path"]), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


class _BodyError(HTTPException):
    """Raised from the body read; an HTTPException so that FastAPI's body parsing passes it on."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message)
        self.error = error


class Metrics:
    """Prometheus metrics of one app (its own registry): requests by endpoint and status, prompt and
    generated tokens, queued and active requests, time to first token, per-request decode speed."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("phikit_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("phikit_prompt_tokens", "prompt tokens received", registry=self.registry)
        self.generated = Counter("phikit_generation_tokens", "tokens generated", registry=self.registry)
        queued = Gauge("phikit_queued_requests", "requests waiting for a slot", registry=self.registry)
        queued.set_function(lambda: engine.waiting.qsize())
        active = Gauge("phikit_active_requests", "requests holding a slot", registry=self.registry)
        active.set_function(lambda: engine.active)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "phikit_time_to_first_token_seconds", "time to first token", buckets=buckets, registry=self.registry
        )
        self.speed = Histogram(
            "phikit_decode_tokens_per_second",
            "decode speed of each finished request",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        engine.on_token = self._token

    def _token(self, request: Request) -> None:
        self.generated.inc()
        if request.completion_tokens == 1:
            self.ttft.observe(time.time() - request.created)

    def finished(self, request: Request) -> None:
        if request.first_token_at and request.completion_tokens > 1:
            elapsed = time.time() - request.first_token_at
            if elapsed > 0:
                self.speed.observe((request.completion_tokens - 1) / elapsed)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


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


def create_app(
    model: CausalLM,
    tokenizer: Tokenizer,
    model_name: str = "phi-2",
    template: str = "auto",
    max_batch: int = 8,
    max_queue: int = 64,
    timeout: float = 600.0,
    api_key: str | None = None,
    default_max_tokens: int = 256,
    max_body_bytes: int = 4 * 2**20,
    body_timeout: float = 30.0,
    adapters: dict[str, str] | None = None,
    prefix_cache_mb: float = 512,
    max_prompts: int = 64,
    protect_metrics: bool = False,
):
    """The FastAPI app; its engine starts with the app and stops with it. Request bodies are limited to
    ``max_body_bytes`` (413) and must arrive without a pause of ``body_timeout`` seconds (408).
    ``adapters`` (name -> adapter folder) are served unmerged next to the base: a request's ``model``
    picks one. Prompt prefixes' keys/values are reused within ``prefix_cache_mb`` (0: off). A completions
    request takes at most ``max_prompts`` prompts; every request's generations (prompts x best_of) are checked
    against the server's capacity before anything is tokenized or allocated. /health and /metrics answer
    without the API key, unless ``protect_metrics`` puts /metrics behind it."""

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if api_key is not None and not api_key.strip():
        raise PhikitError("the API key is empty; give a non-empty key, or none to serve without one")
    chat_template = get_template(template, tokenizer)
    adapter_set = None
    if adapters:
        from phikit.serve.adapters import load_adapters

        clashes = [n for n in adapters if n == model_name or not n]
        if clashes:
            raise PhikitError(f"adapter name {clashes[0]!r} is empty or the base model's own name")
        adapter_set = load_adapters(model, adapters, max_batch)
    engine = Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        prefix_cache_bytes=int(prefix_cache_mb * 2**20),
        adapters=adapter_set,
    )
    context, vocab = engine.context, model.config.vocab_size
    metrics = Metrics(engine)
    prompt_tokenizer = PromptTokenizer(tokenizer)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()
        prompt_tokenizer.close()

    app = FastAPI(
        title="phikit",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions and chat completions for Phi models",
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)
    if api_key:
        app.add_middleware(APIKeyCheck, key=api_key, protect_metrics=protect_metrics)

    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(PhikitError)
    async def phikit_error(_request, exc: PhikitError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        """The framework's own errors (404, 405, body limits) in OpenAI's shape too."""
        if isinstance(exc, _BodyError):
            return exc.error.response()
        messages = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed here"}
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = messages.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind != "application/json":
            return APIError(
                400, f"send the body as JSON with Content-Type: application/json, not {kind or 'none'}"
            ).response()
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON").response()
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        return APIError(400, message, param=param).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "queued": engine.waiting.qsize()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str) -> dict:
        parent = None if name == model_name else model_name
        return {"id": name, "object": "model", "created": 0, "owned_by": "phikit", "root": name, "parent": parent}

    @app.get("/v1/models")
    async def models():
        names = [model_name, *(adapter_set.names if adapter_set else [])]
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        """openai's ``client.models.retrieve(id)``: the model, or a 404 naming those served."""
        adapter_of(model)
        return model_card(model)

    def adapter_of(name: str | None) -> int:
        if name in (None, model_name):
            return -1
        if adapter_set is not None and name in adapter_set.names:
            return adapter_set.index(name)
        served = ", ".join(repr(n) for n in [model_name, *(adapter_set.names if adapter_set else [])])
        raise APIError(
            404, f"model {name!r} does not exist; this server serves {served}", param="model", code="model_not_found"
        )

    def settings(body: _Common, prompt_len: int) -> tuple[int, GenerationConfig, tuple[str, ...]]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        for s in stops:
            check_text(s, "stop")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(min(default_max_tokens, context - prompt_len), 1)
        if prompt_len >= context or prompt_len + max_tokens > context:
            raise APIError(
                400,
                f"this model's context is {context} tokens; the prompt has {prompt_len} and "
                f"max_tokens is {max(max_tokens, 0)}; shorten the prompt or lower max_tokens",
                param="max_tokens" if prompt_len < context else "prompt",
                code="context_length_exceeded",
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        config = GenerationConfig(
            max_new_tokens=max(max_tokens, 1), temperature=temperature, top_p=body.top_p or 1.0, seed=body.seed
        )
        return max_tokens, config, tuple(stops)

    def logit_bias(body: _Common) -> dict[int, float] | None:
        """Token id (ASCII digits: not "-0", "²", "١" or 4,300 digits, which int() takes or chokes on) -> bias."""
        if not body.logit_bias:
            return None
        out = {}
        for key, value in body.logit_bias.items():
            valid = TOKEN_ID.fullmatch(key) is not None and int(key) < vocab
            if not valid or not (math.isfinite(value) and -100 <= value <= 100):
                raise APIError(
                    400, f"logit_bias: {key[:20]!r}: token ids 0..{vocab - 1}, biases -100..100", param="logit_bias"
                )
            out[int(key)] = float(value)
        return out

    async def tokenize(prompt) -> tuple[list[int], str | None]:
        """Token ids of a prompt given as text (tokenized off the event loop: serve/tokenize.py) or as ids
        (checked). Text that cannot fit the context whatever its tokens is refused without tokenizing."""
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            if not prompt_tokenizer.fits(prompt, context - 1):
                raise APIError(
                    400,
                    f"the prompt ({len(prompt)} characters) cannot fit this model's context of {context} tokens",
                    param="prompt",
                    code="context_length_exceeded",
                )
            ids = await prompt_tokenizer.encode(prompt)
            return ids or [tokenizer.eos_id], prompt
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must be 0..{vocab - 1} and not empty", param="prompt")
        return list(prompt), None

    async def run(body: _Common, prompts: list, request: HTTPRequest, kind: str):
        body.check_unsupported()
        adapter = adapter_of(body.model)
        n = body.n or 1
        best_of = getattr(body, "best_of", None) or n
        if best_of < n:
            raise APIError(400, "best_of must be at least n", param="best_of")
        if body.stream and best_of > n:
            raise APIError(400, "best_of larger than n cannot be streamed", param="best_of")
        if len(prompts) > max_prompts:
            raise APIError(
                400,
                f"{len(prompts)} prompts; this server takes at most {max_prompts} per request (--max-prompts)",
                param="prompt",
            )
        total = len(prompts) * best_of  # checked before anything is tokenized, compiled or allocated
        capacity = engine.max_batch + engine.max_queue
        if total > capacity:
            raise APIError(
                400,
                f"this request asks for {total} generations (prompts x max(n, best_of)); this server runs at most "
                f"{capacity} at once (--max-batch {engine.max_batch} + --max-queue {engine.max_queue}); split it",
                param="n",
            )
        if not engine.reserve(total):
            raise APIError(
                503,
                "the server is busy (every slot taken and the queue full); retry later",
                "server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        choices: list[Choice] = []
        try:
            return await generate(body, prompts, request, kind, n, best_of, adapter, choices)
        finally:  # submitted generations are the engine's to release; give back the rest of the reservation
            engine.release(total - sum(c.submitted for c in choices))

    async def generate(body, prompts, request, kind, n, best_of, adapter, choices):
        """The generations of one admitted request (its capacity reserved): each choice made here is
        submitted into the reservation (grammar matchers built only now, for admitted choices)."""
        echo = bool(getattr(body, "echo", False))
        if kind == "chat":
            top = body.top_logprobs if body.top_logprobs is not None else 0
            logprobs = top if body.logprobs else None
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        else:
            logprobs = body.logprobs
        grammar = structured.grammar_for(body.response_format, tokenizer, vocab)
        tokenized = [await tokenize(p) for p in prompts]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = time.time() + timeout
        bias = logit_bias(body)
        for ids, text in tokenized:
            max_tokens, config, stops = settings(body, len(ids))
            if max_tokens == 0 and not echo:
                raise APIError(400, "max_tokens 0 generates nothing; use echo to score a prompt", param="max_tokens")
            if kind == "chat" and grammar is None:  # with a grammar its end is the reply's end
                stops = tuple(dict.fromkeys((*chat_template.stop, *stops)))
            for j in range(best_of):
                seeded = (
                    config
                    if config.seed is None or best_of == 1
                    else GenerationConfig(**{**config.__dict__, "seed": config.seed + j})
                )
                index = len(choices)
                job = Request(
                    ids,
                    max_tokens,
                    seeded,
                    stops,
                    lambda e, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, e)),
                    deadline,
                    logprobs=logprobs if logprobs is not None else (0 if best_of > n else None),
                    prompt_logprobs=echo and logprobs is not None,
                    presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    logit_bias=bias,
                    grammar=structured.Grammar(grammar, tokenizer, vocab) if grammar else None,
                    adapter=adapter,
                )
                choice = Choice(index, job, echo=(text if text is not None else tokenizer.decode(ids)) if echo else "")
                choices.append(choice)
        for choice in choices:
            engine.submit_reserved(choice.request)
            choice.submitted = True
            metrics.prompt_tokens.inc(len(choice.request.prompt_ids))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids, _ in tokenized)

        def usage() -> dict:
            done = sum(c.request.completion_tokens for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        def apply(choice: Choice, event) -> str | None:
            """Record an engine event; the text piece it adds (or None)."""
            what, value = event
            if what == "prompt_logprobs":
                choice.prompt_entries = value
            elif what == "token":
                token, piece, entry = value
                if token is not None:
                    choice.tokens.append(token)
                    choice.entries.append(entry)
                if piece:
                    choice.pieces.append(piece)
                return piece
            else:
                if value == "error":
                    raise APIError(500, "generation failed inside the server (see its log)", "server_error")
                if value == "timeout":
                    raise APIError(
                        504, f"generation did not finish within {timeout:.0f} s", "server_error", code="timeout"
                    )
                choice.reason = value
                metrics.finished(choice.request)
            return None

        if not body.stream:
            pending, next_check = len(choices), loop.time()
            try:
                while pending:
                    try:
                        index, event = await asyncio.wait_for(events.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        index = event = None
                    if loop.time() >= next_check:  # queued or generating: a client that left frees its place
                        next_check = loop.time() + 0.25
                        if await request.is_disconnected():
                            for c in choices:
                                engine.cancel(c.request)
                            raise APIError(499, "client closed the request")
                    if event is not None:
                        apply(choices[index], event)
                        pending -= event[0] == "done"
            except BaseException:
                for c in choices:
                    engine.cancel(c.request)
                raise
            kept = _best(choices, len(prompts), n, best_of)
            body_choices = [_render(c, i, kind, logprobs, echo, tokenizer) for i, c in enumerate(kept)]
            obj = "chat.completion" if kind == "chat" else "text_completion"
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": body.model or model_name,
                "choices": body_choices,
                "usage": usage(),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": rid, "object": chunk_obj, "created": created, "model": body.model or model_name}

        async def sse():
            def pack(payload: dict) -> str:
                return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

            try:
                if kind == "chat":
                    for c in choices:
                        role = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield pack({**base, "choices": [role]})
                pending = len(choices)
                while pending:
                    index, event = await events.get()
                    choice = choices[index]
                    try:
                        piece = apply(choice, event)
                    except APIError as e:
                        yield pack(e.body())
                        yield "data: [DONE]\n\n"
                        return
                    if event[0] == "prompt_logprobs" and echo:
                        piece = choice.echo  # the echoed prompt comes first
                    if piece or (event[0] == "token" and logprobs is not None and event[1][0] is not None):
                        delta = _stream_delta(choice, piece or "", event, kind, logprobs, tokenizer)
                        yield pack({**base, "choices": [delta]})
                    if event[0] == "done":
                        pending -= 1
                        end = {"index": index, "finish_reason": choice.reason, "logprobs": None}
                        end.update({"delta": {}} if kind == "chat" else {"text": ""})
                        yield pack({**base, "choices": [end]})
                if include_usage:
                    yield pack({**base, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                for c in choices:
                    engine.cancel(c.request)  # no-op when finished; frees the slot when the client went away

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        return await run(body, prompts, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        return await run(body, [render_messages(body.messages, chat_template)], request, "chat")

    return app


def _best(choices: list[Choice], prompts: int, n: int, best_of: int) -> list[Choice]:
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


def _legacy_logprobs(choice: Choice, echo: bool, tokenizer: Tokenizer) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    pairs = []
    if echo and choice.prompt_entries is not None:
        pairs += list(zip(choice.request.prompt_ids, choice.prompt_entries))
    pairs += list(zip(choice.tokens, choice.entries))
    for token, entry in pairs:
        text = _token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(entry[0])
            top: dict[str, float] = {}
            for t, lp in entry[1]:
                top.setdefault(_token_text(tokenizer, t), lp)
            out["top_logprobs"].append(top)
    return out


def _chat_logprobs(tokens: list[int], entries: list, tokenizer: Tokenizer) -> dict:
    """OpenAI's chat logprobs; ``bytes`` are each token's own bytes, also for a token that holds part of a
    UTF-8 character (its text alone is U+FFFD; joining the bytes of consecutive tokens gives the character)."""
    content = []
    for token, entry in zip(tokens, entries):
        top = [
            {"token": _token_text(tokenizer, t), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}
            for t, lp in entry[1]
        ]
        text, raw = _token_text(tokenizer, token), list(tokenizer.token_bytes(token))
        content.append({"token": text, "logprob": entry[0], "bytes": raw, "top_logprobs": top})
    return {"content": content}


def _render(choice: Choice, index: int, kind: str, logprobs: int | None, echo: bool, tokenizer: Tokenizer) -> dict:
    text = choice.echo + "".join(choice.pieces)
    if kind == "chat":
        lp = _chat_logprobs(choice.tokens, choice.entries, tokenizer) if logprobs is not None else None
        message = {"role": "assistant", "content": "".join(choice.pieces)}
        return {"index": index, "message": message, "finish_reason": choice.reason, "logprobs": lp}
    lp = _legacy_logprobs(choice, echo, tokenizer) if logprobs is not None else None
    return {"index": index, "text": text, "finish_reason": choice.reason, "logprobs": lp}


def _stream_delta(choice: Choice, piece: str, event, kind: str, logprobs: int | None, tokenizer: Tokenizer) -> dict:
    """One streamed chunk's choice: the new text and, when asked, the new token's log-probabilities."""
    lp = None
    if logprobs is not None and event[0] == "token" and event[1][0] is not None:
        token, _, entry = event[1]
        if kind == "chat":
            lp = _chat_logprobs([token], [entry], tokenizer)
        else:
            text = _token_text(tokenizer, token)
            top = {_token_text(tokenizer, t): v for t, v in entry[1]}
            lp = {"tokens": [text], "token_logprobs": [entry[0]], "top_logprobs": [top], "text_offset": [0]}
    if kind == "chat":
        return {"index": choice.index, "delta": {"content": piece}, "finish_reason": None, "logprobs": lp}
    return {"index": choice.index, "text": piece, "finish_reason": None, "logprobs": lp}


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
