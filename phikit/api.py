"""``phikit.load``: checkpoint + quantization + tokenizer in one call, the entry point for Python users.

This is the one place that composes the capability modules around the core, so they stay independent.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phikit import backends
from phikit.checkpoint import (
    DEFAULT_MODEL,
    QUANTIZED_WEIGHTS,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
    save_checkpoint,
)
from phikit.config import QUANTIZED_ARCHITECTURES, QUANTIZED_TYPES, set_dtype
from phikit.errors import PhikitError
from phikit.generate import Completion, GenerationConfig, generate, stream
from phikit.lora import LoRALinear, load_adapter
from phikit.models import CausalLM, read_config
from phikit.quantize import (
    GROUP_SIZE,
    GROUP_SIZES_TEXT,
    QuantSpec,
    bnb_available,
    bnb_nf4_hook,
    prepare_shells,
    quantizing_hook,
)
from phikit.templates import Template
from phikit.tokenizer import Tokenizer


@dataclass
class Phi:
    """A loaded model with its tokenizer: ``phikit.load("microsoft/phi-2").generate("...")``."""

    model: CausalLM
    tokenizer: Tokenizer
    path: Path
    quantization: QuantSpec | None = None
    load_seconds: float = 0.0
    defaults: GenerationConfig = field(default_factory=GenerationConfig)
    draft: CausalLM | None = None  # a smaller model for speculative decoding (same tokenizer)

    @property
    def dtype(self) -> str:
        """The dtype the weights were loaded in (``load``'s ``dtype`` once resolved: bf16, fp16 or fp32), as the
        embedding holds it; quantized layers keep their format (``precision``), and on a CPU activations stay
        fp32 whatever this is."""
        return _short(self.model.model.embed_tokens.weight.dtype)

    @property
    def precision(self) -> str:
        """What the linear layers hold: the quantized format, else their weights' dtype (bf16, fp16, fp32; not
        the LayerNorms', which the CPU backend keeps in fp32)."""
        if self.quantization is not None:
            return self.quantization.format
        mlp = self.model.model.layers[0].mlp
        linear = next(m for m in mlp.children() if hasattr(m, "in_features"))
        linear = getattr(linear, "base_layer", linear)  # under a LoRA adapter
        return _short(linear.weight.dtype)

    def generate(
        self, prompts: str | list[str], template: Template | str | None = None, **overrides
    ) -> Completion | list[Completion]:
        """Complete one prompt (a ``Completion``: ``.text``, ``.token_ids``, ``.finish_reason``) or a list of
        them (batched). ``template``: how a prompt is wrapped (``"chat"``: the model's chat template;
        ``"instruct"``, ``"raw"``, ...; default: the model's usual one). ``overrides`` are GenerationConfig's
        fields: ``max_new_tokens`` (256), ``temperature`` (0: greedy), ``top_k``, ``top_p``,
        ``repetition_penalty``, ``seed``, ``stop`` (a string or a list), ``truncate``, ``batch_size``,
        ``prompt_lookup``, ``draft_tokens``."""
        return generate(self.model, self.tokenizer, prompts, self.defaults, template, draft=self.draft, **overrides)

    def stream(self, prompt: str, template: Template | str | None = None, **overrides) -> Iterator[str]:
        """The completion of one prompt as pieces of text while it is generated; arguments as ``generate``'s."""
        return stream(self.model, self.tokenizer, prompt, self.defaults, template, self.draft, **overrides)


def _short(dtype: torch.dtype) -> str:
    """bf16, fp16, fp32: the names --dtype and load(dtype=) take."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


KV_CACHE_TYPES = {"auto": None, None: None, "fp16": torch.float16, "int8": torch.int8}  # load's kv_cache


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    quantize: str | QuantSpec | None = None,
    group_size: int | None = None,
    progress: bool = False,
    adapter: str | os.PathLike | None = None,
    kv_cache: str | None = "auto",
) -> Phi:
    """Load a checkpoint of any Phi family (local folder or Hub id) and its tokenizer.

    ``quantize`` (int8, int4, nf4) quantizes each linear layer as it is read (``group_size``: int4's, 64 when
    left out); a checkpoint written by ``phikit quantize`` loads already quantized. ``dtype`` (auto, bf16,
    fp16, fp32) is that of everything not quantized.
    ``kv_cache``: the KV cache's element type: auto (the device's choice: fp16 on a CPU with phikit's kernels,
    else the compute dtype), fp16, or int8 (a scale a row: about half fp16's bytes, for long contexts).
    """
    start = time.perf_counter()
    if kv_cache not in KV_CACHE_TYPES:
        raise PhikitError(f"kv_cache {kv_cache!r}: must be one of {', '.join(t for t in KV_CACHE_TYPES if t)}")
    folder = resolve_model_path(model)
    config = read_config(folder / "config.json")
    tokenizer = Tokenizer(folder)  # before the weights: a mismatch costs no load
    if tokenizer.vocab_size > config.vocab_size:
        raise PhikitError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{config.vocab_size}; ids past it have no embedding (a tokenizer of another model?)"
        )
    target = resolve_device(device)
    resolve_dtype(dtype, target)  # a dtype that is no dtype of weights: refused before the weights are read
    spec = quant_spec(quantize, group_size)
    saved = config.extra.get("quantization_config")
    if saved:
        saved_spec = QuantSpec.from_config(saved, str(folder / "config.json"))
        if spec is not None and spec != saved_spec:
            raise PhikitError(
                f"{folder} is already quantized ({saved_spec.describe()}; asked for {spec.describe()}); load it as "
                "it is (leave quantize out), or quantize the full-precision checkpoint it came from"
            )
        spec = saved_spec
        net = load_model(folder, dtype, target, prepare=lambda m: prepare_shells(m, saved_spec), progress=progress)
    elif spec is not None:
        if spec.format == "nf4" and target.type == "cuda" and bnb_available():
            hook = bnb_nf4_hook(target, resolve_dtype(dtype, target), spec)  # QLoRA's own 4-bit layers
        else:
            hook = quantizing_hook(spec, target, backends.quantizer(target))
        net = load_model(folder, dtype, target, on_tensor=hook, progress=progress)
    else:
        net = load_model(folder, dtype, target, progress=progress)
    net = backends.install(net)  # the device's modules and kernels, chosen once
    if KV_CACHE_TYPES[kv_cache] is not None:
        net.kv_cache_dtype = KV_CACHE_TYPES[kv_cache]
    if adapter is not None:
        load_adapter(net, adapter)
        net.requires_grad_(False)
    return Phi(net, tokenizer, folder, spec, time.perf_counter() - start)


def quant_spec(quantize: str | QuantSpec | None, group_size: int | None = None) -> QuantSpec | None:
    """``load``'s quantize and group_size as a QuantSpec (None: no quantization), or a one-line error."""
    if group_size is not None:
        if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool):
            raise PhikitError(f"group_size must be an integer ({GROUP_SIZES_TEXT}), got {group_size!r}")
        group_size = int(group_size)
    if isinstance(quantize, str):
        fmt = quantize.lower()
        quantize = None if fmt == "none" else QuantSpec(fmt, group_size if fmt == "int4" and group_size else GROUP_SIZE)
    elif isinstance(quantize, QuantSpec):
        if group_size is not None and group_size != quantize.group_size:
            raise PhikitError(f"group_size {group_size} differs from the QuantSpec's {quantize.group_size}: give one")
    elif quantize is not None:
        raise PhikitError(f"quantize must be int8, int4, nf4, a QuantSpec or None, got {quantize!r}")
    if group_size not in (None, GROUP_SIZE) and (quantize is None or quantize.format != "int4"):
        raise PhikitError(
            f"group_size {group_size} is int4's; with {quantize.format if quantize else 'no quantization'} it "
            "changes nothing: leave it out, or quantize to int4"
        )
    return quantize


