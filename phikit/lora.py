"""LoRA adapters on the native model, in PEFT's format on disk.

A targeted linear layer ``...self_attn.q_proj`` becomes a ``LoRALinear`` that keeps the original module as
``base_layer`` (frozen: plain, DenseLinear, QuantizedLinear or a bitsandbytes 4-bit layer) and adds
``lora_A`` (r x in) and ``lora_B`` (out x r): y = base(x) + B(A(dropout(x))) * alpha / r (alpha / sqrt(r) with
rsLoRA). Parameter names follow PEFT (``...q_proj.lora_A.weight`` under the ``base_model.model.`` prefix in the
saved file), so ``peft.PeftModel.from_pretrained(transformers_phi, folder)`` loads our adapters and we load
PEFT's: targets as names, full module paths ("all-linear" as saved) or a regex, rsLoRA, ``modules_to_save``
(whole replacement layers, e.g. TRL's ``lm_head``), and adapters trained on the legacy remote-code layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from phikit.checkpoint import atomic_write, convert_legacy
from phikit.config import PhiConfig
from phikit.errors import PhikitError
from phikit.models import FAMILIES, LINEAR_NAMES, changed

DEFAULT_TARGETS = FAMILIES["phi"].attention_names  # an adapter_config.json without target_modules (Phi-2's)
KNOWN_TARGETS = (*LINEAR_NAMES, "lm_head")
ALIASES = {"Wqkv": ("q_proj", "k_proj", "v_proj"), "out_proj": ("dense",)}  # legacy remote-code names
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer
PEFT_PREFIX = "base_model.model."
LEGACY_PREFIXES = ("transformer.", "layers.", "lm_head.linear.", "lm_head.ln.")  # remote-code tensor names
LORA_PARTS = ("lora_A", "lora_B")


@dataclass
class LoRAConfig:
    """An adapter's shape. ``target_modules``: module names (``q_proj``; a legacy alias ``Wqkv``), full or
    dotted-tail paths (``model.layers.0.self_attn.q_proj``, as PEFT saves "all-linear"), or one string, a
    regex matched against the whole module name or "all-linear", all as PEFT matches them.
    ``modules_to_save``: modules the adapter replaces whole (PEFT's option, e.g. ``lm_head``)."""

    r: int = 16
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR
            else:
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise PhikitError(
                        f"LoRA target_modules {self.target_modules!r} is not a regular expression ({e})"
                    ) from None
        else:
            targets: list[str] = []
            for name in self.target_modules:
                leaf = name.rsplit(".", 1)[-1]
                if leaf not in KNOWN_TARGETS and leaf not in ALIASES:
                    raise PhikitError(
                        f"unknown LoRA target module {name!r}; choose from {', '.join(KNOWN_TARGETS)} "
                        f"(or the legacy {', '.join(ALIASES)})"
                    )
                for t in (name,) if "." in name else ALIASES.get(name, (name,)):  # a path stays as written
                    if t not in targets:
                        targets.append(t)
            self.target_modules = targets
        self.modules_to_save = list(self.modules_to_save or [])
        if self.r < 1:
            raise PhikitError(f"LoRA rank r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise PhikitError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """alpha / r, or rsLoRA's alpha / sqrt(r) (the update's size then does not shrink as r grows)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft(self, base_model: str | None = None) -> dict:
        """The adapter_config.json PEFT writes for this adapter (fields PEFT reads)."""
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": self.modules_to_save or None,
            "use_rslora": self.use_rslora,
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
        unsupported = [k for k in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern") if raw.get(k)]
        unsupported += [k for k in ("layers_to_transform", "exclude_modules", "layer_replication") if raw.get(k)]
        unsupported += [k for k in ("target_parameters", "trainable_token_indices") if raw.get(k)]
        if raw.get("bias", "none") != "none":
            unsupported.append(f"bias={raw['bias']}")
        if unsupported:
            raise PhikitError(f"{source}: unsupported LoRA options {', '.join(unsupported)}")
        try:
            return cls(
                int(raw["r"]),
                float(raw.get("lora_alpha", raw["r"])),
                float(raw.get("lora_dropout", 0.0)),
                raw.get("target_modules") or list(DEFAULT_TARGETS),
                bool(raw.get("use_rslora", False)),
                [saved] if isinstance(saved := raw.get("modules_to_save") or [], str) else list(saved),
            )
        except PhikitError as e:
            raise PhikitError(f"{source}: {e}") from None


def _matches(spec: list[str] | str | None, name: str) -> bool:
    """PEFT's rule for ``target_modules``: a string is "all-linear" (every linear layer but the output layer)
    or a regex the whole module name must match (``re.fullmatch``); a list entry must be the name or its
    dotted tail. No targets listed: any module."""
    if spec is None:
        return True
    if isinstance(spec, str):
        if spec.lower() == ALL_LINEAR:
            return name != "lm_head" and not name.startswith("lm_head.")
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{t}") for t in spec)


def _saved(modules_to_save: list[str], name: str) -> bool:
    """Whether module ``name`` is (or is inside) one of ``modules_to_save``, by PEFT's rule, which also keeps
    LoRA off those modules."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (PEFT's initialisation: A Kaiming-uniform,
    B zero, so a fresh adapter leaves the model unchanged)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = base_layer.in_features, base_layer.out_features
        device = getattr(base_layer, "device", None)  # a quantized layer's buffers may live on the host
        if not isinstance(device, torch.device):
            device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.in_features, self.out_features = in_features, out_features

    disabled = False  # set by adapters_disabled: the layer is then its base alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(dtype)))) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling: what merging adds to the base weight (out, in), fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, fp32, on the base weight's device (full-precision bases)."""
        weight = self.base_layer.weight
        return weight.float() + self.delta_weight().to(weight.device)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every LoRA layer of ``model`` computes its base layer alone (PEFT's
    ``disable_adapter``): the base model without a second copy of its weights (DPO's reference)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every targeted linear layer in a LoRALinear; freeze everything but the adapters (and the
    full-precision weights of ``modules_to_save``, which the adapter trains whole, as PEFT does)."""
    for name, p in model.named_parameters():
        p.requires_grad_(_saved(config.modules_to_save, name.rsplit(".", 1)[0]) and p.is_floating_point())
    targets = _targets(model, config)
    if not targets:
        raise PhikitError(f"no module matches LoRA targets {config.target_modules}")
    for name in targets:
        lora = LoRALinear(model.get_submodule(name), config.r, config.alpha, config.dropout, config.use_rslora)
        _set_module(model, name, lora.train(model.training))  # a model in eval mode gets no dropout
    model.lora_config = config
    changed(model)
    return model


def lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names (with the whole ``modules_to_save`` layers, as PEFT saves),
    from the model's parameters or from ``state``, its full state dict (gathered from sharded processes)."""
    config = getattr(model, "lora_config", None)
    saved = config.modules_to_save if config is not None else []
    named = state.items() if state is not None else model.named_parameters()
    return {
        PEFT_PREFIX + name: p.detach() for name, p in named if ".lora_" in name or _saved(saved, name.rsplit(".", 1)[0])
    }


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format), each atomically; ``state``: the
    model's full state dict where its parameters are shards (FSDP)."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_config", None)
    if config is None:
        raise PhikitError("the model has no LoRA adapter to save")
    folder = Path(folder)
    state = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model, state).items()}
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(
        folder / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config.to_peft(base_model), indent=2))
    )
    return folder


