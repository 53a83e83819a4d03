"""``phikit serve``."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from phikit.cli.common import EPILOG, add_model_args, load_model
from phikit.errors import PhikitError


def add_parser(sub) -> None:
    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve a chat page at / and OpenAI's /v1/completions and /v1/chat/completions (streaming "
        "too), /v1/models, /health and /metrics. Concurrent requests are decoded together (continuous batching). "
        "Only local host names, IP addresses and --allowed-host names are answered (a guard against DNS "
        "rebinding); browsers on other sites are refused unless --cors-origin names them.",
        epilog=EPILOG,
    )
    add_model_args(sv, kv_cache=True, takes_adapter=True)
    sv.add_argument(
        "--adapter",
        "-a",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a LoRA adapter: DIR applies it to every request; NAME=DIR (repeatable) serves it as model NAME "
        "next to the base, several adapters decoding in one batch",
    )
    sv.add_argument(
        "--template",
        "-t",
        default="auto",
        help="how chat messages are rendered: chat (the checkpoint's chat template), guanaco, instruct or your "
        "own 'User: {prompt}\\nBot:'; default auto: chat where the checkpoint has one (Phi-3, Phi-4), else guanaco",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    sv.add_argument("--model-name", help="model id reported and accepted by the API (default: from --model)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting when every slot is taken; more get 503 (default 64)"
    )
    sv.add_argument("--timeout", type=float, default=600, help="seconds a request may take (default 600)")
    sv.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none (default 256)")
    sv.add_argument("--max-body-mb", type=float, default=4, help="largest request body in MB; more get 413 (default 4)")
    sv.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=512,
        help="memory for reusing the keys/values of prompt prefixes already seen (0: off; default 512)",
    )
    sv.add_argument("--max-prompts", type=int, default=64, help="prompts one completions request may hold (default 64)")
    sv.add_argument(
        "--protect-metrics",
        action="store_true",
        help="require the --api-key on /metrics too (/health always answers without it)",
    )
    sv.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    sv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name to answer besides localhost, IP addresses and this machine's name (repeatable; "
        "'*' answers any, which lets any web page you visit that rebinds its DNS name reach the server)",
    )
    sv.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (https://app.example:8443) whose pages may call the API from the browser (repeatable)",
    )
    sv.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.serve import create_app, serve
    from phikit.templates import get_template

    if args.template not in ("chat", "auto"):  # those need the checkpoint's tokenizer
        get_template(args.template)
    check_serve_args(args)  # a mistake costs seconds, not a model load
    pairs = [a.split("=", 1) for a in args.adapter if "=" in a]
    named = dict(pairs)
    plain = [a for a in args.adapter if "=" not in a]
    if len(plain) > 1 or (plain and named):
        raise PhikitError("give one --adapter DIR for every request, or name them: --adapter NAME=DIR ..., not both")
    if len(named) < len(pairs):
        names = [n for n, _ in pairs]
        twice = sorted({n for n in names if names.count(n) > 1})
        raise PhikitError(f"--adapter {', '.join(twice)}: a name given twice; each adapter needs its own")
    name = args.model_name or Path(str(args.model)).name
    if name in named:
        raise PhikitError(f"--adapter {name}=...: {name} is the base model's name; name the adapter otherwise")
    for adapter, folder in named.items():
        if not Path(folder, "adapter_config.json").is_file():
            raise PhikitError(f"--adapter {adapter}={folder}: no adapter_config.json in {folder}")
    phi = load_model(args, adapter=plain[0] if plain else None)
    app = create_app(
        phi.model,
        phi.tokenizer,
        name,
        args.template,
        args.max_batch,
        args.max_queue,
        args.timeout,
        args.api_key,
        args.max_tokens,
        int(args.max_body_mb * 2**20),
        adapters=named or None,
        prefix_cache_mb=args.prefix_cache_mb,
        max_prompts=args.max_prompts,
        protect_metrics=args.protect_metrics,
        ui=not args.no_ui,
        allowed_hosts=[args.host, *args.allowed_host],
        cors_origins=args.cors_origin,
    )
    cache, context = app.state.engine.cache, app.state.engine.context
    if args.max_tokens >= context:
        print(
            f"phikit: note: --max-tokens {args.max_tokens} reaches the model's context of {context} tokens; a "
            "request without max_tokens generates what fits after its prompt",
            file=sys.stderr,
        )
    gb = cache.nbytes / 1e9
    host = f"[{args.host}]" if ":" in args.host else args.host
    if args.host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    where = "API" if args.no_ui else f"chat page: http://{host}:{args.port}/ · API"
    extras = [f"adapters {', '.join(named)}"] if named else []
    extras += ["the API needs --api-key's key"] if args.api_key else []
    print(
        f"serving {name}: {where}: http://{host}:{args.port}/v1 ({args.max_batch} slots, KV cache {gb:.2f} GB "
        + str(cache.k.dtype).removeprefix("torch.")
        + "".join(f"; {e}" for e in extras)
        + ")",
        file=sys.stderr,
    )
    serve(app, args.host, args.port)


def check_serve_args(args: argparse.Namespace) -> None:
    """``phikit serve``'s flags, checked before the model loads; the port must be free to bind."""
    import math
    import socket

    if not 1 <= args.port <= 65535:
        raise PhikitError(f"--port {args.port}: choose a port between 1 and 65535")
    if args.max_batch < 1 or args.max_queue < 0:
        raise PhikitError("--max-batch must be at least 1 and --max-queue at least 0")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise PhikitError(f"--timeout {args.timeout}: give a positive number of seconds")
    if args.max_tokens < 1:
        raise PhikitError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise PhikitError(f"--max-body-mb {args.max_body_mb}: give a positive size")
    if not (math.isfinite(args.prefix_cache_mb) and args.prefix_cache_mb >= 0):
        raise PhikitError(f"--prefix-cache-mb {args.prefix_cache_mb}: give a size >= 0")
    if args.max_prompts < 1:
        raise PhikitError(f"--max-prompts {args.max_prompts}: must be at least 1")
    if args.protect_metrics and args.api_key is None:
        raise PhikitError("--protect-metrics puts /metrics behind the API key: give --api-key too")
    for origin in args.cors_origin:
        scheme, _, rest = origin.partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/"):
            raise PhikitError(f"--cors-origin {origin}: give an origin such as https://app.example:8443 (no path)")
    if args.api_key is not None and not args.api_key.strip():
        raise PhikitError("--api-key is empty; give a non-empty key, or leave --api-key out to serve without one")
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PhikitError(f"--host {args.host}: cannot be resolved ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            fix = {
                errno.EADDRINUSE: "choose another --port",
                errno.EADDRNOTAVAIL: "--host must be an address of this machine",
                errno.EACCES: "ports below 1024 need privileges: choose --port 1024 or above",
            }.get(e.errno, "choose another --host or --port")
            raise PhikitError(f"cannot serve on {args.host}:{args.port}: {e.strerror}; {fix}") from None
