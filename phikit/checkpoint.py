"""Find, read and write Phi checkpoints: local folders or Hugging Face Hub ids, sharded safetensors.

Weights are memory-mapped and moved into the model one tensor at a time, cast on the way, so peak memory
stays near one copy of the weights in the target dtype. The legacy remote-code layouts of the first
Phi-1.5/Phi-2 releases are renamed here, in one place, to transformers' ``PhiForCausalLM`` names.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from phikit import kernels, pagecache
from phikit.config import PhiConfig
from phikit.errors import PhikitError, first_line
from phikit.models import CausalLM, build_model, read_config

DEFAULT_MODEL = "microsoft/phi-2"

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# what a saved checkpoint folder takes along from its source: every tokenizer and generation file (Phi-3's
# tokenizer.model is what llama.cpp's converter reads its vocabulary from)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# weights of `phikit quantize` folders: not model.safetensors, which transformers would read as a plain Phi
QUANTIZED_WEIGHTS = "phikit-quantized.safetensors"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA (also ROCm builds of torch) when present, else CPU; a missing GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise PhikitError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ...: nothing phikit runs on
        raise PhikitError(f"device {str(device)!r} is not one phikit runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PhikitError(
            'device cuda was asked for but torch sees no GPU; use device cpu (--device cpu, device="cpu") '
            "or install a CUDA/ROCm build of torch"
        )
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the GPU supports it, else fp16 on GPU; bf16 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            hint = f' (for {dtype} weights: quantize="int8")' if dtype == torch.int8 else ""
            raise PhikitError(f"dtype {dtype} is not a dtype of weights; use bf16, fp16 or fp32{hint}")
        return dtype
    if isinstance(dtype, str):
        dtype = dtype.lower()
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if dtype not in DTYPES:
        raise PhikitError(f"unknown dtype {dtype!r}; use one of auto, bf16, fp16, fp32")
    return DTYPES[dtype]


def hub_id_shaped(text: str) -> bool:
    """``owner/name``: what may be fetched from the Hub when no local path of that name exists."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model folder as is, or a Hub id downloaded (and cached) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PhikitError(f"{path}: expected a model folder (config.json and *.safetensors), got a file")
        return path
    text = str(model)
    if not hub_id_shaped(text):
        raise PhikitError(f"{text}: no such model folder, and not a Hub id of the form owner/name")
    try:
        print(f"phikit: fetching {text} from the Hugging Face Hub (cached after the first time) ...", file=sys.stderr)
        folder = _hub_download(text, revision, HUB_PATTERNS)
        if not any(folder.glob("*.safetensors")):  # older repos ship only pytorch_model.bin
            folder = _hub_download(text, revision, [*HUB_PATTERNS, "*.bin"])
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "not reachable/found"
        raise PhikitError(
            f"could not get {text!r} from the Hugging Face Hub ({first_line(e)}); "
            "download it where the Hub is reachable and pass --model PATH to its folder"
        ) from None
    return folder


