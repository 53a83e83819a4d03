"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (transformers' ``Phi3ForCausalLM``) in reading order: attention -> MLP ->
block -> model.

Names are transformers' (``model.layers.N.self_attn.qkv_proj``, ``mlp.gate_up_proj``, ``model.norm``), so HF
state dicts and PEFT adapters map 1:1. Sequential pre-norm blocks with RMSNorm, no biases; q, k and v in one
fused projection (rows q | k | v) with grouped-query heads; SwiGLU on one fused gate|up projection; rotary on
``head_dim * partial_rotary_factor`` dims (Phi-4-mini: 0.75), LongRoPE on the 128k models, a sliding window on
the 4k ones; ``lm_head`` tied to the embedding on Phi-4-mini. Shared pieces: ``phikit.models.common``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from phikit.config import Phi3Config
from phikit.models.common import (
    CausalLM,
    KVCache,
    RMSNorm,
    Slots,
    apply_rope,
    attention,
    cached_attention,
    rope_tables,
)

LINEAR_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ATTENTION_NAMES = ("qkv_proj", "o_proj")


class Phi3Attention(nn.Module):
    sdpa = staticmethod(attention)  # a backend may swap in its own

    def __init__(self, config: Phi3Config, layer_idx: int = 0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, (h + 2 * kv) * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, slots: Slots, last_only: bool = False) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, seq, hidden), or with ``last_only`` only the last position's."""
        b, t, _ = x.shape
        c, d = self.config, self.config.head_dim
        q_size, kv_size = c.num_attention_heads * d, c.num_key_value_heads * d
        queries = 1 if last_only else t
        qkv = self.qkv_proj(x)
        q = qkv[:, -queries:, :q_size].reshape(b, queries, -1, d).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = qkv[..., q_size : q_size + kv_size].reshape(b, t, -1, d).transpose(1, 2)  # (batch, kv_heads, ...)
        v = qkv[..., q_size + kv_size :].reshape(b, t, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos[:, :, -queries:], sin[:, :, -queries:]), apply_rope(k, cos, sin)
        y = cached_attention(self.sdpa, q, k, v, cache, self.layer_idx, slots)
        return self.o_proj(y.transpose(1, 2).reshape(b, queries, -1))


class Phi3MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3DecoderLayer(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: Phi3Config, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_dropout = nn.Dropout(float(config.extra.get("resid_pdrop", 0.0)))

    def forward(self, x, cos, sin, cache, slots, last_only: bool = False):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, last_only)
        x = x[:, -attn.shape[1] :] + (self.resid_dropout(attn) if self.training else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.resid_dropout(mlp) if self.training else mlp)


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(float(config.extra.get("embd_pdrop", 0.0)))
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False

    @property
    def output_norm(self) -> nn.Module:
        return self.norm

    def forward(
        self,
        input_ids,
        input_pos=None,
        cache=None,
        positions=None,
        padding_mask=None,
        last_only=False,
        rope_longest=None,
    ):
        """Final hidden states (batch, seq, hidden); ``last_only`` as ``PhiModel.forward``."""
        slots = Slots.build(input_ids, input_pos, cache, positions, padding_mask, self.config.sliding_window)
        x = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        if self.training:
            x = self.embed_dropout(x)
        cos, sin = rope_tables(self.config, slots.positions, x.dtype, rope_longest)
        last_only = last_only and cache is not None and not slots.per_row and x.shape[1] > 1
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cache, slots, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, slots, last_only and i == len(self.layers) - 1)
        return self.norm(x)


class Phi3ForCausalLM(CausalLM):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.kv_cache_dtype: torch.dtype | None = None