def read_adapter(folder: str | os.PathLike, model_config=None) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter folder (ours or PEFT's): its config and tensors keyed by the native model's names, the LoRA
    ones (``...q_proj.lora_A.weight``) and any whole ones (PEFT's saved base layer ``lm_head.base_layer.weight``,
    ``modules_to_save``'s ``lm_head.weight``). An adapter trained on the legacy remote-code layout is read as
    the equal native one (``_from_legacy``), with ``model_config``'s head sizes (Phi-2's by default)."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise PhikitError(
            f"{folder}: no adapter_config.json; an adapter folder holds adapter_config.json and "
            "adapter_model.safetensors"
        )
    try:
        raw_config = json.loads(config_path.read_text())
        config = LoRAConfig.from_peft(raw_config, str(config_path))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
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
        weights_path = folder / "adapter_model.bin"
        from phikit.checkpoint import load_pickled

        raw = load_pickled(weights_path, "save the adapter again")
    else:
        raise PhikitError(f"{folder}: no adapter_model.safetensors")
    # PEFT's in-memory names carry the adapter's name (.default.); older PEFT kept .modules_to_save. on disk
    weights = {
        key.removeprefix(PEFT_PREFIX).replace(".default.", ".").replace(".modules_to_save.", "."): value
        for key, value in raw.items()
    }
    if any(name.startswith(LEGACY_PREFIXES) for name in weights):
        if model_config is not None and model_config.family != "phi":
            raise PhikitError(
                f"{folder}: an adapter of the legacy Phi-2 layout does not fit a {model_config.family} model"
            )
        spec = raw_config.get("target_modules")
        return _from_legacy(config, spec, weights, model_config or PhiConfig(), weights_path)
    return config, weights


