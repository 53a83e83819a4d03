"""``phikit plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phikit.cli.common import output_file


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw fine-tuning runs' curves (PNG or SVG), runs side by side",
        description="Draw the metrics of one or more fine-tuning runs (their output_dir, or metrics.jsonl) as "
        "curves against step, a panel per metric group (loss with held-out loss, learning rate, grad norm, "
        "tokens/s, memory; DPO/ORPO rewards, accuracies, margins; GRPO rewards), each run a line. Needs "
        "matplotlib. Every run also keeps a live output_dir/dashboard.html, which any browser opens.",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders (output_dir) or metrics.jsonl files")
    p.add_argument("--out", "-o", type=Path, default=Path("runs.png"), help="a .png or .svg file (default runs.png)")
    p.add_argument("--metrics", help="only these metrics, comma-separated (e.g. loss,eval_loss)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.plots import plot_runs

    output_file(args.out, "--out")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    out = plot_runs(args.runs, args.out, metrics)
    print(f"wrote {out}", file=sys.stderr)
