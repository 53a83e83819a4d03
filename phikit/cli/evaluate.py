"""``phikit eval``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from phikit.checkpoint import hub_id_shaped
from phikit.cli.common import DTYPES, QUANTIZE, add_model_args, at_least, check_group_size, input_file, load_model
from phikit.errors import PhikitError
from phikit.quantize import GROUP_SIZE, GROUP_SIZES, GROUP_SIZES_TEXT


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="run a prompt suite side by side, or lm-evaluation-harness tasks",
        description="Suite mode runs the prompts of --suite (default: the reference tutorials' ten "
        "prompts) on the model and on each --compare variant, one model loaded at a "
        "time, and writes a side-by-side report.md and report.html to --out. "
        "With --lm-eval it runs lm-evaluation-harness tasks (pip install lm-eval).",
        epilog="Example: phikit eval --model microsoft/phi-2 --compare tuned:adapter=runs/x/adapter "
        "--compare int4:quantize=int4 --out eval/",
    )
    add_model_args(ev, adapter="a LoRA adapter folder")
    ev.add_argument("--suite", type=Path, help="prompt suite YAML (default: the built-in suite)")
    ev.add_argument("--out", type=Path, default=Path("eval"), help="output folder (default eval/)")
    ev.add_argument("--label", default="base", help="column label of the model itself (default base)")
    ev.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL:key=value,...",
        help="another column: the same options with some changed (keys: model, adapter, quantize, "
        "dtype, group_size); repeatable",
    )
    ev.add_argument("--template", "-t", help="override the suite's template")
    ev.add_argument("--max-new-tokens", "-n", type=int, help="override the suite's max_new_tokens")
    ev.add_argument(
        "--perplexity",
        type=Path,
        metavar="FILE",
        help="also measure each model's perplexity on FILE (.txt or .jsonl, as phikit perplexity does with "
        "its default windows) and show them side by side in the report",
    )
    ev.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks instead of a suite")
    ev.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples")
    ev.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction)")
    ev.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    ev.add_argument("--include-path", help="lm-eval: a folder of extra task YAMLs")
    ev.set_defaults(func=run)


CHOICES = {"quantize": (*QUANTIZE, "none"), "dtype": DTYPES}  # those of the flags


def parse_compare(spec: str, base: dict) -> tuple[str, dict]:
    """'int4:quantize=int4,group_size=32' -> ('int4', base options with those changed)."""
    label, _, rest = spec.partition(":")
    if not label or not rest:
        raise PhikitError(f"--compare {spec!r}: expected LABEL:key=value[,key=value]")
    options, given = dict(base), set()
    for item in rest.split(","):
        key, _, value = item.partition("=")
        given.add(key)
        if key not in ("model", "adapter", "quantize", "dtype", "group_size") or not value:
            raise PhikitError(
                f"--compare {spec!r}: unknown or empty key {key!r} (model, adapter, quantize, dtype, group_size)"
            )
        if key == "group_size" and value not in map(str, GROUP_SIZES):
            raise PhikitError(f"--compare {spec!r}: group_size must be {GROUP_SIZES_TEXT}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:  # checked before any model loads
            raise PhikitError(f"--compare {spec!r}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        options[key] = int(value) if key == "group_size" else (None if value == "none" else value)
    if "group_size" in given and options["quantize"] != "int4":
        raise PhikitError(f"--compare {spec!r}: group_size is int4's; add quantize=int4")
    check_sources(options, f"--compare {label}")
    return label, options


def check_sources(options: dict, what: str) -> None:
    """A variant's model and adapter can be found, before any model loads (a later column failing would throw
    away the finished ones' work): a local model folder holds config.json, else the name is a Hub id; an
    adapter folder holds adapter_config.json."""
    model, adapter = options["model"], options.get("adapter")
    folder = Path(str(model)).expanduser()
    if folder.exists() and not (folder / "config.json").is_file():
        hint = "; it is an adapter: use adapter=" if (folder / "adapter_config.json").is_file() else ""
        raise PhikitError(f"{what}: model {model} has no config.json{hint}")
    if not folder.exists() and not hub_id_shaped(str(model)):
        raise PhikitError(f"{what}: model {model}: no such folder, and not a Hub id of the form owner/name")
    if adapter and not (Path(str(adapter)).expanduser() / "adapter_config.json").is_file():
        raise PhikitError(f"{what}: adapter {adapter}: no adapter_config.json there")


def describe(options: dict, results: list[dict], dtype: str) -> str:
    """What a column ran, for the report: model, the weights' dtype as loaded (``dtype``: what --dtype auto
    became), quantization, adapter, prompt template."""
    parts = [f"model {options['model']}", f"dtype {dtype}"]
    if options["quantize"]:
        group = f" (groups of {options['group_size']})" if options["quantize"] == "int4" else ""
        parts.append(f"{options['quantize']}{group}")
    if options.get("adapter"):
        parts.append(f"adapter {options['adapter']}")
    templates = sorted({r["template"] for r in results})
    if templates:
        parts.append(f"template {', '.join(templates)}")
    return " · ".join(parts)


def run(args: argparse.Namespace) -> None:
    import gc

    from phikit import evaluate
    from phikit.checkpoint import atomic_write, check_writable

    if args.out.exists() and not args.out.is_dir():
        raise PhikitError(f"--out {args.out}: is a file; eval writes a folder of reports")
    check_writable(args.out / "report.md", "--out")  # before any model runs
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    at_least(args.batch_size, 1, "--batch-size")
    if args.suite is not None:
        input_file(args.suite, "--suite")
    if args.perplexity is not None:
        if args.lm_eval:
            raise PhikitError("--perplexity goes with a prompt suite; with --lm-eval add a perplexity task (wikitext)")
        input_file(args.perplexity, "--perplexity")
    base = {
        "model": args.model,
        "adapter": args.adapter,
        "quantize": args.quantize,
        "dtype": args.dtype,
        "group_size": args.group_size or GROUP_SIZE,
    }
    if args.template and args.template not in ("chat", "auto"):  # the others are known before any model loads
        from phikit.templates import get_template

        try:
            get_template(args.template)
        except (PhikitError, ValueError) as e:
            raise PhikitError(f"--template: {e}") from None
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise PhikitError(f"--include-path {args.include_path}: no such folder of task YAMLs")
    if args.lm_eval and args.compare:
        raise PhikitError("--compare goes with a prompt suite; with --lm-eval run once per variant (its flags)")
    check_sources(base, "--model")
    if args.lm_eval:
        results = evaluate.run_lm_eval(
            args.model,
            [t for t in args.lm_eval.split(",") if t],
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            adapter=args.adapter,
            batch_size=args.batch_size,
            include_path=args.include_path,
            group_size=check_group_size(args, args.quantize),
            num_fewshot=args.num_fewshot,
            limit=args.limit,
        )
        print(evaluate.format_lm_eval(results))
        from lm_eval.utils import handle_non_serializable

        text = json.dumps(results, indent=2, default=handle_non_serializable)
        atomic_write(args.out / "lm_eval.json", lambda tmp: tmp.write_text(text))
        print(f"wrote {args.out / 'lm_eval.json'}", file=sys.stderr)
        return
    suite = evaluate.load_suite(args.suite)  # a bad suite fails before any model loads
    variants = [(args.label, base)] + [parse_compare(c, base) for c in args.compare]
    if args.group_size is not None and all(options["quantize"] != "int4" for _, options in variants):
        raise PhikitError(f"--group-size {args.group_size} is int4's; no column quantizes to int4")
    labels = [label for label, _ in variants]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise PhikitError(f"column label(s) {', '.join(twice)} given twice (--label is the model's own, default base)")
    overrides = {k: v for k, v in (("template", args.template), ("max_new_tokens", args.max_new_tokens)) if v}
    columns, perplexities, settings = {}, {}, {}
    try:  # a finished report already there is not replaced by a stopped run's (that one goes to out/stopped)
        earlier_finished = (args.out / "report.md").read_text().splitlines()[0].strip() == "# phikit eval"
    except (OSError, UnicodeDecodeError, IndexError):
        earlier_finished = False

    def write(finished: bool, out: Path) -> tuple[Path, Path]:
        data = args.perplexity.name if args.perplexity is not None else None
        title = "phikit eval" if finished else f"phikit eval (stopped: {len(columns)} of {len(variants)} columns)"
        md, html = evaluate.write_report(columns, out, title, perplexities, data, settings)
        atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(columns, indent=2)))
        if perplexities:
            measured = {"data": str(args.perplexity), "models": {k: asdict(v) for k, v in perplexities.items()}}
            atomic_write(out / "perplexity.json", lambda tmp: tmp.write_text(json.dumps(measured, indent=2)))
        return md, html

    try:
        for label, options in variants:
            print(f"[{label}] loading {options['model']} ...", file=sys.stderr)
            phi = load_model(args, **options)
            if args.perplexity is not None:  # first, so a file that is not text fails before the suite runs
                ids = evaluate.read_text(args.perplexity, phi.tokenizer)  # each model's own tokenizer: may differ
                perplexities[label] = evaluate.perplexity(phi.model, ids, progress=True)
                print(f"[{label}] perplexity {perplexities[label].perplexity:.2f}", file=sys.stderr)
            results = evaluate.run_suite(phi, suite, progress=True, **overrides)
            settings[label] = describe(options, results, phi.dtype)
            columns[label] = results
            del phi
            gc.collect()
    except BaseException:
        if columns:  # the columns that finished are kept
            perplexities = {k: v for k, v in perplexities.items() if k in columns}
            md, _ = write(False, args.out / "stopped" if earlier_finished else args.out)
            kept = f" ({args.out}'s earlier finished report kept)" if earlier_finished else ""
            print(
                f"phikit: wrote the {len(columns)} finished column(s) to {md.parent} before stopping{kept}",
                file=sys.stderr,
            )
        raise
    md, html = write(True, args.out)
    print(f"wrote {md} and {html}", file=sys.stderr)
