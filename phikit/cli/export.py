"""``phikit export``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from phikit.cli.common import EPILOG, add_model_arg, size_text
from phikit.errors import PhikitError


def add_parser(sub) -> None:
    from phikit.export import GGUF_TYPES

    ex = sub.add_parser(
        "export",
        help="export (with an adapter merged) as a HF checkpoint, a GGUF file for llama.cpp or an Ollama folder",
        description="--format hf writes a transformers checkpoint folder (transformers, vLLM); --format gguf "
        "writes one GGUF file (llama.cpp) as llama.cpp's converter and llama-quantize would; --format ollama "
        "writes a folder with model.gguf and a Modelfile carrying the prompt template and its stop strings "
        "(then: ollama create NAME -f OUT/Modelfile). Quantized phikit checkpoints cannot be exported: export "
        "the full-precision checkpoint they came from.",
        epilog=EPILOG,
    )
    ex.add_argument("out", help="output folder (hf, ollama) or file, e.g. phi-2-q8_0.gguf (gguf)")
    add_model_arg(ex, adapter=True)
    ex.add_argument("--adapter", "-a", help="a LoRA adapter folder to merge in first")
    ex.add_argument("--format", "-f", choices=["hf", "gguf", "ollama"], default="hf", help="output format (default hf)")
    ex.add_argument(
        "--type",
        dest="gguf_type",
        choices=list(GGUF_TYPES),
        default="f16",
        help="gguf, ollama: tensor type (default f16); tq1_0/tq2_0 only suit ternary-trained models",
    )
    ex.add_argument(
        "--template",
        "-t",
        help="ollama: prompt template of the Modelfile: chat (the checkpoint's chat template), instruct, "
        "guanaco, raw or your own string with {prompt}; default: chat where the checkpoint has one (Phi-3, "
        "Phi-4), else instruct",
    )
    ex.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="hf: dtype of the weights (default: the checkpoint's)"
    )
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.export import export_gguf, export_hf, export_ollama

    start = time.perf_counter()
    if args.dtype and args.format != "hf":
        raise PhikitError(f"--dtype is for --format hf; for {args.format} choose --type (e.g. f16, q8_0, q4_0)")
    if args.template and args.format != "ollama":
        raise PhikitError("--template is for --format ollama (it goes into the Modelfile)")
    if args.format == "gguf" and args.out.endswith(("/", os.sep)):
        raise PhikitError(f"{args.out}: --format gguf writes one file; name it, e.g. {args.out}model.gguf")
    if args.format == "gguf" and not args.out.endswith(".gguf") and not Path(args.out).is_dir():
        print(f"phikit: note: {args.out} has no .gguf ending (llama.cpp does not need one; people do)", file=sys.stderr)
    args.out = Path(args.out)
    if args.format == "gguf":
        out = export_gguf(args.model, args.out, args.adapter, args.gguf_type, args.overwrite, progress=True)
    elif args.format == "ollama":
        template = args.template or "auto"
        out = export_ollama(args.model, args.out, args.adapter, args.gguf_type, template, args.overwrite, True)
    else:
        out = export_hf(args.model, args.out, args.adapter, args.dtype, args.overwrite, progress=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size_text(size)}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.format == "ollama":
        print(f"make the Ollama model with: ollama create NAME -f {out / 'Modelfile'}", file=sys.stderr)
