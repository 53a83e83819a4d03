"""Native PyTorch Phi (Phi-1, Phi-1.5, Phi-2) in reading order: cache -> rope -> attention -> MLP -> block -> model.

Module and parameter names are those of transformers' ``PhiForCausalLM`` (``model.layers.N.self_attn.q_proj``,
``model.final_layernorm``, ``lm_head``) so HF state dicts and PEFT adapters map 1:1. A plain model with one
calling convention, ``forward(input_ids, input_pos, cache, ...)``, and no device branches: device-specific
speed (CPU kernels, CUDA graphs, quantized matmuls) lives in ``phikit.backends``, which swaps in its own
modules at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from phikit.config import PhiConfig


class KVCache:
    """Keys and values of every layer, preallocated to ``max_length`` so decoding never concatenates.

    ``k`` and ``v`` are (layers, batch, kv_heads, max_length, head_dim); layer i uses ``k[i]``.
    """

    def __init__(
        self, config: PhiConfig, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device | str
    ):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length


def rope_tables(config: PhiConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for ``positions`` (batch, seq) -> each (batch, 1, seq, rotary_dim), computed in fp32."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of each head (GPT-NeoX half-split style); pass the rest through."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention; q (batch, heads, seq, dim), k/v (batch, kv_heads, keys, dim).

    Phi-2's attention scores overflow fp16; SDPA's fused kernels (CUDA flash / memory-efficient, and the
    CPU flash kernel) keep scores and softmax in fp32, so fp16 inputs are safe (tested)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


class PhiAttention(nn.Module):
    sdpa = staticmethod(attention)  # a backend may swap in its own (the CPU one for single queries)

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, h * d)
        self.k_proj = nn.Linear(config.hidden_size, kv * d)
        self.v_proj = nn.Linear(config.hidden_size, kv * d)
        self.dense = nn.Linear(h * d, config.hidden_size)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x, cos, sin, kv, slots, mask, last_only: bool = False) -> torch.Tensor:
        """Attention output (batch, seq, hidden).

        kv: this layer's (k_cache, v_cache) or None. slots: where this chunk's keys/values go, an int (a
        chunk at ``slots:slots+seq``, attending to every slot before its end) or a (batch,) tensor (one new
        token per row at its own slot, attending over the whole cache under ``mask``: static shapes, as
        continuous batching and CUDA graphs need). ``last_only``: every position is cached but only the
        last is queried, (batch, 1, hidden)."""
        b, t, _ = x.shape
        d = self.config.head_dim
        per_row = isinstance(slots, torch.Tensor)
        last_only = last_only and t > 1 and kv is not None and not per_row  # one query sees every key
        queries = 1 if last_only else t
        q = self.q_proj(x[:, -queries:]).view(b, queries, -1, d).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        if self.config.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos[:, :, -queries:], sin[:, :, -queries:]), apply_rope(k, cos, sin)
        if kv is not None:
            k_cache, v_cache = kv
            if per_row:
                rows = torch.arange(b, device=x.device)
                k_cache[rows, :, slots] = k[:, :, 0].to(k_cache.dtype)
                v_cache[rows, :, slots] = v[:, :, 0].to(v_cache.dtype)
                k, v = k_cache, v_cache
                if mask is None:  # each row sees the slots up to its own
                    mask = torch.arange(k_cache.shape[2], device=x.device) <= slots.view(-1, 1, 1, 1)
            else:
                k_cache[:, :, slots : slots + t] = k
                v_cache[:, :, slots : slots + t] = v
                k, v = k_cache[:, :, : slots + t], v_cache[:, :, : slots + t]
            k, v = k.to(q.dtype), v.to(q.dtype)  # a narrower cache (fp16 on CPU) is widened to compute
        if mask is not None:
            mask = mask[:, :, -queries:]
        y = self.sdpa(q, k, v, mask, causal=mask is None and queries > 1)
        return self.dense(y.transpose(1, 2).reshape(b, queries, -1))


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.approximate = "none" if config.hidden_act == "gelu" else "tanh"  # gelu_new is the tanh form
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class PhiDecoderLayer(nn.Module):
    """One LayerNorm feeds attention and MLP in parallel; both add to the residual."""

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.self_attn = PhiAttention(config)
        self.mlp = PhiMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(float(config.extra.get("resid_pdrop", 0.0)))

    def forward(self, x, cos, sin, kv, slots, mask, last_only: bool = False):
        """(batch, seq, hidden), or with ``last_only`` (the last layer of a prefill whose other positions
        are not read) only the last position, (batch, 1, hidden): llama.cpp skips these rows too."""
        h = self.input_layernorm(x)
        attn = self.self_attn(h, cos, sin, kv, slots, mask, last_only)
        if attn.shape[1] != x.shape[1]:
            h, x = h[:, -1:], x[:, -1:]
        mlp = self.mlp(h)
        if self.training:
            attn, mlp = self.resid_dropout(attn), self.resid_dropout(mlp)
        return attn + mlp + x


class PhiModel(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(float(config.extra.get("embd_pdrop", 0.0)))
        self.layers = nn.ModuleList(PhiDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Final hidden states (batch, seq, hidden) for ``input_ids`` (batch, seq); with ``last_only`` and a
        cache, those of the last position (batch, 1, hidden), every position's keys/values still cached.

        input_pos: cache slots, (seq,) consecutive slots shared by every row (default ``arange(seq)``), or
            (batch, 1): one new token per row at its own slot (continuous batching, CUDA graphs).
        positions: rope positions (batch, seq); default ``input_pos``. Left-padded rows count from their
            first real token.
        padding_mask: (batch, >= slots in use) bool, False at left-padding slots, which no query attends to.
        """
        b, t = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(t, device=input_ids.device)
        per_row = input_pos.dim() == 2
        if positions is None:
            positions = input_pos if per_row else input_pos.expand(b, t)
        slots = None
        if cache is not None:  # a Python int for a chunk: one host sync per forward, none per layer
            slots = input_pos[:, 0] if per_row else int(input_pos[0])
        # embeddings may be stored narrower than the compute dtype (bf16 table, fp32 activations on CPU)
        x = self.embed_tokens(input_ids).to(self.final_layernorm.weight.dtype)
        if self.training:
            x = self.embed_dropout(x)
        cos, sin = rope_tables(self.config, positions, x.dtype)
        mask = build_mask(
            t, 0 if slots is None else slots, padding_mask, x.device, cache.max_length if cache is not None else 0
        )
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, kv, slots, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv, slots, mask, last_only and i == len(self.layers) - 1)
        return self.final_layernorm(x)


