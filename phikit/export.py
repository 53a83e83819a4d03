"""Export a Phi checkpoint (optionally with a LoRA adapter folded in) for other runtimes.

``export_hf`` writes a plain transformers checkpoint (what transformers, vLLM and llama.cpp's own converter
read); ``export_gguf`` writes one GGUF file that llama.cpp loads directly, laid out as llama.cpp's converter
(``convert_hf_to_gguf.py``, class ``Phi2Model``) lays out microsoft/phi-2: architecture ``phi2``, separate
q/k/v projections with biases, norms and biases in f32, GPT-2 BPE vocabulary padded to the model's rows.

Like ``api``, this module composes the core with ``lora`` (merging is part of exporting a fine-tune).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from phikit.checkpoint import (
    DTYPES,
    atomic_write,
    check_output_folder,
    load_model,
    resolve_model_path,
    save_checkpoint,
)
from phikit.config import PhiConfig
from phikit.errors import PhikitError
from phikit.model import PhiForCausalLM

GGUF_ARCH = "phi2"  # llama.cpp runs Phi-1, Phi-1.5 and Phi-2 as this one architecture
GGUF_TYPES = ("f16", "q8_0", "f32")

# transformers names -> llama.cpp's (gguf-py's TENSOR_NAMES for MODEL_ARCH.PHI2); ".weight"/".bias" kept.
GGUF_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm", "lm_head": "output"}
GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.dense": "attn_output",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def export_hf(
    model: str | os.PathLike,
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``model`` (+ ``adapter`` merged) as a transformers ``PhiForCausalLM`` checkpoint folder: config.json
    with native ``phi`` keys, safetensors (sharded past 2 GB), tokenizer files. Loadable by transformers and vLLM.

    ``dtype`` (fp16, bf16, fp32) defaults to the checkpoint's own. Legacy remote-code checkpoints (``phi-msft``)
    come out in transformers' native layout, since the loader renames them. Without an adapter the weights are
    read in the target dtype directly (no fp32 copy of a 2.7B model); with one, they are merged in fp32.
    """
    if dtype is not None and dtype not in DTYPES:
        raise PhikitError(f"unknown dtype {dtype!r} for export; use one of fp16, bf16, fp32")
    folder, config = _full_precision_source(model)
    out = Path(out)
    check_output_folder(out, overwrite, folder)  # before loading: fail fast
    target = DTYPES.get(dtype or config.torch_dtype or "float32", torch.float32)
    net = _load_merged(folder, config, adapter, progress, dtype=None if adapter else target)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    if state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr():
        del state["lm_head.weight"]  # tied: safetensors refuses shared tensors, transformers re-ties on load
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(target).removeprefix("torch.")
    return save_checkpoint(out, state, hf, folder, overwrite=overwrite, source=folder)


