"""Evaluation: perplexity over a text file with a sliding window."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from phikit.errors import PhikitError
from phikit.model import PhiForCausalLM
from phikit.tokenizer import Tokenizer


def read_text(path: str | Path, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a .txt file, or of the "text" fields of a .jsonl file joined by <|endoftext|>."""
    path = Path(path)
    if not path.is_file():
        raise PhikitError(f"{path}: data file not found")
    if path.suffix != ".jsonl":
        return tokenizer.encode(path.read_text(encoding="utf-8"))
    ids: list[int] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PhikitError(f'{path}:{number}: expected a JSON object with a "text" field') from None
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return ids


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens predicted


@torch.inference_mode()
def perplexity(
    model: PhiForCausalLM,
    ids: list[int],
    context: int = 1024,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of ``ids`` with a sliding window: windows of ``context`` tokens every ``stride`` tokens,
    each scoring only the tokens the previous window did not (transformers' documented method)."""
    context = min(context, model.config.max_position_embeddings)
    stride = stride or context // 2
    if not 0 < stride <= context:
        raise PhikitError(f"stride must be between 1 and the context ({context}), got {stride}")
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise PhikitError("need at least 2 tokens of text to measure perplexity")
    total, count, scored_to = 0.0, 0, 0
    starts = list(range(0, max(len(ids) - 1, 1), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        end = min(begin + context, len(ids))
        window = torch.tensor([ids[begin:end]], device=model.device)
        logits = model(window[:, :-1]).float()
        targets = window[0, 1:]
        first = max(scored_to, begin + 1) - (begin + 1)  # skip tokens an earlier window already scored
        nll = F.cross_entropy(logits[0, first:], targets[first:], reduction="sum")
        total += nll.item()
        count += targets.numel() - first
        scored_to = end
        if end == len(ids):
            break
    mean = total / count
    return Perplexity(math.exp(mean), mean, count)