def build_mask(
    t: int, start: int | torch.Tensor, padding_mask: torch.Tensor | None, device: torch.device, cache_length: int = 0
) -> torch.Tensor | None:
    """Boolean attention mask (batch|1, 1, seq, keys), or None where SDPA's own causal flag suffices.

    Each query also sees itself, so a left-padding row never has every key masked (that gives NaN in SDPA).
    A tensor ``start`` (a slot per row) masks over the whole cache, so shapes never change.
    """
    static = isinstance(start, torch.Tensor)
    if padding_mask is None and (static or t == 1 or start == 0):
        return None  # one new token sees every cached key (per row: attention masks by slot); a fresh prompt is causal
    keys = torch.arange(cache_length if static else start + t, device=device)
    first = start.view(-1, 1) if static else start
    queries = first + torch.arange(t, device=device)  # (seq,) or, per row, (batch, seq)
    mask = keys <= queries[..., None]  # (seq, keys) or (batch, seq, keys)
    if padding_mask is not None:
        mask = (mask & padding_mask[:, None, : keys.numel()]) | (keys == queries[..., None])
        return mask[:, None]
    return mask[None, None]


class PhiForCausalLM(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype (a backend may narrow it)

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) in the model's dtype; ``last_only`` computes just the last position;
        ``hidden_only`` returns the final hidden states instead, before ``lm_head`` (for a loss that applies
        the head itself). Arguments as ``PhiModel.forward``."""
        h = self.model(input_ids, input_pos, cache, positions, padding_mask, last_only and not self.training)
        if last_only:
            h = h[:, -1:]
        return h if hidden_only else self.lm_head(h)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on this model's device, of ``dtype``, else ``kv_cache_dtype``, else the model's."""
        return KVCache(self.config, batch_size, max_length, dtype or self.kv_cache_dtype or self.dtype, self.device)

    @property
    def device(self) -> torch.device:
        return self.model.final_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.final_layernorm.weight.dtype
