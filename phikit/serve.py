"""OpenAI-compatible HTTP server with continuous batching (``phikit serve``).

One engine thread owns the model. Each request gets a row (slot) of a batch KV cache: it is prefilled
alone as soon as a slot is free, then decoded together with every other active request, one token per
row per step, so a new request never waits for others to finish. Requests wait in a bounded queue
(503 when full); a finished, timed-out or disconnected request frees its slot at the next step.

HTTP: FastAPI (imported here, so only ``phikit serve`` needs it). POST /v1/completions and
/v1/chat/completions (also streamed as server-sent events in OpenAI's chunk format), GET /v1/models,
GET /health. Errors are OpenAI-style JSON with 4xx codes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from phikit.errors import PhikitError
from phikit.generate import GenerationConfig, TextStream, process_logits
from phikit.model import PhiForCausalLM
from phikit.templates import Template, get_template
from phikit.tokenizer import Tokenizer

log = logging.getLogger("phikit.serve")

# ---- the engine ----


@dataclass
class Request:
    """One generation in flight; ``events`` receives ("text", piece) then ("done", finish_reason)."""

    prompt_ids: list[int]
    max_tokens: int
    config: GenerationConfig
    stop: tuple[str, ...]
    deliver: Any  # callable(event) -> None, thread-safe
    deadline: float
    generator: torch.Generator | None = None
    cancelled: bool = False
    counted: bool = False  # counts against the engine's capacity until it finishes or is cancelled
    slot: int = -1
    position: int = 0  # cache slot of the newest token, not yet written
    last_token: int = 0
    completion_tokens: int = 0
    stream: TextStream | None = None
    created: float = field(default_factory=time.time)


class Engine:
    """Continuous batching over one model: a background thread admits queued requests into free cache
    rows (prefilling each alone) and decodes all active rows together."""

    def __init__(
        self,
        model: PhiForCausalLM,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        context: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.context = max_batch, context or model.config.max_position_embeddings
        self.cache = model.new_cache(max_batch, self.context)
        self.max_queue = max_queue
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.outstanding = 0  # requests queued or in a slot: at most max_batch + max_queue
        self.lock = threading.Lock()
        self.slots: list[Request | None] = [None] * max_batch
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="phikit-engine", daemon=True)
        self.steps = 0
        self.started = 0  # requests that got a slot

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> bool:
        """Queue a request; False when every slot is taken and ``max_queue`` requests already wait (a
        request counts against the queue only when no slot is free for it)."""
        with self.lock:
            if self.outstanding >= self.max_batch + self.max_queue:
                return False
            self.outstanding += 1
            request.counted = True
        self.waiting.put_nowait(request)
        return True

    def cancel(self, request: Request) -> None:
        """The client went away: stop counting the request now; the engine drops it unstarted, or frees
        its slot at the next step."""
        request.cancelled = True
        self._release(request)

    def _release(self, request: Request) -> None:
        with self.lock:
            if request.counted:
                request.counted = False
                self.outstanding -= 1

    def _done(self, request: Request, reason: str) -> None:
        self._release(request)
        request.deliver(("done", reason))

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    # -- the loop --

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.stopped.is_set():
                self._admit()
                if not any(self.slots):
                    try:
                        request = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._guarded(self._start, request)
                    continue
                self._guarded(self._decode_step)

    def _guarded(self, step, *args) -> None:
        """Run one engine step; an unexpected error fails the requests involved (a 500 to their clients)
        and frees their rows instead of killing the engine thread and hanging every later request."""
        try:
            step(*args)
        except Exception as e:  # noqa: BLE001 - the engine must outlive any single request
            log.exception("engine step failed: %s", e)
            involved = [args[0]] if args else [r for r in self.slots if r is not None]  # one request, or all
            for r in involved:
                if r.slot >= 0 and self.slots[r.slot] is r:
                    self.slots[r.slot] = None
                self._done(r, "error")

    def _admit(self) -> None:
        while None in self.slots:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            self._guarded(self._start, request)

    def _start(self, r: Request) -> None:
        if r.cancelled or time.time() > r.deadline:
            self._done(r, "timeout" if not r.cancelled else "cancelled")
            return
        r.slot = self.slots.index(None)
        self.slots[r.slot] = r
        self.started += 1
        r.stream = TextStream(self.tokenizer, r.stop)
        if r.config.seed is not None:  # any JSON integer, folded into torch's seed range
            r.generator = torch.Generator(device=self.model.device).manual_seed(r.config.seed % 2**64)
        row = _row_cache(self.cache, r.slot)
        device = self.model.device
        ids = torch.tensor([r.prompt_ids], device=device)
        slots = torch.arange(len(r.prompt_ids), device=device)
        logits = self.model(ids, slots, row, last_only=True)[:, -1].float()
        r.position = len(r.prompt_ids)
        self._emit(r, self._sample(r, logits))

    def _decode_step(self) -> None:
        rows = max(i for i, r in enumerate(self.slots) if r is not None) + 1  # rows 0..rows-1 run
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for i, r in enumerate(self.slots[:rows]):
            if r is not None:
                tokens[i, 0], positions[i] = r.last_token, r.position
        device = self.model.device
        view = _first_rows(self.cache, rows)
        slots = positions[:, None].to(device)  # a slot per row: each row's newest position
        logits = self.model(tokens.to(device), slots, view)[:, -1].float()
        self.steps += 1
        for i, r in enumerate(self.slots[:rows]):
            if r is not None:
                r.position += 1
                self._emit(r, self._sample(r, logits[i : i + 1]))

    def _sample(self, r: Request, logits: torch.Tensor) -> int:
        processed = process_logits(logits, r.config, None)
        if r.config.temperature == 0:
            return int(processed.argmax())
        return int(torch.multinomial(processed.softmax(-1), 1, generator=r.generator))

    def _emit(self, r: Request, token: int) -> None:
        """Hand a new token to its request; finish the request if it is done."""
        reason = None
        if r.cancelled:
            reason = "cancelled"
        elif time.time() > r.deadline:
            reason = "timeout"
        elif token == self.tokenizer.eos_id:
            reason = "stop"
        else:
            r.completion_tokens += 1
            r.last_token = token
            piece = r.stream.push(token)
            if piece:
                r.deliver(("text", piece))
            if r.stream.stopped:
                reason = "stop"
            elif r.completion_tokens >= r.max_tokens or r.position + 1 >= self.context:
                reason = "length"
        if reason is not None:
            if reason in ("length", "stop"):
                rest = r.stream.finish()
                if rest:
                    r.deliver(("text", rest))
            self.slots[r.slot] = None
            self._done(r, reason)


def _row_cache(cache, row: int):
    """A KVCache view of one row (shares storage) for prefilling a request alone."""
    view = object.__new__(type(cache))
    view.k, view.v, view.max_length = cache.k[:, row : row + 1], cache.v[:, row : row + 1], cache.max_length
    return view


def _first_rows(cache, rows: int):
    view = object.__new__(type(cache))
    view.k, view.v, view.max_length = cache.k[:, :rows], cache.v[:, :rows], cache.max_length
    return view


# ---- the OpenAI-style API ----


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

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").strip()
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.key):
                error = APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class _BodyError(HTTPException):
    """Raised from the body read; an HTTPException so that FastAPI's body parsing passes it on."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message)
        self.error = error


