"""Several LoRA adapters on one base model, each row of a batch with its own (``phikit serve --adapter
NAME=DIR``), unmerged.

Every targeted linear layer gets the adapters' A matrices stacked (sum of ranks, in) and their B matrices
side by side (out, sum of ranks); a row's output adds ``((x @ A.T) * mask[row]) @ B.T``, where ``mask[row]``
holds the row's adapter's scaling on that adapter's rank columns and zero elsewhere. Two small matmuls
per layer whatever the mix of adapters, and shapes that never depend on it, so the step stays one CUDA
graph. The engine sets the rows' adapters before each forward (``AdapterSet.select``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from phikit.errors import PhikitError
from phikit.lora import _check_fits, _is_lora, read_adapter
from phikit.models import changed


class AdapterSet:
    """The named adapters and the per-row masks their layers read."""

    def __init__(self, names: list[str], ranks: list[int], scalings: list[float], max_rows: int, device):
        self.names = names
        self.offsets = [sum(ranks[:i]) for i in range(len(ranks))]
        self.ranks, self.scalings = ranks, scalings
        self.mask = torch.zeros(max_rows, sum(ranks), device=device)  # rewritten in place: graph-safe
        self.rows = 0

    def index(self, name: str) -> int:
        return self.names.index(name)

    def select(self, adapters: list[int]) -> None:
        """Row i of the next forward decodes with adapter ``adapters[i]`` (-1: the base model alone)."""
        mask = torch.zeros_like(self.mask[: len(adapters)], device="cpu")
        for row, a in enumerate(adapters):
            if a >= 0:
                mask[row, self.offsets[a] : self.offsets[a] + self.ranks[a]] = self.scalings[a]
        self.mask[: len(adapters)].copy_(mask)
        self.rows = len(adapters)


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus every adapter's low-rank update, chosen per row by ``AdapterSet``."""

    def __init__(self, base_layer: nn.Module, adapters: AdapterSet, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base_layer, self.adapters = base_layer, adapters
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer("lora_A", a)  # (sum of ranks, in), fp32
        self.register_buffer("lora_B", b)  # (out, sum of ranks), fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rows = x.shape[0]
        mask = self.adapters.mask[:rows].view(rows, *([1] * (x.dim() - 2)), -1)
        update = ((x.to(self.lora_A.dtype) @ self.lora_A.t()) * mask) @ self.lora_B.t()
        return y + update.to(y.dtype)


def load_adapters(model: nn.Module, named: dict[str, str | Path], max_rows: int) -> AdapterSet:
    """Read every adapter (PEFT's format or ours), check it fits the model, and wrap each layer any of
    them targets in a MultiLoRALinear. An adapter that does not target a layer contributes zero columns.
    Adapters that replace whole layers (``modules_to_save``, PEFT's saved base layer) are refused: one model
    serves every row; each can be served alone (``--adapter DIR``)."""
    configs, weights = {}, {}
    for name, folder in named.items():
        config, tensors = read_adapter(folder, model.config)
        _check_fits(model, config, tensors, folder)  # first, so a tensor that fits no layer is named as such
        whole = [k for k in tensors if not _is_lora(k)]
        if whole:
            what = "a saved base layer" if ".base_layer." in whole[0] else "modules_to_save"
            raise PhikitError(
                f"{folder}: replaces whole weights ({what}: {whole[0]}), which the rows of one batch cannot "
                "differ in; serve it alone with --adapter DIR"
            )
        configs[name], weights[name] = config, tensors
    names = list(named)
    ranks = [configs[n].r for n in names]
    device = next(model.parameters()).device
    adapters = AdapterSet(names, ranks, [configs[n].scaling for n in names], max_rows, device)
    targets = sorted({k.rsplit(".", 2)[0] for tensors in weights.values() for k in tensors})
    for module_name in targets:
        base = model.get_submodule(module_name)
        a = torch.zeros(sum(ranks), base.in_features)
        b = torch.zeros(base.out_features, sum(ranks))
        for i, name in enumerate(names):
            lo, hi = adapters.offsets[i], adapters.offsets[i] + ranks[i]
            if f"{module_name}.lora_A.weight" in weights[name]:
                a[lo:hi] = weights[name][f"{module_name}.lora_A.weight"].float()
                b[:, lo:hi] = weights[name][f"{module_name}.lora_B.weight"].float()
        parent, _, leaf = module_name.rpartition(".")
        wrapped = MultiLoRALinear(base, adapters, a.to(device), b.to(device))
        setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    changed(model)  # a decoding step built from the plain layers (one C call, a CUDA graph) is rebuilt
    return adapters
