"""LoRA fine-tuning speed and memory: phikit vs transformers + peft + trl SFTTrainer, same model, data, run.

    python benchmarks/bench_finetune.py [--steps 30] [--seq-len 256] [--batch-size 4] [--layers 4 --hidden 640]
    python benchmarks/bench_finetune.py --gpu [--steps 20] [--data guanaco.jsonl]     # QLoRA on a GPU
    python benchmarks/bench_finetune.py --recipe recipes/tiny-guanaco-cpu.yaml [--steps 20]  # a recipe's settings

CPU: a small Phi-shaped model (random weights, made by transformers) is trained with the same LoRA (r=16,
alpha=16, q/k/v/dense), the same packed sequences of the guanaco-style text in recipes/data, the same
batch, learning rate and number of optimizer steps, fp32. ``--gpu``: the reference QLoRA recipe's settings
on a full-size random Phi-2 (NF4 double-quantized base through bitsandbytes, bf16 compute, LoRA r16 a16
dropout 0.05 on q/k/v/dense, packing to 1024 tokens, batch 1, paged 8-bit AdamW, gradient checkpointing)
on real guanaco rows (../shared/data/guanaco-1k, or --data). Each engine runs in its own process so its
peak memory is its own (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU); tokens/s counts the
tokens of the timed steps (after 3 warm-up steps). Peak RSS is that of the whole process, and also that of
the training steps after the first (the mark is reset there; Linux), which leaves out loading, quantizing
and tokenizing. Gradient checkpointing is set the same on both sides (on with ``--gpu``, off on the CPU). Each
row records the dtype its LoRA weights were trained in (``lora_dtype``): phikit keeps them in fp32 under bf16
autocast, TRL + PEFT with ``bf16=True`` in bf16, a difference stated next to the QLoRA ratios. Prints a
Markdown table and writes JSON.

``--recipe``: both engines take everything from a phikit recipe: its model, data, template, seq_len,
packing, batch x grad-accum, LoRA (r, alpha, dropout, targets), lr and warm-up, NF4 base (``quantize:
nf4``: phikit's own NF4; for transformers bitsandbytes' 4-bit NF4 with double quantization, fp32 compute),
gradient checkpointing, and the loss on replies only. The data is tokenized once by phikit
(``phikit.data.load_examples``, the recipe's held-out rows removed) and handed to SFTTrainer as
``input_ids`` + ``labels`` (-100 outside the replies), which it packs itself (``packing_strategy="wrapped"``:
concatenated and cut to seq_len, as phikit packs), so both train on the same tokens and the same loss mask.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import WORK, isa_flags, machine, markdown_table, random_phi2, run_worker, save_json, small_phi  # noqa: E402

DATA = HERE.parent / "recipes" / "data" / "tiny-instructions.jsonl"
GUANACO = HERE.parent.parent / "shared" / "data" / "guanaco-1k" / "train.jsonl"
WARMUP = 3


def texts(args=None) -> list[str]:
    data = Path(args.data) if args is not None and args.data else DATA
    rows = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()]
    return rows * (40 if data == DATA else 1)  # enough packed sequences for the steps


def run_phikit(model: Path, args) -> dict:
    from phikit.train import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(args)))
        gpu = dict(quantize="nf4", dtype="bf16", device="cuda", optimizer="paged_adamw_8bit")
        config = TrainConfig(
            model=str(model),
            output_dir=f"{tmp}/out",
            data=str(data),
            data_format="text",
            template="guanaco",
            **(gpu if args.gpu else dict(dtype="fp32", device="cpu")),
            seq_len=args.seq_len,
            packing=True,
            batch_size=args.batch_size,
            grad_accum=1,
            lr=1e-4,
            warmup_steps=0,
            max_steps=args.steps + WARMUP,
            lora_r=16,
            lora_alpha=16,
            lora_dropout=0.05,
            gradient_checkpointing=args.gpu,
            save_every=10**9,
            eval_every=10**9,
        )
        start = time.perf_counter()
        dtype = train_phikit(config)
        rows = [json.loads(line) for line in Path(config.output_dir, "metrics.jsonl").read_text().splitlines()]
        total = time.perf_counter() - start
    return {"losses": [r["loss"] for r in rows if "loss" in r], "total_s": total, "lora_dtype": dtype}


def train_phikit(config) -> str:
    """``phikit.train.finetune(config)``, keeping hold of the recipe to read its LoRA weights' dtype after."""
    from phikit.train import RECIPES

    recipe = RECIPES[config.method](config, False)
    recipe.train()
    return lora_dtype(recipe.model)


