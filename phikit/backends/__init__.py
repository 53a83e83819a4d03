"""Device backends, chosen once at load time: each swaps its own modules into the plain model (same
parameters and names) and binds the quantized layers to its kernels through one table.

``phikit/models`` and ``phikit/quantize.py`` import no backend: the arrows run backend -> model. A backend
installs the model's ``decode_step`` (the one-token step of generation and serving), which rebuilds what it
derived from the modules when the model's ``version`` changes (``phikit.models.changed``).
"""

from __future__ import annotations

import torch
from torch import nn

from phikit.backends import cpu, cuda
from phikit.models import CausalLM
from phikit.quantize import QuantizedLinear, quantize_weight

# (format, device type) -> the matmul of a QuantizedLinear; ROCm GPUs are "cuda" to torch. A format and
# device missing here runs the dequantized reference (QuantizedLinear.forward).
KERNELS = {
    ("int8", "cpu"): cpu.int8_linear,
    ("int4", "cpu"): cpu.int4_linear,
    ("int8", "cuda"): cuda.int8_linear,
    ("int4", "cuda"): cuda.int4_linear,
    ("nf4", "cuda"): cuda.nf4_linear,
}

INSTALL = {"cpu": cpu.install, "cuda": cuda.install}
QUANTIZERS = {"cpu": cpu.quantizer}  # faster quantizers giving the reference's bits


def quantizer(device: torch.device):
    """The quantizer for weights on ``device``: the backend's own, else the reference."""
    return QUANTIZERS.get(torch.device(device).type, quantize_weight)


def bind_kernel(layer: QuantizedLinear) -> QuantizedLinear:
    """Give a quantized layer the kernel for its format and device (None: the dequantized reference)."""
    layer.kernel = KERNELS.get((layer.format, layer.device.type))
    return layer


def install(model: CausalLM) -> CausalLM:
    """Bind every quantized layer to its kernel, then let the model's device's backend swap in its modules."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            bind_kernel(module)
    device = model.device.type
    return INSTALL[device](model) if device in INSTALL else model


def kernel_names(model: nn.Module) -> list[str]:
    """What runs the model's linear layers, one entry per distinct kernel (for ``phikit bench``)."""
    names = []
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            packed = getattr(module, "packed", None)
            if isinstance(packed, cuda.Packed):
                name = packed.name
            elif module.kernel is not None:
                name = f"{module.format}: {module.kernel.__module__.rsplit('.', 1)[-1]}.{module.kernel.__name__}"
            else:
                name = f"{module.format}: dequantize + matmul (reference)"
        elif type(module).__name__ == "Linear4bit":
            name = "bitsandbytes Linear4bit nf4"
        elif isinstance(module, cpu.DenseLinear):
            name = f"{str(module.weight.dtype).removeprefix('torch.')}: phikit CPU kernels (PyTorch under autograd)"
        elif type(module) is nn.Linear:
            name = f"{str(module.weight.dtype).removeprefix('torch.')}: torch.nn.functional.linear"
        else:
            continue
        if name not in names:
            names.append(name)
    return names
