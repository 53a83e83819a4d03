"""LoRA adapters on the native model, in PEFT's format on disk.

A targeted linear layer ``...self_attn.q_proj`` becomes a ``LoRALinear`` that keeps the original module as
``base_layer`` (frozen: plain, DenseLinear, QuantizedLinear or a bitsandbytes 4-bit layer) and adds
``lora_A`` (r x in) and ``lora_B`` (out x r): y = base(x) + B(A(dropout(x))) * alpha / r. Parameter names
follow PEFT (``...q_proj.lora_A.weight`` under the ``base_model.model.`` prefix in the saved file), so
``peft.PeftModel.from_pretrained(transformers_phi, folder)`` loads our adapters and we load PEFT's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from phikit.checkpoint import atomic_write
from phikit.errors import PhikitError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "dense")
KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head")
ALIASES = {"Wqkv": ("q_proj", "k_proj", "v_proj"), "out_proj": ("dense",)}  # legacy remote-code names
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self):
        targets: list[str] = []
        for name in self.target_modules:
            for t in ALIASES.get(name, (name,)):
                if t not in KNOWN_TARGETS:
                    raise PhikitError(
                        f"unknown LoRA target module {name!r}; choose from {', '.join(KNOWN_TARGETS)} "
                        f"(or the legacy {', '.join(ALIASES)})"
                    )
                if t not in targets:
                    targets.append(t)
        self.target_modules = targets
        if self.r < 1:
            raise PhikitError(f"LoRA rank r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise PhikitError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_peft(self, base_model: str | None = None) -> dict:
        """The adapter_config.json PEFT writes for this adapter (fields PEFT reads)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
            "base_model_name_or_path": base_model,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, raw: dict, source: str = "adapter_config.json") -> LoRAConfig:
        if raw.get("peft_type", "LORA") != "LORA":
            raise PhikitError(f"{source}: peft_type {raw.get('peft_type')!r} is not LoRA")
        unsupported = [k for k in ("use_dora", "use_rslora", "lora_bias") if raw.get(k)]
        unsupported += [k for k in ("rank_pattern", "alpha_pattern", "layers_to_transform") if raw.get(k)]
        unsupported += [k for k in ("modules_to_save", "exclude_modules") if raw.get(k)]
        if raw.get("bias", "none") != "none":
            unsupported.append(f"bias={raw['bias']}")
        if unsupported:
            raise PhikitError(f"{source}: unsupported LoRA options {', '.join(unsupported)}")
        targets = raw.get("target_modules") or list(DEFAULT_TARGETS)
        if isinstance(targets, str):  # PEFT allows a regex; we take the module names it lists
            targets = [t for t in (*KNOWN_TARGETS, *ALIASES) if t in targets]
        return cls(
            int(raw["r"]), float(raw.get("lora_alpha", raw["r"])), float(raw.get("lora_dropout", 0.0)), list(targets)
        )


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (PEFT's initialisation: A Kaiming-uniform,
    B zero, so a fresh adapter leaves the model unchanged)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = base_layer.in_features, base_layer.out_features
        device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(dtype)))) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling: what merging adds to the base weight (out, in), fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every targeted linear layer in a LoRALinear; freeze everything but the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = _targets(model, config)
    if not targets:
        raise PhikitError(f"no module matches LoRA targets {config.target_modules}")
    for name in targets:
        lora = LoRALinear(model.get_submodule(name), config.r, config.alpha, config.dropout)
        _set_module(model, name, lora.train(model.training))  # a model in eval mode gets no dropout
    model.lora_config = config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names."""
    return {PEFT_PREFIX + name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format), each atomically."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_config", None)
    if config is None:
        raise PhikitError("the model has no LoRA adapter to save")
    folder = Path(folder)
    state = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(
        folder / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config.to_peft(base_model), indent=2))
    )
    return folder


def read_adapter(folder: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter folder (ours or PEFT's): its config and weights keyed by our module names."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise PhikitError(
            f"{folder}: no adapter_config.json; an adapter folder holds adapter_config.json and "
            "adapter_model.safetensors"
        )
    try:
        config = LoRAConfig.from_peft(json.loads(config_path.read_text()), str(config_path))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PhikitError(f"{config_path}: not a valid LoRA config ({e})") from None
    weights_path = folder / "adapter_model.safetensors"
    if weights_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(weights_path)
        except (SafetensorError, OSError) as e:
            raise PhikitError(f"{weights_path}: cannot read ({e}); the file is truncated or corrupt") from None
    elif (folder / "adapter_model.bin").is_file():
        raw = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise PhikitError(f"{folder}: no adapter_model.safetensors")
    weights: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        if ".mixer.Wqkv." in name or ".mixer.out_proj." in name:
            weights.update(_split_legacy(name, value))
        else:
            weights[name] = value
    return config, weights


def _split_legacy(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A LoRA on the legacy fused Wqkv is the same A shared by q/k/v with B split in three."""
    layer = name.split(".mixer.")[0].replace("transformer.h.", "model.layers.")
    part = name.rsplit(".", 2)[-2]  # lora_A | lora_B
    if ".out_proj." in name:
        return {f"{layer}.self_attn.dense.{part}.weight": value}
    if part == "lora_A":
        return {f"{layer}.self_attn.{p}_proj.lora_A.weight": value for p in "qkv"}
    return {f"{layer}.self_attn.{p}_proj.lora_B.weight": b for p, b in zip("qkv", value.chunk(3, dim=0))}


