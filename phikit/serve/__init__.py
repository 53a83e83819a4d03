"""OpenAI-compatible HTTP server with continuous batching (``phikit serve``): ``schemas`` (request bodies,
errors), ``engine`` (the batching engine), ``adapters`` (several LoRA adapters per batch), ``structured``
(grammar-constrained output), ``app`` (the HTTP routes). FastAPI is imported here, so only ``phikit serve``
needs it."""

from phikit.serve.app import create_app, serve
from phikit.serve.engine import Engine, Request
from phikit.serve.schemas import APIError

__all__ = ["APIError", "Engine", "Request", "create_app", "serve"]
