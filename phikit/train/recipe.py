"""Fine-tuning as a recipe in named phases (torchtune's recipes are the model): ``setup`` (output folder,
processes, seeds), ``setup_data`` (read and check the data before any weight loads), ``setup_model`` (the base,
quantized or not, with a LoRA adapter), ``setup_optimizer``, ``resume``, ``train_step``, ``evaluate``,
``save_checkpoint`` and ``train``, the loop that calls them. SFT, DPO, ORPO and GRPO share every phase but their
data and their loss: a method is a subclass that gives ``setup_data``, ``collate`` and ``loss``
(``phikit.train.preference.PreferenceRecipe``, ``phikit.train.grpo.GRPORecipe``).

Checkpoints are written atomically every ``save_every`` steps; ``resume`` continues from the newest one to the
same result as an uninterrupted run, because the data order depends only on (seed, epoch) and the RNG states
are restored. Under ``torchrun --nproc-per-node N`` the same loop runs DDP (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from phikit.errors import PhikitError
from phikit.train.config import TrainConfig
from phikit.train.losses import causal_lm_loss, frozen_head
from phikit.train.state import (
    PATH_SETTINGS,
    MetricsLog,
    _check_resume,
    _set_rng_state,
    checkpoints,
    how_to_go_on,
    read_trainer_state,
    save_checkpoint,
    whole_path,
)

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


# ---- schedule and optimizer ----


def _lock_run(out: Path):
    """Hold ``out/.phikit.lock`` for the run (released when the process ends, however it ends): a second run
    into the same folder, or a --resume of a run still going, is refused instead of interleaving its
    checkpoints and metrics with this one's. None where the system has no advisory locks."""
    try:
        import fcntl
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".phikit.lock", "a")  # noqa: SIM115 - held open for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise PhikitError(f"{out} is in use by another run; wait for it to end, or choose another output_dir") from None
    return handle


PROGRESS_LINE_S = 30  # where stderr is not a terminal (no bar): a line of progress at most this often


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


