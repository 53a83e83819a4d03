"""What the model families share, once: the KV cache and its ``update`` verb, the slots and mask of a forward
(built once per forward, not per layer), rotary position embedding (partial, LongRoPE), attention with
grouped-query heads and a sliding window, RMSNorm, and the ``CausalLM`` base every family's model derives.

Calling convention (gpt-fast's): ``forward(input_ids, input_pos, cache, ...)`` where ``input_pos`` is always
a tensor of cache slots: (seq,) consecutive slots every row shares (a prefill or a chunk), or (batch, 1), one
new token per row at its own slot (continuous batching, CUDA graphs: static shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of every layer, preallocated to ``max_length`` so decoding never concatenates.

    ``k`` and ``v`` are (layers, batch, kv_heads, max_length, head_dim); layer i uses ``k[i]``. ``rows``
    gives a view of some rows (sharing storage), as the server's engine uses one row per request.

    An int8 cache (``dtype`` torch.int8, opt-in: ``phikit.load(kv_cache="int8")``) holds each row (one token's
    key or value of one head) as int8 codes and ``scales`` = (k_scale, v_scale), (layers, batch, kv_heads,
    max_length) fp32, the row's scale: max |x| / 127, codes x / scale rounded to nearest even (``quantize_rows``,
    the same arithmetic as the CPU kernel's). head_dim + 4 bytes a row instead of fp16's 2 x head_dim: at long
    contexts, where the cache is most of what a decoding step reads, about half the cache's bytes."""

    def __init__(
        self,
        layers: int,
        batch_size: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        empty=None,
    ):
        """``empty(shape, dtype)``: where the caches' memory comes from (zeroed here; a backend may place it,
        see CausalLM.new_cache), else ``torch.zeros`` on ``device``."""
        shape = (layers, batch_size, kv_heads, max_length, head_dim)

        def zeros(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device) if empty is None else empty(shape, dtype).zero_()

        self.k, self.v = zeros(shape, dtype), zeros(shape, dtype)
        self.scales = None  # (k_scale, v_scale) of an int8 cache
        if dtype == torch.int8:
            self.scales = (zeros(shape[:-1], torch.float32), zeros(shape[:-1], torch.float32))
        self.max_length = max_length

    def update(self, layer: int, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values (batch, kv_heads, seq, head_dim) of ``layer`` at ``slots`` and
        return the keys/values to attend over, in ``k``'s dtype (a narrower cache, fp16 on CPU, is widened; an
        int8 one dequantized)."""
        dtype = k.dtype
        if self.scales is None:
            parts = [(self.k[layer], k), (self.v[layer], v)]
        else:
            (k_codes, k_scale), (v_codes, v_scale) = quantize_rows(k), quantize_rows(v)
            parts = [(self.k[layer], k_codes), (self.v[layer], v_codes)]
            parts += [(self.scales[0][layer], k_scale), (self.scales[1][layer], v_scale)]
        if slots.per_row:
            rows = torch.arange(k.shape[0], device=k.device)
            for cache, new in parts:
                cache[rows, :, slots.row_slots] = new[:, :, 0].to(cache.dtype)
            attended = [cache for cache, _ in parts]
        else:
            for cache, new in parts:
                cache[:, :, slots.start : slots.end] = new
            attended = [cache[:, :, slots.first : slots.end] for cache, _ in parts]
        if self.scales is None:
            return attended[0].to(dtype), attended[1].to(dtype)
        return dequantize_rows(attended[0], attended[2], dtype), dequantize_rows(attended[1], attended[3], dtype)

    def rows(self, first: int, count: int = 1) -> KVCache:
        """A view of rows ``first .. first+count-1`` (same storage)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, first : first + count], self.v[:, first : first + count]
        view.scales = None if self.scales is None else tuple(t[:, first : first + count] for t in self.scales)
        view.max_length = self.max_length
        return view

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Everything the cache holds, each (layers, batch, kv_heads, max_length, ...): what copying a row's
        slots elsewhere (the server's prefix cache, a row moved) must copy."""
        return (self.k, self.v, *(self.scales or ()))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., head_dim) -> int8 codes (..., head_dim) and fp32 scales (...): scale = max |x| / 127 per row and
    codes x / scale rounded to nearest even (0 for a zero row), computed in fp32 as the CPU kernel does."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127
    codes = (x / torch.where(scale > 0, scale, 1)[..., None]).round().to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``quantize_rows``' inverse (to within half a step of each row): codes x scale, in ``dtype``."""
    return (codes.float() * scale[..., None]).to(dtype)


