"""The batching engine of ``phikit serve``: one thread owns the model and decodes every request together.

Each request gets a row (slot) of a batch KV cache: it is prefilled alone as soon as a slot is free (from a
cached prefix where one matches), then decoded together with every other active request, one token per
row per step, so a new request never waits for others to finish. Requests wait in a queue while every slot
is taken; a finished, timed-out or abandoned request frees its slot at the next step.

Per request: sampling (temperature, top-p, seed), presence/frequency penalties and logit bias, log-
probabilities of the generated tokens and (echo) of the prompt's, a grammar that constrains the tokens
(structured output), and the LoRA adapter its row decodes with (several adapters in one batch).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from phikit.generate import GenerationConfig, TextStream, process_logits, rope_switch
from phikit.models import CausalLM
from phikit.tokenizer import Tokenizer

log = logging.getLogger("phikit.serve")
PROMPT_LOGPROB_CHUNK = 256  # prompt positions whose logits exist at once when echoing log-probabilities


@dataclass
class Request:
    """One generation. ``deliver`` (thread-safe) receives ("prompt_logprobs", entries), then ("token",
    (token id, text piece, logprob entry or None)) per generated token, then ("done", finish_reason). A
    logprob entry is (log-probability of the token, [(id, log-probability) of the ``logprobs`` most likely
    tokens]); the prompt's first token has None."""

    prompt_ids: list[int]
    max_tokens: int
    config: GenerationConfig
    stop: tuple[str, ...]
    deliver: Any
    deadline: float
    logprobs: int | None = None  # top alternatives per generated token; 0: the chosen token's only
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    grammar: Any = None  # structured.Grammar: allowed tokens per step
    adapter: int = -1  # the LoRA adapter this row decodes with (-1: the base model)
    generator: torch.Generator | None = None
    cancelled: bool = False
    counted: bool = False  # counts against the engine's capacity until it finishes or is cancelled
    slot: int = -1
    position: int = 0  # cache slot of the newest token, not yet written
    last_token: int = 0
    completion_tokens: int = 0
    cumulative_logprob: float = 0.0
    cached_prefix: int = 0  # prompt tokens whose keys/values came from the prefix cache
    counts: dict[int, int] = field(default_factory=dict)
    generated: list[int] = field(default_factory=list)  # the tokens so far (a LongRoPE row is prefilled again)
    stream: TextStream | None = None
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None