def export_gguf(
    model: str | os.PathLike,
    out_file: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    gguf_type: str = "f16",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``model`` (+ ``adapter`` merged) as one GGUF file for llama.cpp, atomically.

    ``gguf_type``: f16, q8_0 (quantized by gguf-py's own ``gguf.quants``, bit-identical to llama.cpp's
    converter) or f32. As in llama.cpp, 1-D tensors (norms, biases) stay f32 whatever the type, and the token
    embedding and output matrix take the file's type too; a matrix whose rows are not a multiple of 32 values
    cannot be Q8_0 and falls back to f16, as the converter does. Tensors are converted and written one at a
    time, so memory stays near one copy of the checkpoint as stored (fp32 when merging an adapter).
    """
    gguf = _import_gguf()
    if gguf_type not in GGUF_TYPES:
        raise PhikitError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    out_file = Path(out_file)
    if out_file.is_dir():
        raise PhikitError(f"{out_file} is a folder; a GGUF export is one file, e.g. {out_file / 'model.gguf'}")
    if out_file.exists() and not overwrite:
        raise PhikitError(f"{out_file} already exists; choose a new file name or pass --overwrite")
    folder, config = _full_precision_source(model)
    if config.qk_layernorm:
        raise PhikitError(
            f"{folder / 'config.json'}: qk_layernorm is true, but llama.cpp's phi2 architecture has no q/k "
            "LayerNorms; export this model with --format hf instead"
        )
    tokens, token_types, pre = gguf_vocab(folder, config.vocab_size)
    net = _load_merged(folder, config, adapter, progress)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(path=None, arch=GGUF_ARCH)
        try:
            plan = _tensor_plan(net, file_type)
            _add_metadata(writer, config, str(model), file_type, sum(t.numel() for _, t, _ in plan))
            _add_vocab(writer, folder, config.vocab_size, tokens, token_types, pre)
            for name, tensor, qtype in plan:
                nbytes = _gguf_nbytes(tuple(tensor.shape), qtype)
                writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, tensor, qtype in tqdm(plan, desc="writing GGUF", unit="tensor", disable=not progress):
                data = gguf.quants.quantize(tensor.detach().to("cpu", torch.float32).numpy(), qtype)
                writer.write_tensor_data(data)
        finally:
            writer.close()

    atomic_write(out_file, write)
    return out_file


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for a ``PhiForCausalLM`` tensor: ``model.layers.3.mlp.fc1.bias`` -> ``blk.3.ffn_up.bias``."""
    module, _, kind = name.rpartition(".")
    if module in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[module]}.{kind}"
    parts = module.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in GGUF_BLOCK_NAMES:
        return f"blk.{parts[2]}.{GGUF_BLOCK_NAMES[parts[3]]}.{kind}"
    raise PhikitError(f"tensor {name} has no llama.cpp phi2 counterpart; the model cannot be exported to GGUF")


