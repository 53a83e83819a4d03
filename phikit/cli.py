"""The ``phikit`` command: parses arguments and calls library functions a user could call from Python."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from phikit import __version__
from phikit.checkpoint import DEFAULT_MODEL
from phikit.errors import PhikitError

EPILOG = "Models: a local folder (config.json + *.safetensors) or a Hugging Face Hub id such as microsoft/phi-2."


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model folder or Hub id (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="weight/compute dtype (default auto: bf16, or fp16 on GPUs without bf16)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: GPU if present)")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["int8", "int4", "nf4"],
        help="quantize linear layers while loading: int8 (per channel), int4 (per group), nf4 "
        "(QLoRA's 4-bit; bitsandbytes on CUDA); a checkpoint from 'phikit quantize' needs none",
    )
    p.add_argument(
        "--group-size", type=int, default=64, choices=[32, 64, 128, 256], help="int4 group size (default 64)"
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--template",
        "-t",
        default="raw",
        help="prompt template: raw, instruct ('Instruct: {prompt}\\nOutput:'), guanaco "
        "('### Human: {prompt}### Assistant:') or your own string with {prompt} (default raw)",
    )
    p.add_argument("--max-new-tokens", "-n", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when TEXT appears (repeatable); the template's turn markers always stop",
    )
    p.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="speculative decoding with drafts copied from earlier text (greedy only; same output)",
    )
    p.add_argument(
        "--draft-model",
        metavar="M",
        help="speculative decoding with a smaller model sharing the tokenizer, e.g. microsoft/phi-1_5 "
        "for Phi-2 (greedy only; same output)",
    )
    p.add_argument("--draft-tokens", type=int, default=5, help="tokens drafted per speculative step (1-7, default 5)")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the last tokens of a prompt too long for the context instead of failing",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phikit",
        description="Run, quantize, benchmark, fine-tune, evaluate and serve Microsoft Phi-2 "
        "(and Phi-1/Phi-1.5) on one GPU or a CPU.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"phikit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="complete a prompt (or a file of prompts)",
        description="Complete a prompt. Prints only the completion on stdout; load time, "
        "speed and peak memory go to stderr.",
        epilog=EPILOG,
    )
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from stdin)")
    g.add_argument(
        "--file",
        "-f",
        type=Path,
        help='batch mode: a .txt file with one prompt per line, or .jsonl with {"prompt": ...} rows; '
        "prints one JSON object per prompt",
    )
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together in --file mode (default 8)")
    g.add_argument("--stream", action="store_true", help="print the completion as it is generated")
    g.add_argument("--quiet", "-q", action="store_true", help="no statistics on stderr")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (pays off on GPUs; minutes of compiling on first use)",
    )
    add_model_args(g)
    add_quantize_args(g)
    g.add_argument("--adapter", "-a", metavar="DIR", help="a LoRA adapter folder (ours or PEFT's), used unmerged")
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser(
        "quantize",
        help="write a quantized checkpoint that loads without re-quantizing",
        description="Quantize a model's linear layers and save it as a checkpoint folder. "
        "Layers are quantized one at a time while loading, so memory stays near "
        "the size of the quantized model.",
        epilog=EPILOG,
    )
    q.add_argument("out", type=Path, help="output folder (must not exist unless --overwrite)")
    q.add_argument("--to", required=True, choices=["int8", "int4", "nf4"], help="quantization format")
    q.add_argument(
        "--group-size", type=int, default=64, choices=[32, 64, 128, 256], help="int4 group size (default 64)"
    )
    q.add_argument(
        "--keep-lm-head", action="store_true", help="leave lm_head unquantized (larger, slightly more accurate)"
    )
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_model_args(q)
    q.set_defaults(func=cmd_quantize)

    f = sub.add_parser(
        "finetune",
        help="LoRA/QLoRA supervised fine-tuning from a YAML recipe",
        description="Fine-tune with LoRA (QLoRA with quantize: nf4) from a recipe; any recipe key "
        "can be overridden on the command line, e.g. --lr 2e-4 --max_steps 100. "
        "Writes checkpoints, metrics.jsonl and the final PEFT-format adapter to "
        "output_dir/adapter. Runs DDP under torchrun --nproc-per-node N.",
        epilog="Recipes: recipes/phi2-qlora-guanaco.yaml (the reference QLoRA run), "
        "recipes/tiny-cpu.yaml (a small CPU run).",
    )
    f.add_argument("--config", "-c", type=Path, help="recipe YAML (see recipes/)")
    f.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)

    mg = sub.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model and save a HF checkpoint",
        description="Write base + adapter as one transformers checkpoint (config.json, safetensors "
        "shards, tokenizer files) that transformers, vLLM and phikit load.",
        epilog=EPILOG,
    )
    mg.add_argument("out", type=Path, help="output folder (must not exist unless --overwrite)")
    mg.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, help=f"base model folder or Hub id (default: {DEFAULT_MODEL})"
    )
    mg.add_argument("--adapter", "-a", required=True, help="LoRA adapter folder")
    mg.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="dtype of the merged weights (default: the base checkpoint's)"
    )
    mg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    mg.set_defaults(func=cmd_merge)

    ex = sub.add_parser(
        "export",
        help="export (with an adapter merged) as a HF checkpoint or a GGUF file for llama.cpp",
        description="--format hf writes a transformers checkpoint folder (transformers, vLLM); --format gguf "
        "writes one GGUF file (llama.cpp, Ollama) in f16, q8_0 or f32. Quantized phikit checkpoints cannot be "
        "exported: export the full-precision checkpoint they came from.",
        epilog=EPILOG,
    )
    ex.add_argument("out", type=Path, help="output folder (hf) or file, e.g. phi-2-q8_0.gguf (gguf)")
    ex.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model folder or Hub id (default: {DEFAULT_MODEL})")
    ex.add_argument("--adapter", "-a", help="a LoRA adapter folder to merge in first")
    ex.add_argument("--format", "-f", choices=["hf", "gguf"], default="hf", help="output format (default hf)")
    ex.add_argument(
        "--type", dest="gguf_type", choices=["f16", "q8_0", "f32"], default="f16", help="GGUF tensor type (default f16)"
    )
    ex.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="hf: dtype of the weights (default: the checkpoint's)"
    )
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve /v1/completions and /v1/chat/completions (streaming too), /v1/models "
        "and /health. Concurrent requests are decoded together (continuous batching).",
        epilog=EPILOG,
    )
    add_model_args(sv)
    add_quantize_args(sv)
    sv.add_argument(
        "--adapter",
        "-a",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a LoRA adapter: DIR applies it to every request; NAME=DIR (repeatable) serves it as model NAME "
        "next to the base, several adapters decoding in one batch",
    )
    sv.add_argument("--template", "-t", default="guanaco", help="how chat messages are rendered (default guanaco)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    sv.add_argument("--model-name", help="model id reported and accepted by the API (default: from --model)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting when every slot is taken; more get 503 (default 64)"
    )
    sv.add_argument("--timeout", type=float, default=600, help="seconds a request may take (default 600)")
    sv.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none (default 256)")
    sv.add_argument("--max-body-mb", type=float, default=4, help="largest request body in MB; more get 413 (default 4)")
    sv.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=512,
        help="memory for reusing the keys/values of prompt prefixes already seen (0: off; default 512)",
    )
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser(
        "chat",
        help="chat in the terminal (streaming, history, /reset, /exit)",
        description="A terminal conversation; the history is kept within the context window.",
        epilog=EPILOG,
    )
    add_model_args(ch)
    add_quantize_args(ch)
    ch.add_argument("--adapter", "-a", metavar="DIR", help="a LoRA adapter folder, used unmerged")
    ch.add_argument("--template", "-t", default="guanaco", help="prompt template of the turns (default guanaco)")
    ch.add_argument("--max-new-tokens", "-n", type=int, default=256, help="reply length limit (default 256)")
    ch.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy; default 0.7)")
    ch.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    ch.add_argument("--seed", type=int, help="random seed")
    ch.set_defaults(func=cmd_chat)

    ev = sub.add_parser(
        "eval",
        help="run a prompt suite side by side, or lm-evaluation-harness tasks",
        description="Suite mode runs the prompts of --suite (default: the reference tutorials' ten "
        "prompts) on the model and on each --compare variant, one model loaded at a "
        "time, and writes a side-by-side report.md and report.html to --out. "
        "With --lm-eval it runs lm-evaluation-harness tasks (pip install lm-eval).",
        epilog="Example: phikit eval --model microsoft/phi-2 --compare fine-tuned:adapter=runs/x/adapter "
        "--compare int4:quantize=int4 --out eval/",
    )
    add_model_args(ev)
    add_quantize_args(ev)
    ev.add_argument("--adapter", "-a", metavar="DIR", help="a LoRA adapter folder")
    ev.add_argument("--suite", type=Path, help="prompt suite YAML (default: the built-in suite)")
    ev.add_argument("--out", type=Path, default=Path("eval"), help="output folder (default eval/)")
    ev.add_argument("--label", default="base", help="column label of the model itself (default base)")
    ev.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL:key=value,...",
        help="another column: the same options with some changed (keys: model, adapter, quantize, "
        "dtype, group_size); repeatable",
    )
    ev.add_argument("--template", "-t", help="override the suite's template")
    ev.add_argument("--max-new-tokens", "-n", type=int, help="override the suite's max_new_tokens")
    ev.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks instead of a suite")
    ev.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples")
    ev.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction)")
    ev.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    ev.add_argument("--include-path", help="lm-eval: a folder of extra task YAMLs")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="measure prefill/decode speed, first-token latency, load time and memory",
        description="Benchmark a model at several precisions, each in a fresh process; prints a "
        "Markdown table (and JSON with --json). Medians of --repeats runs after a "
        "warm-up; decode always runs --new-tokens tokens.",
        epilog=EPILOG,
    )
    b.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model folder or Hub id (default: {DEFAULT_MODEL})")
    b.add_argument(
        "--precisions",
        default="bf16,int8,int4",
        help="comma-separated, from fp32, bf16, fp16, int8, int4, nf4 (default bf16,int8,int4)",
    )
    b.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill (default 128)")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    b.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256], help="int4 group size")
    b.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    b.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also run transformers generate on the same checkpoint (bf16 and each dense precision)",
    )
    b.add_argument("--perplexity-data", metavar="FILE", help="also report perplexity on FILE (.txt or .jsonl)")
    b.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    b.set_defaults(func=cmd_bench)

    pp = sub.add_parser(
        "perplexity",
        help="perplexity of a model on a text file (sliding window)",
        description='Perplexity on a .txt file or the "text" fields of a .jsonl file, with '
        "windows of --context tokens every --stride tokens.",
        epilog=EPILOG,
    )
    pp.add_argument("--data", "-d", type=Path, required=True, help='a .txt file or .jsonl with a "text" field')
    pp.add_argument("--context", type=int, default=1024, help="window length in tokens (default 1024)")
    pp.add_argument("--stride", type=int, help="tokens between windows (default context/2)")
    pp.add_argument("--max-tokens", type=int, help="only the first N tokens of the data")
    add_model_args(pp)
    add_quantize_args(pp)
    pp.set_defaults(func=cmd_perplexity)
    return parser


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt (one per non-empty line) or .jsonl ({"prompt": ...} per line) file."""
    if not path.is_file():
        raise PhikitError(f"{path}: prompt file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise PhikitError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PhikitError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PhikitError(f'{path}:{number}: expected an object with a string "prompt" field')
        prompts.append(row["prompt"])
    return prompts


def sampling_overrides(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        truncate=args.truncate,
        prompt_lookup=args.prompt_lookup,
        draft_tokens=args.draft_tokens,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from phikit.api import load
    from phikit.generate import GenerationConfig, SpeculativeStats, compile_decode, generate, peak_memory_bytes
    from phikit.templates import get_template

    if args.file is None and args.prompt is None:
        raise PhikitError("give a prompt, '-' to read it from stdin, or --file PROMPTS")
    if args.file is not None and args.prompt is not None:
        raise PhikitError("give either a prompt or --file, not both")
    if args.file:
        prompts = read_prompts(args.file)
    elif args.prompt == "-":
        try:
            prompts = [sys.stdin.buffer.read().decode("utf-8")]
        except UnicodeDecodeError as e:
            raise PhikitError(f"the prompt read from stdin is not valid UTF-8 (byte {e.start})") from None
    else:
        prompts = [args.prompt]
    if not prompts:
        raise PhikitError(f"{args.file}: no prompts in the file")
    for prompt in prompts:  # invalid UTF-8 on the command line arrives as lone surrogates
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise PhikitError("the prompt is not valid UTF-8; pass UTF-8 text (or a UTF-8 file with --file)") from None
    config = GenerationConfig(batch_size=args.batch_size, **sampling_overrides(args))
    config.validate()
    template = get_template(args.template)  # fail on a bad template before the slow load
    phi = load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        group_size=args.group_size,
        progress=not args.quiet,
        adapter=args.adapter,
    )
    if args.draft_model:
        draft = load(
            args.draft_model, dtype=args.dtype, device=args.device, quantize=args.quantize, group_size=args.group_size
        )
        phi.draft = draft.model
    if args.compile:
        compile_decode(phi.model, mode="reduce-overhead" if phi.model.device.type == "cuda" else None)
    if not args.quiet:
        print(f"loaded {args.model} ({phi.precision}, {phi.model.device}) in {phi.load_seconds:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    stats = SpeculativeStats()

    def show(index: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    single = args.file is None
    on_text = show if (single and args.stream) else None
    results = generate(
        phi.model, phi.tokenizer, prompts, config, template, on_text=on_text, draft=phi.draft, stats=stats
    )
    if single:
        print(results[0].text if not args.stream else "")
    else:
        for prompt, c in zip(prompts, results):
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "completion": c.text,
                        "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": len(c.token_ids),
                        "finish_reason": c.finish_reason,
                    },
                    ensure_ascii=False,
                )
            )
    if not args.quiet:
        elapsed = time.perf_counter() - start
        new = sum(len(c.token_ids) for c in results)
        if single:  # decode speed: tokens after the first, over the time after the first
            c = results[0]
            rate = (new - 1) / (c.seconds - c.seconds_to_first_token) if new > 1 else 0.0
            speed = f"first token {c.seconds_to_first_token:.2f} s | decode {rate:.2f} tok/s"
        else:
            speed = f"{new / elapsed:.2f} tok/s over all prompts"
        if stats.steps:
            speed += f" | drafts accepted {stats.accepted}/{stats.drafted}"
        peak = peak_memory_bytes(phi.model.device) / 1e9
        print(
            f"{sum(c.prompt_tokens for c in results)} prompt + {new} new tokens in {elapsed:.2f} s | "
            f"{speed} | peak memory {peak:.2f} GB",
            file=sys.stderr,
        )


