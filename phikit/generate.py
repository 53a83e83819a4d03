"""Text generation over the native model: sampling, stop strings, streaming, batches.

The decode loop is plain: one prefill of the (left-padded) prompts into a preallocated KV cache, then
one forward of the newest token per step. Text-level concerns (UTF-8-safe streaming, stop strings that
span tokens) live in ``TextStream`` so the HTTP server can reuse them.
"""

from __future__ import annotations

import math
import numbers
import resource
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, replace

import torch

from phikit.errors import PhikitError
from phikit.models import CausalLM
from phikit.templates import Template, get_template
from phikit.tokenizer import Tokenizer


@dataclass
class GenerationConfig:
    """Decoding settings; ``temperature`` 0 is greedy. Defaults follow transformers' generate."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    truncate: bool = False  # keep a too-long prompt's last tokens instead of raising
    batch_size: int = 8
    prompt_lookup: bool = False  # speculative decoding with drafts copied from earlier text
    draft_tokens: int = 5  # tokens proposed per speculative step (prompt lookup or a draft model)

    def __post_init__(self):
        self._stops()

    def _stops(self) -> None:
        """``stop`` as a tuple: one string is one stop string, as the OpenAI API takes it (not its characters)."""
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif not isinstance(self.stop, tuple) and isinstance(self.stop, Iterable):
            self.stop = tuple(self.stop)

    def validate(self) -> None:
        for name, kind in _FIELD_TYPES.items():  # a wrong type is named here, not deep in torch
            value = getattr(self, name)
            if (not isinstance(value, kind) or isinstance(value, bool)) and not (name == "seed" and value is None):
                need = "an integer" if kind is numbers.Integral else "a number"
                raise PhikitError(f"{name} must be {need}, got {value!r}")
        self._stops()
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise PhikitError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if self.max_new_tokens < 1:
            raise PhikitError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise PhikitError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PhikitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PhikitError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise PhikitError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.batch_size < 1:
            raise PhikitError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 1 <= self.draft_tokens <= 7:
            raise PhikitError(f"draft_tokens must be between 1 and 7, got {self.draft_tokens}")


_FIELD_TYPES = {  # the numbers' types (numpy's included); the flags are taken for their truth
    "max_new_tokens": numbers.Integral,
    "temperature": numbers.Real,
    "top_k": numbers.Integral,
    "top_p": numbers.Real,
    "repetition_penalty": numbers.Real,
    "seed": numbers.Integral,
    "batch_size": numbers.Integral,
    "draft_tokens": numbers.Integral,
}


def with_overrides(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    """``config`` (or the defaults) with some fields set; a name that is not a field is a one-line error."""
    unknown = sorted(set(overrides) - set(GenerationConfig.__dataclass_fields__))
    if unknown:
        known = ", ".join(GenerationConfig.__dataclass_fields__)
        raise PhikitError(f"unknown generation setting(s) {', '.join(unknown)}; known: {known}")
    return replace(config or GenerationConfig(), **overrides)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    seconds_to_first_token: float = 0.0
    seconds: float = 0.0


def process_logits(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty, then temperature, top-k and top-p on fp32 logits (batch, vocab), in
    transformers' order; filtered-out tokens become -inf. ``seen`` marks tokens already in each row."""
    if seen is not None and config.repetition_penalty != 1.0:
        penalized = torch.where(logits < 0, logits * config.repetition_penalty, logits / config.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if config.temperature == 0:
        return logits
    scaled = logits / config.temperature
    if not torch.isfinite(scaled.max()):  # a tiny temperature overflowed: shift first (softmax is shift-invariant)
        shifted = logits - logits.max(dim=-1, keepdim=True).values
        scaled = torch.where(shifted == 0, shifted, shifted / config.temperature)  # 0/0 would be nan
    logits = scaled
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p  # keeps the token that crosses top_p
        drop[..., 0] = False  # and always the most likely one (a top_p that rounds to 0 in fp32)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
    logprobs: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Next token per row (batch,): argmax when temperature is 0, else a draw from the processed logits;
    with ``logprobs``, the drawn tokens' log-probabilities under that distribution are appended to it.

    The draw inverts each row's cumulative distribution at one uniform number (searched with ``right=True``,
    so a token of probability 0 is never drawn). Written so rather than with ``torch.multinomial``, which
    draws an exponential number for every token of the vocabulary: with a seeded generator that was 15.6 ms
    for 16 rows of 50,304 tokens on this 2-core CPU, 89% of a small model's sampling time (GRPO's groups)."""
    logits = process_logits(logits, config, seen)
    if config.temperature == 0:
        token = logits.argmax(dim=-1)
        if logprobs is not None:
            logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1))
        return token
    probs = logits.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)  # a token of probability 0 adds exactly 0: a flat step
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device, dtype=cumulative.dtype)
    token = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1)
    if logprobs is not None:
        logprobs.append(probs.gather(1, token).squeeze(1).log())
    return token.squeeze(-1)


def rope_switch(model: CausalLM) -> int | None:
    """The position from which a LongRoPE model computes with its long factors (its original context), else
    None. A sequence that reaches it is prefilled again from the start (``generate_tokens``), as transformers'
    Phi-3 does: the keys cached so far were rotated with the short factors."""
    longrope = getattr(model.config, "longrope", None)
    return None if longrope is None else longrope.original_max_position_embeddings


@torch.inference_mode()
def generate_tokens(
    model: CausalLM,
    prompts: list[list[int]],
    config: GenerationConfig,
    pad_id: int,
    logprobs: list[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (batch,), step by step, for ``config.max_new_tokens`` steps; with
    ``logprobs``, append to it each step's log-probability of the drawn tokens (batch,) under the
    distribution they were drawn from (after temperature, top-k, top-p and repetition penalty).

    Prompts are left-padded into one batch; the caller stops iterating when every row is done. Each step
    after the prefill runs the model's ``decode_step`` (the backend's, where it installed one); a LongRoPE
    model whose row reaches the switch position (``rope_switch``) is prefilled again at that step instead.
    """
    device = model.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + config.max_new_tokens
    decode_step = model.decode_step
    static = getattr(decode_step, "static", False)
    if static:
        # round the cache up so a compiled step (or a captured CUDA graph) is reused across lengths
        total = min(-(-total // 256) * 256, max(total, model.config.max_position_embeddings))
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    valid = torch.ones(batch, total, dtype=torch.bool)  # False at left padding
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        valid[row, : longest - len(prompt)] = False
    padded = not bool(valid.all())
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    padding_mask = valid if padded else None
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed % 2**64)
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
        for row in range(batch):
            seen[row, ids[row][valid[row, :longest]]] = True
    switch = rope_switch(model)  # steps at which a row's next position reaches it: prefill again
    again = {switch - len(p) for p in prompts} & set(range(config.max_new_tokens)) if switch else set()
    # Padded rows decode through the masked PyTorch attention, which would convert a narrower (fp16 CPU)
    # cache to the activations' dtype at every layer and step (measured 17-20% slower after 500 tokens):
    # they keep a cache of the model's dtype, unless the decoding step takes left padding itself (the CPU
    # backend's one C call: each row attends from its first real slot) or an int8 cache was asked for (its
    # memory is the point).
    takes_padding = getattr(decode_step, "takes_padding", None)
    narrow = model.cache_dtype()
    wide = padded and narrow.is_floating_point and not (takes_padding is not None and takes_padding(narrow))
    cache = model.new_cache(batch, total, model.dtype if wide else None)
    slots = torch.arange(longest, device=device)
    logits = model.prefill(ids, slots, cache, positions, padding_mask)[:, -1].float()
    next_position = positions[:, -1:] + 1
    slot = slots[-1:] + 1  # on the device, advanced in place: no host-to-device copy per step
    for step in range(config.max_new_tokens):
        token = sample_next(logits, config, seen, generator, logprobs)
        yield token
        if step + 1 == config.max_new_tokens:
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if again:
            ids = torch.cat([ids, token[:, None]], dim=1)
        if step in again:  # every slot again, with the long factors for the rows that reached the switch
            every = torch.arange(ids.shape[1], device=device)
            rope = (valid[:, : ids.shape[1]].long().cumsum(-1) - 1).clamp(min=0)
            logits = model.prefill(ids, every, cache, rope, padding_mask)
        elif static:  # a slot per row: the static-shape step
            logits = decode_step(token[:, None], slot.expand(batch, 1), cache, next_position, padding_mask)
        else:
            logits = decode_step(token[:, None], slot, cache, next_position, padding_mask)
        logits = logits[:, -1].float()
        next_position += 1
        slot += 1


class _CompiledStep:
    """``compile_decode``'s decoding step: the model's forward compiled with static shapes."""

    static = True

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, input_ids, input_pos, cache, positions=None, padding_mask=None) -> torch.Tensor:
        return self.compiled(input_ids, input_pos, cache, positions, padding_mask)


