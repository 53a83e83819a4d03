"""Write a `phikit eval` prompt suite of the rows a recipe holds out (its ``eval_fraction``).

    python recipes/heldout_suite.py runs/tiny-guanaco-cpu/recipe.yaml runs/tiny-guanaco-cpu/heldout.yaml
    phikit eval --model M --suite runs/tiny-guanaco-cpu/heldout.yaml --compare tuned:adapter=runs/.../adapter

The recipe is best the run's own ``output_dir/recipe.yaml`` (every run writes the settings it went by, its
command-line overrides included); a recipe file with the same ``--key value`` overrides as ``phikit finetune``
gives the same rows.

`phikit finetune` holds out ``eval_fraction`` of the examples with ``phikit.data.split_eval`` (by the
recipe's ``seed``); this script reads the same rows in the same order (the recipe's ``data``, ``split``,
``max_examples`` and ``skip_bad_rows``), takes the same held-out indices, and writes each held-out row's
first user turn as a prompt, so the comparison runs on prompts the fine-tune never saw. The suite gets the
recipe's template; the prompts are not copied into the repository, only into the file you name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from phikit.checkpoint import atomic_write
from phikit.data import render, rendered_rows, split_eval
from phikit.errors import PhikitError
from phikit.templates import get_template
from phikit.train import TrainConfig


def first_prompt(row: dict, fmt: str, template) -> str:
    """The user's first message of a row, without the template's markers (the suite adds them again)."""
    if fmt == "alpaca":
        extra = row.get("input") or ""
        return row["instruction"] + (f"\n{extra}" if extra else "")
    if fmt == "messages":
        return next(m["content"] for m in row["messages"] if m["role"] == "user")
    segments = render(row, fmt, template)
    user_marker, _, assistant_marker = template.prompt.partition("{prompt}")
    text = segments[0][0]
    if text.startswith(user_marker.strip()):
        text = text[len(user_marker.strip()) :]
    if assistant_marker.strip() and text.endswith(assistant_marker.strip()):
        text = text[: -len(assistant_marker.strip())]
    return text.strip()


def row_id(where: str) -> str:
    """A prompt id that finds the row again: "line-12" for file.jsonl:12, "item-3" for file.json[3]."""
    if where.endswith("]"):
        return "item-" + where.rsplit("[", 1)[1][:-1]
    return "line-" + where.rsplit(":", 1)[1]


def heldout_rows(config: TrainConfig) -> list[tuple[str, dict]]:
    """(where, row) of the rows ``phikit finetune`` holds out for this recipe."""
    if config.eval_data or config.eval_split or not 0 < config.eval_fraction < 1:
        raise PhikitError(
            "the recipe holds out no rows of its data: it needs eval_fraction and no eval_data/eval_split"
        )
    rows = [
        (where, row)
        for where, row, _ in rendered_rows(
            config.data, config.data_format, config.template, config.split, config.skip_bad_rows, config.max_examples
        )
    ]
    return split_eval(rows, config.eval_fraction, config.seed)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument(
        "recipe",
        help="a run's recipe.yaml, or a fine-tuning recipe YAML with eval_fraction (and --key value overrides)",
    )
    ap.add_argument("out", type=Path, help="the suite YAML to write")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="answer budget per prompt (default 256)")
    argv = sys.argv[1:] if argv is None else argv
    own = {"-h", "--help", "--max-new-tokens"}
    rest, extra, i = [], [], 0
    while i < len(argv):  # recipe overrides (--key value, --key=value) wherever they stand; the rest is ours
        token = argv[i]
        if token.startswith("--") and token.split("=", 1)[0] not in own:
            step = 1 if "=" in token else 2
            extra += argv[i : i + step]
        else:
            step = 2 if token == "--max-new-tokens" else 1
            rest += argv[i : i + step]
        i += step
    args = ap.parse_args(rest)
    try:
        from phikit.cli.finetune import parse_overrides

        config = TrainConfig.from_yaml(args.recipe, parse_overrides(extra))
        template = get_template(config.template)
        held = heldout_rows(config)
    except PhikitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prompts = [{"id": row_id(where), "prompt": first_prompt(row, config.data_format, template)} for where, row in held]
    suite = {"template": config.template, "max_new_tokens": args.max_new_tokens, "prompts": prompts}
    header = f"# {len(prompts)} held-out rows of {config.data} (recipe {args.recipe}, seed {config.seed})\n"
    text = header + yaml.safe_dump(suite, allow_unicode=True, sort_keys=False, width=10**6)
    atomic_write(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"{args.out}: {len(prompts)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