def gguf_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """The GGUF token list, token types and BPE pre-tokenizer name of the checkpoint's tokenizer.

    As llama.cpp's converter: tokens in their byte-level form (``Ġthe``), ids the tokenizer lacks up to the
    model's ``vocab_size`` rows filled with ``[PAD<id>]`` of type UNUSED (Phi-2: 50295 tokens, 51200 rows),
    added special tokens (and ``<|...|>``) CONTROL, other added tokens USER_DEFINED.

    The converter names the pre-tokenizer by hashing how the tokenizer splits a test string; for
    microsoft/phi-2 that gives ``phi-2`` and for GPT-2's own tokenizer ``gpt-2``, which llama.cpp runs
    identically (GPT-2's split regex). We check the tokenizer really is byte-level BPE with GPT-2's regex and
    name it as the converter would for those two: ``phi-2`` when it has Phi's added whitespace-run tokens.
    """
    import gguf

    from phikit.tokenizer import Tokenizer

    backend = Tokenizer(folder)._tok  # the ``tokenizers.Tokenizer`` (also built from vocab.json + merges.txt)
    model_type = type(backend.model).__name__
    pre_tokenizer = backend.pre_tokenizer
    if model_type != "BPE" or type(pre_tokenizer).__name__ != "ByteLevel" or not pre_tokenizer.use_regex:
        raise PhikitError(
            f"{folder}: the tokenizer is {model_type} with pre-tokenizer {type(pre_tokenizer).__name__}, not "
            "GPT-2's byte-level BPE that llama.cpp's phi2 expects; export with --format hf instead"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise PhikitError(
            f"{folder}: the tokenizer has id {max(vocab.values())} but config.json vocab_size is {vocab_size}; "
            "the tokenizer does not belong to this model"
        )
    added = backend.get_added_tokens_decoder()
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens in their normalized form
                token = backend.decode(backend.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or (token.startswith("<|") and token.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    whitespace_runs = any(not t.special and t.content.strip() == "" for t in added.values())
    return tokens, [int(t) for t in types], "phi-2" if whitespace_runs else "gpt-2"


def _import_gguf():
    """gguf-py (PyPI ``gguf``, maintained in llama.cpp's repository): its writer, reader and quantizers."""
    try:
        import gguf
    except ImportError:
        raise PhikitError("exporting to GGUF needs the gguf package: pip install gguf") from None
    return gguf


def _full_precision_source(model: str | os.PathLike) -> tuple[Path, PhiConfig]:
    """The model folder and config, refusing quantized checkpoints (ours or bitsandbytes/GPTQ ones)."""
    folder = resolve_model_path(model)
    config = PhiConfig.from_json(folder / "config.json")
    quantization = config.extra.get("quantization_config")
    if quantization:
        kind = quantization.get("format") or quantization.get("quant_method") or "quantized"
        raise PhikitError(
            f"{folder / 'config.json'} has quantization_config ({kind}): the checkpoint is quantized; export the "
            "full-precision checkpoint it came from (and use --type q8_0 for a smaller GGUF)"
        )
    return folder, config


def _load_merged(folder: Path, config: PhiConfig, adapter, progress: bool, dtype=None) -> PhiForCausalLM:
    """The model on CPU with the adapter folded in: fp32 when merging, else ``dtype`` or the dtype it is stored
    in (exact, and half the memory of fp32 for an fp16/bf16 checkpoint)."""
    if adapter is None:
        stored = dtype or DTYPES.get(config.torch_dtype or "float32", torch.float32)
        return load_model(folder, dtype=stored, device="cpu", progress=progress)
    from phikit.lora import load_adapter, merge_lora

    net = load_model(folder, dtype=torch.float32, device="cpu", progress=progress)
    load_adapter(net, adapter)
    return merge_lora(net)


def _tensor_plan(net: PhiForCausalLM, file_type) -> list[tuple[str, torch.Tensor, object]]:
    """(GGUF name, tensor, GGML type) of every tensor, in the model's order, with llama.cpp's type
    rules: 1-D tensors f32; matrices the file's type, f16 where Q8_0's 32-value blocks do not fit a row."""
    import gguf

    matrix_type = {
        gguf.LlamaFileType.ALL_F32: gguf.GGMLQuantizationType.F32,
        gguf.LlamaFileType.MOSTLY_F16: gguf.GGMLQuantizationType.F16,
        gguf.LlamaFileType.MOSTLY_Q8_0: gguf.GGMLQuantizationType.Q8_0,
    }[file_type]
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    plan = []
    for name, tensor in net.state_dict().items():
        if tensor.dim() <= 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif tensor.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
        else:
            qtype = matrix_type
        plan.append((gguf_tensor_name(name), tensor, qtype))
    return plan


def _gguf_nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def _add_metadata(writer, config: PhiConfig, model_name: str, file_type, n_params: int) -> None:
    """The general.* and phi2.* keys llama.cpp's converter writes for microsoft/phi-2.

    Two keys are written from the config where the converter assumes Phi-2's values: feed_forward_length
    (it writes 4 x hidden) and head_count_kv (it writes head_count); both are equal for every Phi release.
    rope.freq_base is written only when it differs from llama.cpp's default 10000 (the converter omits it).
    """
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(model_name).name or model_name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_rope_dimension_count(config.rotary_dim)
    if config.rope_theta != 10000.0:
        writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(file_type)
    writer.add_add_bos_token(False)  # Phi is trained without a BOS token
    writer.add_add_eos_token(False)  # and prompts do not end with EOS
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, folder: Path, vocab_size: int, tokens: list[str], token_types: list[int], pre: str) -> None:
    """GPT-2 BPE tokenizer keys; merges and special ids (bos/eos/unk: 50256 for Phi) read by gguf-py's own
    ``SpecialVocab`` from tokenizer.json / tokenizer_config.json / config.json, as the converter does."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise PhikitError(f"{folder}: no BPE merges found in tokenizer.json or merges.txt; the tokenizer is incomplete")
    special.add_to_gguf(writer, quiet=True)
