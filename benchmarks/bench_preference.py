"""Preference and RL tuning speed and memory: phikit against TRL (DPOTrainer, ORPOTrainer, GRPOTrainer), same
model, data, LoRA and steps, each engine in its own process; and DPO on real pairs with held-out accuracy.

    python benchmarks/bench_preference.py [--methods dpo,orpo,grpo] [--steps 20] [--layers 4 --hidden 640]
    python benchmarks/bench_preference.py --methods "" --real [--real-steps 200]   # DPO on hh-rlhf-2k, 199 test pairs

Model: a small Phi-2-shaped checkpoint with random weights and Phi-2's tokenizer (benchmarks/common.py
small_phi). DPO and ORPO: ../shared/data/hh-rlhf-2k's {prompt, chosen, rejected} pairs (HH-RLHF harmless-base)
that fit in --seq-len tokens whole (so neither engine truncates anything), batch --batch-size pairs, LoRA r16
a16 dropout 0.05 on q/k/v/dense, lr 5e-5, fp32, beta 0.1 (DPO sigmoid). GRPO: the arithmetic prompts of
recipes/data/arithmetic.jsonl, 8 completions per prompt of at most --completion-tokens tokens at temperature
0.7, the same two rewards (the exact answer, answering with a number), --batch-size prompts a step, beta 0,
TRL's dapo loss; TRL samples with transformers' generate from the fp32 policy, phikit with its own batched
decoding from the sampler of each --samplers setting (auto: a bf16 copy with the adapter merged before each
step's sampling, its samples weighted as TRL weighs vLLM's; policy: the fp32 policy itself, as TRL). Both engines'
models start from the same weights; the first --warmup steps are not timed. Speed: pairs (or prompts) a second
and tokens a second (pairs x their mean tokens, prompt + chosen + prompt + rejected; GRPO: steps an hour).
Peak RSS is the worker process's, before and after the first step (Linux: the mark is reset there).

--real: phikit DPO for --real-steps (batch 4, lr --real-lr, cosine) on the 1,996 training pairs (--real-seq-len
256: longer pairs keep the end of their prompt, then lose the ends of their replies), evaluated on the 199
test pairs every 50 steps (eval_rewards/accuracies: the chosen reply's implicit reward above the rejected
one's). Its untrained value is 0 by construction (policy = reference), so the results also give the base
model's own preference: the share of test pairs whose chosen reply it finds more likely (summed log-probs).
Writes the curves as benchmarks/results_preference_dpo_hh.png when matplotlib is installed.

Prints Markdown tables and writes benchmarks/results_preference.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_finetune import PEAK_KB, peak_rss_kb, phikit_clock, trl_clock  # noqa: E402
from common import WORK, isa_flags, machine, markdown_table, run_worker, save_json, small_phi  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
HH = SHARED / "hh-rlhf-2k"
ARITHMETIC = HERE.parent / "recipes" / "data" / "arithmetic.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "dense"]
LR = 5e-5


def fitting_pairs(model: Path, seq_len: int, limit: int) -> list[dict]:
    """hh-rlhf-2k training pairs whose prompt + longer reply (+ EOS) fit in ``seq_len`` tokens."""
    from phikit.tokenizer import Tokenizer

    tokenizer = Tokenizer(model)
    out = []
    for line in (HH / "train.prompt.jsonl").read_text().splitlines():
        row = json.loads(line)
        length = len(tokenizer.encode(row["prompt"])) + 1
        length += max(len(tokenizer.encode(row["chosen"])), len(tokenizer.encode(row["rejected"])))
        if length <= seq_len and row["chosen"].strip() and row["rejected"].strip():
            out.append(row)
        if len(out) == limit:
            break
    return out


def pair_tokens(model: Path, rows: list[dict]) -> float:
    """Mean tokens a pair (prompt + chosen + EOS + prompt + rejected + EOS)."""
    from phikit.tokenizer import Tokenizer

    t = Tokenizer(model)
    return sum(
        2 * len(t.encode(r["prompt"])) + len(t.encode(r["chosen"])) + len(t.encode(r["rejected"])) + 2 for r in rows
    ) / len(rows)


def arithmetic_rows() -> list[dict]:
    return [json.loads(line) for line in ARITHMETIC.read_text().splitlines()]


# ---- the two engines (each in a worker process) ----


def run_phikit(method: str, model: Path, data: Path, args) -> list[float]:
    from phikit.train import TrainConfig, finetune

    stamps = phikit_clock()
    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(
            method=method,
            model=str(model),
            output_dir=f"{tmp}/out",
            data=str(data),
            dtype="fp32",
            device="cpu",
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            grad_accum=1,
            lr=LR,
            warmup_steps=0,
            scheduler="constant",
            max_steps=args.steps + args.warmup,
            lora_r=16,
            lora_alpha=16,
            lora_dropout=0.05,
            lora_targets=TARGETS,
            gradient_checkpointing=False,
            save_every=10**9,
            eval_every=10**9,
            seed=0,
        )
        if method == "grpo":
            settings.update(
                reward_funcs=["answer", "regex"],
                reward_regex=r"\s*-?\d+",
                num_generations=8,
                max_completion_length=args.completion_tokens,
                temperature=0.7,
                seq_len=64 + args.completion_tokens,
                sampler=args.sampler,
            )
        finetune(TrainConfig(**settings), progress=False)
    return stamps


def run_trl(method: str, model: Path, data: Path, args) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, PhiForCausalLM

    from phikit.train.rewards import answer_reward, regex_reward

    stamps: list[float] = []
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.eos_token
    net = PhiForCausalLM.from_pretrained(model, dtype=torch.float32)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    common = dict(
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        max_steps=args.steps + args.warmup,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,  # as phikit's side (the TRL configs' default is on): like for like
        seed=0,
    )
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
    with tempfile.TemporaryDirectory() as tmp:
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            config = DPOConfig(
                output_dir=tmp, beta=0.1, max_length=args.seq_len, per_device_train_batch_size=args.batch_size, **common
            )
            trainer = DPOTrainer(
                net, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora
            )
        elif method == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            config = ORPOConfig(
                output_dir=tmp,
                beta=0.1,
                max_length=args.seq_len,
                per_device_train_batch_size=args.batch_size,
                **common,
            )
            trainer = ORPOTrainer(
                net, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora
            )
        else:
            from trl import GRPOConfig, GRPOTrainer

            config = GRPOConfig(
                output_dir=tmp,
                num_generations=8,
                per_device_train_batch_size=8 * args.batch_size,  # completions: batch-size prompts x 8
                max_completion_length=args.completion_tokens,
                temperature=0.7,
                beta=0.0,
                loss_type="dapo",
                **common,
            )
            trainer = GRPOTrainer(
                net,
                reward_funcs=[answer_reward, regex_reward(r"\s*-?\d+")],
                args=config,
                train_dataset=Dataset.from_list(rows),
                processing_class=tok,
                peft_config=lora,
            )
        trainer.add_callback(trl_clock(stamps))
        trainer.train()
    return stamps


def worker(engine: str, method: str, model: Path, data: Path, args) -> dict:
    import resource

    import torch

    torch.manual_seed(0)
    stamps = (run_phikit if engine == "phikit" else run_trl)(method, model, data, args)
    timed = stamps[args.warmup - 1 :]
    seconds = timed[-1] - timed[0]
    return {
        "engine": engine,
        "method": method,
        "steps_timed": len(timed) - 1,
        "s_per_step": seconds / (len(timed) - 1),
        "peak_rss_gb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, *PEAK_KB.values()) / 1e6,
        "train_peak_rss_gb": max(PEAK_KB["after_first_step"], peak_rss_kb()) / 1e6,
    }


# ---- DPO on the real pairs ----


def base_preference(model: Path, seq_len: int) -> float:
    """Share of the 199 test pairs whose chosen reply the untrained model finds more likely (summed log-probs
    of the reply given the prompt)."""
    import torch

    import phikit
    from phikit.train.losses import sequence_logps
    from phikit.train.preference import collate_pairs, load_pairs

    phi = phikit.load(model, dtype="fp32", device="cpu")
    pairs = load_pairs(str(HH / "test.prompt.jsonl"), phi.tokenizer, seq_len=seq_len)[0]
    wins = 0
    with torch.no_grad():
        for i in range(0, len(pairs), 8):
            batch = pairs[i : i + 8]
            ids, labels = collate_pairs(batch, phi.tokenizer.pad_id)
            sums, _ = sequence_logps(phi.model, ids, labels)
            wins += int((sums[: len(batch)] > sums[len(batch) :]).sum())
    return wins / len(pairs)


def real_dpo(model: Path, args) -> dict:
    from phikit.train import TrainConfig, finetune

    out = WORK / "dpo-hh"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    finetune(
        TrainConfig(
            method="dpo",
            model=str(model),
            output_dir=str(out),
            data=str(HH / "train.prompt.jsonl"),
            eval_data=str(HH / "test.prompt.jsonl"),
            dtype="fp32",
            device="cpu",
            seq_len=args.real_seq_len,
            batch_size=4,
            grad_accum=1,
            lr=args.real_lr,
            warmup_steps=10,
            scheduler="cosine",
            max_steps=args.real_steps,
            lora_r=16,
            lora_alpha=16,
            lora_dropout=0.05,
            lora_targets=TARGETS,
            gradient_checkpointing=False,
            eval_every=50,
            save_every=10**9,
            seed=0,
        ),
        progress=True,
    )
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_rewards/accuracies" in r]
    steps = [r for r in rows if "loss" in r]
    plot(steps, evals, HERE / "results_preference_dpo_hh.png")
    return {
        "steps": args.real_steps,
        "seconds": seconds,
        "base_preference": base_preference(model, args.real_seq_len),
        "evals": [
            {k: r[k] for k in ("step", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")} for r in evals
        ],
        "train_loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
    }


def plot(steps: list[dict], evals: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture of the curves", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    a.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    a.set_xlabel("step")
    a.set_title("DPO loss (ln 2 at the start)")
    a.legend()
    b.plot([r["step"] for r in evals], [r["eval_rewards/accuracies"] for r in evals], "o-", label="accuracy")
    b.plot([r["step"] for r in evals], [r["eval_rewards/margins"] for r in evals], "s-", label="margin")
    b.axhline(0.5, color="grey", lw=0.5)
    b.set_xlabel("step")
    b.set_title("199 held-out HH-RLHF pairs")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="dpo,orpo,grpo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--completion-tokens", type=int, default=32)
    ap.add_argument(
        "--samplers",
        default="auto",
        help="GRPO: phikit's sampler settings to run, comma-separated (auto: a bf16 copy of the fp32 policy; "
        "policy: the policy itself, as TRL samples here)",
    )
    ap.add_argument("--sampler", default="auto", help=argparse.SUPPRESS)  # a worker's one
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--real", action="store_true", help="also DPO on hh-rlhf-2k with held-out accuracy")
    ap.add_argument("--real-steps", type=int, default=200)
    ap.add_argument("--real-seq-len", type=int, default=256)
    ap.add_argument("--real-lr", type=float, default=2e-4)
    ap.add_argument("--out", type=Path, default=HERE / "results_preference.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench_preference needs trl (the baseline): pip install -e '.[bench]'")
    if not HH.is_dir():
        sys.exit(f"bench_preference needs {HH} (the HH-RLHF pairs)")
    model = small_phi(WORK / f"phi-l{args.layers}-h{args.hidden}", args.layers, args.hidden)
    if args.worker:
        engine, method = args.worker.split(":")
        print(json.dumps(worker(engine, method, model, args.data, args)))
        return
    pairs = fitting_pairs(model, args.seq_len, 2000)
    work = Path(tempfile.mkdtemp())
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows()))
    tokens = pair_tokens(model, pairs)
    rows = []
    passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len)]
    passthrough += ["--batch-size", str(args.batch_size), "--completion-tokens", str(args.completion_tokens)]
    passthrough += ["--layers", str(args.layers), "--hidden", str(args.hidden)]
    for method in [m for m in args.methods.split(",") if m]:
        data = work / ("prompts.jsonl" if method == "grpo" else "pairs.jsonl")
        samplers = args.samplers.split(",") if method == "grpo" else ["auto"]
        runs = [("phikit", sampler) for sampler in samplers] + [("trl", None)]
        for engine, sampler in runs:
            print(f"{method}: {engine}" + (f" (sampler {sampler})" if sampler else ""), file=sys.stderr, flush=True)
            extra = ["--sampler", sampler] if sampler else []
            argv = ["--worker", f"{engine}:{method}", "--data", str(data), *passthrough, *extra]
            row = run_worker(Path(__file__), argv)
            if method == "grpo":
                row["steps_per_hour"] = 3600 / row["s_per_step"]
                row["sampler"] = sampler or "policy"
            else:
                row["pairs_per_s"] = args.batch_size / row["s_per_step"]
                row["tokens_per_s"] = row["pairs_per_s"] * tokens
            rows.append(row)
        theirs = rows[-1]
        for ours in rows[-len(runs) : -1]:
            ours["speed_vs_trl"] = f"{theirs['s_per_step'] / ours['s_per_step']:.2f}x"
            ours["memory_vs_trl"] = f"{ours['train_peak_rss_gb'] / theirs['train_peak_rss_gb']:.2f}x"
    print(f"\nMachine: {machine()}\nCPU flags: {isa_flags()}")
    print(f"Model: random Phi-2-shaped {args.layers} x {args.hidden}, Phi-2 tokenizer; {len(pairs)} pairs fit in")
    print(
        f"{args.seq_len} tokens (mean {tokens:.0f} tokens a pair); batch {args.batch_size}; {args.steps} timed steps\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("method", "method"),
                ("engine", "engine"),
                ("sampler", "GRPO sampler"),
                ("s_per_step", "s/step"),
                ("pairs_per_s", "pairs/s"),
                ("tokens_per_s", "tokens/s"),
                ("steps_per_hour", "steps/hour"),
                ("speed_vs_trl", "speed vs TRL"),
                ("peak_rss_gb", "peak RSS GB"),
                ("train_peak_rss_gb", "training peak RSS GB"),
                ("memory_vs_trl", "memory vs TRL"),
            ],
        )
    )
    result = {"settings": vars(args) | {"out": str(args.out), "data": None}, "pairs": len(pairs), "rows": rows}
    if args.real:
        result["real"] = real_dpo(model, args)
        print(json.dumps(result["real"], indent=1))
    save_json(args.out, {"command": " ".join(sys.argv), "cpu_flags": isa_flags(), **result})


if __name__ == "__main__":
    main()