class PrefixCache:
    """Keys/values of recent prompts, reused for a later prompt that starts the same way (a shared system
    prompt, few-shot examples, lm-eval's repeated contexts): its longest cached prefix is copied into the new
    row and only the rest is prefilled. The keys/values of positions before a point depend only on the tokens
    before it, so this gives the cold run's values (up to the last bits: a prefix computed inside another
    prompt's prefill may have been summed in another order; README).

    Stored in blocks of ``BLOCK`` tokens in one arena allocated once (``max_bytes``; no buffer per entry, so
    nothing to fragment the heap), each found by a chain hash of the adapter and every token up to its end:
    a lookup hashes the new prompt block by block (a dict lookup per block, whatever the number of entries).
    Least recently used blocks are reused first; a prefix is always more recent than the blocks after it. A
    prefix shorter than ``min_tokens`` is not worth a copy."""

    BLOCK = 16

    def __init__(self, max_bytes: int, min_tokens: int = 16):
        self.max_bytes, self.min_tokens = max_bytes, max(min_tokens, self.BLOCK)
        self.index: OrderedDict[bytes, int] = OrderedDict()  # chain hash -> block, least recent first
        # the arena: one tensor per tensor of a KVCache (keys, values; an int8 cache's scales too), each
        # (blocks, layers, kv_heads, BLOCK, ...)
        self.parts: tuple[torch.Tensor, ...] | None = None
        self.free: list[int] = []
        self.hits = 0

    @staticmethod
    def _chain(adapter: int, ids: list[int], blocks: int) -> list[bytes]:
        """The chain hash of each of the first ``blocks`` blocks of ``ids``."""
        out, digest = [], hashlib.blake2b(str(adapter).encode(), digest_size=16).digest()
        for b in range(blocks):
            block = array("q", ids[b * PrefixCache.BLOCK : (b + 1) * PrefixCache.BLOCK]).tobytes()
            digest = hashlib.blake2b(digest + block, digest_size=16).digest()
            out.append(digest)
        return out

    def lookup(self, adapter: int, ids: list[int]) -> tuple[int, list[int]]:
        """(tokens to reuse, their blocks in order): the longest cached prefix of whole blocks, leaving at least
        one token to prefill (its logits start the reply)."""
        if self.parts is None:
            return 0, []
        found = []
        for digest in self._chain(adapter, ids, (len(ids) - 1) // self.BLOCK):
            block = self.index.get(digest)
            if block is None:
                break
            found.append((digest, block))
        if len(found) * self.BLOCK < self.min_tokens:
            return 0, []
        for digest, _ in reversed(found):  # the prefix ends up more recent than what follows it
            self.index.move_to_end(digest)
        self.hits += 1
        return len(found) * self.BLOCK, [block for _, block in found]

    def copy_into(self, row, blocks: list[int]) -> None:
        """Write ``blocks`` into a row cache's first slots (a ``KVCache`` of one row: each of its ``tensors``
        (layers, 1, kv_heads, slots, ...))."""
        for i, block in enumerate(blocks):
            span = slice(i * self.BLOCK, (i + 1) * self.BLOCK)
            for part, t in zip(self.parts, row.tensors):
                t[:, 0, :, span] = part[block]

    def store(self, adapter: int, ids: list[int], *tensors: torch.Tensor) -> None:
        """Keep the whole blocks of a prefilled row's cache: ``tensors`` its keys and values (layers, kv_heads,
        len(ids), head_dim), then any scales (layers, kv_heads, len(ids)), as ``KVCache.tensors`` orders them."""
        blocks = len(ids) // self.BLOCK
        if self.max_bytes <= 0 or blocks * self.BLOCK < self.min_tokens:
            return
        if self.parts is None:
            per_block = sum(t[:, :, : self.BLOCK].numel() * t.element_size() for t in tensors)
            count = self.max_bytes // per_block
            if count == 0:
                self.max_bytes = 0
                return
            self.parts = tuple(
                torch.empty((count, *t.shape[:2], self.BLOCK, *t.shape[3:]), dtype=t.dtype, device=t.device)
                for t in tensors
            )
            self.free = list(range(count))
        chain = self._chain(adapter, ids, blocks)
        for b, digest in enumerate(chain):
            if digest in self.index:
                continue
            if not self.free:
                _, old = self.index.popitem(last=False)
                self.free.append(old)
            block = self.free.pop()
            span = slice(b * self.BLOCK, (b + 1) * self.BLOCK)
            for part, t in zip(self.parts, tensors):
                part[block].copy_(t[:, :, span])
            self.index[digest] = block
        for digest in reversed(chain):
            self.index.move_to_end(digest)

    @property
    def bytes(self) -> int:
        return 0 if self.parts is None else sum(t.numel() * t.element_size() for t in self.parts)


class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        context: int | None = None,
        prefix_cache_bytes: int = 0,
        adapters=None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.context = max_batch, context or model.config.max_position_embeddings
        self.cache = model.new_cache(max_batch, self.context)
        self.max_queue = max_queue
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.outstanding = 0  # requests queued or in a slot: at most max_batch + max_queue
        self.lock = threading.Lock()
        self.slots: list[Request | None] = [None] * max_batch
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="phikit-engine", daemon=True)
        self.steps = 0
        self.started = 0  # requests that got a slot
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.adapters = adapters  # adapters.AdapterSet or None
        self.switch = rope_switch(model)  # a LongRoPE row reaching it is prefilled again

    def start(self) -> Engine:
        """Start the engine's thread (again, after ``stop``: an app may be served more than once)."""
        if self.thread.ident is not None:
            self.stopped.clear()
            self.thread = threading.Thread(target=self._run, name="phikit-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> bool:
        """Queue a request; False when every slot is taken and ``max_queue`` requests already wait (a
        request counts against the queue only when no slot is free for it)."""
        with self.lock:
            if self.outstanding >= self.max_batch + self.max_queue:
                return False
            self.outstanding += 1
            request.counted = True
        self.waiting.put_nowait(request)
        return True

    def reserve(self, count: int) -> bool:
        """Take ``count`` places at once (slots or queue) for one request's generations, before anything is
        built for them; False when they do not fit now. Each is used by ``submit_reserved`` or given back
        with ``release``."""
        with self.lock:
            if self.outstanding + count > self.max_batch + self.max_queue:
                return False
            self.outstanding += count
        return True

    def submit_reserved(self, request: Request) -> None:
        """Queue a request into a place ``reserve`` took."""
        request.counted = True
        self.waiting.put_nowait(request)

    def release(self, count: int) -> None:
        """Give back reserved places no request was submitted into."""
        if count:
            with self.lock:
                self.outstanding -= count

    def cancel(self, request: Request) -> None:
        """The client went away: stop counting the request now; the engine drops it unstarted, or frees
        its slot at the next step."""
        request.cancelled = True
        self._release(request)

    def _release(self, request: Request) -> None:
        with self.lock:
            if request.counted:
                request.counted = False
                self.outstanding -= 1

    def _done(self, request: Request, reason: str) -> None:
        self._release(request)
        request.deliver(("done", reason))

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    # -- the loop --

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.stopped.is_set():
                self._admit()
                if not any(self.slots):
                    try:
                        request = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._guarded(self._start, request)
                    continue
                self._guarded(self._decode_step)

    def _guarded(self, step, *args) -> None:
        """Run one engine step; an unexpected error fails the requests involved (a 500 to their clients)
        and frees their rows instead of killing the engine thread and hanging every later request."""
        try:
            step(*args)
        except Exception as e:  # noqa: BLE001 - the engine must outlive any single request
            log.exception("engine step failed: %s", e)
            involved = [args[0]] if args else [r for r in self.slots if r is not None]  # one request, or all
            for r in involved:
                if r.slot >= 0 and self.slots[r.slot] is r:
                    self.slots[r.slot] = None
                self._done(r, "error")

    def _admit(self) -> None:
        while None in self.slots:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            self._guarded(self._start, request)

    def _select_adapters(self, rows: list[int]) -> None:
        if self.adapters is not None:
            self.adapters.select(rows)

    def _start(self, r: Request) -> None:
        if r.cancelled or time.time() > r.deadline:
            self._done(r, "timeout" if not r.cancelled else "cancelled")
            return
        r.slot = self.slots.index(None)
        self.slots[r.slot] = r
        self.started += 1
        r.stream = TextStream(self.tokenizer, r.stop)
        if r.config.seed is not None:  # any JSON integer, folded into torch's seed range
            r.generator = torch.Generator(device=self.model.device).manual_seed(r.config.seed % 2**64)
        self._select_adapters([r.adapter])
        logits = self._prefill(r)
        r.position = len(r.prompt_ids)
        if r.max_tokens == 0:  # echo only: the prompt scored, nothing generated
            self.slots[r.slot] = None
            self._done(r, "length")
            return
        self._emit(r, self._sample(r, logits))

    def _prefill(self, r: Request) -> torch.Tensor:
        """Fill the row's cache with the prompt (from a cached prefix where one matches); the logits
        (1, vocab) fp32 of its last position. With ``prompt_logprobs`` every position's logits are
        scored, a chunk at a time, so the prefix cache is not used."""
        device, ids = self.model.device, r.prompt_ids
        row = self.cache.rows(r.slot)
        start = 0
        # keys cached for a prefix were rotated with LongRoPE's short factors: a longer prompt needs the long
        if not r.prompt_logprobs and (self.switch is None or len(ids) <= self.switch):
            start, blocks = self.prefix_cache.lookup(r.adapter, ids)
            self.prefix_cache.copy_into(row, blocks)
        r.cached_prefix = start
        new = torch.tensor([ids[start:]], device=device)
        slots = torch.arange(start, len(ids), device=device)
        if not r.prompt_logprobs:
            logits = self.model.prefill(new, slots, row)[:, -1].float()
            if self.switch is None or len(ids) <= self.switch:
                self.prefix_cache.store(r.adapter, ids, *(t[:, 0, :, : len(ids)] for t in row.tensors))
            return logits
        hidden = self.model.model(new, slots, row)  # (1, T, hidden)
        entries: list = [None]  # the first token has no log-probability
        targets = torch.tensor(ids[1:], device=device)
        for first in range(0, len(ids), PROMPT_LOGPROB_CHUNK):
            last = min(first + PROMPT_LOGPROB_CHUNK, len(ids))
            logp = self.model.lm_head(hidden[:, first:last])[0].float().log_softmax(-1)  # (positions, vocab)
            scored = min(last, len(ids) - 1) - first  # positions that predict a prompt token
            if scored > 0:
                chosen = logp[:scored].gather(1, targets[first : first + scored, None])[:, 0].tolist()
                top = logp[:scored].topk(max(r.logprobs or 0, 1), dim=-1)
                for i in range(scored):
                    alternatives = list(zip(top.indices[i].tolist(), top.values[i].tolist()))[: r.logprobs or 0]
                    entries.append((chosen[i], alternatives))
            if last == len(ids):
                final = logp[-1:]  # log-probabilities: the same softmax, argmax and top-p as the logits
        r.deliver(("prompt_logprobs", entries))
        return final

    def _decode_step(self) -> None:
        for r in self.slots:  # a LongRoPE row at the switch: every slot again, alone, with the long factors
            if r is not None and r.position == self.switch:
                self._select_adapters([r.adapter])
                ids = torch.tensor([r.prompt_ids + r.generated], device=self.model.device)
                every = torch.arange(ids.shape[1], device=self.model.device)
                logits = self.model.prefill(ids, every, self.cache.rows(r.slot))[:, -1].float()
                r.position += 1
                self._emit(r, self._sample(r, logits))
        if not any(self.slots):
            return
        self._compact()
        rows = max(i for i, r in enumerate(self.slots) if r is not None) + 1  # rows 0..rows-1 run, every one active
        if getattr(self.model.decode_step, "static", False):  # a compiled / graph-captured step: a shape per batch
            rows = min(1 << (rows - 1).bit_length(), len(self.slots))  # so 1, 2, 4, 8 rows (free rows ride along)
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        adapters = [-1] * rows
        for i, r in enumerate(self.slots[:rows]):
            if r is not None:
                tokens[i, 0], positions[i], adapters[i] = r.last_token, r.position, r.adapter
        device = self.model.device
        self._select_adapters(adapters)
        slots = positions[:, None].to(device)  # a slot per row: each row's newest position
        logits = self.model.decode_step(tokens.to(device), slots, self.cache.rows(0, rows))[:, -1].float()
        self.steps += 1
        for i, r in enumerate(self.slots[:rows]):
            if r is not None:
                r.position += 1
                self._emit(r, self._sample(r, logits[i : i + 1]))

    def _compact(self) -> None:
        """Move the highest active rows down into free rows below them (their keys and values with them), so
        that a step decodes only active rows: a finished request in row 0 would otherwise leave the rows above
        it decoding with a dead row between them. A copy of the moved row's cached positions, once per hole."""
        while True:
            active = [i for i, r in enumerate(self.slots) if r is not None]
            free = next((i for i in range(active[-1]) if self.slots[i] is None), None) if active else None
            if free is None:
                return
            r = self.slots[active[-1]]
            used = r.position  # slots 0..position-1 hold its keys/values
            for t in self.cache.tensors:
                t[:, free, :, :used] = t[:, r.slot, :, :used]
            self.slots[free], self.slots[r.slot] = r, None
            r.slot = free

    def _sample(self, r: Request, logits: torch.Tensor) -> tuple[int, tuple | None]:
        """The next token of one row and its logprob entry (log-probabilities of the model's own
        distribution, before penalties, bias, grammar and temperature, as OpenAI reports them)."""
        raw = logits
        penalized = bool(r.counts) and bool(r.presence_penalty or r.frequency_penalty)
        if r.logit_bias or penalized or r.grammar is not None:  # the step's logits stay the model's (logprobs)
            logits = logits.clone()
        if r.logit_bias:
            ids = torch.tensor(list(r.logit_bias), device=logits.device)
            logits[0, ids] += torch.tensor(list(r.logit_bias.values()), device=logits.device)
        if penalized:
            ids = torch.tensor(list(r.counts), device=logits.device)
            counts = torch.tensor(list(r.counts.values()), device=logits.device, dtype=logits.dtype)
            logits[0, ids] -= r.presence_penalty + r.frequency_penalty * counts
        if r.grammar is not None:
            r.grammar.mask(logits[0])
        processed = process_logits(logits, r.config, None)
        if r.config.temperature == 0:
            token = int(processed.argmax())
        else:
            token = int(torch.multinomial(processed.softmax(-1), 1, generator=r.generator))
        entry = None
        if r.logprobs is not None:
            logp = raw[0].log_softmax(-1)
            top = logp.topk(max(r.logprobs, 1))
            alternatives = list(zip(top.indices.tolist(), top.values.tolist()))[: r.logprobs]
            entry = (float(logp[token]), alternatives)
            r.cumulative_logprob += entry[0]
        return token, entry

    def _emit(self, r: Request, sampled: tuple[int, tuple | None]) -> None:
        """Hand a new token to its request; finish the request if it is done."""
        token, entry = sampled
        reason = None
        if r.cancelled:
            reason = "cancelled"
        elif time.time() > r.deadline:
            reason = "timeout"
        elif token in self.tokenizer.stop_ids:  # EOS, <|end|>; a grammar allows them only where its output is done
            reason = "stop"
        else:
            r.first_token_at = r.first_token_at or time.time()
            r.completion_tokens += 1
            r.last_token = token
            if self.switch is not None:
                r.generated.append(token)
            r.counts[token] = r.counts.get(token, 0) + 1
            piece = r.stream.push(token)
            r.deliver(("token", (token, piece, entry)))
            if r.grammar is not None:
                r.grammar.accept(token)
            if r.stream.stopped or (r.grammar is not None and r.grammar.finished()):
                reason = "stop"
            elif r.completion_tokens >= r.max_tokens or r.position + 1 >= self.context:
                reason = "length"
        if reason is not None:
            if reason in ("length", "stop"):
                rest = r.stream.finish()
                if rest:
                    r.deliver(("token", (None, rest, None)))
            self.slots[r.slot] = None
            self._done(r, reason)
