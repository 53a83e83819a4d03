"""Prompt templates: how a conversation is written for the model, and what ends a reply.

Two kinds, one interface (``render``, ``render_messages``, ``conversation_segments``, ``stop``):

- ``Template``: a format string with ``{prompt}`` (``raw``, ``instruct``, ``guanaco`` or a user's own), for
  base models such as Phi-2, which keep writing past their answer, usually by starting the next turn
  ("\\nInstruct:", "### Human:"); those markers are the template's stop strings.
- ``ChatTemplate``: the checkpoint's own Jinja ``chat_template`` (Phi-3, Phi-3.5, Phi-4, Phi-4-mini),
  rendered in a sandbox with transformers' ``apply_chat_template`` semantics; the reply ends at a stop token
  of the tokenizer (``<|end|>``, the EOS ids), not at a string.

``get_template("chat", tokenizer)`` gives the checkpoint's template; ``"auto"`` gives it where the tokenizer
has one and the guanaco format otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from phikit.errors import ConversationRefused, PhikitError

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Template:
    """``prompt`` is a format string with ``{prompt}``; ``stop`` ends generation when it appears.

    ``separator`` goes after each assistant reply when several turns are rendered (chat, training data).
    """

    name: str
    prompt: str
    stop: tuple[str, ...] = ()
    separator: str = "\n"

    def render(self, prompt: str) -> str:
        return self.prompt.replace("{prompt}", prompt)

    def render_chat(self, turns: list[tuple[str, str]], user: str) -> str:
        """Earlier (user, assistant) turns, then the new user turn, ready for the reply."""
        text = ""
        for question, answer in turns:
            text += self.render(question) + " " + answer.strip() + self.separator
        return text + self.render(user)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Chat messages ({"role", "content"}) ending with a user turn, ready for the reply: system (and
        developer) text joins the next user turn. A malformed conversation is a ValueError saying why."""
        turns, pending = _turns(messages)
        if pending is None:
            raise ValueError("the last message must be from the user")
        return self.render_chat(turns, pending)

    def conversation_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """A conversation ending with the assistant as (text, trained on) segments: each assistant reply is
        trained on unless its message has ``"weight": 0`` (OpenAI's fine-tuning format)."""
        turns, pending = _turns(messages)
        if pending is not None or not turns:
            raise ValueError("the last message must be the assistant's")
        weights = [_trained(m) for m in messages if m["role"] == "assistant"]
        segments: list[tuple[str, bool]] = []
        for i, (user, reply) in enumerate(turns):
            segments.append(((self.separator if i else "") + self.render(user), False))
            segments.append((" " + reply.strip(), weights[i]))
        return segments


