"""Model configuration: the fields of a ``config.json`` that the native models need, one dataclass per family."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phikit.errors import PhikitError

# Config "model_type" values of each family. "phi" is the transformers-native layout of Phi-1/1.5/2;
# "phi-msft" and "mixformer-sequential" are the older remote-code releases of the same weights; "phi3" is
# Phi-3, Phi-3.5, Phi-4 and Phi-4-mini.
NATIVE_TYPES = ("phi",)
LEGACY_TYPES = ("phi-msft", "mixformer-sequential")
PHI3_TYPES = ("phi3",)
# A checkpoint written by `phikit quantize`: a type (and architecture) no other tool knows, so that
# transformers, vLLM or llama.cpp refuse it instead of reading quantized codes as weights. One per family.
QUANTIZED_TYPES = {"phi": "phikit_quantized_phi", "phi3": "phikit_quantized_phi3"}
QUANTIZED_ARCHITECTURES = {"phi": "PhikitQuantizedPhiForCausalLM", "phi3": "PhikitQuantizedPhi3ForCausalLM"}
QUANTIZED_TYPE, QUANTIZED_ARCHITECTURE = QUANTIZED_TYPES["phi"], QUANTIZED_ARCHITECTURES["phi"]


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

    family = "phi"
    longrope = None  # Phi-1/1.5/2 have plain RoPE and no sliding window
    sliding_window = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def norm_eps(self) -> float:
        """The decoder layers' normalization epsilon (LayerNorm here, RMSNorm in Phi-3)."""
        return self.layer_norm_eps

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return () if self.eos_token_id is None else (self.eos_token_id,)

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
        if model_type not in (*NATIVE_TYPES, QUANTIZED_TYPES["phi"]):
            raise PhikitError(f"{source}: model_type {model_type!r} is not a Phi-1/1.5/2 model")
        _require(raw, source)
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
        return cls.from_dict(_read_json(path), source=str(path))

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
        return set_dtype(out, self.torch_dtype) if self.torch_dtype else out

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "extra"}