def compile_decode(model: CausalLM, mode: str | None = None, backend: str = "inductor") -> CausalLM:
    """Install a ``torch.compile``d one-token step as the model's ``decode_step``. It takes its cache slot as
    a tensor per row and attends over the whole (padded) cache with a mask, so its shapes never change and
    it compiles once per cache size (``mode="reduce-overhead"`` adds CUDA graphs on GPUs). Prefill stays
    eager."""
    model.decode_step = _CompiledStep(torch.compile(model.forward, mode=mode, backend=backend, dynamic=False))
    return model


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0


class PromptLookup:
    """Drafts by prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last n-gram (n = max_ngram down to 1). Free to compute; pays off when the output repeats its input
    (code edits, summaries, extraction)."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, seq: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    return seq[start + n : start + n + k]
        return []


class DraftModel:
    """Drafts with a smaller model sharing the tokenizer (Phi-1.5 for Phi-2), greedily, with its own cache.

    Each call first feeds the tokens the target accepted since the last call (one chunked forward), so
    rejected drafts cost nothing beyond the draft steps themselves."""

    def __init__(self, model: CausalLM, max_length: int):
        self.model, self.cache, self.pos = model, model.new_cache(1, max_length), 0

    @torch.inference_mode()
    def propose(self, seq: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        device = self.model.device
        new = torch.tensor([seq[self.pos :]], device=device)
        slots = torch.arange(self.pos, len(seq), device=device)
        logits = self.model.prefill(new, slots, self.cache)[0, -1]
        self.pos = len(seq)
        drafts = []
        for i in range(k):
            drafts.append(int(logits.argmax()))
            if i + 1 < k:
                token = torch.tensor([[drafts[-1]]], device=device)
                logits = self.model(token, torch.tensor([self.pos + i], device=device), self.cache)[0, -1]
        return drafts


@torch.inference_mode()
def speculative_tokens(
    model: CausalLM, prompt: list[int], config: GenerationConfig, proposer, stats: SpeculativeStats | None = None
) -> Iterator[torch.Tensor]:
    """Greedy decoding of one prompt, verifying ``proposer``'s drafts with one forward per step.

    The target scores [last token] + drafts at once; drafts are kept up to the first one that differs
    from the target's own argmax, which is emitted instead, so the output is the target's greedy output.
    Rejected drafts need no cache rollback: the next step overwrites their slots and attention only
    reads slots before the current position. A LongRoPE model's drafts stop short of the switch position
    (``rope_switch``), and the step that reaches it scores the whole sequence again, as plain greedy does."""
    stats = stats if stats is not None else SpeculativeStats()
    context = model.config.max_position_embeddings
    switch = rope_switch(model)
    cache = model.new_cache(1, len(prompt) + config.max_new_tokens + config.draft_tokens + 1)
    device = model.device
    slots = torch.arange(len(prompt), device=device)
    logits = model.prefill(torch.tensor([prompt], device=device), slots, cache)[0, -1]
    seq = list(prompt) + [int(logits.argmax())]
    produced, pos = 1, len(prompt)  # pos: cache slot of seq[-1], not yet written
    yield torch.tensor(seq[-1:])
    while produced < config.max_new_tokens:
        room = min(config.draft_tokens, config.max_new_tokens - produced - 1, context - pos - 1)
        if switch is not None and pos < switch:
            room = min(room, switch - pos - 1)  # a chunk never spans the switch
        drafts = proposer.propose(seq, room) if room > 0 else []
        first = 0 if pos == switch else pos  # reaching the switch: every slot again, long factors
        inputs = torch.tensor([[*seq[first:], *drafts]], device=device)
        slots = torch.arange(first, pos + 1 + len(drafts), device=device)
        predicted = model(inputs, slots, cache)[0, pos - first :].argmax(dim=-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == predicted[n]:
            n += 1
        stats.steps, stats.drafted, stats.accepted = stats.steps + 1, stats.drafted + len(drafts), stats.accepted + n
        for token in [*drafts[:n], predicted[n]]:
            seq.append(token)
            produced += 1
            yield torch.tensor([token])
            if produced == config.max_new_tokens:
                return
        pos += n + 1


class TextStream:
    """Text of one generated sequence as it grows: UTF-8-safe pieces, cut at the first stop string.

    Text that could be the start of a stop string is held back until it is clearly not one, so a
    streamed reply never shows a half-printed "### Hum". Stop strings are matched incrementally (one
    Knuth-Morris-Pratt state per stop, fed only the new text), so each token costs time in proportion to
    its own text, however long the stops or the reply.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stop = tuple(dict.fromkeys(s for s in stop if s))
        self.matchers = [_StopMatcher(s) for s in self.stop]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show."""
        if self.stopped:
            return ""
        return self._add(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        """No more tokens: release what was held back."""
        return self._add("" if self.stopped else self.decoder.flush(), final=True)

    def _add(self, piece: str, final: bool) -> str:
        if piece and not self.stopped:
            offset = len(self.text)
            self.text += piece
            starts = [start for m in self.matchers if (start := m.feed(piece, offset)) is not None]
            if starts:  # the earliest stop found in this piece ends the text
                self.text = self.text[: min(starts)]
                self.stopped = True
        end = len(self.text)
        if not final and not self.stopped:
            end -= max((min(m.state, end - self.emitted) for m in self.matchers), default=0)
        text = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return text


class _StopMatcher:
    """Knuth-Morris-Pratt over one stop string: ``state`` is the length of the longest prefix of the stop
    that the text fed so far ends with (what a stream holds back), ``feed`` reports a whole occurrence."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: longest proper prefix of stop[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, piece: str, offset: int) -> int | None:
        """Advance over ``piece`` (which starts at ``offset`` in the text); the start of the first whole
        occurrence of the stop that ends in it, or None."""
        stop, state = self.stop, self.state
        for i, ch in enumerate(piece):
            while state and ch != stop[state]:
                state = self.fail[state - 1]
            if ch == stop[state]:
                state += 1
                if state == len(stop):
                    self.state = state
                    return offset + i + 1 - len(stop)
        self.state = state
        return None