def lora_dtype(model) -> str:
    """The dtype(s) the LoRA weights are kept in (phikit: fp32; TRL + PEFT on a GPU: bf16 with bf16=True):
    stated next to the speed ratios, since it is not the same on both sides."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if "lora_" in n})
    return "+".join(dtypes) or "none"


def recipe_config(args, **overrides):
    from phikit.train import TrainConfig

    return TrainConfig.from_yaml(args.recipe, {**({"model": args.model} if args.model else {}), **overrides})


def write_recipe_examples(args, path: Path) -> int:
    """The recipe's training examples (held-out rows removed) as JSONL of input_ids + labels; their tokens."""
    from phikit.data import load_examples, split_eval
    from phikit.tokenizer import Tokenizer

    c = recipe_config(args)
    tokenizer = Tokenizer(c.model)
    examples, _ = load_examples(
        c.data, tokenizer, c.data_format, c.template, c.split, c.responses_only, c.skip_bad_rows, c.max_examples
    )
    if not (c.eval_data or c.eval_split):
        examples, _ = split_eval(examples, c.eval_fraction, c.seed)
    with path.open("w") as f:
        for e in examples:
            f.write(json.dumps({"input_ids": e.ids, "labels": e.labels}) + "\n")
    return sum(len(e.ids) for e in examples)


