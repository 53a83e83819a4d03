"""``phikit quantize``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from phikit.cli.common import EPILOG, add_group_size_arg, add_model_args, check_group_size, load_model, size_text


def add_parser(sub) -> None:
    q = sub.add_parser(
        "quantize",
        help="write a quantized checkpoint that loads without re-quantizing",
        description="Quantize a model's linear layers and save it as a checkpoint folder. "
        "Layers are quantized one at a time while loading, so memory stays near "
        "the size of the quantized model.",
        epilog=EPILOG,
    )
    q.add_argument("out", type=Path, help="output folder (must not exist unless --overwrite)")
    q.add_argument("--to", required=True, choices=["int8", "int4", "nf4"], help="quantization format")
    add_group_size_arg(q)
    q.add_argument(
        "--keep-lm-head", action="store_true", help="leave lm_head unquantized (larger, slightly more accurate)"
    )
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_model_args(q, quantize=False)
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.api import save_quantized
    from phikit.checkpoint import check_output_folder
    from phikit.quantize import QuantSpec

    local = Path(str(args.model)).expanduser()
    check_output_folder(args.out, args.overwrite, local if local.is_dir() else None)  # before the slow load
    spec = QuantSpec(args.to, check_group_size(args, args.to), lm_head=not args.keep_lm_head)
    start = time.perf_counter()
    phi = load_model(args, quantize=spec)
    out = save_quantized(phi, args.out, overwrite=args.overwrite)
    size = size_text(sum(f.stat().st_size for f in out.glob("*.safetensors")))
    print(f"wrote {out} ({args.to}, {size}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
