"""Weight-only quantization (int8, int4, NF4) and the fast linear layers that run it.

Formats (row n of a weight is output feature n; K = in_features):
  int8  per output channel, symmetric:      w = q * scale[n]                  q in [-127, 127]
  int4  per group of G in a row, asymmetric: w = q * scale[n, g] + minimum[n, g]   q in [0, 15]
  nf4   QLoRA's NormalFloat4 per block of 64, absmax double-quantized to int8 per 256 blocks
4-bit codes are packed two per byte in blocks of 64 (byte i: code i low nibble, code i+32 high nibble), so
one 32-byte load gives 64 codes in order with one mask and one shift.

Which kernel runs is the backends' business (``phikit.backends.KERNELS``, one table keyed by format and
device, bound to each layer at load time): on CPU phikit's AVX2 kernels or PyTorch's own CPU ops, on CUDA
PyTorch's int4/int8 kernels or bitsandbytes. Without a kernel (or under autograd, where a kernel may
decline) the weight is dequantized and multiplied: the reference every kernel is tested against.
Embeddings stay unquantized (a decode step reads one row of them); ``lm_head`` is quantized unless the
spec says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phikit.errors import PhikitError
from phikit.models import LINEAR_NAMES

FORMATS = ("int8", "int4", "nf4")
NF4_BLOCK = 64
NF4_ABSMAX_BLOCK = 256
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip


GROUP_SIZES = (32, 64, 128, 256)  # int4's groups (values sharing one scale and minimum) the kernels take
GROUP_SIZE = 64  # int4's group when none is chosen
GROUP_SIZES_TEXT = ", ".join(map(str, GROUP_SIZES[:-1])) + f" or {GROUP_SIZES[-1]}"  # for errors


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize: format, int4 group size, and whether lm_head is included."""

    format: str
    group_size: int = GROUP_SIZE
    lm_head: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise PhikitError(f"unknown quantization {self.format!r}; use one of {', '.join(FORMATS)}")
        if self.format == "int4" and self.group_size not in GROUP_SIZES:
            raise PhikitError(f"int4 group size must be {GROUP_SIZES_TEXT}, got {self.group_size!r}")
        if self.format != "int4" and self.group_size != GROUP_SIZE:
            raise PhikitError(f"group size {self.group_size!r} is int4's; {self.format} has none (leave it out)")

    def describe(self) -> str:
        """'int4, groups of 32', 'int8', ... for messages."""
        return f"int4, groups of {self.group_size}" if self.format == "int4" else self.format

    def targets(self, name: str) -> bool:
        """Whether the linear layer called ``name`` (e.g. model.layers.3.mlp.fc1) is quantized: every decoder
        layer's linear layers (any family's ``LINEAR_NAMES``), and lm_head unless kept."""
        leaf = name.rsplit(".", 1)[-1]
        return leaf in LINEAR_NAMES or (leaf == "lm_head" and self.lm_head)

    def to_config(self) -> dict:
        return {"quant_method": "phikit", "format": self.format, "group_size": self.group_size, "lm_head": self.lm_head}

    @classmethod
    def from_config(cls, raw: dict, source: str = "config.json") -> QuantSpec:
        if raw.get("quant_method") != "phikit":
            raise PhikitError(
                f"{source}: quantized with {raw.get('quant_method')!r}; phikit loads its own "
                "quantized checkpoints (phikit quantize) or full-precision ones"
            )
        fmt = raw["format"]  # (an int8/nf4 folder written with another group size by an early version: it has none)
        group = int(raw.get("group_size", GROUP_SIZE)) if fmt == "int4" else GROUP_SIZE
        return cls(fmt, group, bool(raw.get("lm_head", True)))


