"""Fine-tuning with LoRA / QLoRA: supervised (SFT), preference tuning (DPO, ORPO) and RL with verifiable
rewards (GRPO), one recipe in named phases driven by a YAML file (``phikit.train.recipe``); settings in
``config``, losses in ``losses``, preference pairs in ``preference``, GRPO's prompts and samples in ``grpo``
and its rewards in ``rewards``, checkpoints and metrics in ``state``."""

import contextlib
import dataclasses
import numbers
import os
from pathlib import Path

from phikit.train.config import DPO_LOSSES, GRPO_LOSSES, METHODS, TrainConfig
from phikit.train.grpo import GRPORecipe
from phikit.train.losses import (
    causal_lm_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    orpo_loss,
    sequence_logps,
    token_logps,
)
from phikit.train.preference import PreferenceRecipe
from phikit.train.recipe import SFTRecipe, _finite_everywhere
from phikit.train.state import MetricsLog, checkpoints, read_trainer_state

RECIPES = {"sft": SFTRecipe, "dpo": PreferenceRecipe, "orpo": PreferenceRecipe, "grpo": GRPORecipe}


def _plain(value):
    """A value given in Python as a recipe would hold it: paths as text, tuples as lists, numpy's numbers
    as Python's."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def finetune(config: TrainConfig, progress: bool = True):
    """Run a fine-tuning recipe (its ``method``'s); returns the folder of the final adapter
    (``output_dir/adapter``) or, with full fine-tuning, model (``output_dir/model``). A run that fails
    before writing anything leaves no output_dir behind where there was none (only its lock file was in it)."""
    # a config built in Python (TrainConfig(...)) is read as a recipe is: types coerced, values checked
    given = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    config = TrainConfig.from_yaml(None, given, source="TrainConfig")
    out = Path(config.output_dir)
    existed = out.exists()
    try:
        return RECIPES[config.method](config, progress).train()
    except BaseException:
        if not existed and out.is_dir() and [p.name for p in out.iterdir()] == [".phikit.lock"]:
            with contextlib.suppress(OSError):
                (out / ".phikit.lock").unlink()
                out.rmdir()
        raise


__all__ = [
    "DPO_LOSSES",
    "GRPO_LOSSES",
    "GRPORecipe",
    "METHODS",
    "RECIPES",
    "MetricsLog",
    "PreferenceRecipe",
    "SFTRecipe",
    "TrainConfig",
    "_finite_everywhere",
    "causal_lm_loss",
    "checkpoints",
    "dpo_loss",
    "finetune",
    "group_advantages",
    "grpo_loss",
    "orpo_loss",
    "read_trainer_state",
    "sequence_logps",
    "token_logps",
]
