"""``phikit chat``: a terminal conversation with streaming replies and a history kept within the context."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from phikit.errors import ConversationRefused, PhikitError, Terminated
from phikit.generate import GenerationConfig, generate
from phikit.templates import ChatTemplate, Template, get_template

HELP = "Commands: /reset forgets the conversation, /help shows this, /exit (or Ctrl-D) quits; Ctrl-C stops a reply."


def conversation(history: list[tuple[str, str]], user: str, system: str | None = None) -> list[dict]:
    """Earlier (user, reply) turns, then the new user turn, as chat messages (a system message first)."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": user}]


def fit_history(
    history: list[tuple[str, str]],
    user: str,
    template: Template | ChatTemplate,
    count_tokens: Callable[[str], int],
    budget: int,
    system: str | None = None,
) -> list[tuple[str, str]]:
    """Drop the oldest turns until the rendered prompt fits ``budget`` tokens."""
    turns = list(history)
    while turns and count_tokens(template.render_messages(conversation(turns, user, system))) > budget:
        turns.pop(0)
    return turns


def chat(
    phi,
    template: str | Template | ChatTemplate = "auto",
    config: GenerationConfig | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    system: str | None = None,
) -> list[tuple[str, str]]:
    """Read user turns with ``read`` until /exit or end of input, stream each reply to ``out``; returns the
    history. The turns are written with ``template`` (``auto``: the checkpoint's chat template where it has
    one, else guanaco's format), after ``system`` if given. Old turns are left out (and it says so) when the
    conversation no longer fits the context window; a message that alone does not fit is refused, not cut."""
    template = get_template(template, phi.tokenizer)
    config = config or GenerationConfig(max_new_tokens=256, temperature=0.7, top_p=0.9)
    context = phi.model.config.max_position_embeddings
    if config.max_new_tokens >= context:
        raise PhikitError(
            f"--max-new-tokens {config.max_new_tokens} leaves no room for a message in the model's context of "
            f"{context} tokens; lower it"
        )
    history: list[tuple[str, str]] = []
    print(HELP, file=out)
    while True:
        try:
            user = read("you> ").strip()
        except (EOFError, KeyboardInterrupt) as e:
            if isinstance(e, Terminated):  # SIGTERM: the program ends (exit 143), not just the conversation
                raise
            print(file=out)
            return history
        if not user:
            continue
        try:
            user.encode("utf-8")  # bytes that are not UTF-8 arrive as lone surrogates
        except UnicodeEncodeError:
            print("(that message is not valid UTF-8 text; type it again)", file=out)
            continue
        if user in ("/exit", "/quit"):
            return history
        if user == "/reset":
            history = []
            print("(conversation reset)", file=out)
            continue
        if user == "/help" or (user.startswith("/") and " " not in user):  # /help, or a mistyped command
            print(HELP if user == "/help" else f"unknown command {user}; {HELP}", file=out)
            continue
        budget = context - config.max_new_tokens
        count = lambda text: len(phi.tokenizer.encode(text))  # noqa: E731
        try:
            kept = fit_history(history, user, template, count, budget, system)
            prompt = template.render_messages(conversation(kept, user, system))
        except ConversationRefused as e:  # a chat template's raise_exception(...): its words; the turn is not taken
            print(f"({e})", file=out)
            continue
        size = count(prompt)
        if size > budget:  # the message alone: refused, never cut (a cut loses the turn's markers), history kept
            print(
                f"(this message does not fit: {size} tokens as a turn, with {config.max_new_tokens} kept "
                f"for the reply, past the context of {context}; shorten it or lower --max-new-tokens)",
                file=out,
            )
            continue
        if len(kept) < len(history):
            print(f"(the {len(history) - len(kept)} oldest turn(s) left out to fit the context)", file=out)
        history = kept
        out.write("phi> ")
        out.flush()

        pieces: list[str] = []

        def show(_index: int, piece: str, pieces: list[str] = pieces) -> None:
            pieces.append(piece)
            out.write(piece)
            out.flush()

        try:
            reply = generate(phi.model, phi.tokenizer, prompt, config, "raw", on_text=show, stop=template.stop).text
        except KeyboardInterrupt as e:  # Ctrl-C stops the reply (kept as far as it got), not the conversation
            if isinstance(e, Terminated):
                raise
            reply = "".join(pieces)
            out.write(" (stopped)")
        out.write("\n")
        history.append((user, reply.strip()))
