"""``phikit merge``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from phikit.cli.common import EPILOG, add_model_arg


def add_parser(sub) -> None:
    mg = sub.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model and save a HF checkpoint",
        description="Write base + adapter as one transformers checkpoint (config.json, safetensors "
        "shards, tokenizer files) that transformers, vLLM and phikit load.",
        epilog=EPILOG,
    )
    mg.add_argument("out", type=Path, help="output folder (must not exist unless --overwrite)")
    add_model_arg(mg, "base model", adapter=True)
    mg.add_argument("--adapter", "-a", required=True, help="LoRA adapter folder")
    mg.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="dtype of the merged weights (default: the base checkpoint's)"
    )
    mg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    mg.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.api import merge_adapter

    start = time.perf_counter()
    out = merge_adapter(args.model, args.adapter, args.out, args.dtype, args.overwrite, progress=True)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
