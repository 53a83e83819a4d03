"""Fine-tuning with LoRA / QLoRA: supervised (SFT) and preference tuning (DPO, ORPO), one recipe in named
phases driven by a YAML file (``phikit.train.recipe``); settings in ``config``, losses in ``losses``,
preference pairs in ``preference``, checkpoints and metrics in ``state``."""

from phikit.train.config import DPO_LOSSES, METHODS, TrainConfig
from phikit.train.losses import causal_lm_loss, dpo_loss, orpo_loss, sequence_logps, token_logps
from phikit.train.recipe import RECIPES, PreferenceRecipe, SFTRecipe, _finite_everywhere, finetune
from phikit.train.state import MetricsLog, checkpoints, read_trainer_state

__all__ = [
    "DPO_LOSSES",
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
    "orpo_loss",
    "read_trainer_state",
    "sequence_logps",
    "token_logps",
]