def save_quantized(phi: Phi, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a quantized model as a checkpoint folder that ``load`` reads without re-quantizing.

    The folder is marked so that other tools refuse it loudly instead of reading int8/int4 codes as
    weights: ``model_type`` ``phikit_quantized_phi`` (architecture ``PhikitQuantizedPhiForCausalLM``)
    and weights in ``phikit-quantized.safetensors`` rather than ``model.safetensors``."""
    if phi.quantization is None:
        raise PhikitError("the model is not quantized; load it with quantize=... first")
    if any(isinstance(m, LoRALinear) for m in phi.model.modules()):
        raise PhikitError(
            "the model carries a LoRA adapter, which a quantized folder does not hold; merge it first (phikit "
            "merge, phikit.api.merge_adapter) and quantize the merged model, or load without adapter="
        )
    if any(type(m).__name__ == "Linear4bit" for m in phi.model.modules()):
        raise PhikitError(
            "this NF4 model is bitsandbytes' (loaded on a GPU), whose layers phikit's folders do not hold; quantize "
            "on the CPU (phikit quantize --device cpu --to nf4), and a GPU loads that folder"
        )
    source = read_config(phi.path / "config.json")
    config = source.to_hf_dict()
    config["quantization_config"] = phi.quantization.to_config()
    set_dtype(config, str(phi.model.dtype).removeprefix("torch."))
    # marked for phikit alone: others refuse it
    config["model_type"], config["architectures"] = (
        QUANTIZED_TYPES[source.family],
        [QUANTIZED_ARCHITECTURES[source.family]],
    )
    state = phi.model.state_dict()
    if state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr():
        del state["lm_head.weight"]  # a head tied to the embedding (kept unquantized): tied again on load
    return save_checkpoint(
        out, state, config, phi.path, overwrite=overwrite, weights_name=QUANTIZED_WEIGHTS, source=phi.path
    )


def merge_adapter(
    model: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base model and write a transformers checkpoint (config, safetensors
    shards, tokenizer files) in the base checkpoint's dtype unless ``dtype`` says otherwise."""
    from phikit.export import export_hf

    return export_hf(model, out, adapter=adapter, dtype=dtype, overwrite=overwrite, progress=progress)
