"""LoRA / QLoRA supervised fine-tuning: one training loop driven by a YAML recipe.

Checkpoints (adapter + optimizer, scheduler, loss-scaler and RNG states + data position) are written
atomically every ``save_every`` steps; ``resume`` continues from the newest one to the same result as an
uninterrupted run, because the data order depends only on (seed, epoch) and the RNG states are restored.
Under ``torchrun --nproc-per-node N`` the same loop runs DDP (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from phikit.errors import PhikitError
from phikit.quantize import QuantizedLinear


@dataclass
class TrainConfig:
    """A fine-tuning recipe. Field names are the YAML keys (and ``--key value`` CLI overrides)."""

    model: str = "microsoft/phi-2"
    output_dir: str = "runs/finetune"
    data: str = "timdettmers/openassistant-guanaco"
    data_format: str = "text"  # text | alpaca | messages | sharegpt | prompt_completion
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
    seed: int = 42
    resume: bool = False

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
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
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise PhikitError(
                f"{path or 'overrides'}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        source = str(path or "overrides")
        config = cls(**{name: cls.coerce(name, value, source) for name, value in raw.items()})
        config.validate(str(path or "config"))
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
        if name == "lora_targets":
            return _lora_targets(value, fail)
        if name == "columns":
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise fail("field=column pairs separated by commas")
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in [*value, *value.values()]):
                raise fail("a mapping from the format's fields to the data's column names")
            return value
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


# ---- distributed helpers ----


def _world() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (one small all-reduce under DDP): a rank that stopped alone
    would leave the others waiting for it in the next collective, for ever."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def _setup_distributed(device: torch.device) -> None:
    if _world()[1] > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


# ---- pieces of the loop ----


def lr_lambda(config: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.scheduler == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        if config.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress)

    return factor


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if device.type != "cuda":
        raise PhikitError(f"optimizer {config.optimizer} needs bitsandbytes on a CUDA GPU; use adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if config.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def causal_lm_loss(model, ids: torch.Tensor, labels: torch.Tensor, head=None) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions (and their count). A batch without any (with
    ``responses_only``, a packed sequence can be all prompt: a long user turn) has loss 0, not NaN.

    With a frozen head (LoRA's usual case) the head is applied by ``head_cross_entropy`` to the labelled
    positions only, a chunk at a time; otherwise (a trained ``lm_head``) through the model as usual. The
    labels are shifted, not the logits, so the full logits are not copied. ``head``: ``frozen_head``'s
    answer, when the caller keeps it across steps (a quantized head is then dequantized once)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    count = int((targets != -100).sum())
    head = head or frozen_head(unwrap(model).lm_head)
    if head is None:
        logits = model(ids)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100, reduction="sum"
        )
        return loss / max(count, 1), count
    hidden = model(ids, hidden_only=True)
    rows = (targets != -100).nonzero().squeeze(1)
    loss = head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), *head, targets, rows)
    return loss / max(count, 1), count


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def frozen_head(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of an output layer that trains nothing (a plain frozen Linear, or a quantized one,
    dequantized), else None."""
    if isinstance(head, QuantizedLinear):
        weight = head.dequantized()
        return weight if head.bias is None else weight.to(head.bias.dtype), head.bias
    if type(head).__name__ == "Linear4bit":  # bitsandbytes' NF4 head (CUDA): dequantized once, as ours
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(head.weight.data, head.weight.quant_state)
        return weight, head.bias
    if type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return head.weight, head.bias
    return None


def head_cross_entropy(hidden, weight, bias, targets, rows, chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """Summed cross-entropy of ``hidden[rows] @ weight.T + bias`` against ``targets[rows]``.

    Written by hand because the (positions, vocab) logits are the largest tensors of LoRA training on a
    small model (1,024 x 51,200 fp32 = 210 MB per sequence, held for backward, plus the softmax's): here
    they exist a chunk of ``chunk_bytes`` at a time, unlabelled positions (prompts, with ``responses_only``)
    skip the head entirely, and the gradient for ``hidden`` is computed in the same pass, so backward
    costs no second head matmul. The head itself gets no gradient (it is frozen)."""
    return _HeadCrossEntropy.apply(
        hidden, weight.detach(), None if bias is None else bias.detach(), targets, rows, chunk_bytes
    )


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, chunk_bytes):
        want_grad = ctx.needs_input_grad[0]
        # the head's own dtype where it is 16-bit (as autocast would run it), else the hidden states'; the
        # softmax in fp32; autocast off so that every dtype here is the one written
        dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if want_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(rows), chunk):
                index = rows[start : start + chunk]
                x, t = hidden.index_select(0, index).to(dtype), targets.index_select(0, index)
                logp = torch.log_softmax(F.linear(x, weight, bias).float(), dim=-1)
                total -= logp.gather(1, t[:, None]).sum()
                if want_grad:  # d(sum of CE)/d logits = softmax - one-hot
                    probs = logp.exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    grad.index_copy_(0, index, (probs.to(dtype) @ weight).to(grad.dtype))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None, None, None


