"""Preference pairs for DPO and ORPO: read, checked (file and line, as SFT data), tokenized, batched.

Rows, in any file or dataset ``phikit.data.read_rows`` reads (TRL's preference formats):
  {"prompt": "...", "chosen": "...", "rejected": "..."}          text, used as written (the prompt ends where
                                                                  the reply starts, as TRL does)
  {"prompt": [messages], "chosen": [messages], "rejected": [...]} conversations, rendered with the recipe's
                                                                  template (``template: chat``: the model's own)
  {"chosen": "...", "rejected": "..."}                             two transcripts of one conversation (HH-RLHF's
                                                                  "\\n\\nHuman: ...\\n\\nAssistant: ..."): the prompt
                                                                  is their shared start, up to its last
                                                                  "Assistant:"
  {"chosen": [messages], "rejected": [messages]}                   the shared leading messages are the prompt
Only the replies are trained on (the prompt's tokens are masked) and each reply ends with the EOS. A pair
runs with its prompt once (``pack_pairs``, ``phikit.train.packing``): prompt, chosen, rejected, pairs laid
end to end in rows. The prompt, most of an HH-RLHF pair's tokens, is computed once instead of once per
reply, and padding nearly vanishes. Where a pair could straddle LongRoPE's switch (each reply's length
decides its factors) the sequences run apart (``collate_pairs``).
``PreferenceRecipe`` is the fine-tuning recipe of DPO and ORPO on them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from phikit.data import apply_columns, prompt_reply_batch, read_rows
from phikit.errors import PhikitError
from phikit.templates import get_template
from phikit.tokenizer import Tokenizer
from phikit.train.losses import dpo_loss, orpo_loss, sequence_logps, unwrap
from phikit.train.packing import ROW_TOKENS, Packed, pack_groups, packable, packed_token_logps
from phikit.train.recipe import SFTRecipe


@dataclass
class PairExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    cut: bool = field(default=False, compare=False)  # shortened to fit seq_len (fit_pair)


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def split_pair(row: dict) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen reply, rejected reply) of a row in one of the four forms above."""
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    if "__error__" in row:
        raise ValueError(row["__error__"])
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    missing = [name for name in ("chosen", "rejected") if row.get(name) is None]
    if missing:
        others = ", ".join(k for k in row if k not in ("prompt", "chosen", "rejected")) or "none"
        raise ValueError(
            f"no {' or '.join(repr(m) for m in missing)} field (its other columns: {others}); name the row's own "
            "columns with columns, e.g. --columns prompt=question,chosen=good,rejected=bad"
        )
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _shared_transcript(chosen, rejected)
        if _is_messages(chosen) and _is_messages(rejected):
            return _shared_messages(chosen, rejected)
        raise ValueError('expected "chosen" and "rejected" (strings or message lists), with or without "prompt"')
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, chosen, rejected
    if _is_messages(prompt) and prompt and all(_is_messages(r) or isinstance(r, str) for r in (chosen, rejected)):
        return prompt, chosen, rejected
    raise ValueError('expected "prompt", "chosen" and "rejected" all strings, or a message list and replies')


def _shared_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind("Assistant:", 0, shared)
    if cut < 0 or shared == len(chosen) == len(rejected):
        raise ValueError(
            'the "chosen" and "rejected" transcripts do not share a prompt ending in "Assistant:"; give a "prompt" '
            "field"
        )
    cut += len("Assistant:")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _shared_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise ValueError('"chosen" and "rejected" must share their leading messages and differ in the last one')
    return chosen[:shared], chosen[shared:], rejected[shared:]