def encode_prompts(tokenizer: Tokenizer, texts: list[str], config: GenerationConfig, context: int) -> list[list[int]]:
    """Token ids of each prompt, checked against the context window (or left-truncated if asked)."""
    room = context - config.max_new_tokens
    if room < 1:
        raise PhikitError(
            f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {context} tokens; lower max_new_tokens (--max-new-tokens)"
        )
    out = []
    for i, ids in enumerate(tokenizer.encode_batch(texts)):
        ids = ids or [tokenizer.eos_id]  # an empty prompt starts from <|endoftext|>, as GPT-2 sampling does
        if len(ids) > room:
            if not config.truncate:
                which = f"prompt {i + 1}" if len(texts) > 1 else "the prompt"
                raise PhikitError(
                    f"{which} is {len(ids)} tokens; with max_new_tokens {config.max_new_tokens} that exceeds "
                    f"the model's context of {context} tokens; shorten it, lower max_new_tokens (--max-new-tokens), "
                    "or truncate=True (--truncate) to keep its last tokens"
                )
            ids = ids[-room:]
        out.append(ids)
    return out


def _prompt_list(prompts) -> list[str]:
    """``prompts`` (text, or a list of texts) as a list; anything else is a one-line error."""
    if isinstance(prompts, str):
        return [prompts]
    chat = PhikitError(
        "prompts are text (a string or a list of strings), not chat messages; render a conversation with its "
        "template first: phikit.templates.get_template('chat', phi.tokenizer).render_messages(messages)"
    )
    if isinstance(prompts, dict):
        raise chat
    items = list(prompts) if isinstance(prompts, Iterable) and not isinstance(prompts, (bytes, bytearray)) else None
    if items is not None and all(isinstance(p, str) for p in items):  # a list, a dataset's column, a generator
        return items
    if items is not None and any(isinstance(p, dict) for p in items):
        raise chat
    kind = type(prompts).__name__ if items is None else f"a sequence holding {items!r:.60}"
    raise PhikitError(f"prompts must be a string or a list of strings, got {kind}")


