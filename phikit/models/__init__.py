"""The model families phikit runs, one plain file each, and the one table from a config's ``model_type`` to
its family: config class, model class and linear-layer names.

    phi   Phi-1, Phi-1.5, Phi-2            (transformers' PhiForCausalLM; also the legacy remote-code types)
    phi3  Phi-3/3.5-mini/-medium, Phi-4, Phi-4-mini (-reasoning)   (transformers' Phi3ForCausalLM)

What the families share (cache, rotary, attention, masks, the ``CausalLM`` base) is ``phikit.models.common``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phikit.config import (
    LEGACY_TYPES,
    NATIVE_TYPES,
    PHI3_TYPES,
    QUANTIZED_TYPES,
    Phi3Config,
    PhiConfig,
    _read_json,
)
from phikit.errors import PhikitError
from phikit.models import phi, phi3
from phikit.models.common import CausalLM, KVCache, Slots, changed


@dataclass(frozen=True)
class Family:
    name: str
    config: type
    model: type
    linear_names: tuple[str, ...]  # the decoder layers' linear layers (quantized, LoRA targets)
    attention_names: tuple[str, ...]  # the attention projections: the default LoRA targets
    description: str


FAMILIES = {
    "phi": Family("phi", PhiConfig, phi.PhiForCausalLM, phi.LINEAR_NAMES, phi.ATTENTION_NAMES, "Phi-1, Phi-1.5, Phi-2"),
    "phi3": Family(
        "phi3",
        Phi3Config,
        phi3.Phi3ForCausalLM,
        phi3.LINEAR_NAMES,
        phi3.ATTENTION_NAMES,
        "Phi-3, Phi-3.5, Phi-4, Phi-4-mini",
    ),
}
MODEL_TYPES = {
    **dict.fromkeys((*NATIVE_TYPES, *LEGACY_TYPES, QUANTIZED_TYPES["phi"]), "phi"),
    **dict.fromkeys((*PHI3_TYPES, QUANTIZED_TYPES["phi3"]), "phi3"),
}
# every family's linear-layer names: what "a linear layer of a decoder" means to quantization and LoRA
LINEAR_NAMES = tuple(dict.fromkeys(name for f in FAMILIES.values() for name in f.linear_names))


def family_of(config) -> Family:
    return FAMILIES[config.family]


def config_from_dict(raw: dict, source: str = "config.json"):
    """The config of any supported family, by ``model_type``; another type is a PhikitError naming them."""
    family = MODEL_TYPES.get(raw.get("model_type"))
    if family is None:
        supported = ", ".join(f"'{t}'" for t in (*NATIVE_TYPES, *PHI3_TYPES))
        raise PhikitError(
            f"{source}: model_type {raw.get('model_type')!r} is not a model phikit runs; it runs model_type "
            f"{supported} ({'; '.join(f.description for f in FAMILIES.values())}) and the legacy "
            f"{', '.join(LEGACY_TYPES)}"
        )
    return FAMILIES[family].config.from_dict(raw, source)


def read_config(path: str | Path):
    """A checkpoint's ``config.json`` as its family's config; a missing or malformed file names itself."""
    return config_from_dict(_read_json(path), source=str(path))


def build_model(config) -> CausalLM:
    """An uninitialised model of ``config``'s family (build it under ``torch.device("meta")`` to load into)."""
    return family_of(config).model(config)


__all__ = [
    "FAMILIES",
    "LINEAR_NAMES",
    "CausalLM",
    "Family",
    "KVCache",
    "Slots",
    "build_model",
    "changed",
    "config_from_dict",
    "family_of",
    "read_config",
]
