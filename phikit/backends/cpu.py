"""The CPU backend: phikit's own AVX2 kernels (``phikit.kernels``, plain C called through ctypes) swapped
into the plain model at load time.

Why kernels of our own: on AVX2 CPUs PyTorch's bf16 matmuls are several times slower than unpacking the
weights to fp32 inside the kernel, its int8/int4 weight-only ops want bf16 activations, and a decoding
step is ~300 small ops whose Python and dispatch overhead rivals the arithmetic on two cores. So:

- linear layers: ``DenseLinear`` (bf16/fp16/fp32 weights) and the int8/int4 entries of the kernel table
  run gemv kernels for a few rows and a GEMM for prefill, fp32 activations;
- ``CpuAttention``: rotary + KV-cache write + attention of one new token in one C call, and plain ops
  for single queries elsewhere (faster than SDPA's CPU kernels there);
- ``CpuDecodeStep``: the model's ``decode_step``, a whole one-token decoding step, every layer, in one C
  call: Phi-1/1.5/2's parallel LayerNorm blocks and the Phi-3 family's RMSNorm blocks (fused qkv, SwiGLU on
  the fused gate|up, grouped-query attention reading each KV head once per group, the sliding window);
- activations in fp32 (norms become fp32) and an fp16 KV cache for narrower weights, as llama.cpp.

Without a C compiler or an AVX2/FMA/F16C CPU (or with ``PHIKIT_NO_KERNELS=1``) every piece falls back to
PyTorch ops, int8/int4 to PyTorch's own CPU weight-only kernels.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from phikit import kernels
from phikit.backends import autotune
from phikit.models.common import CausalLM, RMSNorm, rope_tables
from phikit.models.phi import PhiAttention, PhiDecoderLayer, PhiForCausalLM, PhiMLP
from phikit.models.phi3 import Phi3DecoderLayer, Phi3ForCausalLM
from phikit.quantize import QuantizedLinear, int4_scales_and_zeros, quantize_weight, unpack_nibbles


def _inference(x: torch.Tensor) -> bool:
    """fp32 on CPU without autograd, with the kernels available: the kernels' domain."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and kernels.available()


def _kernel_sized(k: int, n: int) -> bool:
    """K % 64 == 0 and N % 16 == 0: what the kernels take (all Phi shapes)."""
    return k % 64 == 0 and n % 16 == 0


def _kernel_input(x: torch.Tensor, k: int, n: int) -> bool:
    """Our kernels handle this input: CPU, no autograd, kernel-sized."""
    return (
        x.device.type == "cpu"
        and _kernel_sized(k, n)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and kernels.available()
    )


