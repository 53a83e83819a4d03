"""Find, read and write Phi checkpoints: local folders or Hugging Face Hub ids, sharded safetensors.

Weights are memory-mapped and moved into the model one tensor at a time, cast on the way, so peak memory
stays near one copy of the weights in the target dtype. The legacy remote-code layouts of the first
Phi-1.5/Phi-2 releases are renamed here, in one place, to transformers' ``PhiForCausalLM`` names.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from phikit.config import PhiConfig
from phikit.errors import PhikitError
from phikit.model import PhiForCausalLM

DEFAULT_MODEL = "microsoft/phi-2"

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA (also ROCm builds of torch) when present, else CPU; a missing GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise PhikitError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PhikitError(
            "--device cuda was asked for but torch sees no GPU; use --device cpu "
            "(or install a CUDA/ROCm build of torch)"
        )
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the GPU supports it, else fp16 on GPU; bf16 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if dtype not in DTYPES:
        raise PhikitError(f"unknown dtype {dtype!r}; use one of auto, bf16, fp16, fp32")
    return DTYPES[dtype]


def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model folder as is, or a Hub id downloaded (and cached) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PhikitError(f"{path}: expected a model folder (config.json and *.safetensors), got a file")
        return path
    text = str(model)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise PhikitError(f"{text}: no such model folder, and not a Hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # older repos ship only pytorch_model.bin
            folder = Path(snapshot_download(text, revision=revision, allow_patterns=[*HUB_PATTERNS, "*.bin"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "not reachable/found"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PhikitError(
            f"could not get {text!r} from the Hugging Face Hub ({reason[:200]}); "
            "download it where the Hub is reachable and pass --model PATH to its folder"
        ) from None
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in shard order; missing shards are an error naming them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PhikitError(f"{index}: not a valid shard index ({e})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise PhikitError(
                    f"{index} lists shard(s) that are missing: {', '.join(missing)}; re-download the checkpoint"
                )
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PhikitError(
            f"{folder}: no weights found (expected model.safetensors or model.safetensors.index.json with its shards)"
        )
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight, one shard open (memory-mapped) at a time."""
    for file in files:
        if file.suffix == ".bin":
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise PhikitError(
                    f"{file}: cannot read weights ({e}); the file is truncated or corrupt, re-download it"
                ) from None
            yield from state.items()
            del state
            continue
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise PhikitError(
                f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt, re-download it"
            ) from None


_LEGACY_BLOCK = {
    "ln": "input_layernorm",
    "mixer.out_proj": "self_attn.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def convert_legacy(name: str, tensor: torch.Tensor, config: PhiConfig) -> list[tuple[str, torch.Tensor]]:
    """Rename one tensor of the remote-code layouts (``phi-msft``: ``transformer.h.N.mixer.Wqkv``;
    ``mixformer-sequential``: ``layers.N+1.mixer.Wqkv``) to ``PhiForCausalLM`` names. ``Wqkv`` holds
    q, k and v stacked along the output dim, so it is split in three. Unknown buffers map to nothing.
    """
    n = config.num_hidden_layers
    if name in ("transformer.embd.wte.weight", "layers.0.wte.weight"):
        return [("model.embed_tokens.weight", tensor)]
    head = re.fullmatch(rf"(?:lm_head|layers\.{n + 1})\.(ln|linear)\.(weight|bias)", name)
    if head:
        target = "model.final_layernorm" if head[1] == "ln" else "lm_head"
        return [(f"{target}.{head[2]}", tensor)]
    block = re.fullmatch(r"(transformer\.h|layers)\.(\d+)\.(.+)\.(weight|bias)", name)
    if not block:
        return []
    layer = int(block[2]) - (1 if block[1] == "layers" else 0)
    prefix, part, kind = f"model.layers.{layer}", block[3], block[4]
    if part == "mixer.Wqkv":
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        q, k, v = torch.split(tensor, [q_size, kv_size, kv_size], dim=0)
        return [(f"{prefix}.self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    if part in _LEGACY_BLOCK:
        return [(f"{prefix}.{_LEGACY_BLOCK[part]}.{kind}", tensor)]
    return []


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter ``name`` (e.g. ``model.layers.0.mlp.fc1.weight``) with ``tensor``, frozen."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    on_tensor=None,
    progress: bool = False,
) -> PhiForCausalLM:
    """Build a PhiForCausalLM from a checkpoint folder or Hub id, in eval mode with frozen weights.

    ``on_tensor(name, tensor, model)`` may take over placing a tensor (quantization does, so a
    full-precision copy of every layer never exists at once); it returns True when it did.
    """
    folder = resolve_model_path(path)
    config = PhiConfig.from_json(folder / "config.json")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    seen: set[str] = set()
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for name, tensor in iter_tensors(weight_files(folder)):
        pairs = convert_legacy(name, tensor, config) if config.legacy_layout else [(name, tensor)]
        for key, value in pairs:
            if key not in expected:
                continue  # rotary buffers and the like: not parameters of ours
            if value.shape != expected[key]:
                raise PhikitError(
                    f"{folder}: tensor {key} has shape {tuple(value.shape)} but config.json "
                    f"implies {tuple(expected[key])}; config and weights do not match"
                )
            if on_tensor is None or not on_tensor(key, value, model):
                set_tensor(model, key, value.to(device=device).to(dtype))
            seen.add(key)
            bar.update()
    bar.close()
    if config.tie_word_embeddings and "lm_head.weight" not in seen and "model.embed_tokens.weight" in seen:
        model.lm_head.weight = model.model.embed_tokens.weight
        seen.add("lm_head.weight")
    missing = sorted(set(expected) - seen)
    if missing:
        raise PhikitError(
            f"{folder}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}; "
            "it is incomplete or not a Phi checkpoint"
        )
    model.eval()
    return model


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
