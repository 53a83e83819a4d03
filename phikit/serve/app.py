"""The HTTP side of ``phikit serve``: thin routes over ``serving.Serving`` (the OpenAI endpoints' logic), the
middleware of ``middleware.py``, and the chat page (static files in ``ui/``, shipped inside the package).

POST /v1/completions (a prompt as text, token ids, or a list of either; ``echo``, ``logprobs``, ``n``,
``best_of``, penalties, ``logit_bias``) and /v1/chat/completions (``logprobs``/``top_logprobs``, ``n``,
text content parts, the ``developer`` role), both streamed as server-sent events on request, and both
with ``response_format`` json_object / json_schema; GET /v1/models (the base and each adapter),
/health, /metrics (Prometheus) and / (the chat page). Every error is OpenAI-shaped JSON.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from phikit.errors import PhikitError
from phikit.models import CausalLM
from phikit.serve.engine import Engine
from phikit.serve.metrics import Metrics
from phikit.serve.middleware import APIKeyCheck, BodyError, BodyLimit, CountRequests, HostCheck
from phikit.serve.schemas import APIError, ChatBody, CompletionBody, Limits, as_written
from phikit.serve.serving import Serving
from phikit.templates import get_template
from phikit.tokenizer import Tokenizer

UI_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}
# the page runs only its own files: no inline script, nothing from elsewhere, even if a reply slipped through
UI_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


UNION_TAG = re.compile(r"[a-z_-]+\[.*\]|str|int|float|bool|none|dict|list")  # pydantic's per-type loc parts


def _field_path(loc) -> tuple:
    """A validation error's location in the body (``loc[0]`` is "body"), pydantic's tags for the members of a
    union (``str``, ``list[str]``) left out."""
    return tuple(p for p in list(loc)[1:] if isinstance(p, int) or not UNION_TAG.fullmatch(str(p)))


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
    ui: bool = True,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    cors_origins: list[str] | tuple[str, ...] = (),
):
    """The FastAPI app; its engine starts with the app and stops with it. Request bodies are limited to
    ``max_body_bytes`` (413) and must arrive without a pause of ``body_timeout`` seconds (408).
    ``adapters`` (name -> adapter folder) are served unmerged next to the base: a request's ``model``
    picks one. Prompt prefixes' keys/values are reused within ``prefix_cache_mb`` (0: off). A completions
    request takes at most ``max_prompts`` prompts. /health and /metrics answer without the API key, unless
    ``protect_metrics`` puts /metrics behind it. ``ui``: the chat page at /. Only local hosts, IP addresses
    and ``allowed_hosts`` are answered; browsers' cross-origin requests only from ``cors_origins``."""

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
    metrics = Metrics(engine)
    names = [model_name, *(adapter_set.names if adapter_set else [])]
    limits = Limits(engine.context, model.config.vocab_size, default_max_tokens)
    serving = Serving(engine, tokenizer, chat_template, metrics, names, limits, timeout, max_prompts)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()
        serving.close()

    app = FastAPI(
        title="phikit",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions and chat completions for Phi models",
    )
    app.state.engine = engine
    app.state.metrics = metrics
    # the last added runs first: count, then Host/Origin, CORS (its preflights carry no key), key, body limits
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)
    if api_key:
        app.add_middleware(APIKeyCheck, key=api_key, protect_metrics=protect_metrics)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostCheck, allowed=list(allowed_hosts), cors_origins=list(cors_origins))
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
        if isinstance(exc, BodyError):
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
        path = _field_path(first.get("loc", ()))
        param = ".".join(str(p) for p in path) or None  # as schemas.py's own errors name a param: messages.0.content
        # a field that takes one of several types fails once per type: say each (without pydantic's tags)
        why = " or ".join(dict.fromkeys(e["msg"] for e in exc.errors() if _field_path(e.get("loc", ())) == path))
        why = why or first.get("msg", "invalid request")
        return APIError(400, f"{as_written(param)}: {why}" if param else why, param=param).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "queued": engine.waiting.qsize()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [serving.model_card(n) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        """openai's ``client.models.retrieve(id)``: the model, or a 404 naming those served."""
        return serving.model_card(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        return await serving.answer(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        return await serving.answer(body, request)

    if ui:
        add_chat_page(app)
    return app


def add_chat_page(app: FastAPI) -> None:
    """/ (the chat page) and /ui/chat.js, /ui/chat.css, read from the package; answered under a content
    security policy that runs the page's own script only."""
    folder = resources.files("phikit.serve") / "ui"
    headers = {"Content-Security-Policy": UI_POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def page():
        return Response((folder / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in UI_FILES:
            raise APIError(404, f"no such file: /ui/{name[:100]}")
        return Response((folder / name).read_bytes(), media_type=UI_FILES[name], headers=headers)


SHUTDOWN_GRACE_S = 10  # a Ctrl-C or SIGTERM lets streaming requests finish this long, then ends them


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
