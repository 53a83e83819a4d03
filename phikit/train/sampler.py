"""What GRPO samples its groups of completions with.

``policy``: the model being trained, as it is (its own dtype, its LoRA layers unmerged, PyTorch's ops).
``bf16`` / ``fp16``: a copy of the model in that dtype, loaded once from the checkpoint with the inference
backend (on the CPU: the 16-bit kernels and the one-call decoding step), into which the policy's current
weights are written before each step's sampling (an adapter merged: W + B A alpha / r, rounded once).
Why a copy: sampling is most of a GRPO step on a small batch, and a decoding step reads every weight; from
fp32 weights through LoRA's extra matrix products it ran at a third of the 16-bit copy's speed here
(benchmarks/RESULTS.md, issue 24). The copy's distribution differs from the policy's by its rounding, so
the loss corrects for it as TRL does for vLLM's samples (``grpo_loss``'s importance sampling), from the
log-probabilities the sampler drew each token with.
"""

from __future__ import annotations

import torch

from phikit.errors import PhikitError
from phikit.lora import LoRALinear


def quantized(model: torch.nn.Module) -> bool:
    """Whether any weight of ``model`` is stored quantized (loaded so, or a checkpoint saved quantized)."""
    return any(
        isinstance(getattr(m, "weight", None), torch.Tensor) and not m.weight.is_floating_point()
        for m in model.modules()
    )


def resolve(kind: str, training_dtype: str, quantized: bool) -> str:
    """``auto``: a bf16 copy where the policy trains in fp32 on full-precision weights (the copy then costs
    half the weights' memory again), else the policy itself."""
    if kind == "auto":
        return "bf16" if training_dtype == "fp32" and not quantized else "policy"
    if kind != "policy" and quantized:
        raise PhikitError(
            f"sampler {kind} copies the policy's merged weights, which a quantized base cannot give: use "
            "sampler: policy, or train on the full-precision base"
        )
    return kind


def merged_parameters(model: torch.nn.Module):
    """(name, value) of every weight of ``model`` that training changes, named as in the model without
    adapters: each LoRA layer's merged weight (fp32) and every other trained parameter as it is."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield f"{name}.weight", module.merged_weight()
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in name:
            yield name.replace(".base_layer.", "."), p


class Sampler:
    """The model completions are sampled from (``model``), kept equal to the policy by ``refresh``."""

    def __init__(self, policy: torch.nn.Module, kind: str, folder=None, device=None):
        self.policy, self.kind = policy, kind
        self.model = policy
        self.version: int | None = None  # the policy's optimizer steps when last written into the copy
        if kind != "policy":
            from phikit.api import load

            self.model = load(folder, dtype=kind, device=device).model.eval()
            self.model.requires_grad_(False)
            self.params = dict(self.model.named_parameters())

    @property
    def exact(self) -> bool:
        """Whether samples come from the policy itself (no correction needed)."""
        return self.kind == "policy"

    @torch.no_grad()
    def refresh(self, version: int) -> None:
        """Write the policy's current weights into the copy, unless they were written at this ``version``
        (the optimizer steps taken); nothing for ``policy``."""
        if self.kind == "policy" or version == self.version:
            return
        self.version = version
        for name, value in merged_parameters(self.policy):
            if name not in self.params:
                raise PhikitError(f"the sampler's copy has no parameter {name} of the policy")
            self.params[name].copy_(value)