def _mean(rows: list[dict]) -> dict:
    """The mean of each metric over micro-batches."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


# ---- the recipe ----


class SFTRecipe:
    """Supervised fine-tuning: next-token cross-entropy on (packed) texts. The base of the other methods."""

    def __init__(self, config: TrainConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.rank, self.world, self.sharded = 0, 1, False  # until setup() and setup_model() say otherwise
        self.step = 0
        self.cursor = {"epoch": 0, "batch": 0}

    # -- phases --

    def setup(self) -> None:
        """Device, processes, the output folder (a finished or running run is never overwritten), seeds."""
        from phikit.checkpoint import resolve_device

        config = self.config
        self.rank, self.world, local_rank = _world()
        device = resolve_device(config.device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.main_process = self.rank == 0
        self.out = out = Path(config.output_dir)
        if self.main_process:
            from phikit.checkpoint import check_writable

            check_writable(out / "metrics.jsonl", "output_dir")  # a read-only place: one line, before anything
            self.lock = _lock_run(out)
        self.existing = existing = checkpoints(out) if out.exists() else []
        if (
            self.main_process
            and out.exists()
            and not config.resume
            and (existing or (out / "adapter").exists() or (out / "model").exists())
        ):
            how = "pass --resume to continue it, or " if existing else "it finished; "
            raise PhikitError(f"{out} already holds a run; {how}choose another output_dir")
        if config.resume and not existing:
            raise PhikitError(f"--resume: no checkpoint-* folder in {out}")
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if config.resume:
            changed = _check_resume(existing[-1], config)
            if changed and self.main_process:
                print(
                    f"phikit: note: resuming with settings other than {existing[-1].name}'s: {'; '.join(changed)}",
                    file=sys.stderr,
                )
        if self.main_process and config.report_to:  # a tracker that is not installed fails now, not after loading
            from phikit.train.report import check_trackers

            check_trackers(config.report_to)

    def read_data(self, load) -> tuple[list, list]:
        """(training items, held-out items): ``load(source, split, limit)`` -> (items, malformed rows skipped)
        reads the data (``self.skipped`` keeps its count); the held-out ones are ``eval_data``/``eval_split``'s,
        else ``eval_fraction`` of the training data. Every method reads its data so."""
        from phikit.data import FORMATS, check_columns, split_eval

        config = self.config
        fields = FORMATS.get(config.format) if config.method == "sft" else None  # the others read their own
        check_columns(config.data, config.split, config.columns, fields)
        items, self.skipped = load(config.data, config.split, config.max_examples)
        if config.eval_data or config.eval_split:
            return items, load(config.eval_data or config.data, config.eval_split or "test", None)[0]
        return split_eval(items, config.eval_fraction, config.seed)

    def setup_data(self) -> None:
        """Training and evaluation sequences, read and checked with the checkpoint's tokenizer before any
        weight is loaded: a bad row costs seconds, not a model load."""
        from phikit.data import load_examples, pack_examples, truncate_examples

        config = self.config

        def load(source, split, limit):
            return load_examples(
                source,
                self.tokenizer,
                config.format,
                config.template,
                split,
                config.responses_only,
                config.skip_bad_rows,
                limit,
                config.columns,
            )

        examples, held = self.read_data(load)
        pad = self.tokenizer.pad_id
        if config.packing:
            self.train_set, self.eval_set = (
                pack_examples(examples, config.seq_len, pad),
                (pack_examples(held, config.seq_len, pad) if held else []),
            )
        else:
            self.train_set, self.eval_set = (
                truncate_examples(examples, config.seq_len),
                truncate_examples(held, config.seq_len),
            )

    def setup_model(self) -> None:
        """The base model (quantized as asked) with a fresh LoRA adapter, or the checkpoint's when resuming;
        with ``lora: false`` every weight trains (resumed from the checkpoint's). Then wrapped for the
        processes: FSDP2 shards (``fsdp``) or DDP."""
        from phikit.api import load
        from phikit.lora import LoRAConfig, inject_lora, load_adapter
        from phikit.models import family_of

        config = self.config
        dtype = config.dtype
        if dtype == "auto":
            cuda = self.device.type == "cuda"
            dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        self.dtype = dtype
        weights = self.existing[-1] if config.resume and not config.lora else self.folder
        phi = load(
            weights,
            dtype=dtype,
            device=self.device,
            quantize=config.quantize,
            progress=self.main_process and self.progress,
        )
        model = self.model = phi.model
        targets = config.lora_targets or list(family_of(model.config).attention_names)
        if not config.lora:
            for p in model.parameters():
                p.requires_grad_(p.is_floating_point())
        elif config.resume:
            load_adapter(model, self.existing[-1])
            for name, p in model.named_parameters():
                p.requires_grad_(".lora_" in name)
        else:
            inject_lora(model, LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, targets))
        model.model.gradient_checkpointing = config.gradient_checkpointing
        model.train()
        self.head = frozen_head(model.lm_head)  # a frozen head's weights, dequantized once for the whole run
        self.net = model
        self.sharded = config.fsdp and self.world > 1
        if self.sharded:
            self.shard()
        elif self.world > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
        self.amp_dtype = amp_dtype if self.device.type == "cuda" else None

    def shard(self) -> None:
        """FSDP2 (``fully_shard``): each decoder layer, then the rest, sharded over the processes, so each holds
        about 1/N of the weights, gradients and optimizer state, and gathers a layer's weights only while it
        runs. A frozen output layer (LoRA's case) stays whole on every process: the loss applies it outside the
        model's forward, a chunk of positions at a time."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self.config.quantize:
            raise PhikitError("fsdp shards full-precision weights; quantize (QLoRA) runs with DDP instead")
        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        head = self.model.lm_head
        ignored = set(head.parameters()) if self.head is not None else None
        fully_shard(self.model, mesh=mesh, ignored_params=ignored)

    def full_state(self) -> dict:
        """The model's whole state dict: gathered onto the first process (the others get an empty one) where
        it is sharded, which every process must call together."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def memory(self) -> dict:
        """MB of parameters and of optimizer state this process holds (the largest over processes)."""
        from torch.distributed.tensor import DTensor

        def local(t):
            t = t.to_local() if isinstance(t, DTensor) else t
            return t.numel() * t.element_size()

        params = sum(local(p) for p in {id(p): p for p in self.model.parameters()}.values())
        state = sum(local(v) for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        sizes = torch.tensor([params, state], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
        return {"memory/params_mb": float(sizes[0]) / 1e6, "memory/optimizer_mb": float(sizes[1]) / 1e6}

    def setup_optimizer(self) -> None:
        """AdamW (or bitsandbytes' 8-bit ones on CUDA) over the adapter, the schedule over the run's steps,
        and a loss scaler with fp16."""
        from phikit.data import epoch_batches
        from phikit.lora import trainable_parameters

        config = self.config
        per_epoch = len(epoch_batches(self.train_set, config.batch_size, config.seed, 0, self.rank, self.world))
        per_epoch //= config.grad_accum
        if per_epoch == 0:
            raise PhikitError(
                f"{config.data}: too little data for one optimizer step "
                f"({len(self.train_set)} {self.unit}, batch {config.batch_size} x grad_accum {config.grad_accum})"
            )
        self.total_steps = config.max_steps or math.ceil(per_epoch * config.epochs)
        self.params = trainable_parameters(self.model)
        self.optimizer = make_optimizer(config, self.params, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None

    def resume(self) -> None:
        """Optimizer, schedule, scaler, RNG and data position from the newest checkpoint."""
        state = read_trainer_state(self.existing[-1] / "trainer_state.pt")
        if self.sharded:  # saved whole (by parameter name): each process takes its shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.cursor = state["step"], state["cursor"]
        _set_rng_state(state["rng"])

    def next_batches(self) -> list:
        """The step's ``grad_accum`` micro-batches, collated (in order of the epoch's shuffled batches)."""
        from phikit.data import epoch_batches

        config = self.config
        out = []
        for _ in range(config.grad_accum):
            if self.cursor["batch"] >= len(self.batches):
                self.cursor = {"epoch": self.cursor["epoch"] + 1, "batch": 0}
                self.batches = epoch_batches(
                    self.train_set, config.batch_size, config.seed, self.cursor["epoch"], self.rank, self.world
                )
            out.append(self.collate(self.batches[self.cursor["batch"]]))
            self.cursor["batch"] += 1
        return out

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; the step's metrics (means over them)."""
        config, world = self.config, self.world
        batches = self.next_batches()
        self.optimizer.zero_grad(set_to_none=True)
        rows = []
        for micro, batch in enumerate(batches):
            sync = world == 1 or micro == config.grad_accum - 1 or self.sharded
            context = self.net.no_sync() if not sync else contextlib.nullcontext()
            with context:
                with self.autocast():
                    loss, metrics, _ = self.loss(self.net, batch)
                if not _finite_everywhere(loss, world):  # every rank stops together: none waits at a barrier
                    self.bar.close()
                    last = checkpoints(self.out)
                    value = loss.item() if not torch.isfinite(loss) else "non-finite on another rank"
                    fp16 = " or use bf16 instead of fp16" if self.dtype == "fp16" else ""
                    raise PhikitError(
                        f"loss became {value} at step {self.step + 1}; lower lr{fp16}; last checkpoint: "
                        f"{last[-1] if last else 'none'}"
                    )
                scaled = loss / config.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            rows.append({"loss": loss.item(), **metrics})
            self.tokens_seen += self.tokens(batch)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm) if config.max_grad_norm else None
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {**_mean(rows), "grad_norm": float(grad_norm) if grad_norm is not None else None}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The method's loss and metrics over the held-out data, weighted by each batch's size."""
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = {}
        weight = 0
        for batch in self.eval_batches:
            tensors = self.collate(batch)
            with self.autocast():
                loss, metrics, n = self.loss(self.model, tensors)
            for k, v in {"loss": float(loss), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v * n
            weight += n
        self.model.train(was_training)
        return {f"eval_{k}": v / max(weight, 1) for k, v in totals.items()}

    def save_checkpoint(self) -> Path | None:
        """checkpoint-<step>/ (phikit.train.state.save_checkpoint): the adapter or, with full fine-tuning, the
        whole model as an HF folder, and the trainer's state; every process calls it (a sharded model is
        gathered first), the first one writes."""
        model_state = self.full_state()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        else:
            optimizer_state = self.optimizer.state_dict()
        if not self.main_process:
            return None
        trainer_state = {
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "cursor": dict(self.cursor),
            "config": dataclasses.asdict(self.config),
        }
        return save_checkpoint(
            self.out,
            self.step,
            lambda folder: self.write_weights(folder, model_state),
            trainer_state,
            self.config.save_total_limit,
        )

    def write_weights(self, folder: Path, state: dict) -> None:
        """The trained weights into ``folder``: a PEFT adapter, or (full fine-tuning) an HF checkpoint folder."""
        from phikit.checkpoint import save_checkpoint as save_hf
        from phikit.lora import save_adapter

        if self.config.lora:
            # a local folder as an absolute path: merge finds it from anywhere
            save_adapter(self.model, folder, base_model=whole_path(self.config.model), state=state)
            return
        if getattr(self.model.config, "tie_word_embeddings", False):
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # transformers ties it on load
        save_hf(folder, state, self.model.config.to_hf_dict(), self.folder, overwrite=True)

    def save_final(self) -> Path:
        """output_dir/adapter (PEFT's format) or, with full fine-tuning, output_dir/model (an HF folder),
        written whole and renamed; every process calls it."""
        from phikit.checkpoint import write_folder

        state = self.full_state()
        final = self.out / ("adapter" if self.config.lora else "model")
        if self.main_process:
            write_folder(final, lambda tmp: self.write_weights(tmp, state))
        return final

    def train(self) -> Path:
        """Every phase in order, then steps until the run's end; returns the final adapter's (or model's) folder.
        The output folder's lock is let go however the run ends (a caller may start another run there)."""
        try:
            return self._train()
        finally:
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.close()
                self.lock = None

    def _train(self) -> Path:
        from phikit.checkpoint import resolve_model_path
        from phikit.data import epoch_batches
        from phikit.tokenizer import Tokenizer

        config = self.config
        self.setup()
        self.folder = resolve_model_path(config.model)
        self.tokenizer = Tokenizer(self.folder)
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        if config.resume:
            self.resume()
            if self.main_process:
                print(f"phikit: resuming from {self.existing[-1]} (step {self.step})", file=sys.stderr)
                if self.step >= self.total_steps:
                    print(
                        f"phikit: the run already reached its last step ({self.total_steps}); nothing is left to "
                        "train (raise max_steps or epochs for more); its final weights are written again",
                        file=sys.stderr,
                    )
        if self.main_process:  # the settings this run goes by, for a person (the checkpoints keep their own)
            from phikit.checkpoint import atomic_write

            settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "resume"}
            settings["output_dir"] = str(self.out.resolve())
            for key in PATH_SETTINGS:  # local paths whole: the file reads the same from anywhere
                settings[key] = whole_path(settings[key])
            text = yaml.safe_dump(settings, sort_keys=False)
            atomic_write(self.out / "recipe.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        size = config.batch_size
        self.eval_batches = [self.eval_set[i : i + size] for i in range(0, len(self.eval_set), size)]
        log = MetricsLog(
            self.out,
            self.main_process,
            self.step if config.resume else None,
            config.report_to,
            dataclasses.asdict(config),
        )
        if self.main_process and self.skipped:
            print(f"skipped {self.skipped} malformed row(s) of {config.data}", file=sys.stderr)
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"fine-tuning ({config.method})",
            unit="step",
            disable=None if self.main_process and self.progress else True,  # None: none when stderr is no terminal
        )
        self.batches = epoch_batches(self.train_set, size, config.seed, self.cursor["epoch"], self.rank, self.world)
        self.tokens_seen, logged = 0, False
        # tokens seen and the time after the last metrics line's step: tokens/s is the training's since then
        since: tuple[int, float] | None = (0, time.perf_counter())
        quiet_since = time.monotonic()  # the last progress line printed where stderr is not a terminal
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                elapsed = time.perf_counter() - since[1]
                rate = (self.tokens_seen - since[0]) * self.world / elapsed if elapsed > 0 else 0.0
                lr = self.scheduler.get_last_lr()[0]
                self.bar.update()
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
                if self.main_process and self.progress and self.bar.disable:  # no terminal: a line now and then
                    if time.monotonic() - quiet_since >= PROGRESS_LINE_S or self.step in (1, self.total_steps):
                        print(
                            f"step {self.step}/{self.total_steps}: loss {metrics['loss']:.4f}, lr {lr:.2e}, "
                            f"tokens/s {rate:.0f}",
                            file=sys.stderr,
                            flush=True,
                        )
                        quiet_since = time.monotonic()
                if not logged:  # what each process holds, once the optimizer has its state
                    log.write(self.step, **self.memory())
                    logged = True
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    log.write(self.step, **metrics, lr=lr, tokens_per_s=rate, epoch=self.cursor["epoch"])
                    since = None  # restarted once this step's evaluation and checkpoint are done
                if self.eval_batches and (self.step % config.eval_every == 0 or self.step == self.total_steps):
                    evaluated = self.evaluate()
                    if "eval_loss" in evaluated and config.method == "sft":
                        evaluated["eval_perplexity"] = math.exp(min(evaluated["eval_loss"], 50))
                    log.write(self.step, **evaluated)
                    since = None  # the evaluation's time is not the training's
                    self.bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items()))
                if self.step % config.save_every == 0 or self.step == self.total_steps:  # a finished run extends
                    self.save_checkpoint()
                    since = None
                if self.world > 1:
                    torch.distributed.barrier()
                if since is None:
                    since = (self.tokens_seen, time.perf_counter())
            self.bar.close()
            final = self.save_final()
        except BaseException as e:  # the dashboard stops reloading and says how the run ended
            self.bar.close()
            how = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by an error ({type(e).__name__})"
            with contextlib.suppress(Exception):
                log.close(f"{how} at step {self.step} of {self.total_steps}; {how_to_go_on(self.out)}", failed=True)
            raise
        log.close()
        if self.world > 1:
            torch.distributed.barrier()
            # what holds the process group (FSDP's sharded modules, DDP, the optimizer's sharded state) goes
            # first: a gloo group destroyed under them aborted a process at exit ("terminate called without
            # an active exception") now and then
            import gc

            self.net = self.model = self.optimizer = self.scheduler = self.params = None
            gc.collect()
            torch.distributed.destroy_process_group()
        return final

    # -- what a method changes --

    unit = "sequences"

    def autocast(self):
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    def collate(self, batch: list) -> tuple[torch.Tensor, ...]:
        """A batch of examples as tensors on the device (ids first)."""
        from phikit.data import collate

        return tuple(t.to(self.device) for t in collate(batch, self.tokenizer.pad_id))

    def tokens(self, batch) -> int:
        """Tokens a micro-batch runs (for tokens/s)."""
        return int(batch[0].numel())

    def loss(self, model, batch: tuple) -> tuple[torch.Tensor, dict, int]:
        """The loss to minimise on one micro-batch, its metrics (floats) and its weight in a held-out mean
        (SFT: the labelled tokens, as its loss is per token)."""
        ids, labels = batch
        loss, count = causal_lm_loss(model, ids, labels, self.head)
        if self.world > 1 and model.training:  # a mean over every process's tokens, as one process would take
            total = torch.tensor([count], dtype=torch.float64, device=ids.device)
            torch.distributed.all_reduce(total)
            loss = loss * (count * self.world / max(float(total), 1.0))
        return loss, {}, count