def iter_generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: str | list[str],
    config: GenerationConfig,
    template: Template | str | None = None,
    draft: CausalLM | None = None,
    stats: SpeculativeStats | None = None,
) -> Generator[tuple[int, str], None, list[Completion]]:
    """Generate for ``prompts`` in batches; yield (prompt index, new text) as text becomes final and
    return the completions in prompt order. With ``draft`` (a smaller model) or ``config.prompt_lookup``,
    decoding is speculative: one prompt at a time, greedy, with output identical to plain greedy.
    Every check (settings, template, prompts and their lengths) is made here, before the generator is
    returned: a mistake is an error at the call, not at the first ``next``."""
    config.validate()
    speculative = draft is not None or config.prompt_lookup
    if speculative:
        if config.temperature != 0 or config.repetition_penalty != 1.0:
            raise PhikitError(
                "speculative decoding (draft model or prompt lookup) is greedy only: use "
                "temperature 0 and no repetition penalty"
            )
        if draft is not None and draft.config.vocab_size != model.config.vocab_size:
            raise PhikitError(
                f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the "
                f"model's ({model.config.vocab_size}); they must share a tokenizer"
            )
        config = replace(config, batch_size=1)
    template = get_template(template, tokenizer)
    stop = tuple(dict.fromkeys((*template.stop, *config.stop)))
    texts = [template.render(p) for p in _prompt_list(prompts)]
    encoded = encode_prompts(tokenizer, texts, config, model.config.max_position_embeddings)
    return _batches(model, tokenizer, config, stop, encoded, speculative, draft, stats)