def cmd_quantize(args: argparse.Namespace) -> None:
    from phikit.api import load, save_quantized
    from phikit.checkpoint import check_output_folder
    from phikit.quantize import QuantSpec

    local = Path(str(args.model)).expanduser()
    check_output_folder(args.out, args.overwrite, local if local.is_dir() else None)  # before the slow load
    spec = QuantSpec(args.to, args.group_size, lm_head=not args.keep_lm_head)
    start = time.perf_counter()
    phi = load(args.model, dtype=args.dtype, device=args.device, quantize=spec, progress=True)
    out = save_quantized(phi, args.out, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
    print(f"wrote {out} ({args.to}, {size:.2f} GB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    from phikit.bench import BenchSettings, markdown, run_bench

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in ("fp32", "bf16", "fp16", "int8", "int4", "nf4")]
    if unknown or not precisions:
        raise PhikitError(f"unknown precision(s) {', '.join(unknown)}; choose from fp32, bf16, fp16, int8, int4, nf4")
    if args.new_tokens < 1 or args.prompt_tokens < 1 or args.repeats < 1:
        raise PhikitError("--new-tokens, --prompt-tokens and --repeats must be at least 1")
    if args.perplexity_data and not Path(args.perplexity_data).is_file():
        raise PhikitError(f"{args.perplexity_data}: data file not found")
    settings = BenchSettings(
        args.model,
        precisions,
        args.device,
        args.prompt_tokens,
        args.new_tokens,
        args.repeats,
        args.group_size,
        args.compare_transformers,
        args.perplexity_data,
        args.threads,
    )
    from phikit.checkpoint import atomic_write

    def save(report: dict) -> None:  # after every row: an interrupted run keeps what it measured
        if args.json:
            atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))

    report = run_bench(settings, on_row=save)
    print(
        f"{report['machine']}\nmodel {args.model}, batch 1, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens\n"
    )
    print(markdown(report))
    save(report)


