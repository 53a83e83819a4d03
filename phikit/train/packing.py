"""Replies that share a prompt, run with the prompt once: a preference pair's chosen and rejected replies
(DPO, ORPO), a GRPO group's completions.

Each group lies in a row as prompt, reply 1, reply 2, ...: every reply's positions restart where the prompt
ends and its tokens see the prompt and themselves only, so each reply's log-probabilities are those of
prompt + reply run alone (tested against TRL's, which computes the prompt once per reply). Groups lie end to
end in rows of up to ``row_tokens`` tokens, each blind to the others: no prompt twice and next to no padding.
Why rows of several groups: padding a batch to its longest pair wasted about a fifth of HH-RLHF's tokens; the
masked attention a longer row costs is small next to the linear layers at these lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phikit.train.losses import scored_logps

ROW_TOKENS = 512  # groups share a row up to this many tokens (a longer group has a row to itself)


@dataclass
class Packed:
    """Groups end to end in rows (``pack_groups``): token ids and rope positions (rows, longest), which keys
    each query sees (rows, longest, longest), and per scored token: the flat position whose output predicts
    it, the token, and the reply (sequence) it belongs to, of ``sequences``."""

    sequences: int

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor

    def to(self, device) -> Packed:
        return Packed(self.sequences, *(t.to(device) for k, t in vars(self).items() if k != "sequences"))

    def numel(self) -> int:
        """Tokens run (for tokens/s: each prompt counts once)."""
        return self.ids.numel()


def packable(model_config, seq_len: int) -> bool:
    """Whether groups may run packed: everywhere but where a sequence could reach LongRoPE's switch, whose
    factors each sequence's own length chooses."""
    return model_config.longrope is None or seq_len <= model_config.original_max_position_embeddings


def pack_groups(
    groups: list[tuple[list[int], list[list[int]]]],
    pad_id: int,
    window: int | None = None,
    row_tokens: int = ROW_TOKENS,
    order: list[int] | None = None,
) -> Packed:
    """(prompt, replies) groups packed into rows. Reply j of all the groups' replies in order is sequence
    ``order[j]`` (default j). A query sees earlier keys of its group's prompt and of its own reply only
    (and, with ``window``, those within that many positions): the attention of each prompt + reply alone.
    The last prompt position predicts every reply's first token."""
    sizes = [len(prompt) + sum(len(r) for r in replies) for prompt, replies in groups]
    capacity = max(max(sizes), row_tokens)
    place, used = [], [0]  # (row, offset) of each group; tokens used in each row
    for size in sizes:
        if used[-1] and used[-1] + size > capacity:
            used.append(0)
        place.append((len(used) - 1, used[-1]))
        used[-1] += size
    longest = max(used)
    ids = torch.full((len(used), longest), pad_id, dtype=torch.long)
    positions = torch.zeros(len(used), longest, dtype=torch.long)
    owner = torch.full((len(used), longest), -1, dtype=torch.long)  # the group of each position (-1: padding)
    part = torch.full((len(used), longest), -1, dtype=torch.long)  # 0 prompt, j + 1 the group's reply j
    rows, targets, sequence = [], [], []
    index = 0
    for g, ((prompt, replies), (row, at)) in enumerate(zip(groups, place)):
        p = len(prompt)
        ids[row, at : at + p] = torch.tensor(prompt, dtype=torch.long)
        positions[row, at : at + p] = torch.arange(p)
        owner[row, at : at + sizes[g]] = g
        part[row, at : at + p] = 0
        start = p
        for j, reply in enumerate(replies):
            span = slice(at + start, at + start + len(reply))
            ids[row, span] = torch.tensor(reply, dtype=torch.long)
            positions[row, span] = torch.arange(p, p + len(reply))
            part[row, span] = j + 1
            base = row * longest + at
            for k, token in enumerate(reply):
                before = (start + k - 1) if k else p - 1  # the position whose output predicts this token
                if before >= 0:  # a group without a prompt cannot predict its first tokens (as unpacked)
                    rows.append(base + before)
                    targets.append(token)
                    sequence.append(order[index] if order else index)
            start += len(reply)
            index += 1
    span = torch.arange(longest)
    earlier = (span[None, :] <= span[:, None])[None]  # (1, queries, keys)
    same_group = (owner[:, None, :] == owner[:, :, None]) & (owner[:, None, :] >= 0)
    visible = (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])
    mask = earlier & same_group & visible
    if window:
        mask &= positions[:, None, :] > positions[:, :, None] - window
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return Packed(index, ids, positions, mask, as_long(rows), as_long(targets), as_long(sequence))


def packed_token_logps(model, packed: Packed, head=None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each scored token, its sequence), as ``token_logps`` gives for the sequences apart.
    ``head``: ``frozen_head``'s answer (None: looked up; a trained head gives its own logits)."""
    inputs = {"input_ids": packed.ids, "positions": packed.positions, "padding_mask": packed.mask}
    return scored_logps(model, inputs, packed.rows, packed.targets, head, temperature), packed.sequence
