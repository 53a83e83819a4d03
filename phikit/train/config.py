"""A fine-tuning recipe's settings: the YAML keys, typed and checked the same way from YAML and the command line."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from phikit.errors import PhikitError

METHODS = ("sft", "dpo", "orpo", "grpo")
DPO_LOSSES = ("sigmoid", "ipo", "robust")
GRPO_LOSSES = ("dapo", "grpo", "bnpo", "dr_grpo")
SAMPLERS = ("auto", "policy", "bf16", "fp16")
GRPO_KEYS = (
    "num_generations",
    "max_completion_length",
    "temperature",
    "reward_funcs",
    "reward_weights",
    "reward_regex",
    "epsilon",
    "scale_rewards",
    "sampler",
    "importance_sampling",
    "importance_sampling_max",
)
CORRECTIONS = ("sequence_mask", "sequence_truncate", "token_mask", "token_truncate", "off")


# transformers' TrainingArguments / TRL / PEFT names people bring along -> the recipe's own
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "seq_len",
    "max_length": "seq_len",
    "r": "lora_r",
    "lora_rank": "lora_r",
    "target_modules": "lora_targets",
    "lr_scheduler_type": "scheduler",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "optim": "optimizer",
    "model_name_or_path": "model",
    "dataset": "data",
    "dataset_name": "data",
}


def unknown_settings(unknown: list[str], known) -> str:
    """The message for recipe keys that do not exist: the nearest known key for each where every one has a close
    one, else every known key in order."""
    import difflib

    close = {u: [ALIASES[u]] if u in ALIASES else difflib.get_close_matches(u, known, 1) for u in unknown}
    if all(close.values()):
        return f"unknown setting(s) {', '.join(f'{u} (did you mean {close[u][0]}?)' for u in unknown)}"
    return f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz")


def _beside(recipe: Path, value):
    """A relative data path of a recipe: as written where it exists from the working directory (recipes
    written for the folder they are run from keep working), else beside the recipe file when it exists
    there; a file (a data suffix, or ./ ../) in neither place is an error naming both; anything else (a Hub
    dataset id) unchanged."""
    if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
        return value
    near = recipe.parent / value
    if near.exists():
        return str(near)
    if value.startswith(".") or value.endswith(DATA_SUFFIXES):  # a file, not a Hub dataset id: say where we looked
        raise PhikitError(
            f"{recipe}: data file {value} is neither in the working folder ({Path.cwd()}) nor beside the recipe "
            f"({recipe.parent}); give its path with --data (or --eval_data)"
        )
    return value


@dataclass
class TrainConfig:
    """A fine-tuning recipe. Field names are the YAML keys (and ``--key value`` CLI overrides)."""

    method: str = "sft"  # sft | dpo | orpo (preference pairs: phikit.train.preference) | grpo (prompts + rewards)
    model: str = "microsoft/phi-2"
    output_dir: str = "runs/finetune"
    data: str = "timdettmers/openassistant-guanaco"
    # text | alpaca | messages | sharegpt | prompt_completion (sft); preference (dpo, orpo); prompts (grpo);
    # empty: the method's own
    data_format: str | None = None
    columns: dict[str, str] | None = None  # the format's field -> the data's column, e.g. {prompt: question}
    template: str = "guanaco"
    split: str = "train"
    eval_data: str | None = None  # a file or dataset; with a Hub dataset, eval_split picks its split
    eval_split: str | None = None
    eval_fraction: float = 0.0  # hold this much of the training data out when there is no eval data
    responses_only: bool = False
    skip_bad_rows: bool = False
    max_examples: int | None = None
    seq_len: int = 1024
    packing: bool = True
    dtype: str = "auto"  # compute dtype of the frozen base: bf16, fp16 (with loss scaling), fp32
    device: str = "auto"
    quantize: str | None = None  # nf4 (QLoRA: bitsandbytes on CUDA, our NF4 on CPU), int8, int4
    lora: bool = True  # false: full fine-tuning (every weight trains; saves output_dir/model, an HF folder)
    fsdp: bool = False  # shard weights, gradients and optimizer state over torchrun's processes (FSDP2)
    lora_r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    # default: the attention projections of the model's family; names, full paths, "all-linear" or a regex
    lora_targets: list[str] | str | None = None
    batch_size: int = 1
    grad_accum: int = 12
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 100
    epochs: float = 3
    max_steps: int | None = None
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes, CUDA)
    gradient_checkpointing: bool = True
    eval_every: int = 50
    save_every: int = 50
    save_total_limit: int = 2
    log_every: int = 1
    report_to: list[str] | None = None  # tensorboard, wandb, mlflow, trackio (phikit.train.report); none
    seed: int = 42
    resume: bool = False
    # preference and RL tuning (TRL's names and defaults): DPO's beta (strength of the pull to the reference,
    # 0.1), ORPO's lambda (weight of the odds-ratio term, 0.1) or GRPO's KL coefficient (0: no reference);
    # the loss (DPO: sigmoid | ipo | robust; GRPO: dapo | grpo | bnpo | dr_grpo); DPO's share of pairs taken
    # as mislabelled
    beta: float | None = None
    loss_type: str | None = None
    label_smoothing: float = 0.0
    # GRPO: completions sampled per prompt, their length and temperature; reward functions (built-ins
    # answer | regex | length, or "package.module:function" called as TRL calls them), their weights, the
    # pattern of the regex reward; the ratio's clip; how rewards are scaled into advantages
    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    reward_funcs: list[str] | None = None
    reward_weights: list[float] | None = None
    reward_regex: str | None = None
    epsilon: float = 0.2
    scale_rewards: str = "group"  # group | batch | none
    # what samples the completions (phikit.train.sampler): auto (a bf16 copy of the policy, its adapter
    # merged before each step's sampling, where the policy trains in fp32 on full-precision weights; else the
    # policy) | policy | bf16 | fp16; how the loss weighs a copy's samples (TRL's vLLM correction):
    # sequence_mask | sequence_truncate | token_mask | token_truncate | off, and the weight's bound
    sampler: str = "auto"
    importance_sampling: str = "sequence_mask"
    importance_sampling_max: float = 3.0

    @property
    def pairs(self) -> bool:
        """Whether the method trains on preference pairs (chosen / rejected) rather than single texts."""
        return self.method in ("dpo", "orpo")

    @property
    def format(self) -> str:
        """The data format in effect: ``data_format``, or the method's own (text for sft, preference for pairs,
        prompts for grpo)."""
        return self.data_format or {"grpo": "prompts"}.get(self.method, "preference" if self.pairs else "text")

    def ignored(self) -> list[str]:
        """Settings given other than their defaults that this run's method does not use (GRPO's sampling and
        rewards outside grpo, DPO's label smoothing outside dpo): worth a word to whoever set them."""
        used_by = {name: ("grpo",) for name in GRPO_KEYS} | {"label_smoothing": ("dpo",)}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        out = [k for k, methods in used_by.items() if self.method not in methods and getattr(self, k) != defaults[k]]
        # beta and loss_type get the method's defaults when left empty (__post_init__): sft's are DPO's
        if self.method == "sft" and self.beta != 0.1:
            out.append("beta")
        if self.method in ("sft", "orpo") and self.loss_type != "sigmoid":
            out.append("loss_type")
        return out

    def notes(self) -> list[str]:
        """Settings that are valid but likely a mistake, each worth a line before the run: a LoRA-sized learning
        rate for full fine-tuning (the tiny CPU recipe's 2e-2 on every weight: held-out perplexity 51.6 -> 791
        in a new user's trial), and what ``ignored`` names."""
        ignored = self.ignored()
        out = [f"method {self.method} does not use {', '.join(ignored)}"] if ignored else []
        if not self.lora and self.lr > 1e-3:
            out.append(
                f"lr {self.lr:g} is a LoRA-sized rate; with lora: false every weight takes it (full fine-tuning "
                "usually takes 1e-5 to 1e-4): pass --lr 2e-5 or so"
            )
        return out

    def __post_init__(self):
        """The method's defaults where the recipe left ``beta`` and ``loss_type`` empty (TRL's)."""
        if self.beta is None:
            self.beta = 0.0 if self.method == "grpo" else 0.1
        if self.loss_type is None:
            self.loss_type = "dapo" if self.method == "grpo" else "sigmoid"

    @classmethod
    def from_yaml(
        cls, path: str | Path | None, overrides: dict | None = None, source: str | None = None
    ) -> TrainConfig:
        raw: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise PhikitError(f"{path}: recipe not found")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise PhikitError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(raw, dict):
                raise PhikitError(f"{path}: expected a mapping of settings")
            for key in ("data", "eval_data"):  # a recipe's own files, wherever it is run from (unless overridden)
                if key in raw and key not in (overrides or {}):
                    raw[key] = _beside(path, raw[key])
        raw.update(overrides or {})  # None too: "--quantize none" clears what the recipe set
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        given = source  # what the messages name: the caller's word (TrainConfig), else the recipe or "overrides"
        source = given or str(path or "overrides")
        if unknown:
            raise PhikitError(f"{source}: {unknown_settings(unknown, names)}")
        config = cls(**{name: cls.coerce(name, value, source) for name, value in raw.items()})
        config.validate(f"{path} + overrides" if path and overrides else str(path or given or "config"))
        return config

    @classmethod
    def coerce(cls, name: str, value, source: str = "config"):
        """``value`` (from YAML, or a command-line string) as the setting's type, the same way for both:
        booleans from true/false/yes/no/on/off/1/0, integers only when whole, numbers from text (YAML reads
        1e-4 as a string), ``lora_targets`` from a list, a comma list, "all-linear", a module name or a regex,
        ``columns`` from a mapping or "field=column,..."; anything else is a PhikitError naming the key."""
        kind = str({f.name: f for f in dataclasses.fields(cls)}[name].type)
        optional = "None" in kind

        def fail(expected: str):
            return PhikitError(f"{source}: {name} must be {expected}, got {value!r}")

        if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            if not optional:
                raise fail("given")
            return None
        if "str" not in kind and isinstance(value, str) and value.strip().lower() in ("none", "null"):  # a number
            raise PhikitError(f"{source}: {name} cannot be none; only optional settings (such as max_steps) clear")
        if name == "lora_targets":
            return _lora_targets(value, fail)
        if name == "report_to":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise fail("a list of trackers (tensorboard, wandb, mlflow, trackio) or none")
            items = [v.strip().lower() for v in items if v.strip() and v.strip().lower() != "none"]
            from phikit.train.report import TRACKERS

            unknown = [v for v in items if v not in TRACKERS]
            if unknown:
                raise fail(f"trackers among {', '.join(TRACKERS)} (or none)")
            return list(dict.fromkeys(items)) or None  # each once
        if name in ("reward_funcs", "reward_weights"):
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if not isinstance(items, list) or not items:
                raise fail("a list (or a comma-separated list)")
            if name == "reward_funcs":
                if not all(isinstance(v, str) and v.strip() for v in items):
                    raise fail("a list of reward names or package.module:function paths")
                return items
            try:
                weights = [float(v) for v in items if not isinstance(v, bool)]
            except (TypeError, ValueError):
                raise fail("a list of numbers") from None
            if len(weights) != len(items) or not all(math.isfinite(w) for w in weights):
                raise fail("a list of finite numbers")
            return weights
        if name == "columns":
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise fail("field=column pairs separated by commas")
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in [*value, *value.values()]):
                raise fail("a mapping from the format's fields to the data's column names")
            return value
        if name == "importance_sampling" and value is False:  # YAML reads a bare off as false
            return "off"
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise fail("true or false")
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise fail("a whole number")
            try:
                number = float(value) if isinstance(value, str) else value
            except ValueError:
                raise fail("a whole number") from None
            if not isinstance(number, (int, float)) or not math.isfinite(number) or number != int(number):
                raise fail("a whole number")
            return int(number)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise fail("a number")
            try:
                return float(value)
            except (TypeError, ValueError):
                raise fail("a number") from None
        if not isinstance(value, str):
            raise fail("text")
        return value

    def validate(self, source: str) -> None:
        finite = all(
            isinstance(v, (int, float)) and math.isfinite(v)
            for v in (self.lr, self.weight_decay, self.max_grad_norm, self.epochs, self.lora_alpha, self.eval_fraction)
        )
        checks = [
            (finite, "lr, weight_decay, max_grad_norm, epochs, lora_alpha and eval_fraction must be finite numbers"),
            (self.seq_len >= 8, "seq_len must be at least 8"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1 (or empty: from epochs)"),
            (self.save_every >= 1 and self.eval_every >= 1, "save_every and eval_every must be at least 1"),
            (self.log_every >= 1 and self.warmup_steps >= 0, "log_every must be >= 1 and warmup_steps >= 0"),
            (self.save_total_limit >= 0, "save_total_limit must be >= 0 (0: keep every checkpoint)"),
            (0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (self.lora_r >= 1 and self.lora_alpha > 0, "lora_r must be >= 1 and lora_alpha > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (not Path(self.output_dir).is_file(), f"output_dir {self.output_dir} is a file, not a folder"),
            (self.scheduler in ("linear", "cosine", "constant"), "scheduler must be linear, cosine or constant"),
            (
                self.optimizer in ("adamw", "adamw_8bit", "paged_adamw_8bit"),
                "optimizer must be adamw, adamw_8bit or paged_adamw_8bit",
            ),
            (self.dtype in ("auto", "bf16", "fp16", "fp32"), "dtype must be auto, bf16, fp16 or fp32"),
            (self.quantize in (None, "nf4", "int8", "int4"), "quantize must be nf4, int8, int4 or empty"),
            (self.epochs > 0 or self.max_steps, "set epochs > 0 or max_steps"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (self.lora or self.quantize is None, "full fine-tuning (lora: false) needs an unquantized base"),
            (
                self.lora or not (self.method == "dpo" or (self.method == "grpo" and self.beta)),
                f"{self.method}'s reference is the base with the adapter off: it needs lora (full fine-tuning "
                "would need a second copy of the model)",
            ),
            (
                self.loss_type in (GRPO_LOSSES if self.method == "grpo" else DPO_LOSSES),
                f"loss_type must be one of {', '.join(GRPO_LOSSES if self.method == 'grpo' else DPO_LOSSES)}",
            ),
            (
                math.isfinite(self.beta) and (self.beta >= 0 if self.method == "grpo" else self.beta > 0),
                "beta must be a positive number (GRPO: >= 0)",
            ),
            (self.num_generations >= 2, "num_generations must be at least 2 (advantages compare a group)"),
            (self.max_completion_length >= 1, "max_completion_length must be at least 1"),
            (math.isfinite(self.temperature) and self.temperature > 0, "temperature must be a positive number"),
            (0 < self.epsilon < 1, "epsilon must be in (0, 1)"),
            (self.scale_rewards in ("group", "batch", "none"), "scale_rewards must be group, batch or none"),
            (self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}"),
            (
                self.importance_sampling in CORRECTIONS,
                f"importance_sampling must be one of {', '.join(CORRECTIONS)}, got {self.importance_sampling!r}",
            ),
            (
                math.isfinite(self.importance_sampling_max) and self.importance_sampling_max >= 1,
                f"importance_sampling_max must be a finite number >= 1, got {self.importance_sampling_max}",
            ),
            (self.method != "grpo" or bool(self.reward_funcs), "method grpo needs reward_funcs"),
            (
                self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs or []),
                "reward_weights must have one weight per reward function",
            ),
            (0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)"),
            (
                (self.format == "preference") == self.pairs and (self.format == "prompts") == (self.method == "grpo"),
                f"method {self.method} trains on "
                + {"dpo": "preference pairs", "orpo": "preference pairs", "grpo": "prompts"}.get(self.method, "texts")
                + f", not data_format {self.format} (leave data_format empty for the method's own)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PhikitError(f"{source}: {message}")


def _lora_targets(value, fail) -> list[str] | str:
    """LoRA targets as PEFT takes them: a list of module names or paths; one string that is "all-linear" or
    a regex (matched against whole module names); a comma list or a single module name as a list."""
    from phikit.lora import KNOWN_TARGETS

    if isinstance(value, str):
        text = value.strip()
        if "," in text:
            return [t.strip() for t in text.split(",") if t.strip()]
        if re.fullmatch(r"[\w.]+", text) and text.rsplit(".", 1)[-1] in KNOWN_TARGETS:  # a name or a path
            return [text]
        return text  # all-linear, or a regex
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise fail("a list of module names, 'all-linear' or a regular expression")
