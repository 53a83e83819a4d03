"""Prometheus metrics of ``phikit serve`` (/metrics), each app with its own registry. The engine is only
read (queue length, active rows); tokens and times are observed by the serving layer as it receives the
engine's events, so the engine never calls into the HTTP side."""

from __future__ import annotations

import time

from phikit.serve.engine import Engine, Request

ROUTES = (
    "/",
    "/ui/{file}",
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
    for prefix in ("/v1/models/", "/ui/"):
        if path.startswith(prefix):
            return next(r for r in ROUTES if r.startswith(prefix))
    return "other"


class Metrics:
    """Requests by route and status, prompt and generated tokens, prompt tokens served from the prefix cache,
    queued and active requests, time to first token, per-request decode speed."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("phikit_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("phikit_prompt_tokens", "prompt tokens received", registry=self.registry)
        held = "prompt tokens whose keys and values came from the prefix cache"
        self.cached_tokens = Counter("phikit_prefix_cache_hit_tokens", held, registry=self.registry)
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

    def token(self, request: Request, first: bool) -> None:
        """A generated token of ``request`` reached the serving layer (``first``: its first)."""
        self.generated.inc()
        if first and request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.created)

    def finished(self, request: Request) -> None:
        self.cached_tokens.inc(request.cached_prefix)
        if request.first_token_at and request.completion_tokens > 1:
            elapsed = time.time() - request.first_token_at
            if elapsed > 0:
                self.speed.observe((request.completion_tokens - 1) / elapsed)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
