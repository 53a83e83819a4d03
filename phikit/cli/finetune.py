"""``phikit finetune``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from phikit.errors import PhikitError


def add_parser(sub) -> None:
    f = sub.add_parser(
        "finetune",
        help="LoRA/QLoRA fine-tuning from a YAML recipe: supervised (sft), DPO, ORPO or GRPO",
        description="Fine-tune with LoRA (QLoRA with quantize: nf4) from a recipe; any recipe key "
        "can be overridden on the command line, e.g. --lr 2e-4 --max_steps 100. method: sft (texts, the "
        "default), dpo or orpo (preference pairs {prompt, chosen, rejected}, or HH-RLHF's {chosen, rejected} "
        "transcripts; beta, loss_type sigmoid|ipo|robust, label_smoothing as TRL's) or grpo (prompts, "
        "num_generations sampled completions each, reward_funcs: answer, regex, length or package.module:function; "
        "sampler auto|policy|bf16|fp16: what samples them, by default a bf16 copy of an fp32 policy, whose "
        "samples importance_sampling sequence_mask|sequence_truncate|token_mask|token_truncate|off weighs, "
        "bound importance_sampling_max). --key none clears an optional setting (max_steps, eval_data ...). "
        "Writes checkpoints, metrics.jsonl and the final PEFT-format adapter to "
        "output_dir/adapter (--lora false: every weight trains, output_dir/model is an HF folder). Runs DDP under "
        "torchrun --nproc-per-node N, or FSDP2 with --fsdp (gloo on CPU, NCCL on GPUs).",
        epilog="Recipes: recipes/phi2-qlora-guanaco.yaml (the reference QLoRA run), "
        "recipes/tiny-cpu.yaml (a small CPU run), recipes/tiny-phi3-chat-cpu.yaml (a Phi-3-family model on "
        "chat messages in its own chat template), recipes/tiny-guanaco-cpu.yaml and tiny-alpaca-cpu.yaml, "
        "recipes/tiny-dpo-cpu.yaml (DPO on a CPU), recipes/tiny-grpo-cpu.yaml (GRPO on arithmetic). "
        f"Recipe keys and their defaults (docs/finetune.md's table says what each does): {recipe_keys()}.",
    )
    f.add_argument("--config", "-c", type=Path, help="recipe YAML (see recipes/)")
    f.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    f.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2) instead "
        "of copying the model into each (DDP); with --lora false, full fine-tuning",
    )
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    f.set_defaults(func=run)


def recipe_keys() -> str:
    """Every recipe key with its default, for --help: "method sft, model microsoft/phi-2, ..."."""
    import dataclasses

    from phikit.train.config import TrainConfig

    def shown(value) -> str:
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    per_method = ("beta", "loss_type")  # empty: the method's own (TrainConfig.__post_init__)
    return ", ".join(
        f"{f.name} {'(per method)' if f.name in per_method else shown(f.default)}"
        for f in dataclasses.fields(TrainConfig)
    )


def run(args: argparse.Namespace) -> None:
    from phikit.train import TrainConfig, finetune

    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = True
    if args.fsdp:
        overrides["fsdp"] = True
    config = TrainConfig.from_yaml(args.config, overrides)
    if os.environ.get("RANK", "0") == "0":
        for note in config.notes():
            print(f"phikit: note: {note}", file=sys.stderr)
    try:
        final = finetune(config, progress=not args.quiet)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{interrupted_note(Path(config.output_dir))}", file=sys.stderr)
        raise
    except Exception as e:
        from phikit.cli import disk_full

        if disk_full(e) and os.environ.get("RANK", "0") == "0":  # the checkpoints written so far are whole
            print(interrupted_note(Path(config.output_dir)), file=sys.stderr)
        raise
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first process wrote it
        print(f"{'adapter' if final.name == 'adapter' else 'model'} written to {final}", file=sys.stderr)
        out = Path(config.output_dir)
        print(f"metrics: {out / 'metrics.jsonl'}, their charts: {out / 'dashboard.html'}", file=sys.stderr)


def interrupted_note(out: Path) -> str:
    """What an interrupted run left and how to go on from it (``train.state.how_to_go_on``), as a message."""
    from phikit.train.state import how_to_go_on

    return f"phikit: {how_to_go_on(out)}"


def parse_overrides(tokens: list[str]) -> dict:
    """``--lr 2e-4 --lora_targets q_proj,v_proj --packing false`` -> typed recipe overrides."""
    import dataclasses

    from phikit.train import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key.startswith("--") and "=" in key:  # --lr=2e-4
            key, value, step = *key.split("=", 1), 1
        elif key.startswith("--") and i + 1 < len(tokens):
            value, step = tokens[i + 1], 2
        else:
            raise PhikitError(f"recipe overrides come in pairs like --lr 2e-4; got {' '.join(tokens[i:])!r}")
        name = key[2:].replace("-", "_")
        if name not in fields:
            from phikit.train.config import unknown_settings

            raise PhikitError(f"--{name}: {unknown_settings([name], fields)}")
        out[name] = coerce(fields[name], value)
        i += step
    return out


def coerce(f, text: str):
    """A command-line string as the recipe field's type, exactly as a YAML value is read."""
    from phikit.train import TrainConfig

    return TrainConfig.coerce(f.name, text, f"--{f.name}")