def _targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The linear layers an adapter of ``config`` wraps (not ones wrapped already)."""
    return [
        name
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in config.target_modules
        and hasattr(m, "in_features")
        and not isinstance(m, LoRALinear)
        and ".base_layer" not in name
    ]


def _check_fits(model, config: LoRAConfig, weights: dict, base: dict, folder) -> None:
    """Every adapter tensor has its target layer, of the right shape and rank ``config.r``, and every target
    has its tensors: checked before any adapter memory is allocated."""
    modules = dict(model.named_modules())
    targets = _targets(model, config)
    expected = {f"{t}.{part}.weight" for t in targets for part in ("lora_A", "lora_B")}
    missing, unknown = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unknown:
        raise PhikitError(
            f"{folder}: adapter does not fit this model ({len(missing)} missing, {len(unknown)} "
            f"unexpected tensors, e.g. {(missing or unknown)[0]})"
        )
    for name, value in weights.items():
        module_name, part, _ = name.rsplit(".", 2)
        module = modules[module_name]
        want = (config.r, module.in_features) if part == "lora_A" else (module.out_features, config.r)
        if tuple(value.shape) != want:
            raise PhikitError(
                f"{folder}: {name} has shape {tuple(value.shape)}, this model and the adapter's r={config.r} "
                f"need {want}; the adapter was made for another model or its config does not match"
            )
    for name, value in base.items():
        module_name, leaf = name.rsplit(".base_layer.", 1)
        current = getattr(modules.get(module_name), leaf, None)
        if module_name not in targets or not isinstance(current, torch.Tensor) or not current.is_floating_point():
            raise PhikitError(f"{folder}: {name} replaces a layer that is not a full-precision target here")
        if current.shape != value.shape:
            raise PhikitError(f"{folder}: {name} has shape {tuple(value.shape)}, the model's is {tuple(current.shape)}")


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Inject the adapter's layers into ``model`` and load its weights (frozen base, trainable adapter).
    PEFT saves the whole base layer with an ``lm_head`` target (``...lm_head.base_layer.weight``): those
    tensors replace the layer's weights, as PEFT loads them."""
    config, weights = read_adapter(folder)
    base = {k: weights.pop(k) for k in list(weights) if ".base_layer." in k}
    _check_fits(model, config, weights, base, folder)
    inject_lora(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
        for name, value in base.items():
            module_name, leaf = name.rsplit(".base_layer.", 1)
            target = getattr(model.get_submodule(module_name).base_layer, leaf)
            target.copy_(value.to(target.dtype))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B A alpha/r) and unwrap the layers; the base must be
    full precision (merge a quantized model's adapter into the original checkpoint instead)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        base = module.base_layer
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise PhikitError(f"cannot merge into the quantized layer {name}; load the base model unquantized")
        with torch.no_grad():
            base.weight.data = (weight.float() + module.delta_weight().to(weight.device)).to(weight.dtype)
        _set_module(model, name, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
