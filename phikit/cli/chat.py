"""``phikit chat``."""

from __future__ import annotations

import argparse

from phikit.cli.common import EPILOG, add_model_args, check_generation, load_model


def add_parser(sub) -> None:
    ch = sub.add_parser(
        "chat",
        help="chat in the terminal (streaming, history, /reset, /exit)",
        description="A terminal conversation; the history is kept within the context window.",
        epilog=EPILOG,
    )
    add_model_args(ch, adapter="a LoRA adapter folder, used unmerged", kv_cache=True)
    ch.add_argument(
        "--template",
        "-t",
        default="auto",
        help="how turns are written: chat (the checkpoint's chat template), guanaco, instruct or 'User: {prompt}"
        "\\nBot:'; default auto: chat where the checkpoint has a chat template (Phi-3, Phi-4), else guanaco",
    )
    ch.add_argument("--system", help="a system message before the conversation")
    ch.add_argument("--max-new-tokens", "-n", type=int, default=256, help="reply length limit (default 256)")
    ch.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy; default 0.7)")
    ch.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    ch.add_argument("--seed", type=int, help="random seed")
    ch.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from phikit.chat import chat
    from phikit.generate import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    check_generation(config)
    phi = load_model(args)
    chat(phi, args.template, config, system=args.system)
