"""``phikit generate``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from phikit.cli.common import EPILOG, add_model_args, add_sampling_args, check_generation, input_file, load_model
from phikit.errors import PhikitError


def add_parser(sub) -> None:
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
        help='batch mode: a .txt file with one prompt per line, or .jsonl with {"prompt": ...} rows ("-": '
        "lines of stdin); prints one JSON object per prompt",
    )
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together in --file mode (default 8)")
    g.add_argument("--stream", action="store_true", help="print the completion as it is generated")
    g.add_argument("--quiet", "-q", action="store_true", help="no statistics on stderr")
    g.add_argument(
        "--system", help="a system message before the prompt (with any --template but raw: chat, auto, guanaco ...)"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (pays off on GPUs; minutes of compiling on first use)",
    )
    add_model_args(g, adapter="a LoRA adapter folder (ours or PEFT's), used unmerged", kv_cache=True)
    add_sampling_args(g)
    g.set_defaults(func=run)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt (one per non-empty line) or .jsonl ({"prompt": ...} per line) file; ``-`` reads
    the lines of stdin."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
    else:
        data = input_file(path, "--file").read_bytes()
    try:
        lines = data.decode("utf-8-sig").splitlines()  # a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
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


SYSTEM_NEEDS = "--system needs a template that writes a conversation: --template chat, auto, guanaco, instruct, yours"


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


def run(args: argparse.Namespace) -> None:
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
            prompts = [sys.stdin.buffer.read().decode("utf-8-sig")]
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
    check_generation(config)
    if args.template not in ("chat", "auto"):  # those need the checkpoint's tokenizer (and never give raw)
        if get_template(args.template).name == "raw" and args.system:  # fail before the slow load
            raise PhikitError(SYSTEM_NEEDS)
    if args.stream and args.file:
        raise PhikitError("--stream prints one completion as it is generated; --file prints one JSON line per prompt")
    phi = load_model(args, progress=not args.quiet)
    template = get_template(args.template, phi.tokenizer)
    if args.system:  # each prompt as a conversation: the system message, then the prompt as the user's turn
        system = {"role": "system", "content": args.system}
        prompts = [template.render_messages([system, {"role": "user", "content": p}]) for p in prompts]
        config = GenerationConfig(**{**config.__dict__, "stop": (*template.stop, *config.stop)})
        template = get_template("raw")
    if args.draft_model:
        draft = load_model(args, progress=False, model=args.draft_model, adapter=None)
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
        longest = max((c.prompt_tokens + len(c.token_ids) for c in results), default=0)
        cache = phi.model.kv_cache_bytes(longest) / 1e6
        kind = str(phi.model.cache_dtype()).removeprefix("torch.")
        print(
            f"{sum(c.prompt_tokens for c in results)} prompt + {new} new tokens in {elapsed:.2f} s | "
            f"{speed} | peak memory {peak:.2f} GB | KV cache {cache:.1f} MB for {longest} tokens ({kind})",
            file=sys.stderr,
        )
