"""GRPO's rewards: built-in ones and the user's own functions, called as TRL calls them.

A reward function takes keyword arguments and returns one float per completion (None where it does not
apply; a list, tuple, NumPy array or tensor): ``prompts`` and ``completions`` (texts; where the data's prompts
are chat messages, TRL's conversational form: each prompt its messages, each completion
[{"role": "assistant", "content": text}]), ``completion_ids`` (token ids), ``trainer_state`` (its
``global_step``) and every other column of the data rows, one value per completion (each row's value
repeated for its group). Built-ins, by name (always given texts):
  answer   1.0 when the last number in the completion equals the row's ``answer`` column, else 0.0
           (a verifiable task: arithmetic checked exactly)
  regex    1.0 when the completion matches ``reward_regex`` from its start (a format reward), else 0.0
  length   0 up to ``max_completion_length`` minus a quarter of it, then down linearly to -1 at the
           length limit (TRL's soft overlong punishment)
Anything else is ``package.module:function``, imported from the working folder or the Python path: recipes
name code the user wrote, as ``reward_funcs`` in TRL (a recipe is trusted as the code it names is).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
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


STANDARD = {"prompts", "completions", "completion_ids", "trainer_state"}  # what every call passes


def columns_taken(function: Callable) -> set[str]:
    """The data columns a reward function requires: its parameters without a default beyond the standard ones."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in named and p.default is p.empty} - STANDARD


def _import(module: str):
    """``module`` imported from the working folder as well as the Python path (as ``python -m`` would find it;
    the ``phikit`` command's own folder is on its path, not the user's)."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module)
    finally:
        if added:
            sys.path.remove(here)


def reward_functions(names: list[str], regex: str | None, limit: int) -> list[tuple[str, Callable]]:
    """(name, function) for each entry of ``reward_funcs``, names unique (a second ``answer`` is ``answer_2``,
    so each has its own ``rewards/<name>`` metric); a name that cannot be resolved is a PhikitError."""
    out: list[tuple[str, Callable]] = []
    for entry in names:
        name, function = _resolve(entry, regex, limit)
        taken = {n for n, _ in out}
        unique = next(n for n in (name, *(f"{name}_{i}" for i in range(2, len(out) + 3))) if n not in taken)
        out.append((unique, function))
    return out


def _resolve(name: str, regex: str | None, limit: int) -> tuple[str, Callable]:
    if name == "answer":
        return name, answer_reward
    if name == "regex":
        if not regex:
            raise PhikitError("reward_funcs: the regex reward needs reward_regex (a pattern)")
        try:
            return name, regex_reward(regex)
        except re.error as e:
            raise PhikitError(f"reward_regex: not a valid regular expression ({e})") from None
    if name == "length":
        return name, length_reward(limit)
    if ":" not in name:
        raise PhikitError(
            f"reward_funcs: unknown reward {name!r}; use answer, regex, length or package.module:function"
        )
    module, _, attribute = name.partition(":")
    try:
        function = getattr(_import(module), attribute)
    except (ImportError, AttributeError) as e:
        raise PhikitError(f"reward_funcs: cannot load {name} ({e})") from None
    if not callable(function):
        raise PhikitError(f"reward_funcs: {name} is not a function")
    return attribute, function


def built_in(function: Callable) -> bool:
    """One of phikit's own rewards (given texts whatever the prompts' form)."""
    return getattr(function, "__module__", None) == __name__