def _check_text(text: str, param: str) -> None:
    """Text must encode as UTF-8: a lone surrogate ("\\ud800") is the client's mistake, a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode()
        message = f"{param} contains an unpaired surrogate ({bad}), which is not valid Unicode"
        raise APIError(400, message, param=param) from None


class _Common(BaseModel):
    """Fields shared by both endpoints; unknown fields are rejected (a typo should not pass silently)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0, ge=0, le=0)
    frequency_penalty: float = Field(default=0, ge=0, le=0)


class CompletionBody(_Common):
    prompt: str | list[str]
    echo: bool = Field(default=False, le=False)
    logprobs: int | None = Field(default=None, le=0)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = Field(default=False, le=False)


def render_messages(messages: list[Message], template: Template) -> str:
    """Chat turns through the prompt template: system text joins the next user turn; the conversation
    must end with a user message."""
    turns: list[tuple[str, str]] = []
    pending_user: str | None = None
    system = ""
    for m in messages:
        if m.role == "system":
            system += m.content.strip() + "\n"
        elif m.role == "user":
            if pending_user is not None:
                raise APIError(400, "two user messages in a row; put them in one message", param="messages")
            pending_user, system = system + m.content, ""
        else:
            if pending_user is None:
                raise APIError(400, "an assistant message must follow a user message", param="messages")
            turns.append((pending_user, m.content))
            pending_user = None
    if pending_user is None:
        raise APIError(400, "the last message must be from the user", param="messages")
    return template.render_chat(turns, pending_user)


