"""``phikit bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phikit.cli.common import (
    EPILOG,
    add_group_size_arg,
    add_kv_cache_arg,
    add_model_arg,
    at_least,
    check_group_size,
    output_file,
)
from phikit.errors import PhikitError


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="measure prefill/decode speed, first-token latency, load time and memory",
        description="Benchmark a model at several precisions, each in a fresh process; prints a "
        "Markdown table (and JSON with --json). Medians of --repeats runs after a "
        "warm-up; decode always runs --new-tokens tokens.",
        epilog=EPILOG,
    )
    add_model_arg(b)
    b.add_argument(
        "--precisions",
        default="bf16,int8,int4",
        help="comma-separated, from fp32, bf16, fp16, int8, int4, nf4 (default bf16,int8,int4)",
    )
    b.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill (default 128)")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    add_group_size_arg(b)
    add_kv_cache_arg(b)
    b.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    b.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also run transformers generate on the same checkpoint (bf16 and each dense precision; on a GPU "
        "also nf4 through bitsandbytes)",
    )
    b.add_argument(
        "--depth",
        default="",
        metavar="N[,N...]",
        help="also decode after N tokens of context (e.g. 4096,16384: llama-bench's -d); the cache holds random "
        "keys and values instead of a prefill's, as many bytes as a real context's",
    )
    b.add_argument("--perplexity-data", metavar="FILE", help="also report perplexity on FILE (.txt or .jsonl)")
    b.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    b.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help="also draw tokens/s and memory per precision and engine as bars (.png or .svg; needs matplotlib)",
    )
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.bench import BenchSettings, markdown, run_bench

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in ("fp32", "bf16", "fp16", "int8", "int4", "nf4")]
    if unknown or not precisions:
        raise PhikitError(f"unknown precision(s) {', '.join(unknown)}; choose from fp32, bf16, fp16, int8, int4, nf4")
    if args.new_tokens < 1 or args.prompt_tokens < 1 or args.repeats < 1:
        raise PhikitError("--new-tokens, --prompt-tokens and --repeats must be at least 1")
    at_least(args.threads, 1, "--threads")
    if args.json is not None:
        output_file(args.json, "--json")
    if args.plot is not None:
        from phikit.plots import check_picture

        check_picture(output_file(args.plot, "--plot"))
    if args.perplexity_data and not Path(args.perplexity_data).is_file():
        raise PhikitError(f"{args.perplexity_data}: data file not found")
    from phikit.checkpoint import resolve_model_path
    from phikit.models import read_config

    context = read_config(resolve_model_path(args.model) / "config.json").max_position_embeddings
    try:
        depths = [int(d) for d in args.depth.split(",") if d.strip()]
    except ValueError:
        raise PhikitError(f"--depth {args.depth!r}: give whole numbers of tokens, e.g. 4096,16384") from None
    if any(d < 1 or d + args.new_tokens > context for d in depths):
        raise PhikitError(f"--depth: each depth must be at least 1 and, with --new-tokens, within {context} tokens")
    if args.prompt_tokens + args.new_tokens > context:
        raise PhikitError(
            f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed the model's context of "
            f"{context} tokens; lower them"
        )
    settings = BenchSettings(
        args.model,
        precisions,
        args.device,
        args.prompt_tokens,
        args.new_tokens,
        args.repeats,
        check_group_size(args, "int4" if "int4" in precisions else precisions[0]),
        args.compare_transformers,
        args.perplexity_data,
        args.threads,
        depths,
        kv_cache=args.kv_cache,
    )
    from phikit.checkpoint import atomic_write

    def save(report: dict) -> None:  # after every row: an interrupted run keeps what it measured
        if args.json:
            atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))

    report = run_bench(settings, on_row=save)
    print(
        f"{report['machine']}\nmodel {args.model}, batch 1, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens\n"
    )
    print(markdown(report))
    save(report)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from phikit.plots import plot_bench

        print(f"wrote {plot_bench(report, args.plot)}", file=sys.stderr)