# ---- reference quantizers and dequantizers (plain PyTorch) ----


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8, blocks of 64 as described in the module docstring."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // 64, 2, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    blocks = packed.reshape(n, half // 32, 1, 32)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Scale and minimum are stored in fp16 (as llama.cpp's 4-bit formats do); codes use the rounded values."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    low = groups.amin(dim=-1).half()
    scale = ((groups.amax(dim=-1) - low.float()) / 15).clamp(min=1e-7).half()
    q = torch.round((groups - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return {"weight": pack_nibbles(q.reshape(n, k)), "weight_scale": scale, "weight_min": low}


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """NF4 codes per block of 64 with absmax scales, the absmax values themselves quantized to int8
    (double quantization, as QLoRA does) per 256 blocks around their mean."""
    n, k = w.shape
    blocks = w.reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1).float().clamp(min=1e-12)
    # nearest code = the bucket between the midpoints of neighbouring codes (ties to the lower code, as an
    # argmin would), a few blocks at a time so that the temporaries stay small next to the weight itself
    midpoints = ((NF4_CODE[1:] + NF4_CODE[:-1]) / 2).to(w.device)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=w.device)
    step = max(1, (1 << 22) // NF4_BLOCK)
    for i in range(0, len(blocks), step):
        normalized = blocks[i : i + step].float() / absmax[i : i + step, None]
        codes[i : i + step] = torch.bucketize(normalized, midpoints, out_int32=True)
    mean = absmax.mean()
    centered = absmax - mean
    pad = (-centered.numel()) % NF4_ABSMAX_BLOCK
    chunks = F.pad(centered, (0, pad)).reshape(-1, NF4_ABSMAX_BLOCK)
    absmax_scale = (chunks.abs().amax(dim=1) / 127).clamp(min=1e-12)
    absmax_q = torch.round(chunks / absmax_scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {
        "weight": pack_nibbles(codes.reshape(n, k)),
        "weight_absmax": absmax_q.flatten()[: absmax.numel()],
        "weight_absmax_scale": absmax_scale,
        "weight_absmax_mean": mean.reshape(1),
    }


def int4_scales_and_zeros(scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Our int4 groups (w = q * scale + minimum) in the form of PyTorch's int4 kernels (CPU and CUDA
    tinygemm), w = (q - 8) * scale + zero: a (groups, N, 2) bf16 table with zero = minimum + 8 * scale."""
    zero = minimum.float() + 8 * scale.float()
    return torch.stack([scale.float(), zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def dequantize(fmt: str, t: dict[str, torch.Tensor], group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The fp32 weight (N, K) that quantized tensors ``t`` stand for."""
    if fmt == "int8":
        return t["weight"].float() * t["weight_scale"][:, None]
    q = unpack_nibbles(t["weight"])
    n, k = q.shape
    if fmt == "int4":
        groups = q.reshape(n, k // group_size, group_size).float()
        return (groups * t["weight_scale"].float()[..., None] + t["weight_min"].float()[..., None]).reshape(n, k)
    absmax_q = t["weight_absmax"].float()
    scales = t["weight_absmax_scale"].repeat_interleave(NF4_ABSMAX_BLOCK)[: absmax_q.numel()]
    absmax = absmax_q * scales + t["weight_absmax_mean"]
    values = NF4_CODE.to(q.device)[q.long()].reshape(-1, NF4_BLOCK) * absmax[:, None]
    return values.reshape(n, k)


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "nf4": quantize_nf4}


# ---- the layer ----


def quantized_shapes(fmt: str, out_features: int, in_features: int, group_size: int = GROUP_SIZE) -> dict[str, tuple]:
    """name -> (shape, dtype) of the buffers ``quantize_weight`` makes of an (out, in) weight, without making
    them: the checkpoint loader's empty shells and the C quantizer's outputs take them from here. (Running the
    quantizers on the meta device gives the same, but a process's first meta computation imports torch's
    compiler stack: 1.1 s of a pre-quantized checkpoint's load.) tests/test_quantize.py checks them against
    the quantizers'."""
    n, k = out_features, in_features
    if fmt == "int8":
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n,), torch.float32)}
    if fmt == "int4":
        groups = (n, k // group_size)
        return {
            "weight": ((n, k // 2), torch.uint8),
            "weight_scale": (groups, torch.float16),
            "weight_min": (groups, torch.float16),
        }
    blocks = n * k // NF4_BLOCK
    return {
        "weight": ((n, k // 2), torch.uint8),
        "weight_absmax": ((blocks,), torch.int8),
        "weight_absmax_scale": ((-(-blocks // NF4_ABSMAX_BLOCK),), torch.float32),
        "weight_absmax_mean": ((1,), torch.float32),
    }


def quantize_weight(weight: torch.Tensor, fmt: str, group_size: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """The quantized tensors of ``weight`` in ``fmt``, computed in fp32 by the reference quantizers."""
    return quantize_int4(weight, group_size) if fmt == "int4" else QUANTIZERS[fmt](weight)


def _check_quantizable(fmt: str, out_features: int, in_features: int, group_size: int) -> None:
    multiple = {"int4": group_size, "nf4": 64}.get(fmt, 32)  # int4's groups; nf4's blocks of 64, packed
    if in_features % multiple or (fmt == "nf4" and out_features * in_features % NF4_BLOCK):
        raise PhikitError(
            f"cannot quantize a {out_features}x{in_features} weight to {fmt}: in_features must "
            f"be a multiple of {multiple}"
        )


class QuantizedLinear(nn.Module):
    """A frozen linear layer with a quantized weight (buffers ``weight``, ``weight_scale`` ...) and a bias.

    ``kernel(layer, x)``: the backend's matmul for this format and device, bound at load time; it may keep
    its own layout of the weight in ``packed`` and may decline (return None, e.g. under autograd), and then
    the weight is dequantized and multiplied (the reference).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        group_size: int = GROUP_SIZE,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format, self.group_size = fmt, group_size
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.kernel = None
        self.packed = None
        self.home: torch.device | None = None  # set where a backend moved the buffers off the compute device

    @property
    def device(self) -> torch.device:
        """Where the layer computes: the buffers' device, unless a backend keeps its kernel's own layout there
        and moved the checkpoint's buffers to the host (``backends/cuda.py``)."""
        return self.home if self.home is not None else self.weight.device

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: str,
        group_size: int = GROUP_SIZE,
        device: torch.device | str = "cpu",
        quantizer=quantize_weight,
    ) -> QuantizedLinear:
        """Quantize ``weight`` on its own device with ``quantizer`` (the reference, or a backend's faster one
        giving the same bits) and store the result on ``device``."""
        out_features, in_features = weight.shape
        _check_quantizable(fmt, out_features, in_features, group_size)
        layer = cls(in_features, out_features, fmt, group_size, bias)
        for name, t in quantizer(weight, fmt, group_size).items():
            layer.register_buffer(name, t.to(device).contiguous())
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(device)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, fmt: str, group_size: int, bias: bool) -> QuantizedLinear:
        """A shell with correctly shaped buffers on the meta device, filled in by the checkpoint loader."""
        _check_quantizable(fmt, out_features, in_features, group_size)
        layer = cls(
            in_features, out_features, fmt, group_size, torch.empty(out_features, device="meta") if bias else None
        )
        for name, (shape, dtype) in quantized_shapes(fmt, out_features, in_features, group_size).items():
            layer.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))
        return layer

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.format, self.tensors(), self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = self.kernel(self, x)
            if y is not None:
                return y
        weight = self.dequantized().to(x.device, x.dtype)  # a GPU backend may keep the buffers on the host
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.format == "int4" else ""
        kernel = f", kernel={self.kernel.__name__}" if self.kernel is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{group}{kernel}"


# ---- applying quantization to a model ----


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: nn.Module, spec: QuantSpec, quantizer=quantize_weight) -> nn.Module:
    """Quantize the targeted linear layers of a loaded model in place, one layer at a time."""
    for name in linear_names(model):
        if spec.targets(name):
            linear = model.get_submodule(name)
            layer = QuantizedLinear.from_weight(
                linear.weight.data,
                None if linear.bias is None else linear.bias.data,
                spec.format,
                spec.group_size,
                linear.weight.device,
                quantizer,
            )
            _set_module(model, name, layer)
            del linear
    return model


def prepare_shells(model: nn.Module, spec: QuantSpec) -> None:
    """Replace targeted meta-device linears by QuantizedLinear shells (to load a quantized checkpoint)."""
    for name in linear_names(model):
        if spec.targets(name):
            linear = model.get_submodule(name)
            _set_module(
                model,
                name,
                QuantizedLinear.empty(
                    linear.in_features, linear.out_features, spec.format, spec.group_size, linear.bias is not None
                ),
            )


def quantizing_hook(spec: QuantSpec, device: torch.device, quantizer=quantize_weight):
    """An ``on_tensor`` hook for ``load_model``: quantize each targeted weight as it is read (with
    ``quantizer``), so a full-precision copy of the model never exists; biases wait for their weight."""
    pending_bias: dict[str, torch.Tensor] = {}
    pending_weight: dict[str, torch.Tensor] = {}

    def place(model: nn.Module, module_name: str) -> None:
        weight = pending_weight.pop(module_name)
        bias = pending_bias.pop(module_name, None)
        layer = QuantizedLinear.from_weight(
            weight.to(device),
            None if bias is None else bias.to(device),
            spec.format,
            spec.group_size,
            device,
            quantizer,
        )
        _set_module(model, module_name, layer)

    def on_tensor(key: str, value: torch.Tensor, model: nn.Module, dtype: torch.dtype) -> bool:
        module_name, _, leaf = key.rpartition(".")
        if not spec.targets(module_name) or leaf not in ("weight", "bias"):
            return False
        linear = model.get_submodule(module_name)
        if isinstance(linear, QuantizedLinear):
            return False
        (pending_weight if leaf == "weight" else pending_bias)[module_name] = (
            value if leaf == "weight" else value.to(dtype)
        )
        if module_name in pending_weight and (linear.bias is None or module_name in pending_bias):
            place(model, module_name)
        return True

    return on_tensor


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises more than ImportError
        return False
    return True


def bnb_nf4_hook(device: torch.device, compute_dtype: torch.dtype, spec: QuantSpec | None = None):
    """``on_tensor`` hook that puts each linear layer the spec targets (every decoder linear, and lm_head
    unless the spec keeps it, as on the CPU) into a bitsandbytes 4-bit NF4 layer with double quantization:
    the reference tutorials' QLoRA base, for CUDA/ROCm. Without a spec, QLoRA's own choice: lm_head kept."""
    import bitsandbytes as bnb

    spec = spec or QuantSpec("nf4", lm_head=False)
    pending: dict[str, dict[str, torch.Tensor]] = {}

    def on_tensor(key: str, value: torch.Tensor, model: nn.Module, dtype: torch.dtype) -> bool:
        module_name, _, leaf = key.rpartition(".")
        if not spec.targets(module_name) or leaf not in ("weight", "bias"):
            return False
        linear = model.get_submodule(module_name)
        got = pending.setdefault(module_name, {})
        got[leaf] = value
        if "weight" not in got or (linear.bias is not None and "bias" not in got):
            return True
        del pending[module_name]
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="cpu",
        )
        layer.weight = bnb.nn.Params4bit(
            got["weight"].to(compute_dtype), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        if "bias" in got:
            layer.bias = nn.Parameter(got["bias"].to(compute_dtype), requires_grad=False)
        _set_module(model, module_name, layer.to(device))  # moving to the GPU quantizes
        return True

    return on_tensor
