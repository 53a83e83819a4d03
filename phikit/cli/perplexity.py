"""``phikit perplexity``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phikit.cli.common import EPILOG, add_model_args, at_least, input_file, load_model
from phikit.errors import PhikitError


def add_parser(sub) -> None:
    pp = sub.add_parser(
        "perplexity",
        help="perplexity of a model on a text file (sliding window)",
        description='Perplexity on a .txt file or the "text" fields of a .jsonl file, with '
        "windows of --context tokens every --stride tokens.",
        epilog=EPILOG,
    )
    pp.add_argument("--data", "-d", type=Path, required=True, help='a .txt file or .jsonl with a "text" field')
    pp.add_argument("--context", type=int, default=1024, help="window length in tokens (default 1024)")
    pp.add_argument("--stride", type=int, help="tokens between windows (default context/2)")
    pp.add_argument("--max-tokens", type=int, help="only the first N tokens of the data")
    add_model_args(pp, adapter="a LoRA adapter folder: the perplexity of the fine-tuned model")
    pp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.evaluate import perplexity, read_text

    input_file(args.data, "--data")
    at_least(args.context, 2, "--context")
    at_least(args.stride, 1, "--stride")
    at_least(args.max_tokens, 2, "--max-tokens")
    if args.stride is not None and args.stride > args.context:
        raise PhikitError(f"--stride {args.stride} is longer than --context {args.context}")
    phi = load_model(args)
    ids = read_text(args.data, phi.tokenizer)
    context = phi.model.config.max_position_embeddings
    if args.context > context:
        print(
            f"phikit: --context {args.context} is more than the model's {context}; windows of {context}",
            file=sys.stderr,
        )
    result = perplexity(phi.model, ids, min(args.context, context), args.stride, args.max_tokens, progress=True)
    window = min(args.context, context)
    print(
        json.dumps(
            {
                "model": str(args.model),
                "adapter": args.adapter,
                "precision": phi.precision,  # what the linear layers hold
                "group_size": phi.quantization.group_size if phi.quantization and phi.precision == "int4" else None,
                "dtype": phi.dtype,  # the weights' as loaded
                "context": window,
                "stride": args.stride or window // 2,
                "perplexity": result.perplexity,
                "nll": result.nll,
                "tokens": result.tokens,
            }
        )
    )
