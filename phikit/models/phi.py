"""Phi-1, Phi-1.5 and Phi-2 (transformers' ``PhiForCausalLM``) in reading order: attention -> MLP -> block -> model.

Module and parameter names are transformers' (``model.layers.N.self_attn.q_proj``, ``model.final_layernorm``,
``lm_head``), so HF state dicts and PEFT adapters map 1:1. One LayerNorm feeds attention and MLP in parallel;
partial rotary (Phi-2: the first 32 of 80 dims per head); biases everywhere. Cache, rotary, masks and
attention are shared with the other families (``phikit.models.common``); device speed lives in backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from phikit.config import PhiConfig
from phikit.models.common import CausalLM, KVCache, Slots, apply_rope, attention, cached_attention, rope_tables

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "dense")  # the seed QLoRA recipe's LoRA targets


class PhiAttention(nn.Module):
    sdpa = staticmethod(attention)  # a backend may swap in its own (the CPU one for single queries)

    def __init__(self, config: PhiConfig, layer_idx: int = 0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, h * d)
        self.k_proj = nn.Linear(config.hidden_size, kv * d)
        self.v_proj = nn.Linear(config.hidden_size, kv * d)
        self.dense = nn.Linear(h * d, config.hidden_size)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, slots: Slots, last_only: bool = False) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, seq, hidden); with ``last_only`` every position is cached but only
        the last is queried: (batch, 1, hidden)."""
        b, t, _ = x.shape
        d = self.config.head_dim
        queries = 1 if last_only else t
        q = self.q_proj(x[:, -queries:]).view(b, queries, -1, d).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        if self.config.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos[:, :, -queries:], sin[:, :, -queries:]), apply_rope(k, cos, sin)
        y = cached_attention(self.sdpa, q, k, v, cache, self.layer_idx, slots)
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

    def __init__(self, config: PhiConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(float(config.extra.get("resid_pdrop", 0.0)))

    def forward(self, x, cos, sin, cache, slots, last_only: bool = False):
        """(batch, seq, hidden), or with ``last_only`` (the last layer of a prefill whose other positions
        are not read) only the last position, (batch, 1, hidden): llama.cpp skips these rows too."""
        h = self.input_layernorm(x)
        attn = self.self_attn(h, cos, sin, cache, slots, last_only)
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
        self.layers = nn.ModuleList(PhiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    @property
    def output_norm(self) -> nn.Module:
        return self.final_layernorm

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
        """Final hidden states (batch, seq, hidden); with ``last_only`` (a chunk into a cache) those of the
        last position, (batch, 1, hidden), every position's keys/values still cached."""
        slots = Slots.build(input_ids, input_pos, cache, positions, padding_mask)
        # embeddings may be stored narrower than the compute dtype (bf16 table, fp32 activations on CPU)
        x = self.embed_tokens(input_ids).to(self.final_layernorm.weight.dtype)
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
        return self.final_layernorm(x)


class PhiForCausalLM(CausalLM):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype (a backend may narrow it)