@torch.no_grad()
def evaluate_loss(model, batches, pad_id: int, device: torch.device, autocast, head=None) -> float:
    from phikit.data import collate

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        ids, labels = (t.to(device) for t in collate(batch, pad_id))
        with autocast():
            loss, n = causal_lm_loss(model, ids, labels, head)
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, scaler, cursor: dict, config: TrainConfig, limit: int
) -> Path:
    """checkpoint-<step>/ with the adapter and everything needed to resume, written as a whole and renamed.
    ``trainer_state.pt`` holds only tensors and plain values, so resuming reads it with
    ``torch.load(weights_only=True)``: a file planted in a checkpoint folder cannot run code."""
    from phikit.checkpoint import replace_folder, user_mode
    from phikit.lora import save_adapter

    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".checkpoint-{step}.tmp-"))
    user_mode(tmp, directory=True)
    try:
        save_adapter(model, tmp, base_model=config.model)
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(),
                "cursor": cursor,
                "config": dataclasses.asdict(config),
            },
            tmp / "trainer_state.pt",
        )
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(out)[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


RESUME_SETTINGS = ("model", "quantize", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def _check_resume(checkpoint: Path, config: TrainConfig) -> None:
    """``--resume`` continues the run a checkpoint was saved by: settings that shape the adapter or what it
    trains on top of must be the checkpoint's, else a PhikitError naming each that differs."""
    saved = read_trainer_state(checkpoint / "trainer_state.pt").get("config", {})
    differ = [
        f"{key} {saved[key]!r} there, {getattr(config, key)!r} now"
        for key in RESUME_SETTINGS
        if key in saved and saved[key] != getattr(config, key)
    ]
    if differ:
        raise PhikitError(
            f"--resume: {checkpoint} was trained with other settings ({'; '.join(differ)}); resume with its "
            "settings or start a new output_dir"
        )


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state, unpickled with ``weights_only=True`` (tensors and plain values only)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PhikitError(
            f"{path}: refusing to resume from it: it is corrupt or holds more than tensors and plain values "
            f"({reason}); remove that checkpoint folder to resume from an earlier one"
        ) from None


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint-<step> folders in step order (``checkpoint-4.bak`` and the like are not)."""
    found = [
        p
        for p in out.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir() and (p / "trainer_state.pt").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class MetricsLog:
    """metrics.jsonl, plus TensorBoard when it is installed."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None = None):
        """A fresh run starts a new file; a resumed one keeps the lines up to its checkpoint's step, so
        every step appears once (the killed run may have logged steps past its last checkpoint)."""
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled:
            kept = []
            if resume_step is not None and self.path.is_file():
                for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line + "\n")
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue
            from phikit.checkpoint import atomic_write

            atomic_write(self.path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---- the loop ----


def finetune(config: TrainConfig, progress: bool = True) -> Path:
    """Run a fine-tuning recipe; returns the folder of the final adapter (``output_dir/adapter``)."""
    from phikit.api import load
    from phikit.checkpoint import replace_folder, resolve_device, resolve_model_path
    from phikit.data import collate, epoch_batches, load_examples, pack_examples, split_eval, truncate_examples
    from phikit.lora import LoRAConfig, inject_lora, load_adapter, save_adapter, trainable_parameters
    from phikit.models import family_of
    from phikit.tokenizer import Tokenizer

    rank, world, local_rank = _world()
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    _setup_distributed(device)
    main_process = rank == 0
    out = Path(config.output_dir)
    existing = checkpoints(out) if out.exists() else []
    if main_process and out.exists() and not config.resume and (existing or (out / "adapter").exists()):
        how = "pass --resume to continue it, or " if existing else "it finished; "
        raise PhikitError(f"{out} already holds a run; {how}choose another output_dir")
    if config.resume and not existing:
        raise PhikitError(f"--resume: no checkpoint-* folder in {out}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    if config.resume:
        _check_resume(existing[-1], config)
    # the data is read and checked (with the checkpoint's tokenizer) before any weight is loaded: a bad row
    # costs seconds, not a model load
    folder = resolve_model_path(config.model)
    tokenizer = Tokenizer(folder)
    examples, skipped = load_examples(
        config.data,
        tokenizer,
        config.data_format,
        config.template,
        config.split,
        config.responses_only,
        config.skip_bad_rows,
        config.max_examples,
        config.columns,
    )
    if config.eval_data or config.eval_split:
        eval_examples, _ = load_examples(
            config.eval_data or config.data,
            tokenizer,
            config.data_format,
            config.template,
            config.eval_split or "test",
            config.responses_only,
            config.skip_bad_rows,
            columns=config.columns,
        )
    else:
        examples, eval_examples = split_eval(examples, config.eval_fraction, config.seed)

    dtype = config.dtype
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    phi = load(folder, dtype=dtype, device=device, quantize=config.quantize, progress=main_process and progress)
    model = phi.model
    targets = config.lora_targets or list(family_of(model.config).attention_names)
    lora_config = LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, targets)
    if config.resume:
        load_adapter(model, existing[-1])
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
    else:
        inject_lora(model, lora_config)
    model.model.gradient_checkpointing = config.gradient_checkpointing
    model.train()

    shape = (
        (lambda ex: pack_examples(ex, config.seq_len, tokenizer.pad_id))
        if config.packing
        else (lambda ex: truncate_examples(ex, config.seq_len))
    )
    train_set, eval_set = shape(examples), shape(eval_examples) if eval_examples else []
    eval_batches = [eval_set[i : i + config.batch_size] for i in range(0, len(eval_set), config.batch_size)]
    per_epoch = len(epoch_batches(train_set, config.batch_size, config.seed, 0, rank, world)) // config.grad_accum
    if per_epoch == 0:
        raise PhikitError(
            f"{config.data}: too little data for one optimizer step "
            f"({len(train_set)} sequences, batch {config.batch_size} x grad_accum {config.grad_accum})"
        )
    total_steps = config.max_steps or math.ceil(per_epoch * config.epochs)

    params = trainable_parameters(model)
    optimizer = make_optimizer(config, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    fp16 = dtype == "fp16"
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None and device.type == "cuda")

    step, cursor = 0, {"epoch": 0, "batch": 0}
    if config.resume:
        state = read_trainer_state(existing[-1] / "trainer_state.pt")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step, cursor = state["step"], state["cursor"]
        _set_rng_state(state["rng"])
    head = frozen_head(model.lm_head)  # a frozen head's weights, dequantized once for the whole run
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    log = MetricsLog(out, main_process, step if config.resume else None)
    if main_process and skipped:
        print(f"skipped {skipped} malformed row(s) of {config.data}")
    bar = tqdm(
        total=total_steps, initial=step, desc="fine-tuning", unit="step", disable=not (main_process and progress)
    )
    batches = epoch_batches(train_set, config.batch_size, config.seed, cursor["epoch"], rank, world)
    tokens_seen, started = 0, time.perf_counter()
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            if cursor["batch"] >= len(batches):
                cursor = {"epoch": cursor["epoch"] + 1, "batch": 0}
                batches = epoch_batches(train_set, config.batch_size, config.seed, cursor["epoch"], rank, world)
            ids, labels = (t.to(device) for t in collate(batches[cursor["batch"]], tokenizer.pad_id))
            cursor["batch"] += 1
            sync = world == 1 or micro == config.grad_accum - 1
            context = net.no_sync() if not sync and world > 1 else contextlib.nullcontext()
            with context:
                with autocast():
                    loss, n = causal_lm_loss(net, ids, labels, head)
                if not _finite_everywhere(loss, world):  # every rank stops together: none waits at a barrier
                    bar.close()
                    last = checkpoints(out)
                    raise PhikitError(
                        f"loss became {loss.item() if not torch.isfinite(loss) else 'non-finite on another rank'} "
                        f"at step {step + 1}; lower lr{' or use bf16 instead of fp16' if fp16 else ''}; last "
                        f"checkpoint: {last[-1] if last else 'none'}"
                    )
                scaled = loss / config.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.item() / config.grad_accum
            tokens_seen += int(ids.numel())
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm else None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - started
        rate = tokens_seen * world / elapsed if elapsed > 0 else 0.0
        lr = scheduler.get_last_lr()[0]
        bar.update()
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        if step % config.log_every == 0 or step == total_steps:
            log.write(
                step,
                loss=loss_sum,
                lr=lr,
                tokens_per_s=rate,
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                epoch=cursor["epoch"],
            )
        if eval_batches and (step % config.eval_every == 0 or step == total_steps):
            eval_loss = evaluate_loss(model, eval_batches, tokenizer.pad_id, device, autocast, head)
            log.write(step, eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50)))
            bar.write(f"step {step}: eval loss {eval_loss:.4f}")
        if main_process and (step % config.save_every == 0 or step == total_steps) and step < total_steps:
            save_checkpoint(
                out, step, model, optimizer, scheduler, scaler, dict(cursor), config, config.save_total_limit
            )
        if world > 1:
            torch.distributed.barrier()
    bar.close()
    log.close()
    final = out / "adapter"
    if main_process:
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp, base_model=config.model)
        replace_folder(tmp, final)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final