def _from_legacy(
    config: LoRAConfig, spec, weights: dict[str, torch.Tensor], model_config: PhiConfig, source: Path
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The native adapter equal to one on the legacy layout (``transformer.h.N.mixer.Wqkv``, ``mixer.out_proj``,
    ``mlp.fc1``, ``mlp.fc2``, ``lm_head.linear``), renamed by the loader's own ``convert_legacy``. The fused
    Wqkv stacks q, k and v by rows, so its B is cut into q, k and v rows and all three keep its A: B @ A cut
    by rows is B_q @ A, B_k @ A, B_v @ A, exactly the fused update. Targets and modules_to_save are matched
    on the legacy names, as PEFT matched them, and listed by their native names."""
    native: dict[str, torch.Tensor] = {}
    targets: dict[str, None] = {}
    saved: dict[str, None] = {}
    for name, value in weights.items():
        module, part, kind = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
        if part in (*LORA_PARTS, "base_layer"):
            # q, k and v share A; cutting B (or the base weight) by rows names the native layers
            like = weights.get(f"{module}.lora_B.{kind}") if part == "lora_A" else value
            renamed = _convert_legacy(f"{module}.{kind}", like, model_config, source) if like is not None else []
            pieces = [(f"{n.rsplit('.', 1)[0]}.{part}.{kind}", value if part == "lora_A" else t) for n, t in renamed]
            if part != "base_layer" and _matches(spec, module):
                targets.update(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in renamed))
        else:
            pieces = _convert_legacy(name, value, model_config, source)
            if _saved(config.modules_to_save, name.rsplit(".", 1)[0]):
                saved.update(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in pieces))
        native.update(pieces or [(name, value)])  # not a layer of the model: refused by _check_fits
    # a modules_to_save entry with no weights stays listed, and _check_fits says so
    saved_modules = list(saved) or config.modules_to_save
    return dataclasses.replace(config, target_modules=list(targets), modules_to_save=saved_modules), native


def _convert_legacy(name: str, tensor: torch.Tensor, model_config: PhiConfig, source: Path) -> list:
    try:
        return convert_legacy(name, tensor, model_config)
    except RuntimeError:  # torch.split: not q + k + v rows of this model
        raise PhikitError(
            f"{source}: {name.rsplit('.', 1)[0]}'s tensor of shape {tuple(tensor.shape)} does not split into "
            "this model's q, k and v rows; the adapter was made for another model"
        ) from None


def _targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The linear layers an adapter of ``config`` wraps (not ones wrapped already), chosen as PEFT chooses."""
    return [
        name
        for name, m in model.named_modules()
        if hasattr(m, "in_features")
        and not isinstance(m, LoRALinear)
        and ".base_layer" not in name
        and ".lora_" not in name
        and not _saved(config.modules_to_save, name)
        and _matches(config.target_modules, name)
    ]


def _is_lora(name: str) -> bool:
    return name.count(".") >= 2 and name.rsplit(".", 2)[1] in LORA_PARTS


def _check_fits(model, config: LoRAConfig, weights: dict, folder) -> None:
    """Every adapter tensor has its target layer, of the right shape and rank ``config.r``, every target has
    its tensors, and every whole tensor (a saved base layer, ``modules_to_save``) replaces one of the model's
    of its shape: checked before any adapter memory is allocated."""
    modules = dict(model.named_modules())
    targets = _targets(model, config)
    lora = {k for k in weights if _is_lora(k)}
    whole = {k: v for k, v in weights.items() if k not in lora}
    saved = {k for k in whole if ".base_layer." not in k and _saved(config.modules_to_save, k.rsplit(".", 1)[0])}
    expected = {f"{t}.{part}.weight" for t in targets for part in LORA_PARTS}
    missing = sorted(expected - lora)
    unknown = sorted((lora - expected) | {k for k in whole if ".base_layer." not in k and k not in saved})
    if missing or unknown:
        raise PhikitError(
            f"{folder}: adapter does not fit this model ({len(missing)} missing, {len(unknown)} "
            f"unexpected tensors, e.g. {(missing or unknown)[0]})"
        )
    for name, value in weights.items():
        if name not in lora:
            continue
        module_name, part, _ = name.rsplit(".", 2)
        module = modules[module_name]
        want = (config.r, module.in_features) if part == "lora_A" else (module.out_features, config.r)
        if tuple(value.shape) != want:
            raise PhikitError(
                f"{folder}: {name} has shape {tuple(value.shape)}, this model and the adapter's r={config.r} "
                f"need {want}; the adapter was made for another model or its config does not match"
            )
    for name, value in whole.items():
        if name in saved:
            module_name, leaf = name.rsplit(".", 1)
            module = modules.get(module_name)
            current = getattr(module, leaf, None)
            if not isinstance(current, torch.Tensor) or not value.is_floating_point():
                raise PhikitError(f"{folder}: {name} (modules_to_save) is not a floating weight of this model")
            want = _dense_shape(module, leaf)
        else:
            module_name, leaf = name.rsplit(".base_layer.", 1)
            current = getattr(modules.get(module_name), leaf, None)
            if module_name not in targets or not isinstance(current, torch.Tensor) or not current.is_floating_point():
                raise PhikitError(f"{folder}: {name} replaces a layer that is not a full-precision target here")
            want = tuple(current.shape)
        if tuple(value.shape) != want:
            raise PhikitError(f"{folder}: {name} has shape {tuple(value.shape)}, the model's is {want}")
    for m in config.modules_to_save:
        if not any(_saved([m], k.rsplit(".", 1)[0]) for k in saved):
            raise PhikitError(
                f"{folder}: adapter_config.json lists {m!r} in modules_to_save but the adapter holds no weights for it"
            )


def _dense_shape(module: nn.Module, leaf: str) -> tuple[int, ...]:
    """The full-precision shape of ``module.leaf`` (a quantized layer stores its weight packed)."""
    if leaf == "weight" and hasattr(module, "in_features"):
        return (module.out_features, module.in_features)
    return tuple(getattr(module, leaf).shape)


def _replace_whole(model: nn.Module, module_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put a ``modules_to_save`` layer's weights in place: new parameters, so a weight tied to another stays as
    it was (PEFT trains a copy). A quantized layer becomes a plain linear layer in the model's dtype, since
    PEFT's copy is full precision."""
    module = model.get_submodule(module_name)
    weight = getattr(module, "weight", None)
    if "weight" in tensors and isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        bias = getattr(module, "bias", None)
        dtype = getattr(model, "dtype", torch.float32)
        linear = nn.Linear(
            module.in_features, module.out_features, bias=bias is not None, device=module.device, dtype=dtype
        )
        if bias is not None:
            linear.bias.data.copy_(bias)
        _set_module(model, module_name, linear)
        module = linear
    for leaf, value in tensors.items():
        current = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(value.to(current.device, current.dtype)))


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Inject the adapter's layers into ``model`` and load its weights (frozen base, trainable adapter).
    PEFT saves the whole base layer with an ``lm_head`` target (``...lm_head.base_layer.weight``) and the whole
    ``modules_to_save`` layers (``lm_head.weight``): those tensors replace the layer's weights, as PEFT loads
    them. ``merge_lora`` keeps them."""
    config, weights = read_adapter(folder, getattr(model, "config", None))
    _check_fits(model, config, weights, folder)
    inject_lora(model, config)
    params = dict(model.named_parameters())
    whole: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, value in weights.items():
            if _is_lora(name):
                params[name].copy_(value)
            elif ".base_layer." in name:
                module_name, leaf = name.rsplit(".base_layer.", 1)
                target = getattr(model.get_submodule(module_name).base_layer, leaf)
                target.copy_(value.to(target.dtype))
            else:
                module_name, leaf = name.rsplit(".", 1)
                whole.setdefault(module_name, {})[leaf] = value
        for module_name, tensors in whole.items():
            _replace_whole(model, module_name, tensors)
    changed(model)
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
            base.weight.data = module.merged_weight().to(weight.dtype)
        _set_module(model, name, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    changed(model)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