def cmd_perplexity(args: argparse.Namespace) -> None:
    from phikit.api import load
    from phikit.evaluate import perplexity, read_text

    phi = load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        group_size=args.group_size,
        progress=True,
    )
    ids = read_text(args.data, phi.tokenizer)
    result = perplexity(phi.model, ids, args.context, args.stride, args.max_tokens, progress=True)
    print(
        json.dumps(
            {
                "model": str(args.model),
                "precision": phi.precision,
                "perplexity": result.perplexity,
                "nll": result.nll,
                "tokens": result.tokens,
            }
        )
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    from phikit.train import TrainConfig, finetune

    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = True
    config = TrainConfig.from_yaml(args.config, overrides)
    final = finetune(config, progress=not args.quiet)
    print(f"adapter written to {final}", file=sys.stderr)


def parse_overrides(tokens: list[str]) -> dict:
    """``--lr 2e-4 --lora_targets q_proj,v_proj --packing false`` -> typed recipe overrides."""
    import dataclasses

    from phikit.train import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if not key.startswith("--") or i + 1 >= len(tokens):
            raise PhikitError(f"recipe overrides come in pairs like --lr 2e-4; got {' '.join(tokens[i:])!r}")
        name = key[2:].replace("-", "_")
        if name not in fields:
            raise PhikitError(f"unknown recipe setting --{name}; known: {', '.join(fields)}")
        out[name] = coerce(fields[name], tokens[i + 1])
        i += 2
    return out


def coerce(f, text: str):
    """A command-line string as the recipe field's type (from its default value)."""
    default = f.default if f.default is not f.default_factory else None
    kind = str(f.type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if "list" in kind:
            return [t.strip() for t in text.split(",") if t.strip()]
        if "bool" in kind or isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if "float" in kind:
            return float(text)
        if "int" in kind:
            return int(text)
    except ValueError:
        raise PhikitError(f"--{f.name}: {text!r} is not a valid {kind}") from None
    return text


def cmd_merge(args: argparse.Namespace) -> None:
    from phikit.api import merge_adapter

    start = time.perf_counter()
    out = merge_adapter(args.model, args.adapter, args.out, args.dtype, args.overwrite, progress=True)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    from phikit.export import export_gguf, export_hf

    start = time.perf_counter()
    if args.format == "gguf":
        if args.dtype:
            raise PhikitError("--dtype is for --format hf; for GGUF choose --type f16, q8_0 or f32")
        out = export_gguf(args.model, args.out, args.adapter, args.gguf_type, args.overwrite, progress=True)
    else:
        out = export_hf(args.model, args.out, args.adapter, args.dtype, args.overwrite, progress=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from phikit.api import load
    from phikit.serve import create_app, serve
    from phikit.templates import get_template

    get_template(args.template)
    check_serve_args(args)  # a mistake costs seconds, not a model load
    named = dict(a.split("=", 1) for a in args.adapter if "=" in a)
    plain = [a for a in args.adapter if "=" not in a]
    if len(plain) > 1:
        raise PhikitError("give one --adapter DIR for every request, or name them: --adapter NAME=DIR ...")
    for name, folder in named.items():
        if not Path(folder, "adapter_config.json").is_file():
            raise PhikitError(f"--adapter {name}={folder}: no adapter_config.json in {folder}")
    phi = load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        group_size=args.group_size,
        adapter=plain[0] if plain else None,
        progress=True,
    )
    name = args.model_name or Path(str(args.model)).name
    app = create_app(
        phi.model,
        phi.tokenizer,
        name,
        args.template,
        args.max_batch,
        args.max_queue,
        args.timeout,
        args.api_key,
        args.max_tokens,
        int(args.max_body_mb * 2**20),
        adapters=named or None,
        prefix_cache_mb=args.prefix_cache_mb,
    )
    cache = app.state.engine.cache
    gb = (cache.k.numel() + cache.v.numel()) * cache.k.element_size() / 1e9
    print(
        f"serving {name} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots, KV cache {gb:.2f} GB)",
        file=sys.stderr,
    )
    serve(app, args.host, args.port)


def check_serve_args(args: argparse.Namespace) -> None:
    """``phikit serve``'s flags, checked before the model loads; the port must be free to bind."""
    import math
    import socket

    if not 1 <= args.port <= 65535:
        raise PhikitError(f"--port {args.port}: choose a port between 1 and 65535")
    if args.max_batch < 1 or args.max_queue < 0:
        raise PhikitError("--max-batch must be at least 1 and --max-queue at least 0")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise PhikitError(f"--timeout {args.timeout}: give a positive number of seconds")
    if args.max_tokens < 1:
        raise PhikitError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise PhikitError(f"--max-body-mb {args.max_body_mb}: give a positive size")
    if not (math.isfinite(args.prefix_cache_mb) and args.prefix_cache_mb >= 0):
        raise PhikitError(f"--prefix-cache-mb {args.prefix_cache_mb}: give a size >= 0")
    if args.api_key is not None and not args.api_key.strip():
        raise PhikitError("--api-key is empty; give a non-empty key, or leave --api-key out to serve without one")
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PhikitError(f"--host {args.host}: cannot be resolved ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise PhikitError(f"cannot serve on {args.host}:{args.port}: {e.strerror}; choose another --port") from None


def cmd_chat(args: argparse.Namespace) -> None:
    from phikit.api import load
    from phikit.chat import chat
    from phikit.generate import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    config.validate()
    phi = load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        group_size=args.group_size,
        adapter=args.adapter,
        progress=True,
    )
    chat(phi, args.template, config)


def parse_compare(spec: str, base: dict) -> tuple[str, dict]:
    """'int4:quantize=int4,group_size=32' -> ('int4', base options with those changed)."""
    label, _, rest = spec.partition(":")
    if not label or not rest:
        raise PhikitError(f"--compare {spec!r}: expected LABEL:key=value[,key=value]")
    options = dict(base)
    for item in rest.split(","):
        key, _, value = item.partition("=")
        if key not in ("model", "adapter", "quantize", "dtype", "group_size") or not value:
            raise PhikitError(
                f"--compare {spec!r}: unknown or empty key {key!r} (model, adapter, quantize, dtype, group_size)"
            )
        if key == "group_size" and value not in ("32", "64", "128", "256"):
            raise PhikitError(f"--compare {spec!r}: group_size must be 32, 64, 128 or 256, got {value!r}")
        options[key] = int(value) if key == "group_size" else (None if value == "none" else value)
    return label, options


def cmd_eval(args: argparse.Namespace) -> None:
    import gc

    from phikit import evaluate
    from phikit.api import load
    from phikit.checkpoint import atomic_write

    base = {
        "model": args.model,
        "adapter": args.adapter,
        "quantize": args.quantize,
        "dtype": args.dtype,
        "group_size": args.group_size,
    }
    if args.lm_eval:
        results = evaluate.run_lm_eval(
            args.model,
            [t for t in args.lm_eval.split(",") if t],
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            adapter=args.adapter,
            batch_size=args.batch_size,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
        )
        print(evaluate.format_lm_eval(results))
        from lm_eval.utils import handle_non_serializable

        text = json.dumps(results, indent=2, default=handle_non_serializable)
        atomic_write(args.out / "lm_eval.json", lambda tmp: tmp.write_text(text))
        return
    suite = evaluate.load_suite(args.suite)  # a bad suite fails before any model loads
    variants = [(args.label, base)] + [parse_compare(c, base) for c in args.compare]
    overrides = {k: v for k, v in (("template", args.template), ("max_new_tokens", args.max_new_tokens)) if v}
    columns = {}
    for label, options in variants:
        print(f"[{label}] loading {options['model']} ...", file=sys.stderr)
        phi = load(
            options["model"],
            dtype=options["dtype"],
            device=args.device,
            quantize=options["quantize"],
            group_size=options["group_size"],
            adapter=options["adapter"],
            progress=True,
        )
        columns[label] = evaluate.run_suite(phi, suite, progress=True, **overrides)
        del phi
        gc.collect()
    md, html = evaluate.write_report(columns, args.out)
    atomic_write(args.out / "results.json", lambda tmp: tmp.write_text(json.dumps(columns, indent=2)))
    print(f"wrote {md} and {html}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "finetune":
        parser.parse_args(argv)  # reports the unknown arguments the usual way
    args.overrides = extra
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
        sys.stdout.flush()
    except PhikitError as e:
        print(f"phikit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nphikit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `phikit generate ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"phikit: error: the disk is full{where}; free some space and run again", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