@dataclass
class Slots:
    """Where one forward's tokens go in the cache and which keys each query sees, built once per forward.

    Chunk mode (``input_pos`` (seq,)): slots ``start .. end-1`` are written and keys ``first .. end-1``
    attended (``first`` > 0 only under a sliding window). Per-row mode (``input_pos`` (batch, 1)): row i
    writes ``row_slots[i]`` and attends over the whole cache under ``mask``. ``mask`` (batch|1, 1, seq,
    keys) bool, or None where every key is visible (one query) or SDPA's own causal flag suffices
    (``causal``)."""

    positions: torch.Tensor  # (batch, seq) rope positions
    per_row: bool
    start: int = 0
    first: int = 0
    end: int = 0
    row_slots: torch.Tensor | None = None  # (batch,) in per-row mode
    mask: torch.Tensor | None = None
    causal: bool = False
    padded: bool = False  # some rows are left-padded (a padding mask was given)
    window: int | None = None

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None,
        cache: KVCache | None,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        window: int | None = None,
    ) -> Slots:
        """positions: rope positions (batch, seq), default the slots (left-padded rows count from their first
        real token). padding_mask: (batch, >= slots in use) bool, False at left-padding slots, which no query
        attends to; or, without a cache, (batch, seq, seq): the keys each query sees, whole (several sequences
        in one row sharing a prefix, as a preference pair's replies share its prompt; the caller applies any
        sliding window to it). window: a query at slot s sees keys s-window+1 .. s (transformers' sliding
        window)."""
        b, t = input_ids.shape
        device = input_ids.device
        if padding_mask is not None and padding_mask.dim() == 3:
            if cache is not None or padding_mask.shape != (b, t, t):
                raise ValueError(f"a whole mask is (batch, seq, seq) = {(b, t, t)} without a cache")
            if positions is None:
                positions = torch.arange(t, device=device).expand(b, t)
            mask = padding_mask | torch.eye(t, dtype=torch.bool, device=device)  # a query always sees itself
            return cls(positions, False, 0, 0, t, mask=mask[:, None], padded=True, window=window)
        if input_pos is None:
            input_pos = torch.arange(t, device=device)
        if input_pos.dim() == 2:  # one token per row at its own slot, over the whole cache
            if t != 1 or input_pos.shape != (b, 1):
                raise ValueError(
                    f"a slot per row (input_pos of shape (batch, 1)) takes one new token per row; got "
                    f"input_ids {tuple(input_ids.shape)} and input_pos {tuple(input_pos.shape)}"
                )
            row_slots = input_pos[:, 0]
            if positions is None:
                positions = input_pos
            keys = torch.arange(cache.max_length if cache is not None else t, device=device)
            queries = row_slots.view(-1, 1)  # (batch, 1)
            mask = keys <= queries[..., None]  # (batch, 1, keys)
            if window:
                mask &= keys > queries[..., None] - window
            if padding_mask is not None:
                mask = (mask & padding_mask[:, None, : keys.numel()]) | (keys == queries[..., None])
            padded = padding_mask is not None
            return cls(positions, True, 0, 0, keys.numel(), row_slots, mask[:, None], False, padded, window)
        if positions is None:
            positions = input_pos.expand(b, t)
        start = int(input_pos[0]) if cache is not None else 0  # one host sync per forward, none per layer
        end = start + t
        first = max(0, start - window + 1) if window else 0
        fits = not window or end - first <= window  # no query's window excludes a key in first..end-1
        if padding_mask is None and fits and (t == 1 or start == 0):
            return cls(positions, False, start, first, end, causal=t > 1, window=window)
        keys = torch.arange(first, end, device=device)
        queries = start + torch.arange(t, device=device)
        mask = keys <= queries[:, None]  # (seq, keys)
        if window:
            mask &= keys > queries[:, None] - window
        if padding_mask is not None:  # each query also sees itself: a padding row is never all masked (NaN)
            mask = (mask & padding_mask[:, None, first:end]) | (keys == queries[:, None])
            return cls(positions, False, start, first, end, mask=mask[:, None], padded=True, window=window)
        return cls(positions, False, start, first, end, mask=mask[None, None], window=window)

    def mask_for(self, queries: int) -> torch.Tensor | None:
        """The mask of the last ``queries`` queries (a prefill whose last layer computes only the last)."""
        return None if self.mask is None else self.mask[:, :, -queries:]


