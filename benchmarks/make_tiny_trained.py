"""Make a small *trained* Phi checkpoint plus held-out text, for measuring quantization quality.

    nice -n 10 python benchmarks/make_tiny_trained.py [--out DIR] [--steps N] [--seq-len 256] [--force]
    nice -n 10 python benchmarks/make_tiny_trained.py --tokenizer ../shared/data/phi2-tokenizer \
        --out benchmarks/_work/tiny-phi2tok        # Phi-2's tokenizer and 51,200-row vocabulary
    nice -n 10 python benchmarks/make_tiny_trained.py --tokenizer ../shared/data/phi2-tokenizer \
        --extra-text ../shared/data/alpaca-52k/alpaca_data.json.gz --extra-field output --extra-rows 2000:22000 \
        --context 2048 --seq-len 512 --batch-size 2 --steps 600 --out benchmarks/_work/tiny-phi2-base
        # the base of recipes/tiny-alpaca-cpu.yaml: also general English prose, Phi-2's 2,048-token context
    nice -n 10 python benchmarks/make_tiny_trained.py --tokenizer ../shared/data/phi2-tokenizer \
        --extra-text ../shared/data/alpaca-52k/alpaca_data.json.gz --extra-field output --extra-rows 2000:12000 \
        --chat-text ../shared/data/guanaco-1k/train.jsonl --chat-exclude recipes/tiny-guanaco-cpu.yaml \
        --context 2048 --seq-len 512 --batch-size 2 --steps 700 --out benchmarks/_work/tiny-phi2-chatbase
        # the base of recipes/tiny-guanaco-cpu.yaml: also the words of its conversations, without markers

Why: quantization error on a checkpoint with random weights says little about what int8/int4 does to a
real model (random weights have no outliers, no structure, and a perplexity near the vocabulary size).
A real Phi-2 is too big to train or even evaluate quickly on a CPU, so this script trains a tiny model with
Phi-2's architecture choices (PhiForCausalLM: partial rotary embeddings 0.4, gelu_new, parallel
attention/MLP block, untied LM head with bias) on real technical English that ships with Python itself:
the documentation topics in `pydoc_data.topics`. No download is needed.

It is also the base model of the CPU fine-tuning recipes (recipes/tiny-guanaco-cpu.yaml, tiny-alpaca-cpu.yaml):
a base that has only read documentation and rambles on when asked a question, so a fine-tune that learns to
end its answers at <|endoftext|> shows. With --tokenizer pointing at Phi-2's own tokenizer (GPT-2's BPE plus
38 whitespace-run tokens), the vocabulary is 51,200 rows like Phi-2's (--vocab-size overrides).
--extra-text adds general prose to the training text (never to the held-out text): one field of the rows of a
.json/.jsonl file (gzipped too), e.g. the answers of Stanford Alpaca rows that no recipe fine-tunes on, joined
by blank lines into documents of about 2,000 characters, with EOS only between those documents, so the base
learns English without learning to stop after a short answer. --context sets max_position_embeddings
(Phi-2: 2048; the rotary embedding has no learned positions, so only --seq-len says what was trained).

What it writes into --out (default benchmarks/_work/tiny-trained, written to a temp folder then renamed):
  config.json, generation_config.json, model.safetensors   the trained model (fp32, save_pretrained)
  tokenizer.json, vocab.json, merges.txt, tokenizer_config.json   copied from --tokenizer (GPT-2 BPE by
                  default), with added_tokens.json and special_tokens_map.json where it has them
  heldout.txt     the held-out topics (never trained on), joined by blank lines
  heldout.jsonl   the same topics, one {"text": ...} row each
  train_info.json settings, parameter count, timings, held-out loss/perplexity

The split is fixed (it does not depend on --seed): topics are ordered by the SHA-256 of their name and taken
into the held-out set while they fit in 10% of the characters. Training packs the other topics into one
token stream with EOS (50256) between documents and cuts it into --seq-len windows (a fresh random offset
and order each epoch); AdamW with linear warm-up and cosine decay, fp32 on CPU, seeded.

Held-out perplexity is measured on heldout.txt tokenized as a whole, in non-overlapping --seq-len windows
(each window predicts its tokens 2..n), first on the in-memory model and again on the checkpoint reloaded
with PhiForCausalLM.from_pretrained / AutoTokenizer.from_pretrained, which must agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "_work" / "tiny-trained"
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/data/gpt2-bpe"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("added_tokens.json", "special_tokens_map.json")  # Phi-2's tokenizer has them
PHI2_VOCAB = 51200  # Phi-2's embedding rows: 50,295 tokens padded to a multiple of 64 (and then some)
EOS = 50256
HELDOUT_FRACTION = 0.10

MODEL_SHAPE = dict(
    vocab_size=50304,  # a multiple of 64 >= GPT-2's 50257 tokens (PHI2_VOCAB with Phi-2's tokenizer)
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    max_position_embeddings=512,
    partial_rotary_factor=0.4,
    hidden_act="gelu_new",
    rope_theta=10000.0,
    layer_norm_eps=1e-5,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    bos_token_id=EOS,
    eos_token_id=EOS,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training/eval window (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help=f"GPT-2 BPE folder (default {DEFAULT_TOKENIZER})"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        help=f"embedding rows (default {MODEL_SHAPE['vocab_size']}, or {PHI2_VOCAB} when the tokenizer has "
        "Phi-2's added whitespace tokens)",
    )
    p.add_argument("--context", type=int, default=512, help="max_position_embeddings (default 512)")
    p.add_argument("--extra-text", type=Path, help="a .json/.jsonl(.gz) of rows whose --extra-field is also trained on")
    p.add_argument("--extra-field", default="text", help="the field of --extra-text's rows to read (default text)")
    p.add_argument("--extra-rows", default=":", help="a START:END slice of --extra-text's rows (default all)")
    p.add_argument(
        "--chat-text",
        type=Path,
        help="a .jsonl of {text} conversations in the guanaco format, also trained on as plain prose: the "
        "turns' words without the '### Human:' / '### Assistant:' markers, so the base knows the language "
        "and topics of the conversations but not their format or where a reply ends",
    )
    p.add_argument(
        "--chat-exclude",
        type=Path,
        help="a phikit recipe YAML: leave out of --chat-text the rows it holds out (its eval_fraction)",
    )
    p.add_argument("--seed", type=int, default=0, help="torch seed for init and data order (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if --out already exists")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if not 2 <= args.seq_len <= args.context:
        p.error(f"--seq-len must be in 2..{args.context} (--context)")
    try:
        start, end = (int(x) if x else None for x in args.extra_rows.split(":"))
    except ValueError:
        p.error(f"--extra-rows must be START:END, e.g. 2000:22000, got {args.extra_rows!r}")
    args.extra_slice = slice(start, end)
    return args


def extra_documents(path: Path, field: str, rows: slice, doc_chars: int = 2000) -> list[str]:
    """The ``field`` of each row in ``rows`` of a .json/.jsonl(.gz) file, joined by blank lines into
    documents of about ``doc_chars`` characters (rows without the field, or with it empty, are skipped)."""
    from phikit.data import read_rows

    texts = [row.get(field) for _, row in read_rows(str(path))][rows]
    return join_documents([t.strip() for t in texts if isinstance(t, str) and t.strip()], doc_chars)


def join_documents(texts: list[str], doc_chars: int) -> list[str]:
    """``texts`` in order, joined by blank lines into documents of about ``doc_chars`` characters."""
    docs, current = [], ""
    for text in texts:
        current = f"{current}\n\n{text}" if current else text
        if len(current) >= doc_chars:
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


def chat_documents(path: Path, exclude_recipe: Path | None, doc_chars: int = 2000) -> list[str]:
    """The conversations of a guanaco-format .jsonl as prose: each turn's words without its marker, turns
    and rows joined by blank lines into documents of about ``doc_chars`` characters; the rows that
    ``exclude_recipe`` holds out are left out (they are its held-out prompts)."""
    import re

    from phikit.data import read_rows

    held = set()
    if exclude_recipe is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
        from heldout_suite import heldout_rows

        from phikit.train import TrainConfig

        config = TrainConfig.from_yaml(exclude_recipe, {"data": str(path)})
        held = {row.get("text") for _, row in heldout_rows(config)}
    texts = []
    for _, row in read_rows(str(path)):
        text = row.get("text")
        if isinstance(text, str) and text not in held:
            turns = [t.strip() for t in re.split(r"###\s*(?:Human|Assistant):", text)]
            texts.append("\n\n".join(t for t in turns if t))
    print(f"chat text: {len(texts)} conversations of {path} ({len(held)} held out by {exclude_recipe})", flush=True)
    return join_documents(texts, doc_chars)


def split_topics() -> tuple[dict[str, str], dict[str, str]]:
    """Deterministic (train, held-out) split of pydoc_data.topics, held-out ~10% of the characters."""
    from pydoc_data.topics import topics

    order = sorted(topics, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    budget = HELDOUT_FRACTION * sum(len(t) for t in topics.values())
    held, used = [], 0
    for name in order:
        if used + len(topics[name]) <= budget:
            held.append(name)
            used += len(topics[name])
    train = {n: topics[n].strip() for n in sorted(topics) if n not in held}
    return train, {n: topics[n].strip() for n in sorted(held)}


def perplexity(model, ids: torch.Tensor, seq_len: int, batch_size: int = 8) -> tuple[float, float]:
    """Mean next-token NLL and perplexity over non-overlapping windows of `seq_len` tokens of `ids`."""
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            for length in sorted({len(w) for w in windows[i : i + batch_size]}):  # the last window may be short
                batch = torch.stack([w for w in windows[i : i + batch_size] if len(w) == length])
                logits = model(input_ids=batch).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total += nll.item()
                count += batch[:, 1:].numel()
    model.train(was_training)
    loss = total / count
    return loss, math.exp(loss)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    """Endless batches of packed windows; each epoch starts at a random offset and shuffles the windows."""
    while True:
        offset = int(torch.randint(seq_len, (1,), generator=generator))
        n = (len(stream) - offset) // seq_len
        windows = stream[offset : offset + n * seq_len].view(n, seq_len)
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield windows[order[i : i + batch_size]]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(args: argparse.Namespace, shape: dict, tokenizer, train_texts: list[str], held_ids: torch.Tensor):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(args.seed)
    stream = []
    for text in train_texts:
        stream += tokenizer(text)["input_ids"] + [EOS]
    stream = torch.tensor(stream, dtype=torch.long)
    if len(stream) < args.seq_len * args.batch_size + args.seq_len:
        raise SystemExit(
            f"error: only {len(stream)} training tokens, too few for batch {args.batch_size} x {args.seq_len}"
        )

    model = PhiForCausalLM(PhiConfig(**shape))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, min(50, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warmup))
    tokens_per_step = args.batch_size * args.seq_len
    epochs = args.steps * tokens_per_step / len(stream)
    print(
        f"model: {n_params / 1e6:.2f}M parameters; train: {len(stream):,} tokens "
        f"({epochs:.1f} epochs in {args.steps} steps of {args.batch_size}x{args.seq_len})",
        flush=True,
    )

    gen = torch.Generator().manual_seed(args.seed)
    data = batches(stream, args.seq_len, args.batch_size, gen)
    model.train()
    start = time.perf_counter()
    history = []
    eval_every = max(1, args.steps // 4)
    for step in range(1, args.steps + 1):
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1 or step == args.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (args.steps - step)
            lr = sched.get_last_lr()[0]
            timing = f"{elapsed:5.0f}s  eta {eta:4.0f}s"
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.3f}  lr {lr:.2e}  {timing}", flush=True)
        if step % eval_every == 0 or step == args.steps:
            held_loss, held_ppl = perplexity(model, held_ids, args.seq_len)
            history.append(
                {
                    "step": step,
                    "train_loss": round(loss.item(), 4),
                    "heldout_loss": round(held_loss, 4),
                    "heldout_ppl": round(held_ppl, 2),
                }
            )
            print(f"  held-out loss {held_loss:.3f}  perplexity {held_ppl:.1f}", flush=True)
    info = {
        "parameters": n_params,
        "train_tokens": len(stream),
        "epochs": round(epochs, 2),
        "train_seconds": round(time.perf_counter() - start, 1),
        "history": history,
    }
    return model, info


def unigram_perplexity(train_ids: list[int], held_ids: list[int], vocab_size: int, alpha: float = 0.1) -> float:
    """Perplexity of an add-alpha smoothed unigram model of the training tokens on the held-out tokens."""
    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab_size).double() + alpha
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[torch.tensor(held_ids)].mean().item())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    if out.exists() and not args.force:
        print(f"{out} already exists; skipping (use --force to rebuild)")
        return 0
    missing = [f for f in TOKENIZER_FILES if not (args.tokenizer / f).is_file()]
    if missing:
        raise SystemExit(f"error: tokenizer folder {args.tokenizer} lacks {', '.join(missing)}")

    from transformers import AutoTokenizer, PhiForCausalLM

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    tokenizer.model_max_length = 10**9  # we tokenize whole documents and window them ourselves
    vocab_size = args.vocab_size or (PHI2_VOCAB if len(tokenizer) > EOS + 1 else MODEL_SHAPE["vocab_size"])
    if vocab_size < len(tokenizer):
        raise SystemExit(f"error: --vocab-size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    shape = {**MODEL_SHAPE, "vocab_size": vocab_size, "max_position_embeddings": args.context}
    train_topics, held_topics = split_topics()
    held_text = "\n\n".join(held_topics.values()) + "\n"
    held_ids = torch.tensor(tokenizer(held_text)["input_ids"], dtype=torch.long)
    train_chars = sum(map(len, train_topics.values()))
    print(
        f"pydoc topics: {len(train_topics)} train ({train_chars:,} chars), {len(held_topics)} held out "
        f"({len(held_text):,} chars, {len(held_ids):,} tokens): {', '.join(held_topics)}",
        flush=True,
    )
    train_ids = [i for t in train_topics.values() for i in tokenizer(t)["input_ids"]]
    unigram = unigram_perplexity(train_ids, held_ids.tolist(), vocab_size)
    print(f"unigram (add-0.1) held-out perplexity: {unigram:.1f}", flush=True)

    extra = extra_documents(args.extra_text, args.extra_field, args.extra_slice) if args.extra_text else []
    if args.extra_text:
        print(f"extra text: {len(extra)} documents ({sum(map(len, extra)):,} chars) from {args.extra_text}", flush=True)
    if args.chat_text:
        extra += chat_documents(args.chat_text, args.chat_exclude)
    model, info = train(args, shape, tokenizer, list(train_topics.values()) + extra, held_ids)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES:
        if (args.tokenizer / name).is_file():
            shutil.copyfile(args.tokenizer / name, tmp / name)
    (tmp / "heldout.txt").write_text(held_text)
    with open(tmp / "heldout.jsonl", "w") as f:
        for text in held_topics.values():
            f.write(json.dumps({"text": text}) + "\n")

    # Verify the saved folder on its own: reload model and tokenizer, re-measure held-out perplexity.
    loaded = PhiForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    loaded_tok = AutoTokenizer.from_pretrained(str(tmp))
    loaded_tok.model_max_length = 10**9
    reload_ids = torch.tensor(loaded_tok((tmp / "heldout.txt").read_text())["input_ids"], dtype=torch.long)
    loss, ppl = perplexity(loaded, reload_ids, args.seq_len)
    trained_ppl = info["history"][-1]["heldout_ppl"]
    if not torch.equal(reload_ids, held_ids):
        raise SystemExit("error: the reloaded tokenizer does not reproduce the held-out token ids")
    if abs(ppl - trained_ppl) > 0.01 * trained_ppl:
        raise SystemExit(f"error: reloaded checkpoint gives perplexity {ppl:.2f}, trained model gave {trained_ppl:.2f}")

    info = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "force", "extra_slice")
        },
        "model": shape,
        "extra_text": {"documents": len(extra), "chars": sum(map(len, extra))},
        "split": {
            "train_topics": len(train_topics),
            "heldout_topics": list(held_topics),
            "heldout_tokens": len(held_ids),
        },
        **info,
        "unigram_heldout_ppl": round(unigram, 2),
        "heldout_loss": round(loss, 4),
        "heldout_ppl": round(ppl, 2),
        "eval": f"heldout.txt, non-overlapping {args.seq_len}-token windows, fp32",
        "total_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    (tmp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")

    if out.exists():  # --force: swap the new folder in, then drop the old one
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    print(
        f"reloaded from {out}: held-out loss {loss:.3f}, perplexity {ppl:.2f} (unigram {unigram:.1f}); "
        f"{info['parameters'] / 1e6:.2f}M parameters; {info['total_seconds']:.0f}s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
