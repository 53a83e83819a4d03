"""What every request passes before a route sees it (plain ASGI, under which a route still sees its client
disconnect, as it does not under FastAPI's http middleware): the Host and Origin guard, the API key, the body
limits, and the request counter. Each refusal is an OpenAI-shaped error."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket

from fastapi import HTTPException

from phikit.serve.metrics import Metrics, route_label
from phikit.serve.schemas import APIError


def _headers(scope) -> dict[bytes, bytes]:
    return dict(scope.get("headers") or [])


def _hostname(host: str) -> str:
    """``name`` of a Host header ``name:port`` / ``[v6]:port``, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.removesuffix(".")  # "localhost." is the fully qualified "localhost"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware against DNS rebinding and cross-site use. A page on another site can point its own DNS
    name at 127.0.0.1 and then talk to this server as "same origin" (Ollama's 2024 advisory); the Host header
    still carries that name, so only these hosts are answered: IP addresses (a rebinding needs a name),
    ``localhost`` and ``*.localhost``, this machine's name, the bound address, and ``allowed`` (``*``: any).
    A browser request from another origin (its ``Origin`` header) is refused unless ``cors_origins`` names
    it; same-origin requests (the chat page's own) pass. A request without Host (HTTP/1.0, no browser) passes.
    """

    def __init__(self, app, allowed: list[str] | tuple[str, ...] = (), cors_origins: list[str] | tuple[str, ...] = ()):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {"localhost", socket.gethostname().lower(), *(_hostname(a) for a in allowed if a != "*")}
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    def host_allowed(self, host: str) -> bool:
        name = _hostname(host)
        return self.any or _is_ip(name) or name in self.allowed or name.endswith(".localhost")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not self.host_allowed(host):
            name = _hostname(host)[:100]
            error = APIError(
                400,
                f"this server does not answer the host {name!r} (start it with --allowed-host {name} to allow it)",
                code="host_not_allowed",
            )
            return await error.response()(scope, receive, send)
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        if origin and origin not in self.origins:
            scheme, _, rest = origin.partition("://")
            if scheme not in ("http", "https") or rest != host.strip().lower():  # not the page's own origin
                error = APIError(
                    403,
                    f"cross-origin requests from {origin[:100]!r} are refused (phikit serve --cors-origin allows one)",
                    code="origin_not_allowed",
                )
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets 413, one that stalls for more than
    ``timeout`` seconds between chunks gets 408 (a slow upload cannot hold a connection forever). Raised from
    the body read itself; the app's HTTPException handler answers."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def _too_large(self) -> APIError:
        size = f"{self.max_bytes / 2**20:g} MB"
        return APIError(413, f"request body larger than {size} (phikit serve --max-body-mb)", code="too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _headers(scope).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), timeout=self.timeout)
            except asyncio.TimeoutError:
                raise BodyError(APIError(408, f"request body not received within {self.timeout:g} s")) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyError(self._too_large())
            return message

        await self.app(scope, limited, send)


class BodyError(HTTPException):
    """Raised from the body read; an HTTPException so that FastAPI's body parsing passes it on."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message)
        self.error = error


class APIKeyCheck:
    """ASGI middleware: /v1 requests need ``Authorization: Bearer KEY`` (the scheme in any case); /metrics
    too with ``protect_metrics``. The chat page and /health answer without it."""

    def __init__(self, app, key: str, protect_metrics: bool = False):
        self.app, self.key, self.protect_metrics = app, key.encode(), protect_metrics

    async def __call__(self, scope, receive, send):
        guarded = scope["type"] == "http" and (
            scope["path"].startswith("/v1") or (self.protect_metrics and scope["path"] == "/metrics")
        )
        if guarded:
            header = _headers(scope).get(b"authorization", b"").strip()
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.key):
                error = APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class CountRequests:
    """ASGI middleware: every response counted by route and status (``phikit_requests``)."""

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