def rope_tables(
    config, positions: torch.Tensor, dtype: torch.dtype, longest: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of rotary position embedding for ``positions`` (batch, seq) -> each (batch, 1, seq, rotary_dim),
    computed in fp32 as transformers does (inverse frequencies theta^(-2i/dim); cat(freqs, freqs)).

    LongRoPE (``config.longrope``: short and long factors, the attention factor, the original context): the
    inverse frequencies are divided per dim by the short factors while a row's longest position still fits
    the original context and by the long ones once it passes it (transformers' rule, per row here), and
    cos/sin are multiplied by the attention factor at every length. ``longest`` (batch,): the row's longest
    position where the positions are a chunk of a longer prompt (``CausalLM.prefill``), else their own
    maximum. Callers recompute the cache when a sequence crosses that point (``generate``), as
    transformers' Phi-3 does."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.int64).float() / dim
    base = config.rope_theta**exponents
    longrope = getattr(config, "longrope", None)
    if longrope is None:
        inv_freq = 1.0 / base
        freqs = positions[..., None].float() * inv_freq  # (batch, seq, dim/2)
        scale = 1.0
    else:
        short = 1.0 / (torch.tensor(longrope.short_factor, dtype=torch.float32, device=positions.device) * base)
        long = 1.0 / (torch.tensor(longrope.long_factor, dtype=torch.float32, device=positions.device) * base)
        reach = positions.amax(dim=-1) if longest is None else longest.to(positions.device)
        longer = reach[:, None, None] >= longrope.original_max_position_embeddings
        freqs = positions[..., None].float() * torch.where(longer, long, short)
        scale = longrope.attention_factor
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of each head (GPT-NeoX half-split style); pass the rest through."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        half = dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention; q (batch, heads, seq, dim), k/v (batch, kv_heads, keys, dim); kv_heads
    may divide heads (grouped-query attention, each KV head serving its group).

    Phi-2's attention scores overflow fp16; SDPA's fused kernels (CUDA flash / memory-efficient, and the
    CPU flash kernel) keep scores and softmax in fp32, so fp16 inputs are safe (tested)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def cached_attention(sdpa, q, k, v, cache: KVCache | None, layer: int, slots: Slots) -> torch.Tensor:
    """Write k/v into the cache (when there is one) and attend: q (batch, heads, queries, dim) may hold only
    the last queries of the forward's tokens. ``sdpa``: the attention function (a backend may swap it)."""
    if cache is not None:
        k, v = cache.update(layer, slots, k, v)
    queries = q.shape[2]
    return sdpa(q, k, v, slots.mask_for(queries), causal=slots.causal and queries > 1)


class RMSNorm(nn.Module):
    """Root-mean-square normalization, computed in fp32 (transformers' Phi3RMSNorm, same order of ops)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


PREFILL_CHUNK = 512  # prompt tokens per forward in ``CausalLM.prefill`` (llama.cpp's default micro-batch)


class CausalLM(nn.Module):
    """What every family's ``...ForCausalLM`` shares: the calling convention, the cache, the head, the
    decoding step a backend installs, and the structure version that step is keyed by.

    A family defines ``self.model`` (with ``embed_tokens``, ``layers`` and ``output_norm``) and ``lm_head``.
    ``decode_step`` is ``forward`` until a backend installs its own (``phikit.backends``); ``version`` is
    bumped (``changed``) whenever modules are swapped (an adapter loaded, merged or wrapped), and an
    installed step rebuilds what it derived from the modules when it sees a new version."""

    version: int = 0

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        rope_longest: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) in the model's dtype; ``last_only`` computes just the last position;
        ``hidden_only`` returns the final hidden states instead, before ``lm_head`` (for a loss that applies
        the head itself). ``input_pos``/``positions``/``padding_mask``: see ``Slots.build``;
        ``rope_longest``: see ``rope_tables``."""
        last = last_only and not self.training
        h = self.model(input_ids, input_pos, cache, positions, padding_mask, last, rope_longest=rope_longest)
        if last_only:
            h = h[:, -1:]
        return h if hidden_only else self.lm_head(h)

    def prefill(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Write a prompt's keys and values into ``cache`` at slots ``input_pos`` (seq,), ``chunk`` tokens
        (default ``PREFILL_CHUNK``) per forward, and return the last position's logits (batch, 1, vocab).

        Equal to one forward over the whole prompt (LongRoPE's factors are chosen by the prompt's longest
        position, not the chunk's), while no forward holds more than a chunk's activations and attention
        works on a chunk's queries at a time: a 32k-token prompt never makes a 32k-row activation or a
        32k x 32k score matrix, and only the last position meets the head."""
        chunk = chunk or PREFILL_CHUNK
        t = input_ids.shape[1]
        if positions is None:
            positions = input_pos.expand(input_ids.shape[0], t)
        longest = positions.amax(dim=-1) if getattr(self.config, "longrope", None) else None
        logits = None
        for start in range(0, t, chunk):
            end = min(start + chunk, t)
            part = input_ids[:, start:end], input_pos[start:end], cache, positions[:, start:end], padding_mask
            logits = self(*part, last_only=True, rope_longest=longest)
        return logits

    def decode_step(self, input_ids, input_pos, cache, positions=None, padding_mask=None) -> torch.Tensor:
        """One new token per row: logits (batch, 1, vocab). A backend may install a faster equal step."""
        return self.forward(input_ids, input_pos, cache, positions, padding_mask)

    def cache_dtype(self, dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype of a new KV cache: ``dtype``, else ``kv_cache_dtype`` (a backend may narrow it), else the
        model's."""
        return dtype or getattr(self, "kv_cache_dtype", None) or self.dtype

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on this model's device, of ``cache_dtype(dtype)``, its memory from
        ``kv_cache_empty`` where a backend set one (the CPU backend: on 2 MB pages)."""
        c = self.config
        dtype = self.cache_dtype(dtype)
        layers, kv_heads, head_dim = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        empty = getattr(self, "kv_cache_empty", None) if self.device.type == "cpu" else None
        return KVCache(layers, batch_size, kv_heads, max_length, head_dim, dtype, self.device, empty)

    def kv_cache_bytes(self, tokens: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """The bytes ``new_cache(batch_size, tokens, dtype)`` holds: keys and values of every layer (and an
        int8 cache's fp32 scale a row)."""
        c = self.config
        dtype = self.cache_dtype(dtype)
        row = c.head_dim * dtype.itemsize + (4 if dtype == torch.int8 else 0)
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * row
        return per_token * tokens * batch_size

    @property
    def device(self) -> torch.device:
        return self.model.output_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the output norm's (a CPU backend keeps norms, so activations, in fp32)."""
        return self.model.output_norm.weight.dtype


def changed(model: nn.Module) -> None:
    """Say that ``model``'s modules were swapped (an adapter injected, loaded or merged): decoding steps a
    backend derived from them are rebuilt before their next use."""
    model.version = getattr(model, "version", 0) + 1