def _kernel_weight(module: nn.Module, weight: torch.Tensor) -> bool:
    """A layer the C decoding step may run: kernel-sized, contiguous, no hooks on it."""
    return (
        weight.device.type == "cpu"
        and weight.is_contiguous()
        and _kernel_sized(module.in_features, module.out_features)
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


class _Fp32Bias:
    """fp32 copy of a bias for the C kernels, refreshed when the bias changes."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:
            return None
        key = (bias.data_ptr(), bias._version, bias.dtype)
        if key != self.key:
            self.key, self.value = key, bias.detach().float().contiguous()
        return self.value


def _fp32_bias(module: nn.Module) -> torch.Tensor | None:
    if "_bias32" not in module.__dict__:  # modules are swapped in place: no __init__ of ours ran
        module._bias32 = _Fp32Bias()
    return module._bias32.get(module.bias)


def _run(x, kind, weight, bias32, out_features, scale=None, minimum=None, group_size=0) -> torch.Tensor:
    """Decode-sized inputs through the gemv kernels, longer ones (prefill) through the path the autotune
    chose for this format and shape (``autotune``); output in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if x2.shape[0] <= kernels.MAX_ROWS:  # one row's result whatever the number of rows: batch-invariant
        if kind == "bf16" and autotune.choose_decode(kind, out_features, x2.shape[1]) == "bf16_dp":
            y = kernels.gemv_bf16_dp(x2, weight, bias32)
        else:
            y = kernels.gemv(x2, kind, weight, scale, minimum, bias32, group_size)
    else:  # prefill: the path measured fastest on this machine for this format and shape
        path = autotune.choose(kind, out_features, x2.shape[1], group_size, x2.shape[0])
        y = autotune.run(path, x2, kind, weight, scale, minimum, bias32, group_size)
    return y.to(x.dtype).reshape(*lead, out_features)


class DenseLinear(nn.Linear):
    """``nn.Linear`` (same parameters and names) that runs bf16/fp16/fp32 weights through the kernels when
    it can; PyTorch's bf16 GEMM on AVX2 CPUs is several times slower than unpacking to fp32."""

    KINDS = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.KINDS.get(self.weight.dtype)
        if kind is None or not _kernel_input(x, self.in_features, self.out_features) or self.weight.requires_grad:
            if x.dtype != self.weight.dtype:  # fp32 activations over narrower stored weights
                return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            return F.linear(x, self.weight, self.bias)
        return _run(x, kind, self.weight, _fp32_bias(self), self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseLinear:
        """A DenseLinear sharing ``linear``'s parameters (``install`` swaps the class in place instead)."""
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)
        return new


# ---- the kernel table's CPU entries (phikit.backends.KERNELS) ----


def int8_linear(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
    """phikit's int8 kernels (fp32 activations), else PyTorch's ``_weight_int8pack_mm`` (bf16)."""
    if _kernel_input(x, layer.in_features, layer.out_features):
        return _run(x, "int8", layer.weight, _fp32_bias(layer), layer.out_features, layer.weight_scale)
    return _torch_weight_only(layer, x)


def int4_linear(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
    """phikit's int4 kernels (activations quantized to int8 per group), else PyTorch's int4 CPU op."""
    if _kernel_input(x, layer.in_features, layer.out_features):
        args = (layer.weight_scale, layer.weight_min, layer.group_size)
        return _run(x, "int4", layer.weight, _fp32_bias(layer), layer.out_features, *args)
    return _torch_weight_only(layer, x)


def _torch_weight_only(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
    """PyTorch's own CPU weight-only kernels (bf16 activations), used when ours are unavailable."""
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    try:
        if layer.format == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, layer.weight, layer.weight_scale.to(torch.bfloat16))
        else:
            if layer.packed is None:
                q = unpack_nibbles(layer.weight).to(torch.int32)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                layer.packed = (packed, int4_scales_and_zeros(layer.weight_scale, layer.weight_min))
            packed, sz = layer.packed
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, layer.group_size, sz)
    except (RuntimeError, AttributeError):
        return None
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, layer.out_features)


def quantizer(weight: torch.Tensor, fmt: str, group_size: int = 64) -> dict[str, torch.Tensor]:
    """int8/int4 quantization in one C pass per row (same bits as the reference, ~20-50x faster)."""
    if kernels.can_quantize(weight, fmt, group_size):
        return kernels.quantize(weight, fmt, group_size)
    return quantize_weight(weight, fmt, group_size)


# ---- attention, MLP and the one-call decoding step ----


def single_query_attention(q, k, v, mask, causal: bool) -> torch.Tensor:
    """One query token (decoding) in three plain ops, several times faster on CPU than SDPA's kernels;
    anything else through SDPA."""
    if q.shape[2] == 1 and q.shape[1] == k.shape[1]:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (batch, heads, 1, keys)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def _fused_cache_ok(cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the fused C attention takes a cache of this dtype and heads of this size (it holds a head in
    at most 16 vectors of 8)."""
    return cache_dtype in kernels.CACHE_KINDS and head_dim % 8 == 0 and head_dim <= 128


def _fused_decode_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether one decoding step can use the fused C attention (rotary + cache write + attention)."""
    return _inference(q) and k_cache.is_contiguous() and _fused_cache_ok(k_cache.dtype, k_cache.shape[-1])


class CpuAttention(PhiAttention):
    """Phi attention whose one-token step (no padding) runs rotary, cache write and attention in one C call."""

    sdpa = staticmethod(single_query_attention)

    def forward(self, x, cos, sin, cache, slots, last_only: bool = False) -> torch.Tensor:
        b, t, _ = x.shape
        if cache is None or t != 1 or slots.padded or not _fused_decode_ok(x, cache.k[self.layer_idx]):
            return super().forward(x, cos, sin, cache, slots, last_only)
        d = self.config.head_dim
        q = self.q_proj(x).view(b, 1, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, 1, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, 1, -1, d).transpose(1, 2)
        if self.config.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q1, k1, v1 = q[:, :, 0].contiguous(), k[:, :, 0].contiguous(), v[:, :, 0].contiguous()
        i = self.layer_idx
        scales = () if cache.scales is None else (cache.scales[0][i], cache.scales[1][i])
        start = slots.row_slots if slots.per_row else slots.start
        tables = kernels.step_tables(cos, sin, start, b)
        y = kernels.attention_decode(q1, k1, v1, cache.k[i], cache.v[i], *tables, *scales)
        return self.dense(y.view(b, 1, -1))


class CpuMLP(PhiMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.approximate == "tanh" and _inference(h) and h.is_contiguous():
            return self.fc2(kernels.gelu_tanh_(h))  # in place, ~4x faster than torch's on CPU
        return self.fc2(F.gelu(h, approximate=self.approximate))


class CpuDecodeStep:
    """A model's ``decode_step`` on the CPU: every decoder layer in one C call (``phikit_decode_layers``) when
    the layers qualify, else the model's forward.

    The C call reads a ctypes array of pointers to every layer's norm and linear weights, built on first use
    and rebuilt when the model's ``version`` changes (``phikit.models.changed``: an adapter loaded, merged or
    wrapped), not by inspecting the modules each step. A layer qualifies when its linears have a
    ``kernel_args`` form (DenseLinear, int8/int4; not LoRA wrappers), its norms are fp32, Phi-2's MLP is
    gelu_new, and nothing hooks it."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.version: int | None = None
        self.array = None
        self.keep: list[torch.Tensor] = []  # the tensors the array points into

    def __getstate__(self) -> dict:  # pointers do not survive a copy or a pickle: rebuilt on first use
        return {"model": self.model, "version": None, "array": None, "keep": []}

    def __call__(self, input_ids, input_pos, cache, positions=None, padding_mask=None) -> torch.Tensor:
        model = self.model
        padding = None if padding_mask is None else left_padding(padding_mask, input_pos)
        if (
            (padding_mask is not None and padding is None)
            or model.training
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or cache.v.stride() != cache.k.stride()  # layers (batch, kv_heads, slots, dim) contiguous
        ):
            return model.forward(input_ids, input_pos, cache, positions, padding_mask)
        x = model.model.embed_tokens(input_ids).to(model.dtype)
        plan = self.plan() if _fused_decode_ok(x, cache.k[0]) else None
        if plan is None:
            return model.forward(input_ids, input_pos, cache, positions, padding_mask)
        per_row = input_pos.dim() == 2
        if positions is None:
            positions = input_pos if per_row else input_pos.expand(x.shape[0], 1)
        cos, sin = rope_tables(model.config, positions, x.dtype)
        start = input_pos[:, 0] if per_row else int(input_pos[0])
        hidden = kernels.decode_layers(plan, x, model.config, cos, sin, cache, start, padding)
        return model.lm_head(model.model.output_norm(hidden))

    def takes_padding(self, cache_dtype: torch.dtype) -> bool:
        """Whether left-padded rows decode through the one C call here (with a cache of ``cache_dtype``), so a
        batched generation need not widen its cache for the PyTorch attention."""
        return (
            kernels.available() and _fused_cache_ok(cache_dtype, self.model.config.head_dim) and self.plan() is not None
        )

    def plan(self) -> ctypes.Array | None:
        """The pointer array of the model as it is now (None: a layer does not qualify)."""
        if self.version != self.model.version:
            self.version = self.model.version
            config = self.model.config
            layers = self.model.model.layers
            args = None if config.hidden_size % 8 else [_layer_args(layer) for layer in layers]
            if args is None or any(a is None for a in args):
                self.array, self.keep = None, []
            else:
                self.array = kernels.plan_array(args)
                tensors = [t for _, norms, linears in args for t in (*norms, *(x for lin in linears for x in lin))]
                self.keep = [t for t in tensors if isinstance(t, torch.Tensor)]
        return self.array


def left_padding(padding_mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor | None:
    """Each row's count of leading padding slots where ``padding_mask`` (batch, slots) is left padding (False
    then True up to the slot written), else None (another shape of mask: the step runs in PyTorch)."""
    if padding_mask.dim() != 2 or input_pos.dim() != 1 or input_pos.numel() != 1:
        return None
    used = padding_mask[:, : int(input_pos[0]) + 1]
    leading = (~used).long().cumprod(dim=-1).sum(dim=-1)  # False slots before the first True
    if not bool((used.sum(dim=-1) == used.shape[1] - leading).all()):  # a False after a True
        return None
    return leading


def _layer_args(layer) -> tuple | None:
    """One decoder layer as the C step reads it (``kernels.plan_array``): its kind, its norms' fp32 weights
    (Phi: the LayerNorm's weight and bias; Phi-3: the two RMSNorms') and its linears' ``kernel_args``."""
    if type(layer) is PhiDecoderLayer:
        attn, mlp, norm = layer.self_attn, layer.mlp, layer.input_layernorm
        if attn.config.qk_layernorm or getattr(mlp, "approximate", None) != "tanh" or norm.bias is None:
            return None
        kind, norms = "phi", (norm.weight, norm.bias)
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.dense, mlp.fc1, mlp.fc2)
    elif type(layer) is Phi3DecoderLayer:
        attn, mlp = layer.self_attn, layer.mlp
        kind, norms = "phi3", (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    else:
        return None
    modules = (layer, attn, mlp, *(m for m in layer.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))), *linears)
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return None
    if any(t is None or t.dtype != torch.float32 for t in norms):
        return None
    args = [kernel_args(module) for module in linears]
    if any(a is None for a in args):
        return None
    return kind, norms, args


