"""``phikit plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phikit.cli.common import output_file
from phikit.errors import PhikitError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw fine-tuning runs' curves (PNG or SVG), runs side by side",
        description="Draw the metrics of one or more fine-tuning runs (their output_dir, or metrics.jsonl) as "
        "curves against step, a panel per metric group (loss with held-out loss, learning rate, grad norm, "
        "tokens/s, memory; DPO/ORPO rewards, accuracies, margins; GRPO rewards), each run a line. Needs "
        "matplotlib. Every run also keeps a live output_dir/dashboard.html, which any browser opens. Given the "
        "JSON that 'phikit bench --json' wrote, it draws that benchmark's bars instead (as bench --plot does).",
    )
    p.add_argument(
        "runs", nargs="+", type=Path, help="run folders (output_dir) or metrics.jsonl files; or one bench --json file"
    )
    p.add_argument("--out", "-o", type=Path, default=Path("runs.png"), help="a .png or .svg file (default runs.png)")
    p.add_argument("--metrics", help="only these metrics, comma-separated (e.g. loss,eval_loss)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.plots import plot_bench, plot_runs

    output_file(args.out, "--out")
    report = bench_report(args.runs)
    if report is not None:
        if args.metrics or len(args.runs) > 1:
            raise PhikitError("a bench --json file is drawn alone, without --metrics")
        print(f"wrote {plot_bench(report, args.out)}", file=sys.stderr)
        return
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    out = plot_runs(args.runs, args.out, metrics)
    print(f"wrote {out}", file=sys.stderr)


def bench_report(paths: list[Path]) -> dict | None:
    """The report of a ``phikit bench --json`` file among ``paths`` (a JSON object with its "rows"), else None."""
    import json

    for path in paths:
        if path.suffix == ".json" and path.is_file():
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise PhikitError(f"{path}: not valid JSON") from None
            if isinstance(report, dict) and isinstance(report.get("rows"), list):
                return report
            raise PhikitError(
                f"{path}: not a 'phikit bench --json' report (no rows); runs are folders or metrics.jsonl"
            )
    return None
