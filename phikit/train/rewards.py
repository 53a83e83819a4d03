"""GRPO's rewards: built-in ones and the user's own functions, called as TRL calls them.

A reward function takes keyword arguments and returns one float per completion (None where it does not
apply): ``prompts`` and ``completions`` (texts), ``completion_ids`` (token ids), and every other column of the
data rows, one value per completion (each row's value repeated for its group). Built-ins, by name:
  answer   1.0 when the last number in the completion equals the row's ``answer`` column, else 0.0
           (a verifiable task: arithmetic checked exactly)
  regex    1.0 when the completion matches ``reward_regex`` from its start (a format reward), else 0.0
  length   0 up to ``max_completion_length`` minus a quarter of it, then down linearly to -1 at the
           length limit (TRL's soft overlong punishment)
Anything else is ``package.module:function``, imported from the Python path: recipes name code the user
wrote, as ``reward_funcs`` in TRL (a recipe is trusted as the code it names is).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from phikit.errors import PhikitError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_reward(completions: list[str], answer: list, **_) -> list[float]:
    """1.0 where the completion's last number equals the expected answer (compared as numbers), else 0.0."""
    out = []
    for text, expected in zip(completions, answer):
        found = NUMBER.findall(text)
        try:
            out.append(float(bool(found) and math.isclose(float(found[-1]), float(expected))))
        except (TypeError, ValueError):
            out.append(0.0)
    return out


def regex_reward(pattern: str) -> Callable[..., list[float]]:
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completions: list[str], **_) -> list[float]:
        return [1.0 if compiled.match(text) else 0.0 for text in completions]

    reward.__name__ = "regex"
    return reward


def length_reward(limit: int) -> Callable[..., list[float]]:
    margin = max(1, limit // 4)

    def reward(completion_ids: list[list[int]], **_) -> list[float]:
        free = limit - margin
        return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / margin) for ids in completion_ids]

    reward.__name__ = "length"
    return reward


def reward_functions(names: list[str], regex: str | None, limit: int) -> list[tuple[str, Callable]]:
    """(name, function) for each entry of ``reward_funcs``; a name that cannot be resolved is a PhikitError."""
    out = []
    for name in names:
        if name == "answer":
            out.append((name, answer_reward))
        elif name == "regex":
            if not regex:
                raise PhikitError("reward_funcs: the regex reward needs reward_regex (a pattern)")
            try:
                out.append((name, regex_reward(regex)))
            except re.error as e:
                raise PhikitError(f"reward_regex: not a valid regular expression ({e})") from None
        elif name == "length":
            out.append((name, length_reward(limit)))
        elif ":" in name:
            module, _, attribute = name.partition(":")
            try:
                function = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as e:
                raise PhikitError(f"reward_funcs: cannot load {name} ({e})") from None
            if not callable(function):
                raise PhikitError(f"reward_funcs: {name} is not a function")
            out.append((attribute, function))
        else:
            raise PhikitError(
                f"reward_funcs: unknown reward {name!r}; use answer, regex, length or package.module:function"
            )
    return out
