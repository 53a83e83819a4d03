"""Model configuration: the fields of a Phi ``config.json`` that the native model needs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phikit.errors import PhikitError

# Config "model_type" values we can run. "phi" is the transformers-native layout of Phi-1/1.5/2;
# "phi-msft" and "mixformer-sequential" are the older remote-code releases of the same weights.
NATIVE_TYPES = ("phi",)
LEGACY_TYPES = ("phi-msft", "mixformer-sequential")
# A checkpoint written by `phikit quantize`: a type (and architecture) no other tool knows, so that
# transformers, vLLM or llama.cpp refuse it instead of reading quantized codes as weights.
QUANTIZED_TYPE = "phikit_quantized_phi"
QUANTIZED_ARCHITECTURE = "PhikitQuantizedPhiForCausalLM"


@dataclass
class PhiConfig:
    """Shape and numerics of a Phi model (Phi-1, Phi-1.5, Phi-2).

    Defaults are Phi-2's. ``partial_rotary_factor`` of each head's dimensions get rotary
    position embedding (0.4 x 80 = first 32 dims for Phi-2); the rest pass through.
    """

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in ("float16", ...)
    legacy_layout: bool = False  # weights use remote-code names (transformer.h.N.mixer.Wqkv ...)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other keys, kept for export

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> PhiConfig:
        """Build a config from a transformers ``config.json`` dict.

        Accepts the published Phi-2 keys (top-level ``partial_rotary_factor``/``rope_theta``),
        the ``rope_parameters`` dict newer transformers write, and the legacy ``phi-msft``
        keys (``n_embd``, ``n_layer``, ``rotary_dim`` ...).
        """
        model_type = raw.get("model_type")
        if model_type in LEGACY_TYPES:
            return cls._from_legacy(raw, source)
        if model_type not in (*NATIVE_TYPES, QUANTIZED_TYPE):
            raise PhikitError(
                f"{source}: model_type {model_type!r} is not a Phi model; phikit runs model_type "
                f"'phi' (Phi-1, Phi-1.5, Phi-2) and the legacy {', '.join(LEGACY_TYPES)}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise PhikitError(f"{source}: missing required key(s) {', '.join(missing)}")
        heads = _int(raw, "num_attention_heads", source)
        rope = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type")) or scaling.get("rope_type", scaling.get("type"))
        if rope_type not in (None, "default"):
            raise PhikitError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        known = {f for f in cls.__dataclass_fields__}
        cfg = cls(
            vocab_size=_int(raw, "vocab_size", source),
            hidden_size=_int(raw, "hidden_size", source),
            intermediate_size=_int(raw, "intermediate_size", source),
            num_hidden_layers=_int(raw, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "num_key_value_heads", source, default=heads),
            max_position_embeddings=_int(raw, "max_position_embeddings", source, default=2048),
            # transformers' PhiConfig defaults partial_rotary_factor to 0.5 when absent.
            partial_rotary_factor=_float({"partial_rotary_factor": partial}, "partial_rotary_factor", source, 0.5),
            rope_theta=_float({"rope_theta": theta}, "rope_theta", source, 10000.0, positive=True),
            layer_norm_eps=_float(raw, "layer_norm_eps", source, 1e-5, positive=True),
            hidden_act=raw.get("hidden_act", "gelu_new"),
            qk_layernorm=bool(raw.get("qk_layernorm", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=_first(raw.get("eos_token_id")),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            extra={k: v for k, v in raw.items() if k not in known},
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def _from_legacy(cls, raw: dict[str, Any], source: str) -> PhiConfig:
        """The remote-code config of the first Phi releases (``phi-msft`` / ``mixformer-sequential``)."""
        required = ("n_embd", "n_layer", "n_head")
        missing = [k for k in required if k not in raw]
        if missing:
            raise PhikitError(f"{source}: legacy Phi config lacks key(s) {', '.join(missing)}")
        hidden, heads = _int(raw, "n_embd", source), _int(raw, "n_head", source)
        head_dim = max(hidden // heads, 1)
        # The remote code pads the vocabulary up to a multiple of pad_vocab_size_multiple.
        multiple = _int(raw, "pad_vocab_size_multiple", source, default=64)
        vocab = int(math.ceil(_int(raw, "vocab_size", source, default=50304) / multiple) * multiple)
        cfg = cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_int(raw, "n_inner", source, default=4 * hidden),
            num_hidden_layers=_int(raw, "n_layer", source),
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "n_head_kv", source, default=heads),
            max_position_embeddings=_int(raw, "n_positions", source, default=2048),
            partial_rotary_factor=_int(raw, "rotary_dim", source, default=32) / head_dim,
            rope_theta=_float(raw, "rotary_base", source, 10000.0, positive=True),
            layer_norm_eps=_float(raw, "layer_norm_epsilon", source, 1e-5, positive=True),
            hidden_act=raw.get("activation_function", "gelu_new"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", 50256),
            eos_token_id=_first(raw.get("eos_token_id", 50256)),
            torch_dtype=raw.get("torch_dtype"),
            legacy_layout=True,
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Reject shapes the model cannot be built with, naming the field."""
        if self.hidden_size % self.num_attention_heads:
            raise PhikitError(
                f"{source}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise PhikitError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if not 0.0 <= self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise PhikitError(
                f"{source}: partial_rotary_factor {self.partial_rotary_factor} must give an "
                f"even number of rotary dims between 0 and head_dim {self.head_dim}"
            )
        if self.hidden_act not in ("gelu_new", "gelu_pytorch_tanh", "gelu", "gelu_fast"):
            raise PhikitError(f"{source}: hidden_act {self.hidden_act!r} is not supported")

    @classmethod
    def from_json(cls, path: str | Path) -> PhiConfig:
        """Read ``config.json``; a missing or malformed file is a PhikitError naming it."""
        path = Path(path)
        if not path.is_file():
            raise PhikitError(
                f"{path}: config.json not found; a model folder needs config.json next to its *.safetensors files"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PhikitError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise PhikitError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` of this model (native ``phi`` layout), for export."""
        out = dict(self.extra)
        out.update(
            architectures=["PhiForCausalLM"],
            model_type="phi",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            partial_rotary_factor=self.partial_rotary_factor,
            rope_theta=self.rope_theta,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            qk_layernorm=self.qk_layernorm,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        out.pop("rope_parameters", None)
        out.pop("rope_scaling", None)
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "extra"}


def _int(raw: dict[str, Any], key: str, source: str, default: int | None = None, minimum: int = 1) -> int:
    """``raw[key]`` as an integer >= ``minimum`` (``default`` when absent or null, if there is one)."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise PhikitError(f"{source}: {key} is null; it must be an integer >= {minimum}")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PhikitError(f"{source}: {key} must be an integer, got {value!r}")
    if value < minimum:
        raise PhikitError(f"{source}: {key} must be at least {minimum}, got {value}")
    return value


def _float(raw: dict[str, Any], key: str, source: str, default: float, positive: bool = False) -> float:
    """``raw[key]`` as a finite number (``default`` when absent or null), positive if asked."""
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PhikitError(f"{source}: {key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise PhikitError(f"{source}: {key} must be positive, got {value}")
    return float(value)


def _first(value: Any) -> Any:
    """``eos_token_id`` may be a list in newer configs; the first id is the model's EOS."""
    if isinstance(value, list):
        return value[0] if value else None
    return value
