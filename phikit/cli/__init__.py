"""The ``phikit`` command: a small dispatcher. Each subcommand is a module here with ``add_parser(sub)`` (its
flags and help) and ``run(args)``, which checks the arguments and calls library functions a user could
call from Python too; the flags several commands share, and loading a model from them, live in
``phikit.cli.common``."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading

from phikit import __version__
from phikit.errors import PhikitError, Terminated

# subcommand -> module, in the order --help lists them
COMMANDS = {
    "generate": "generate",
    "quantize": "quantize",
    "finetune": "finetune",
    "merge": "merge",
    "export": "export",
    "serve": "serve",
    "chat": "chat",
    "eval": "evaluate",
    "bench": "bench",
    "perplexity": "perplexity",
    "plot": "plot",
}


def _terminate(signum, frame):
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    import numpy  # noqa: F401 - before PyTorch, which imports it from C and would swallow a Ctrl-C meanwhile

    from phikit.cli.common import EPILOG  # the commands' modules import PyTorch: main() catches a Ctrl-C then

    parser = argparse.ArgumentParser(
        prog="phikit",
        description="Run, quantize, benchmark, fine-tune, evaluate, serve and export Microsoft's Phi models "
        "(Phi-1/1.5/2 and the Phi-3 family: Phi-3, Phi-3.5, Phi-4, Phi-4-mini) on one GPU or a CPU.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"phikit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"phikit.cli.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # (tests call main() from other threads too)
        return _main(argv)
    before = signal.signal(signal.SIGTERM, _terminate)  # the server's uvicorn installs its own while it runs
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, before)  # a caller's own (main() called from Python) comes back


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
    except KeyboardInterrupt as e:  # while PyTorch imports (seconds on a cold start)
        return _interrupted(e)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command is None:
        parser.parse_args(argv)  # reports the unknown arguments the usual way
    if extra and args.command != "finetune":  # with the command's own usage, not phikit's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from phikit.cli.common import default_model

        default_model(args)
        args.func(args)
        sys.stdout.flush()
    except PhikitError as e:
        print(f"phikit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except BrokenPipeError:  # `phikit generate ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        print(f"phikit: error: {full}; free some space and run again", file=sys.stderr)
        return 2
    return 0


def _interrupted(e: KeyboardInterrupt) -> int:
    """Ctrl-C: one line and 130; SIGTERM: one line and 143 (128 + the signal, as a shell reports them)."""
    terminated = isinstance(e, Terminated)
    print(f"\nphikit: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130


def disk_full(e: BaseException) -> str | None:
    """What to say when ``e`` is a write that ran out of disk space, else None. Python's own writes raise
    OSError ENOSPC; safetensors (a Rust error naming os error 28), gguf-py ("Not enough free space") and
    torch.save (its zip writer: "unexpected pos") each say it their own way."""
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full{f' writing {e.filename}' if e.filename else ''}"
    if "No space left on device" in text or "os error 28" in text or "Not enough free space to write" in text:
        return "the disk is full"
    if isinstance(e, RuntimeError) and "unexpected pos" in text:  # torch.save's writer cut short
        return "a file could not be written whole (the disk is probably full)"
    return None


if __name__ == "__main__":
    sys.exit(main())