def run_phikit_recipe(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = recipe_config(
            args, output_dir=f"{tmp}/out", max_steps=args.steps + WARMUP, save_every=10**9, eval_every=10**9
        )
        dtype = train_phikit(config)
        rows = [json.loads(line) for line in Path(config.output_dir, "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in rows if "loss" in r], "lora_dtype": dtype}


def nf4_config(compute_dtype):
    """bitsandbytes' 4-bit NF4 with double quantization (the reference QLoRA recipe's base)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def train_with_trl(net, tok, dataset, lora: dict, **settings) -> dict:
    """Train ``net`` with SFTTrainer and a PEFT LoRA (``lora``: LoraConfig's r, lora_alpha, lora_dropout,
    target_modules) for WARMUP + --steps optimizer steps, a timestamp per step; ``settings`` are the
    SFTConfig fields the two baselines set differently. Returns the losses, the step stamps and the dtype the
    LoRA weights were trained in."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            fp16=False,
            dataloader_num_workers=0,
            **settings,
        )
        trainer = SFTTrainer(
            model=net,
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[trl_clock(stamps)],
            peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "step_stamps": stamps, "lora_dtype": lora_dtype(trainer.model)}


def run_trl_recipe(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, PhiForCausalLM

    c = recipe_config(args)
    if c.quantize not in (None, "nf4") or c.dtype not in ("fp32", "auto"):
        raise SystemExit("--recipe: the transformers baseline covers fp32 CPU recipes with quantize nf4 or none")
    tok = AutoTokenizer.from_pretrained(c.model)
    tok.pad_token = tok.eos_token
    quantization = nf4_config(torch.float32) if c.quantize == "nf4" else None
    net = PhiForCausalLM.from_pretrained(
        c.model, dtype=torch.float32, quantization_config=quantization, device_map={"": "cpu"}
    )
    return train_with_trl(
        net,
        tok,
        load_dataset("json", data_files=args.examples, split="train"),
        dict(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=list(c.lora_targets)),
        max_steps=args.steps + WARMUP,
        per_device_train_batch_size=c.batch_size,
        gradient_accumulation_steps=c.grad_accum,
        learning_rate=c.lr,
        lr_scheduler_type=c.scheduler,
        warmup_steps=c.warmup_steps,
        weight_decay=c.weight_decay,
        max_grad_norm=c.max_grad_norm,
        optim="adamw_torch",
        packing=c.packing,
        packing_strategy="wrapped",
        max_length=c.seq_len,
        gradient_checkpointing=c.gradient_checkpointing,
        use_cpu=True,
        bf16=False,
        seed=c.seed,
    )


def run_trl(model: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PhiForCausalLM

    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.eos_token
    if args.gpu:
        net = PhiForCausalLM.from_pretrained(
            model, dtype=torch.bfloat16, quantization_config=nf4_config(torch.bfloat16), device_map={"": 0}
        )
    else:
        net = PhiForCausalLM.from_pretrained(model, dtype=torch.float32)
    gpu = dict(optim="paged_adamw_8bit", packing_strategy="wrapped")
    return train_with_trl(
        net,
        tok,
        Dataset.from_dict({"text": texts(args)}),
        dict(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "dense"]),
        max_steps=args.steps + WARMUP,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        warmup_steps=0,
        packing=True,
        max_length=args.seq_len,
        use_cpu=not args.gpu,
        dataset_text_field="text",
        bf16=args.gpu,
        # phikit's setting, in every mode (SFTConfig's default is on, phikit's CPU run is without): like for like
        gradient_checkpointing=args.gpu,
        **(gpu if args.gpu else {}),
    )


PEAK_KB = {"before_first_step": 0, "after_first_step": 0}


def peak_rss_kb() -> int:
    """This process's peak resident memory so far (VmHWM), in kB; 0 where /proc is not there."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return 0


def stamp(stamps: list[float]) -> None:
    """Time an optimizer step. After the first one the peak-RSS mark is reset (Linux: clear_refs 5), so the
    peak of the training steps is told apart from that of loading and preparing (quantizing, tokenizing)."""
    stamps.append(time.perf_counter())
    if len(stamps) == 1:
        PEAK_KB["before_first_step"] = max(peak_rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    PEAK_KB["after_first_step"] = peak_rss_kb()


def phikit_clock() -> list[float]:
    """Timestamps of phikit's optimizer steps (``stamp``), taken where each step's loss is logged."""
    import phikit.train as train

    stamps: list[float] = []
    original = train.MetricsLog.write

    def timed_write(self, step, **values):  # one call with the loss per optimizer step
        if "loss" in values:
            stamp(stamps)
        return original(self, step, **values)

    train.MetricsLog.write = timed_write
    return stamps


def trl_clock(stamps: list[float]):
    """A transformers Trainer callback that ``stamp``s each optimizer step into ``stamps``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamp(stamps)

    return Clock()


def worker(engine: str, model: Path, args) -> dict:
    import torch

    torch.manual_seed(0)
    if engine == "phikit":
        stamps = phikit_clock()
        result = run_phikit_recipe(args) if args.recipe else run_phikit(model, args)
        result["step_stamps"] = stamps
    else:
        result = run_trl_recipe(args) if args.recipe else run_trl(model, args)
    stamps = result.pop("step_stamps")
    timed = stamps[WARMUP - 1 :]
    seconds = timed[-1] - timed[0]
    tokens = args.steps * args.batch_size * args.seq_len * args.grad_accum
    return {
        "engine": engine,
        "tokens_per_s": tokens / seconds,
        "s_per_step": seconds / args.steps,
        "peak_rss_gb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, *PEAK_KB.values()) / 1e6,
        "train_peak_rss_gb": PEAK_KB["after_first_step"] / 1e6,  # steps 2..n only
        **({"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9} if args.gpu else {}),
        "first_loss": result["losses"][0],
        "last_loss": result["losses"][-1],
        "lora_dtype": result["lora_dtype"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--gpu", action="store_true", help="QLoRA on a GPU, full-size random Phi-2, seq-len 1024")
    ap.add_argument("--data", help="a JSONL of {text} rows (--gpu default: ../shared/data/guanaco-1k)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--recipe", help="take model, data and every training setting from this recipe YAML")
    ap.add_argument("--model", help="--recipe: another model folder than the recipe's")
    ap.add_argument("--rounds", type=int, default=1, help="--recipe: run the two engines this many times, in turn")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--examples", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench_finetune needs trl (the transformers + peft + trl baseline): pip install -e '.[bench]'")
    args.grad_accum = 1
    if args.recipe:
        main_recipe(args)
        return
    if args.gpu:
        if "--seq-len" not in sys.argv:
            args.seq_len = 1024
        if "--batch-size" not in sys.argv:
            args.batch_size = 1
        args.data = args.data or str(GUANACO)
        model = random_phi2(device="cuda")
    else:
        model = small_phi(WORK / f"phi-l{args.layers}-h{args.hidden}", args.layers, args.hidden)
    args.out = args.out or HERE / ("results_finetune_gpu.json" if args.gpu else "results_finetune.json")
    if args.worker:
        print(json.dumps(worker(args.worker, model, args)))
        return
    rows = []
    for engine in ("phikit", "trl"):
        print(f"training with {engine} ...", file=sys.stderr, flush=True)
        flags = [
            "--worker",
            engine,
            "--steps",
            str(args.steps),
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            str(args.batch_size),
            "--layers",
            str(args.layers),
            "--hidden",
            str(args.hidden),
            *(["--gpu", "--data", args.data] if args.gpu else []),
        ]
        try:
            rows.append(run_worker(Path(__file__), flags))
        except RuntimeError as e:  # the other engine's row is still worth keeping
            print(e, file=sys.stderr)
            rows.append({"engine": engine, "error": str(e).splitlines()[0], "tokens_per_s": float("nan")})
        save_json(args.out, {"command": " ".join(sys.argv), "rows": rows})  # each worker's row as it finishes
    rows[0]["speedup"] = f"{rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x"
    rows[1]["engine"] = "transformers+peft+trl SFTTrainer"
    what = (
        "full-size random Phi-2, QLoRA (NF4 base, bf16, paged 8-bit AdamW, gradient checkpointing)"
        if args.gpu
        else f"Phi {args.layers} layers x {args.hidden}, fp32 CPU, no gradient checkpointing on either side"
    )
    print(
        f"\nMachine: {machine()}\n{what}, LoRA r=16 on q/k/v/dense, "
        f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("engine", "engine"),
                ("tokens_per_s", "tokens/s"),
                ("s_per_step", "s/step"),
                ("peak_rss_gb", "peak RSS GB"),
                *([("peak_gpu_memory_gb", "peak GPU GB")] if args.gpu else []),
                ("first_loss", "first loss"),
                ("last_loss", "last loss"),
                ("speedup", "speed-up"),
                ("lora_dtype", "LoRA weights"),
            ],
        )
    )
    save_json(args.out, {"command": " ".join(sys.argv), "rows": rows})


def main_recipe(args) -> None:
    """Both engines on one recipe's model, data and settings, each in its own process, ``--rounds`` times."""
    config = recipe_config(args)
    args.seq_len, args.batch_size, args.grad_accum = config.seq_len, config.batch_size, config.grad_accum
    name = Path(args.recipe).stem
    args.out = args.out or HERE / f"results_finetune_{name}.json"
    if args.worker:
        print(json.dumps(worker(args.worker, Path(config.model), args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        examples = Path(tmp) / "examples.jsonl"
        train_tokens = write_recipe_examples(args, examples)
        for round_ in range(1, args.rounds + 1):
            for engine in ("phikit", "trl"):
                print(f"round {round_}: training with {engine} ...", file=sys.stderr, flush=True)
                flags = ["--worker", engine, "--recipe", args.recipe, "--steps", str(args.steps)]
                flags += [*(["--model", args.model] if args.model else []), "--examples", str(examples)]
                row = run_worker(Path(__file__), flags)
                row["round"] = round_
                rows.append(row)
            phikit_row, trl_row = rows[-2], rows[-1]
            phikit_row["speedup"] = f"{phikit_row['tokens_per_s'] / trl_row['tokens_per_s']:.2f}x"
            phikit_row["memory"] = f"{phikit_row['peak_rss_gb'] / trl_row['peak_rss_gb']:.2f}x"
            trl_row["engine"] = "transformers+peft+trl SFTTrainer"
    flags = isa_flags()
    print(
        f"\nMachine: {machine()}\nCPU flags: {flags}\nRecipe {args.recipe}: model {config.model}, "
        f"{'NF4 base, ' if config.quantize == 'nf4' else ''}LoRA r={config.lora_r} alpha={config.lora_alpha} "
        f"dropout {config.lora_dropout} on {'/'.join(config.lora_targets)}, batch {config.batch_size} x grad-accum "
        f"{config.grad_accum} x {config.seq_len} tokens (packed), gradient checkpointing "
        f"{'on' if config.gradient_checkpointing else 'off'}, loss on {'replies' if config.responses_only else 'all'}; "
        f"{args.steps} timed steps after {WARMUP} warm-up steps; {train_tokens:,} training tokens\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("round", "round"),
                ("engine", "engine"),
                ("tokens_per_s", "tokens/s"),
                ("s_per_step", "s/step"),
                ("peak_rss_gb", "peak RSS GB"),
                ("train_peak_rss_gb", "peak RSS of steps 2..n GB"),
                ("first_loss", "first loss"),
                ("last_loss", "last loss"),
                ("speedup", "speed-up"),
                ("memory", "peak RSS vs trl"),
                ("lora_dtype", "LoRA weights"),
            ],
        )
    )
    save_json(
        args.out,
        {
            "command": " ".join(sys.argv),
            "recipe": args.recipe,
            "cpu_flags": flags,
            "train_tokens": train_tokens,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