def _batches(
    model: CausalLM,
    tokenizer: Tokenizer,
    config: GenerationConfig,
    stop: tuple[str, ...],
    encoded: list[list[int]],
    speculative: bool,
    draft: CausalLM | None,
    stats: SpeculativeStats | None,
) -> Generator[tuple[int, str], None, list[Completion]]:
    """iter_generate's generator, over checked and encoded prompts."""
    completions: list[Completion] = []
    for first in range(0, len(encoded), config.batch_size):
        chunk = encoded[first : first + config.batch_size]
        streams = [TextStream(tokenizer, stop) for _ in chunk]
        tokens: list[list[int]] = [[] for _ in chunk]
        reasons = ["length"] * len(chunk)
        done = [False] * len(chunk)
        start = time.perf_counter()
        first_token_at = None
        if speculative:
            proposer = (
                DraftModel(draft, len(chunk[0]) + config.max_new_tokens + config.draft_tokens + 1)
                if draft is not None
                else PromptLookup()
            )
            token_steps = speculative_tokens(model, chunk[0], config, proposer, stats)
        else:
            token_steps = generate_tokens(model, chunk, config, tokenizer.pad_id)
        for step_tokens in token_steps:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            for row, token in enumerate(step_tokens.tolist()):
                if done[row]:
                    continue
                if token in tokenizer.stop_ids:  # EOS, <|end|>: the end of the reply, not part of it
                    done[row], reasons[row] = True, "stop"
                    continue
                tokens[row].append(token)
                piece = streams[row].push(token)
                if streams[row].stopped:
                    done[row], reasons[row] = True, "stop"
                if piece:
                    yield first + row, piece
            if all(done):
                break
        elapsed = time.perf_counter() - start
        for row, stream in enumerate(streams):
            piece = stream.finish()
            if piece:
                yield first + row, piece
            completions.append(
                Completion(
                    stream.text, tokens[row], len(chunk[row]), reasons[row], (first_token_at or start) - start, elapsed
                )
            )
    return completions


def generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: str | list[str],
    config: GenerationConfig | None = None,
    template: Template | str | None = None,
    on_text: Callable[[int, str], None] | None = None,
    draft: CausalLM | None = None,
    stats: SpeculativeStats | None = None,
    **overrides,
) -> Completion | list[Completion]:
    """Complete one prompt (returns a Completion) or several (a list, batched with left padding).

    ``overrides`` set GenerationConfig fields (``max_new_tokens=64, temperature=0.7 ...``);
    ``on_text(index, piece)`` is called with text as it is produced.
    """
    config = with_overrides(config, overrides)
    single = isinstance(prompts, str)
    runner = iter_generate(model, tokenizer, prompts, config, template, draft, stats)
    while True:
        try:
            index, piece = next(runner)
        except StopIteration as finished:
            completions = finished.value
            break
        if on_text is not None:
            on_text(index, piece)
    return completions[0] if single else completions


def stream(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    config: GenerationConfig | None = None,
    template: Template | str | None = None,
    draft: CausalLM | None = None,
    **overrides,
) -> Iterator[str]:
    """The completion of ``prompt`` piece by piece as it is generated (an iterator; a mistake in the
    arguments is an error here, at the call)."""
    if not isinstance(prompt, str):
        raise PhikitError(f"stream takes one prompt (a string), got {type(prompt).__name__}; generate takes several")
    runner = iter_generate(model, tokenizer, prompt, with_overrides(config, overrides), template, draft)
    return (piece for _, piece in runner)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: max allocated on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