def _hub_download(repo: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` that gives up when nothing happens for PHIKIT_HUB_TIMEOUT seconds (default
    60): huggingface_hub makes its first request with no timeout, so a server that accepts a connection and
    never answers hung phikit silently. Progress is the repo's cache folder growing (finished or partial
    files); the download runs in a worker thread, which is left behind if it hangs."""
    from huggingface_hub import constants, snapshot_download

    try:
        patience = float(os.environ.get("PHIKIT_HUB_TIMEOUT", "60"))
    except ValueError:
        raise PhikitError(f"PHIKIT_HUB_TIMEOUT={os.environ['PHIKIT_HUB_TIMEOUT']!r} is not a number") from None
    result: dict = {}

    def work() -> None:
        try:
            result["folder"] = snapshot_download(repo, revision=revision, allow_patterns=patterns)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = e

    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    worker = threading.Thread(target=work, name="phikit-hub-download", daemon=True)
    worker.start()
    seen, changed = None, time.monotonic()
    while worker.is_alive():
        worker.join(timeout=0.5)
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
        if size != seen:
            seen, changed = size, time.monotonic()
        elif time.monotonic() - changed > patience:
            raise RuntimeError(f"no progress for {patience:g} s (PHIKIT_HUB_TIMEOUT)")
    if "error" in result:
        raise result["error"]
    return Path(result["folder"])


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in shard order; missing shards are an error naming them."""
    for index_name in (
        f"{QUANTIZED_WEIGHTS}.index.json",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ):
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
    for name in (QUANTIZED_WEIGHTS, "model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PhikitError(
            f"{folder}: no weights found (expected model.safetensors or model.safetensors.index.json with its shards)"
        )
    return files


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(
    file: Path, convert=None, mapped=None, kept=None, notify=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one safetensors file, each read into its own buffer.

    Written by hand instead of ``safetensors.safe_open``: its memory map keeps every page it touched
    resident until the file is closed, so converting a shard held weights + a whole shard in RSS; reading
    tensor by tensor holds weights + one tensor. The header is checked against the file size, so a
    truncated download is caught before any tensor is read. ``convert(tensor)`` (optional) runs on each
    tensor in the reading thread, while it is still in cache (fp16 -> bf16 in place when loading bf16).

    ``mapped(dtype)`` (optional): True for the stored dtypes whose tensors are instead views of their own
    private memory maps of the file (``pagecache.map_tensor``; ``convert`` is not applied to them), no copy: a weight
    kept as stored costs no read buffer, and one that is quantized or converted later is read where the page
    cache holds it and unmapped once dropped.

    ``kept(dtype)`` (optional): True for the mapped dtypes whose tensors become the weights as they are; when
    those are most of the file, the page cache is first made to hold it on 2 MB pages (``pagecache.settle``,
    ``notify(message)`` told if the file is read again), which decoding streams faster.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            data_start = 8 + header_len
            for name, info in entries:
                begin, end = info["data_offsets"]
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"unsupported dtype {info['dtype']} of {name}")
                if data_start + end > size:
                    raise ValueError(f"tensor {name} ends at byte {data_start + end} of {size}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise PhikitError(
                f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt, re-download it"
            ) from None
        fd = f.fileno()
        if kept is not None and mapped is not None:
            used = sum(
                info["data_offsets"][1] - info["data_offsets"][0]
                for _, info in entries
                if mapped(SAFETENSORS_DTYPES[info["dtype"]]) and kept(SAFETENSORS_DTYPES[info["dtype"]])
            )
            if used * 2 > size:
                pagecache.settle(file, notify)

        def read(info: dict) -> torch.Tensor | None:
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if mapped is not None and mapped(dtype):
                return pagecache.map_tensor(fd, data_start + begin, end - begin, dtype, info["shape"])
            # 4 KB pages: preadv filling fresh 2 MB pages (two threads) loaded Phi-2 bf16 in 6.3-7.2 s against
            # 2.5-2.7 s on this VM (benchmarks/RESULTS.md, issue 23); what is quantized or converted out of place
            # still lands on 2 MB pages (kernels.empty_weight)
            buffer = kernels.empty_weight((end - begin,), torch.uint8, huge=False)
            view, done = memoryview(buffer.numpy()), 0
            while done < end - begin:
                got = os.preadv(fd, [view[done:]], data_start + begin + done)
                if got <= 0:
                    return None
                done += got
            tensor = buffer.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            return convert(tensor) if convert is not None else tensor

        # Two reads in flight (preadv releases the GIL): filling fresh memory is mostly page faults, and
        # the second core halves it; at most two tensors ahead of the one being placed.
        with ThreadPoolExecutor(2, thread_name_prefix="phikit-read") as pool:
            pending = deque()
            for i, (name, _info) in enumerate(entries):
                while len(pending) < 3 and i + len(pending) < len(entries):
                    _, ahead = entries[i + len(pending)]
                    pending.append(pool.submit(read, ahead))
                tensor = pending.popleft().result()
                if tensor is None:
                    raise PhikitError(f"{file}: truncated while reading {name}; re-download it")
                yield name, tensor


def load_pickled(path: Path, remedy: str, **options) -> dict:
    """A PyTorch pickle (``.bin`` weights, an adapter_model.bin, a trainer state) read with ``weights_only``:
    tensors and plain values only, so a planted file cannot run code. Either failure is one line: a file that
    holds other objects is refused as such (not called corrupt, and without torch's advice to load it
    unsafely), anything else is a truncated or corrupt file; ``remedy`` says what to do about that."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, **options)
    except MemoryError:
        raise
    except OSError as e:  # not the file's fault (permissions, a disk error): said as it is
        raise PhikitError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean "unreadable"
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise PhikitError(
                f"{path}: refused: it holds Python objects besides tensors and plain values, and loading those "
                "could run code; use a file of tensors (safetensors)"
            ) from None
        raise PhikitError(
            f"{path}: cannot read ({first_line(e)}); the file is truncated or corrupt: {remedy}"
        ) from None


def _read_ahead(files: list[Path]) -> None:
    """Ask the kernel to start reading every weight file into the page cache now (posix_fadvise
    WILLNEED), so the disk streams while tensors are converted and placed, instead of one read at a time:
    measured loading Phi-2 from a cold page cache, reading took 3.9 s instead of 9.6 s."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def iter_tensors(
    files: list[Path], convert=None, mapped=None, kept=None, notify=None
) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, owned) of every weight, shard after shard; ``owned``: the tensor has memory of its own
    that nothing else views (safetensors), so it may be converted in place. A .bin file's tensors may share
    storage (tied weights), so they are not. ``convert``, ``mapped``, ``kept``, ``notify``: see
    ``read_safetensors`` (safetensors only)."""
    _read_ahead(files)
    for file in files:
        if file.suffix != ".bin":
            for name, tensor in read_safetensors(file, convert, mapped, kept, notify):
                yield name, tensor, True
            continue
        state = load_pickled(file, "re-download it", mmap=True)
        for name, tensor in state.items():
            yield name, tensor, False
        del state


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


def cast(value: torch.Tensor, dtype: torch.dtype, device: torch.device, in_place: bool = False) -> torch.Tensor:
    """``value`` as ``dtype``, converted where it is cheaper: fp16/fp32 -> bf16 on the CPU with the kernel
    (PyTorch's fp16 -> bf16 took a third of loading Phi-2), in the read buffer itself if ``in_place``."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return kernels.to_bf16(value, in_place=in_place)  # PyTorch's own conversion for what it does not take
    return value.to(device=device).to(dtype)


def _fp16_to_bf16(tensor: torch.Tensor) -> torch.Tensor:
    return kernels.to_bf16(tensor, in_place=True) if tensor.dtype == torch.float16 else tensor


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (e.g. ``model.layers.0.mlp.fc1.weight``) with ``tensor``, frozen."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    prepare: Callable[[CausalLM], None] | None = None,
    on_tensor: Callable[[str, torch.Tensor, CausalLM, torch.dtype], bool] | None = None,
    progress: bool = False,
) -> CausalLM:
    """Build the model of a checkpoint folder or Hub id (its family by config.json's ``model_type``), in eval
    mode with frozen weights.

    Floating parameters are cast to ``dtype``; buffers (quantized weights and their scales) keep theirs.
    ``prepare(model)`` may swap modules of the meta-device model first (shells of a quantized checkpoint);
    ``on_tensor(name, tensor, model, dtype)`` may take over placing a tensor and returns True when it did
    (quantizing while loading, so a full-precision copy of every layer never exists at once). A head tied to
    the embedding (``tie_word_embeddings`` and no ``lm_head.weight`` stored) is offered to ``on_tensor`` as
    ``lm_head.weight`` too, so a quantized head is quantized apart from the embedding, which stays as is.
    """
    folder = resolve_model_path(path)
    config = read_config(folder / "config.json")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with _unfragmented_heap():
        model = _load_weights(folder, config, device, dtype, prepare, on_tensor, progress)
    model.eval()
    return model


def _load_weights(folder, config, device, dtype, prepare, on_tensor, progress) -> CausalLM:
    with torch.device("meta"), _no_init():
        model = build_model(config)
    if prepare is not None:
        prepare(model)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    buffers = {name: t.dtype for name, t in model.named_buffers()}
    seen: set[str] = set()
    if device.type == "cpu":
        kernels.available()  # a first use compiles the kernel library: its notice before the bar, not inside it
    bar = tqdm(
        total=len(expected), desc="loading weights", unit="tensor", disable=None if progress else True, leave=False
    )
    convert = None
    if on_tensor is None and prepare is None and dtype == torch.bfloat16 and device.type == "cpu":
        convert = _fp16_to_bf16  # plain bf16 loading: every floating weight converts in the reading threads

    # Tensors other than those converted in the reading threads (fp16 -> bf16 in place in a read buffer; in a
    # map each page written would be copied first) are views of the files' pages, no read buffer: kept as stored
    # they are the weights (a bf16 checkpoint loaded as bf16 copies nothing), else read once and unmapped.
    def mapped(stored: torch.dtype) -> bool:
        return convert is None or stored != torch.float16

    def kept(stored: torch.dtype) -> bool:  # mapped tensors that stay the weights as they are
        return on_tensor is None and device.type == "cpu" and stored == dtype

    def notify(message: str) -> None:
        if progress:
            tqdm.write(f"phikit: {message}", file=sys.stderr)

    for name, tensor, owned in iter_tensors(weight_files(folder), convert, mapped, kept, notify):
        pairs = convert_legacy(name, tensor, config) if config.legacy_layout else [(name, tensor)]
        for key, value in pairs:
            if key not in expected:
                if key.endswith((".weight", ".bias")):  # rotary buffers and the like are fine to skip
                    raise PhikitError(
                        f"{folder}: tensor {key} has no place in the {type(model).__name__} config.json "
                        f"describes ({config.num_hidden_layers} layers); config and weights do not match"
                    )
                continue
            if value.shape != expected[key]:
                raise PhikitError(
                    f"{folder}: tensor {key} has shape {tuple(value.shape)} but config.json "
                    f"implies {tuple(expected[key])}; config and weights do not match"
                )
            if key in buffers and value.dtype != buffers[key]:
                raise PhikitError(
                    f"{folder}: tensor {key} is {value.dtype}, the quantized format stores it as "
                    f"{buffers[key]}; the checkpoint is corrupt or of another format"
                )
            if key not in buffers and not value.is_floating_point():
                raise PhikitError(f"{folder}: tensor {key} is {value.dtype}, not a floating-point weight")
            if on_tensor is None or not on_tensor(key, value, model, dtype):
                if key not in buffers and value.is_floating_point():
                    value = cast(value, dtype, device, in_place=owned and value is tensor)
                set_tensor(model, key, value.to(device=device))
            seen.add(key)
            bar.update()
    bar.close()
    if config.tie_word_embeddings and "lm_head.weight" not in seen and "model.embed_tokens.weight" in seen:
        embedding = model.model.embed_tokens.weight
        if on_tensor is None or not on_tensor("lm_head.weight", embedding, model, dtype):
            model.lm_head.weight = embedding
        seen.add("lm_head.weight")
    missing = sorted(set(expected) - seen)
    if missing:
        raise PhikitError(
            f"{folder}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}; "
            "it is incomplete or not a checkpoint of this model"
        )
    return model


@contextmanager
def _no_init():
    """Skip the random initialisation of a model built only to receive checkpoint weights: on the meta
    device it computes nothing, but its first use imports PyTorch's reference ops (~2 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


@contextmanager
def _unfragmented_heap():
    """While loading, glibc malloc serves every block of 1 MB or more with its own memory map.

    Loading allocates read buffers and casting/quantizing temporaries between the weights it keeps. With
    glibc's default moving mmap threshold, blocks up to 32 MB land on the heap, and the freed ones, wedged
    between kept weights, stay resident: measured on Phi-2, the same int8 load ended at 3.2 GB or 9.5 GB
    of RSS from run to run (bf16: 5.8 or 7.4 GB). A fixed 1 MB threshold made it 3.2 GB every time. After
    loading the threshold is fixed at glibc's usual ceiling (32 MB), so repeated activation buffers
    reuse the heap, and freed pages are handed back with malloc_trim. Elsewhere than glibc: nothing.
    """
    libc = None
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


def umask() -> int:
    """This process's umask, read without changing it where Linux tells it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def user_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the mode a plain open/mkdir would give it
    under the user's umask (0644/0755 under umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def check_writable(path: str | os.PathLike, what: str = "") -> Path:
    """``path`` (a file or folder phikit is about to create) can be written: its nearest existing parent is a
    folder in which this user can make files (tried with an empty file, removed again). Called before slow
    work, so that a path that cannot be written fails in one line at once, not after the work."""
    path = Path(path)
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    label = f"{what} {path}" if what else str(path)
    if not where.is_dir():
        raise PhikitError(f"{label}: {where} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".phikit-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PhikitError(f"{label}: cannot write in {where} ({e.strerror or e})") from None
    return path


def _host_tag() -> str:
    """This machine's name and PID namespace (containers sharing a hostname do not share pids): what makes a
    pid in a temporary's name mean this process table."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    try:
        return f"{host}n{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


_HOST = _host_tag()


def temp_tag() -> str:
    """``host-pid``, in the name of every temporary file or folder phikit writes beside its outputs, so that a
    later run can tell the leftovers of a killed process (``sweep_stale``)."""
    return f"{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def sweep_stale(parent: Path, stem: str) -> None:
    """Delete what a phikit process on this machine left in ``parent`` when it was killed before it could clean
    up (SIGKILL, out of memory, a power cut; Ctrl-C cleans up itself): temporaries of an output whose name
    matches the regex ``stem`` (``.NAME.host-pid....tmp``, ``.NAME.tmp-host-pid-...``, ``.NAME.old-host-pid-...``)
    whose process no longer runs. Hidden names, so a user would not find them; a model's can be gigabytes. Said
    on stderr."""
    import shutil

    pattern = re.compile(rf"\.(?:{stem})\.(?:tmp-|old-)?{re.escape(_HOST)}-(\d+)[.-]")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = pattern.match(entry.name)
        if not found or _alive(int(found.group(1))):
            continue
        name = entry.name[1:].rsplit(".old-", 1)[0]
        if ".old-" in entry.name and (entry / name).exists() and not (parent / name).exists():
            try:  # killed between replace_folder's two renames: the previous output goes back in place
                os.replace(entry / name, parent / name)
                print(f"phikit: put {parent / name} back from {entry}, where a killed process left it", file=sys.stderr)
            except OSError:
                continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        print(f"phikit: removed {entry}, left unfinished by a process that was killed", file=sys.stderr)


def _temporary_beside(path: Path, folder: bool = False) -> Path:
    """A new temporary file (or folder) beside ``path``, its parents made (and what a killed process left there
    for the same path removed: ``sweep_stale``): where that cannot be made, a one-line error naming ``path``
    rather than the temporary name (a full disk keeps its own error)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent, re.escape(path.name))
        if folder:
            return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{temp_tag()}-"))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{temp_tag()}.", suffix=".tmp")
        os.close(fd)
        return Path(tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        check_writable(path)  # names what stands in the way
        raise PhikitError(f"cannot write {path} ({e.strerror or e})") from None


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file.
    The file gets the user's umask, as a plain write would."""
    tmp = _temporary_beside(path)
    try:
        write(Path(tmp))
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder(out: Path, write) -> Path:
    """``atomic_write``'s twin for a folder: ``write(tmp)`` fills a temporary folder beside ``out`` (the user's
    umask, as a plain mkdir would give), which then replaces ``out`` (``replace_folder``); a failure or an
    interrupt removes the temporary, so ``out`` is never half-written."""
    import shutil

    tmp = _temporary_beside(out, folder=True)  # named for this process: a killed one's is swept later
    try:
        user_mode(tmp, directory=True)
        write(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_folder(new: Path, out: Path) -> None:
    """Put the finished folder ``new`` at ``out`` (a sibling), replacing what is there without a moment where
    neither exists on disk: the old folder is renamed aside, the new one renamed into place, then the old
    one deleted (a crash in between leaves both, never neither)."""
    import shutil

    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{temp_tag()}-"))
        os.replace(out, old / out.name)
    os.replace(new, out)
    if old is not None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # a Ctrl-C while the old copy goes: the new one is in place; the old one goes too
            shutil.rmtree(old, ignore_errors=True)
            raise


INNER_FILES = ("model.gguf", "Modelfile")  # the files phikit writes one by one inside an output folder (Ollama's)
# what a folder phikit writes holds (a checkpoint, an adapter, an Ollama folder): --overwrite replaces no other
OUTPUT_MARKS = ("config.json", "adapter_config.json", INNER_FILES[1])
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def check_output_folder(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """``out`` may be written: new or empty (what a killed phikit process left in it removed), or ``overwrite`` of
    a folder holding a model (one of ``OUTPUT_MARKS`` beside weights, no subfolders); never a file or a symbolic
    link, never the source folder or one that contains it (replacing it would delete the source), never the
    working folder, a folder holding it, or a mount point."""
    if out.is_symlink():
        raise PhikitError(f"{out} is a symbolic link; give the folder it points to, or a new one")
    if out.exists() and not out.is_dir():
        raise PhikitError(f"{out} is a file; give a folder to write the checkpoint into")
    if source is not None:
        target, origin = out.resolve(), Path(source).resolve()
        if target == origin or target in origin.parents:
            raise PhikitError(f"{out} is or contains the source model {source}; writing there would delete it")
    if out.is_dir():  # what a killed export left inside (an Ollama folder's GGUF, its Modelfile) is not content
        sweep_stale(out, "|".join(re.escape(name) for name in INNER_FILES))
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not overwrite:
        raise PhikitError(
            f"{out} already exists and is not empty; choose a new folder or overwrite (--overwrite, overwrite=True)"
        )
    if out.exists():  # the output is renamed into place (replace_folder): never onto these
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise PhikitError(f"{out} is the working folder or holds it; write the model into a folder of its own")
        if os.path.ismount(out):
            raise PhikitError(f"{out} is a mount point; write the model into a folder inside it")
    if entries:  # overwrite: only a folder phikit could have written is replaced
        model = any((out / name).is_file() for name in OUTPUT_MARKS) and any(
            e.suffix in WEIGHT_SUFFIXES for e in entries
        )
        if not model or any(e.is_dir() and e.name != ".cache" for e in entries):  # .cache: huggingface's local-dir
            raise PhikitError(
                f"{out} does not look like a model folder (one of {', '.join(OUTPUT_MARKS)} beside weights, no "
                "subfolders), so overwriting it could delete files phikit did not write; remove it yourself or "
                "choose another folder"
            )
    check_writable(out)


def save_checkpoint(
    out: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: dict,
    tokenizer_folder: Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    weights_name: str = "model.safetensors",
    source: Path | None = None,
) -> Path:
    """Write a transformers-style checkpoint folder: config.json, safetensors (``weights_name``, sharded
    with an index past ``max_shard_bytes``) and the tokenizer files. Everything is written into a temporary
    folder that is renamed into place at the end, so an interrupted save never leaves a half-written
    checkpoint. ``source`` (the model folder being converted) may not be ``out`` or inside it: overwriting
    would delete it."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out)
    check_output_folder(out, overwrite, source)

    def write(tmp: Path) -> None:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state_dict.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.detach().to("cpu").contiguous()
            size += nbytes
        stem = weights_name.removesuffix(".safetensors")
        names = (
            [weights_name]
            if len(shards) == 1
            else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for file, shard in zip(names, shards):
            save_file(shard, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state_dict.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / f"{weights_name}.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_folder / name).is_file():
                    shutil.copyfile(tokenizer_folder / name, tmp / name)
        for written in tmp.iterdir():  # safetensors writes 0600: give every file the user's umask
            user_mode(written)

    return write_folder(out, write)