@dataclass(frozen=True)
class LongRoPE:
    """LongRoPE parameters of a 128k Phi-3 model: per-dim factors and when the long ones apply."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float

    @staticmethod
    def default_attention_factor(factor: float, original: int) -> float:
        """sqrt(1 + ln(factor) / ln(original context)); 1 when the context is not extended."""
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


@dataclass
class Phi3Config:
    """Shape and numerics of a Phi-3-family model (Phi-3/3.5-mini and -medium, Phi-4, Phi-4-mini), read as
    transformers' ``Phi3Config`` reads it. Defaults are Phi-3-mini-4k's.

    RoPE parameters come from ``rope_parameters`` (transformers 5) or the older top-level ``rope_theta``,
    ``partial_rotary_factor`` and ``rope_scaling``; a ``longrope`` (legacy ``su``/``yarn``) scaling gives
    ``longrope``. ``sliding_window``: a query sees that many keys, itself included (None: all)."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim_override: int | None = None  # config.json "head_dim", where it is not hidden / heads
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    partial_rotary_factor: float = 1.0
    rope_theta: float = 10000.0
    longrope: LongRoPE | None = None
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (32000,)
    pad_token_id: int | None = 32000
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read, written back on export

    family = "phi3"
    qk_layernorm = False
    legacy_layout = False

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_eps

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def extra(self) -> dict[str, Any]:
        return self.raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Phi3Config:
        if raw.get("model_type") not in (*PHI3_TYPES, QUANTIZED_TYPES["phi3"]):
            raise PhikitError(f"{source}: model_type {raw.get('model_type')!r} is not a Phi-3-family model")
        _require(raw, source)
        heads = _int(raw, "num_attention_heads", source)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise PhikitError(f"{source}: rope_parameters must be an object, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type")) or "default"
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        window = raw.get("sliding_window")
        eos = raw.get("eos_token_id", 32000)
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if any(isinstance(e, bool) or not isinstance(e, int) for e in eos):
            raise PhikitError(f"{source}: eos_token_id must be an integer or a list of integers, got {eos!r}")
        cfg = cls(
            vocab_size=_int(raw, "vocab_size", source),
            hidden_size=_int(raw, "hidden_size", source),
            intermediate_size=_int(raw, "intermediate_size", source),
            num_hidden_layers=_int(raw, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "num_key_value_heads", source, default=heads),
            head_dim_override=_int(raw, "head_dim", source, default=0, minimum=0) or None,
            max_position_embeddings=_int(raw, "max_position_embeddings", source, default=4096),
            partial_rotary_factor=_float({"partial_rotary_factor": partial}, "partial_rotary_factor", source, 1.0),
            rope_theta=_float({"rope_theta": theta}, "rope_theta", source, 10000.0, positive=True),
            sliding_window=None if window is None else _int(raw, "sliding_window", source),
            rms_norm_eps=_float(raw, "rms_norm_eps", source, 1e-5, positive=True),
            hidden_act=raw.get("hidden_act", "silu"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=dict(raw),
        )
        # transformers keeps the top-level original_max_position_embeddings first (Phi3Config always has one)
        original = raw.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
        cfg.original_max_position_embeddings = _int(
            {"original_max_position_embeddings": original}, "original_max_position_embeddings", source, 4096
        )
        if kind in ("longrope", "su", "yarn"):
            cfg.longrope = cls._longrope(rope, cfg, source)
        elif kind != "default":
            raise PhikitError(f"{source}: rope type {kind!r} is not supported (default or longrope)")
        cfg.validate(source)
        return cfg

    @staticmethod
    def _longrope(rope: dict, cfg: Phi3Config, source: str) -> LongRoPE:
        """transformers' ``_compute_longrope_parameters``: factor defaults to max / original positions; the
        attention factor to sqrt(1 + ln(factor) / ln(original))."""
        half = cfg.rotary_dim // 2
        factors = {}
        for key in ("short_factor", "long_factor"):
            value = rope.get(key)
            if (
                not isinstance(value, list)
                or len(value) != half
                or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                    for v in value
                )
            ):
                raise PhikitError(f"{source}: rope {key} must be a list of {half} positive numbers (rotary dims / 2)")
            factors[key] = tuple(float(v) for v in value)
        original = cfg.original_max_position_embeddings
        factor = _float(rope, "factor", source, cfg.max_position_embeddings / original, positive=True)
        attention = rope.get("attention_factor")
        if attention is None:
            attention = LongRoPE.default_attention_factor(factor, original)
        attention = _float({"attention_factor": attention}, "attention_factor", source, 1.0, positive=True)
        return LongRoPE(factors["short_factor"], factors["long_factor"], original, attention)

    def validate(self, source: str = "config") -> None:
        """Reject shapes the model cannot be built with, naming the field."""
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise PhikitError(
                f"{source}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads} (and there is no head_dim)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise PhikitError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise PhikitError(
                f"{source}: partial_rotary_factor {self.partial_rotary_factor} must give an even number of "
                f"rotary dims between 2 and head_dim {self.head_dim}"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise PhikitError(f"{source}: hidden_act {self.hidden_act!r} is not supported (silu)")

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` of this model: the one it was read from, as it was."""
        out = dict(self.raw)
        out.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
        return set_dtype(out, self.torch_dtype) if self.torch_dtype else out

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "raw"}


def set_dtype(hf: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Write the weights' dtype ("bfloat16" ...) into a config.json dict under both names transformers reads:
    ``dtype`` (transformers 5, which prefers it) and ``torch_dtype`` (older releases). A config read from a
    transformers 5 checkpoint carries ``dtype``: left as it was, it would load an fp16 export as fp32."""
    hf["dtype"] = hf["torch_dtype"] = dtype
    return hf


def _require(raw: dict[str, Any], source: str) -> None:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in raw]
    if missing:
        raise PhikitError(f"{source}: missing required key(s) {', '.join(missing)}")


def _read_json(path: str | Path) -> dict[str, Any]:
    """A config.json as a dict; a missing or malformed file is a PhikitError naming it."""
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
    return raw


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