def encode_pair(prompt, chosen, rejected, tokenizer: Tokenizer, template) -> PairExample:
    """Token ids of the prompt and of each reply (ending with the EOS). Text is tokenized as written; a
    conversation is rendered with ``template`` and cut where its last reply starts (as SFT's segments)."""
    if isinstance(prompt, str):
        return PairExample(
            tokenizer.encode(prompt), *(_with_eos(tokenizer.encode(r), tokenizer) for r in (chosen, rejected))
        )
    sides = []
    for reply in (chosen, rejected):
        messages = reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
        if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "assistant":
            raise ValueError("each reply must be one assistant message (or a string)")
        segments = template.conversation_segments(list(prompt) + messages)
        last = max(i for i, (_, trained) in enumerate(segments) if trained)
        ids = [[t for text, _ in part for t in tokenizer.encode(text)] for part in (segments[:last], segments[last:])]
        sides.append((ids[0], _with_eos(ids[1], tokenizer)))
    if sides[0][0] != sides[1][0]:
        raise ValueError("the prompt renders differently before the chosen and the rejected reply")
    return PairExample(sides[0][0], sides[0][1], sides[1][1])


def _with_eos(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    return ids if ids and ids[-1] == tokenizer.eos_id else ids + [tokenizer.eos_id]


def fit_pair(pair: PairExample, seq_len: int) -> tuple[PairExample, bool]:
    """The pair within ``seq_len`` tokens a sequence (and whether it was cut): the prompt loses its start
    while the longer reply would get less than half the length, then the replies lose their ends."""
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= seq_len:
        return pair, False
    prompt = pair.prompt
    room = seq_len - len(prompt)
    wanted = min(longest, seq_len // 2)
    if room < wanted:
        prompt = prompt[len(prompt) - (seq_len - wanted) :] if seq_len > wanted else []
        room = seq_len - len(prompt)
    return PairExample(prompt, pair.chosen[:room], pair.rejected[:room], cut=True), True


def load_pairs(
    source: str,
    tokenizer: Tokenizer,
    template: str = "guanaco",
    split: str = "train",
    seq_len: int = 1024,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[PairExample], int, int]:
    """(pairs, malformed rows skipped, pairs cut to ``seq_len``) of a data source; a malformed row raises a
    PhikitError naming file and line unless ``skip_bad_rows``."""
    chat = get_template(template, tokenizer)
    pairs: list[PairExample] = []
    skipped = cut = 0
    for where, row in read_rows(source, split):
        try:
            pair = encode_pair(*split_pair(apply_columns(row, columns)), tokenizer, chat)
        except ValueError as e:
            if skip_bad_rows:
                skipped += 1
                continue
            raise PhikitError(f"{where}: {e} (preference pairs); fix the row or set skip_bad_rows") from None
        pair, was_cut = fit_pair(pair, seq_len)
        pairs.append(pair)
        cut += was_cut
        if limit and len(pairs) >= limit:
            break
    if not pairs:
        raise PhikitError(f"{source}: no usable preference pairs ({skipped} malformed)")
    return pairs, skipped, cut


def collate_pairs(pairs: list[PairExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of 2 x len(pairs) sequences, every chosen one first, then every rejected one (TRL's
    order), right-padded; labels are IGNORE on the prompts and the padding."""
    prompts = [p.prompt for p in pairs] * 2
    return prompt_reply_batch(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def pack_pairs(
    pairs: list[PairExample], pad_id: int, window: int | None = None, row_tokens: int = ROW_TOKENS
) -> Packed:
    """Pairs as prompt, chosen, rejected, end to end in rows (``pack_groups``); pair i's chosen reply is
    sequence i, its rejected one n + i (``collate_pairs``'s order)."""
    n = len(pairs)
    order = [i + n * j for i in range(n) for j in (0, 1)]
    return pack_groups([(p.prompt, [p.chosen, p.rejected]) for p in pairs], pad_id, window, row_tokens, order)


def packed_logps(model, packed: Packed, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each reply, its token count): chosen replies first, then rejected, as
    ``sequence_logps`` gives for ``collate_pairs``'s batch."""
    logps, sequence = packed_token_logps(model, packed, head)
    sums = torch.zeros(packed.sequences, dtype=logps.dtype, device=logps.device).index_add(0, sequence, logps)
    return sums, torch.bincount(sequence, minlength=packed.sequences)


class PreferenceRecipe(SFTRecipe):
    """DPO (the base model, adapter disabled, as the reference: no second copy of the weights, as TRL with
    PEFT) and ORPO (no reference) on preference pairs. The reference's log-probs of a pair never change
    (the base is frozen and has no dropout), so each is computed once and kept for later epochs."""

    unit = "pairs"

    def setup_data(self) -> None:
        config = self.config

        def load(source, split, limit):
            args = (config.template, split, config.seq_len, config.skip_bad_rows, limit, config.columns)
            pairs, skipped, _ = load_pairs(source, self.tokenizer, *args)
            return pairs, skipped

        self.train_set, self.eval_set = self.read_data(load)
        cut = [sum(p.cut for p in pairs) for pairs in (self.train_set, self.eval_set)]
        if any(cut) and self.main_process:  # counted after held-out rows are split off (eval_fraction)
            held = f"; {cut[1]} of {len(self.eval_set)} held-out" if self.eval_set else ""
            hint = (
                ": a longer seq_len keeps more of each"
                if sum(cut) * 4 > len(self.train_set) + len(self.eval_set)
                else ""
            )
            print(
                f"{cut[0]} of {len(self.train_set)} training pair(s){held} were cut to seq_len "
                f"{config.seq_len} tokens{hint}",
                file=sys.stderr,
            )
        self.reference: dict[int, tuple[float, float]] = {}

    def setup_model(self) -> None:
        super().setup_model()
        if self.config.method == "dpo" and getattr(self.model.lora_config, "modules_to_save", None):
            raise PhikitError("DPO's reference is the base with the adapter off: modules_to_save is not supported")

    def collate(self, batch: list) -> tuple:
        if packable(unwrap(self.model).config, self.config.seq_len):
            window = getattr(unwrap(self.model).config, "sliding_window", None)
            return pack_pairs(batch, self.tokenizer.pad_id, window).to(self.device), None, batch
        ids, labels = collate_pairs(batch, self.tokenizer.pad_id)
        return ids.to(self.device), labels.to(self.device), batch

    def logps(self, model, ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(ids, Packed):
            return packed_logps(model, ids, self.head)
        return sequence_logps(model, ids, labels, self.head)

    def reference_logps(self, batch: list, ids, labels) -> torch.Tensor:
        """Summed log-probs of every sequence of the batch under the base model (the adapter switched off),
        from the cache where the pair was seen before."""
        from phikit.lora import adapters_disabled

        keys = [id(p) for p in batch]
        if self.sharded or not all(k in self.reference for k in keys):  # sharded: every process runs it together
            with torch.no_grad(), adapters_disabled(self.model), self.autocast():
                sums, _ = self.logps(self.model, ids, labels)
            n = len(batch)
            for i, k in enumerate(keys):
                self.reference[k] = (float(sums[i]), float(sums[n + i]))
        chosen = [self.reference[k][0] for k in keys]
        rejected = [self.reference[k][1] for k in keys]
        return torch.tensor(chosen + rejected, dtype=torch.float32, device=self.device)

    def loss(self, model, batch: tuple) -> tuple[torch.Tensor, dict]:
        ids, labels, pairs = batch
        config = self.config
        sums, counts = self.logps(model, ids, labels)
        n = len(pairs)
        if config.method == "orpo":
            return (*orpo_loss(sums[:n], sums[n:], counts[:n], counts[n:], config.beta), n)
        reference = self.reference_logps(pairs, ids, labels)
        loss, metrics = dpo_loss(
            sums[:n],
            sums[n:],
            reference[:n],
            reference[n:],
            config.beta,
            config.loss_type,
            config.label_smoothing,
            counts[:n],
            counts[n:],
        )
        return loss, metrics, n
