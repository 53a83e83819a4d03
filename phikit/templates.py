"""Prompt templates: how a user turn is wrapped for Phi, and the turn markers that end a reply.

Phi-2 is a base model that keeps writing past its answer, usually by starting the next turn
("\\nInstruct:", "### Human:"); those markers are the template's stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from phikit.errors import PhikitError


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


TEMPLATES = {
    "raw": Template("raw", "{prompt}", ()),
    "instruct": Template("instruct", "Instruct: {prompt}\nOutput:", ("\nInstruct:", "\nOutput:"), "\n"),
    "guanaco": Template("guanaco", "### Human: {prompt}### Assistant:", ("### Human:", "### Assistant:"), ""),
}


def get_template(spec: str | Template | None) -> Template:
    """A template by name (raw, instruct, guanaco) or a user format string containing ``{prompt}``.

    A user template stops where its own turn marker (the text before ``{prompt}``) appears again.
    """
    if isinstance(spec, Template):
        return spec
    if spec is None:
        return TEMPLATES["raw"]
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{prompt}" not in spec:
        raise PhikitError(
            f"unknown template {spec!r}; use one of {', '.join(TEMPLATES)} or a format string "
            "containing {prompt}, e.g. 'User: {prompt}\\nAssistant:'"
        )
    spec = spec.replace("\\n", "\n").replace("\\t", "\t")  # "\n" typed on a command line
    marker = spec.split("{prompt}")[0].strip()
    return Template("custom", spec, (marker,) if marker else ())