def _turns(messages: list[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """(user, assistant) pairs and a last user text without a reply (or None)."""
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    system = ""
    for m in messages:
        role, text = _role_and_text(m)
        if role in ("system", "developer"):
            system += text.strip() + "\n"
        elif role == "user":
            if pending is not None:
                raise ValueError("two user messages in a row; put them in one message")
            pending, system = system + text, ""
        else:
            if pending is None:
                raise ValueError("an assistant message must follow a user message")
            turns.append((pending, text))
            pending = None
    return turns, pending


def _trained(message: dict) -> bool:
    """An assistant message's ``weight``: 1 (the default) is trained on, 0 is not."""
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(f'a message\'s "weight" is 0 (left out of the loss) or 1, got {weight!r}')
    return weight == 1


def _role_and_text(message) -> tuple[str, str]:
    if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
        raise ValueError('each message needs "role" (system, user, assistant) and string "content"')
    return message["role"], message["content"]


TEMPLATES = {
    "raw": Template("raw", "{prompt}", ()),
    "instruct": Template("instruct", "Instruct: {prompt}\nOutput:", ("\nInstruct:", "\nOutput:"), "\n"),
    "guanaco": Template("guanaco", "### Human: {prompt}### Assistant:", ("### Human:", "### Assistant:"), ""),
}


class ChatTemplate:
    """A checkpoint's Jinja ``chat_template``, rendered as transformers' ``apply_chat_template`` renders it:
    an immutable sandbox (the template comes from the Hub: it may not touch Python objects), ``trim_blocks``
    and ``lstrip_blocks``, the loopcontrols extension, a ``tojson`` that does not escape HTML,
    ``raise_exception`` and ``strftime_now``; variables ``messages``, ``add_generation_prompt`` and the
    tokenizer's special tokens (``bos_token``, ``eos_token``, ...). ``stop`` is empty: replies end at the
    tokenizer's stop tokens (``<|end|>`` and every EOS id)."""

    name = "chat"
    stop: tuple[str, ...] = ()

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        for m in messages:  # the template decides which roles it knows
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError('each message needs a string "role" and string "content"')
        try:
            return self._template.render(
                messages=[{k: v for k, v in m.items() if k != "weight"} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:  # raise_exception in the template, or the sandbox refusing
            raise ConversationRefused(f"the chat template refused the conversation: {e}") from None

    def render(self, prompt: str) -> str:
        return self.render_messages([{"role": "user", "content": prompt}])

    def render_chat(self, turns: list[tuple[str, str]], user: str) -> str:
        messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return self.render_messages([*messages, {"role": "user", "content": user}])

    def conversation_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The whole conversation as the template renders it, cut into prompt and reply segments: a reply
        runs from the end of the conversation before it rendered with the generation prompt to where the
        conversation rendered up to and including it stops agreeing with the whole (its closing tokens,
        ``<|end|>``, belong to the reply; a final EOS the template adds goes with the last reply)."""
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("the last message must be the assistant's")
        full = self.render_messages(messages, add_generation_prompt=False)
        segments: list[tuple[str, bool]] = []
        done = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("an assistant message must follow a user message")
            prefix = self.render_messages(messages[:i], add_generation_prompt=True)
            start = len(prefix)
            end = _common_prefix(self.render_messages(messages[: i + 1], add_generation_prompt=False), full)
            if not full.startswith(prefix) or not done <= start <= end:
                raise ValueError("the chat template does not render this conversation turn by turn")
            if start > done:
                segments.append((full[done:start], False))
            segments.append((full[start:end], _trained(m)))
            done = end
        if done < len(full):
            segments.append((full[done:], False))
        return segments


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in jinja2's immutable sandbox with transformers' globals and filters."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PhikitError("chat templates need the jinja2 package: pip install jinja2") from None

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (templates that mark replies for training): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise PhikitError(f"the checkpoint's chat_template is not a valid Jinja template ({e})") from None


def get_template(spec, tokenizer=None, fallback: str = "guanaco") -> Template | ChatTemplate:
    """A template by name (raw, instruct, guanaco), ``chat`` (the checkpoint's chat_template, from
    ``tokenizer``), ``auto`` (chat where the tokenizer has one, else ``fallback``), or a user format string
    containing ``{prompt}``. A user template stops where its own turn marker (the text before ``{prompt}``)
    appears again."""
    if isinstance(spec, (Template, ChatTemplate)):
        return spec
    if spec is None:
        return TEMPLATES["raw"]
    if spec in ("chat", "auto"):
        source = getattr(tokenizer, "chat_template", None)
        if source:
            return ChatTemplate(source, tokenizer.special_tokens)
        if spec == "auto":
            return TEMPLATES[fallback]
        where = f" {tokenizer.folder}" if tokenizer is not None else ""
        raise PhikitError(
            f"template 'chat' needs the checkpoint's chat_template, and the tokenizer{where} has none "
            "(tokenizer_config.json chat_template or chat_template.jinja); use instruct, guanaco or your own"
        )
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{prompt}" not in spec:
        raise PhikitError(
            f"unknown template {spec!r}; use one of {', '.join(TEMPLATES)}, chat, auto or a format string "
            "containing {prompt}, e.g. 'User: {prompt}\\nAssistant:'"
        )
    spec = spec.replace("\\n", "\n").replace("\\t", "\t")  # "\n" typed on a command line
    marker = spec.split("{prompt}")[0].strip()
    return Template("custom", spec, (marker,) if marker else ())
