"""GRPO's data and its samples: prompts read and checked (file and line), groups of completions sampled with
phikit's own batched generation, scored by the reward functions and turned into training sequences.

Rows: {"prompt": "..." | [messages], ...}: text is used as written, messages are rendered with the recipe's
template and its generation prompt; every other column goes to the reward functions (e.g. "answer").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from phikit.data import IGNORE, apply_columns, read_rows
from phikit.errors import PhikitError
from phikit.templates import get_template
from phikit.tokenizer import Tokenizer


@dataclass
class PromptExample:
    ids: list[int]
    text: str
    columns: dict = field(default_factory=dict)


def load_prompts(
    source: str,
    tokenizer: Tokenizer,
    template: str = "guanaco",
    split: str = "train",
    max_prompt_tokens: int = 512,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[PromptExample], int]:
    """(prompts, malformed rows skipped); a prompt longer than ``max_prompt_tokens`` keeps its end."""
    chat = get_template(template, tokenizer)
    prompts: list[PromptExample] = []
    skipped = 0
    for where, row in read_rows(source, split):
        try:
            text, extra = _prompt(row, columns, chat)
        except (ValueError, TypeError) as e:
            if skip_bad_rows:
                skipped += 1
                continue
            raise PhikitError(f"{where}: {e} (GRPO prompts); fix the row or set skip_bad_rows") from None
        prompts.append(PromptExample(tokenizer.encode(text)[-max_prompt_tokens:], text, extra))
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise PhikitError(f"{source}: no usable prompts ({skipped} malformed)")
    return prompts, skipped


def _prompt(row, columns, chat) -> tuple[str, dict]:
    """A row's prompt as text and its other columns."""
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    if "__error__" in row:
        raise ValueError(row["__error__"])
    row = apply_columns(row, columns)
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        prompt = chat.render_messages(prompt, add_generation_prompt=True)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('expected a field "prompt": text or a list of chat messages')
    return prompt, {k: v for k, v in row.items() if k != "prompt"}


@torch.no_grad()
def sample_completions(
    model, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int, stop_ids, pad_id: int
) -> list[list[int]]:
    """One sampled completion per prompt (all decoded together), each up to and including its first stop
    token, or ``max_new_tokens`` long. The model decodes in eval mode (no dropout) and goes back to its mode."""
    from phikit.generate import GenerationConfig, generate_tokens

    was_training = model.training
    model.eval()
    try:
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for tokens in generate_tokens(model, prompts, config, pad_id):
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    out[row].append(token)
                    done[row] = token in stop_ids
            if all(done):
                break
    finally:
        model.train(was_training)
    return out


def score(functions, prompts: list[PromptExample], group: int, completions: list[str], ids: list[list[int]]):
    """(rewards: one row per function, one column per completion, NaN where a function returned None; the
    mean of each function's rewards by name). Columns of the data go to the functions repeated per group."""
    texts = [p.text for p in prompts for _ in range(group)]
    columns = {k for p in prompts for k in p.columns}
    kwargs = {k: [p.columns.get(k) for p in prompts for _ in range(group)] for k in columns}
    rows = []
    for name, function in functions:
        values = function(prompts=texts, completions=completions, completion_ids=ids, **kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise PhikitError(f"reward function {name} must return one number per completion ({len(completions)})")
        try:
            rows.append([float("nan") if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise PhikitError(f"reward function {name} returned something that is not a number or None") from None
    rewards = torch.tensor(rows, dtype=torch.float32)
    means = {f"rewards/{name}": float(torch.nanmean(rewards[i])) for i, (name, _) in enumerate(functions)}
    return rewards, means


def sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of prompt + completion rows, right-padded; labels only on the completions."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), longest), IGNORE, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        labels[row, len(prompt) : len(prompt) + len(completion)] = torch.tensor(completion)
    return ids, labels