def kernel_args(module: nn.Module) -> tuple | None:
    """(kind, weight, scale, minimum, fp32 bias, group size) of a linear layer for the C decoding step, or
    None where it has no such form (LoRA wrappers, nf4, other layer types)."""
    if type(module) is DenseLinear:
        kind = DenseLinear.KINDS.get(module.weight.dtype)
        if kind is None or module.weight.requires_grad or not _kernel_weight(module, module.weight):
            return None
        if kind == "bf16" and autotune.choose_decode(kind, module.out_features, module.in_features) == "bf16_dp":
            kind = "bf16_dp"
        return kind, module.weight, None, None, _fp32_bias(module), 0
    if isinstance(module, QuantizedLinear) and module.format in ("int8", "int4"):
        if not _kernel_weight(module, module.weight):
            return None
        minimum = getattr(module, "weight_min", None)
        return module.format, module.weight, module.weight_scale, minimum, _fp32_bias(module), module.group_size
    return None


# ---- installing the backend ----


def install(model: CausalLM) -> CausalLM:
    """Swap the CPU modules into ``model`` in place (same parameters and names), install its decoding step
    (``CpuDecodeStep``) and set its CPU layout: activations fp32 whatever the stored weights
    (norms become fp32, a few KB, so embeddings, the KV cache and every element-wise op follow; AVX2 has no
    bf16 arithmetic, so bf16 activations would only add conversions); weights keep their stored dtype.

    The KV cache of a model whose linear weights are narrower than fp32 (bf16, fp16, int8, int4) is fp16,
    as llama.cpp's is, when the kernels run: long contexts read half the bytes per token (measured after
    a 1024-token prompt: benchmarks/RESULTS.md). fp32 models keep an fp32 cache (exact parity)."""
    narrow = False
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DenseLinear
        elif type(module) is PhiAttention:
            module.__class__ = CpuAttention
        elif type(module) is PhiMLP:
            module.__class__ = CpuMLP
        elif "sdpa" in type(module).__dict__:  # another family's attention: single queries in plain ops
            module.sdpa = single_query_attention
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.float()
        elif isinstance(module, (nn.Linear, QuantizedLinear)):
            narrow = narrow or module.weight.dtype != torch.float32
    if isinstance(model, (PhiForCausalLM, Phi3ForCausalLM)):
        model.decode_step = CpuDecodeStep(model)
    if narrow and kernels.available():
        model.kv_cache_dtype = torch.float16
    model.kv_cache_empty = kernels.empty_weight  # KV caches on 2 MB pages, as the weights
    return model