def create_app(
    model: PhiForCausalLM,
    tokenizer: Tokenizer,
    model_name: str = "phi-2",
    template: str = "guanaco",
    max_batch: int = 8,
    max_queue: int = 64,
    timeout: float = 600.0,
    api_key: str | None = None,
    default_max_tokens: int = 256,
    max_body_bytes: int = 4 * 2**20,
    body_timeout: float = 30.0,
):
    """The FastAPI app; its engine starts with the app and stops with it. Request bodies are limited to
    ``max_body_bytes`` (413) and must arrive without a pause of ``body_timeout`` seconds (408)."""

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if api_key is not None and not api_key.strip():
        raise PhikitError("the API key is empty; give a non-empty key, or none to serve without one")
    chat_template = get_template(template)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    context = engine.context

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(
        title="phikit",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions and chat completions for Phi models",
    )
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return exc.response()

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
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "request body is not valid JSON").body(), status_code=400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    if api_key:
        app.add_middleware(APIKeyCheck, key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "queued": engine.waiting.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "phikit"}]}

    async def run(body: _Common, prompt: str, request: HTTPRequest, kind: str):
        if body.model not in (None, model_name):
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        _check_text(prompt, "prompt" if kind == "completion" else "messages")
        for stop_text in [body.stop] if isinstance(body.stop, str) else body.stop or []:
            _check_text(stop_text, "stop")
        # tokenizing a long prompt takes a while: off the event loop, so other clients are not held up
        ids = await asyncio.to_thread(tokenizer.encode, prompt) or [tokenizer.eos_id]
        max_tokens = body.max_completion_tokens or body.max_tokens or min(default_max_tokens, context - len(ids))
        if len(ids) >= context or len(ids) + max_tokens > context:
            raise APIError(
                400,
                f"this model's context is {context} tokens; the prompt has {len(ids)} and "
                f"max_tokens is {max(max_tokens, 0)}; shorten the prompt or lower max_tokens",
                param="max_tokens" if len(ids) < context else "prompt",
                code="context_length_exceeded",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        stop = tuple(dict.fromkeys((*(chat_template.stop if kind == "chat" else ()), *stops)))
        config = GenerationConfig(
            max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Request(
            ids,
            max_tokens,
            config,
            stop,
            lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
            time.time() + timeout,
        )
        if not engine.submit(job):
            raise APIError(
                503,
                "the server is busy (every slot taken and the queue full); retry later",
                "server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())

        def usage() -> dict:
            done = job.completion_tokens
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}

        def choice(text: str | None, reason: str | None, final: bool) -> dict:
            if kind == "chat":
                key = "message" if final else "delta"
                content = {"role": "assistant", "content": text} if text is not None else {}
                return {"index": 0, key: content, "finish_reason": reason, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}

        obj = "chat.completion" if kind == "chat" else "text_completion"
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def finish(reason: str) -> str:
            if reason == "error":
                raise APIError(500, "generation failed inside the server (see its log)", "server_error")
            if reason == "timeout":
                raise APIError(504, f"generation did not finish within {timeout:.0f} s", "server_error", code="timeout")
            return reason

        if not body.stream:
            parts = []
            next_check = loop.time()
            try:
                while True:
                    try:
                        event, value = await asyncio.wait_for(events.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        event = value = None
                    if loop.time() >= next_check:  # queued or generating: a client that left frees its place
                        next_check = loop.time() + 0.25
                        if await request.is_disconnected():
                            engine.cancel(job)
                            raise APIError(499, "client closed the request")
                    if event == "text":
                        parts.append(value)
                    elif event == "done":
                        reason = finish(value)
                        break
            except asyncio.CancelledError:
                engine.cancel(job)
                raise
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": [choice("".join(parts), reason, True)],
                "usage": usage(),
            }

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse():
            def pack(payload: dict) -> str:
                return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

            base = {"id": rid, "object": chunk_obj, "created": created, "model": model_name}
            try:
                if kind == "chat":
                    yield pack(
                        {
                            **base,
                            "choices": [
                                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            ],
                        }
                    )
                while True:
                    event, value = await events.get()
                    if await request.is_disconnected():
                        job.cancelled = True
                        return
                    if event == "text":
                        yield pack({**base, "choices": [choice(value, None, False)]})
                        continue
                    if value == "timeout":
                        yield pack(APIError(504, "generation timed out", "server_error", code="timeout").body())
                    elif value == "error":
                        yield pack(APIError(500, "generation failed inside the server", "server_error").body())
                    else:
                        end = choice(None, value, False) if kind == "chat" else choice("", value, False)
                        yield pack({**base, "choices": [end]})
                    if include_usage:
                        yield pack({**base, "choices": [], "usage": usage()})
                    yield "data: [DONE]\n\n"
                    return
            finally:
                engine.cancel(job)  # no-op when finished; frees the slot when the client went away

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
            prompt = prompt[0]
        return await run(body, prompt, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        return await run(body, render_messages(body.messages, chat_template), request, "chat")

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
