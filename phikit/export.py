"""Export a Phi checkpoint (optionally with a LoRA adapter folded in) for other runtimes.

``export_hf`` writes a plain transformers checkpoint (what transformers, vLLM and llama.cpp's own converter
read); ``export_gguf`` writes one GGUF file that llama.cpp loads directly, laid out as llama.cpp's converter
(``convert_hf_to_gguf.py``) lays out the family: ``Phi2Model`` for Phi-1/1.5/2 (architecture ``phi2``,
separate q/k/v projections with biases, GPT-2 BPE vocabulary padded to the model's rows) and
``Phi3MiniModel`` for the Phi-3 family (architecture ``phi3``, fused qkv and gate|up, LongRoPE's factors as
``rope_factors_long/short`` tensors, no ``output`` tensor when the head is tied; Phi-3's SentencePiece
vocabulary, or the BPE one of Phi-4 and Phi-4-mini); norms in f32. ``export_ollama`` writes that GGUF plus
an Ollama ``Modelfile`` carrying phikit's prompt template (or the checkpoint's chat template) and stops.

Like ``api``, this module composes the core with ``lora`` (merging is part of exporting a fine-tune).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from phikit.checkpoint import (
    DTYPES,
    INNER_FILES,
    atomic_write,
    check_output_folder,
    check_writable,
    load_model,
    resolve_model_path,
    save_checkpoint,
    weight_files,
)
from phikit.config import PhiConfig, set_dtype
from phikit.errors import PhikitError
from phikit.models import CausalLM, read_config
from phikit.templates import ChatTemplate, Template, get_template

GGUF_ARCHS = {"phi": "phi2", "phi3": "phi3"}  # llama.cpp's architecture of each family

# --type -> the GGML type of the weight matrices (gguf-py's names). Every type gguf-py's numpy quantizers
# write, made the way llama.cpp makes it:
# - CONVERTER_TYPES as ``convert_hf_to_gguf.py --outtype`` writes them, from the checkpoint's own weights;
# - the others as ``llama-quantize`` makes them from the converter's f16 file: from the weights rounded to
#   f16, output.weight in Q8_0 (llama-quantize's choice, Q6_K, is a k-quant gguf-py cannot write; Q8_0 is
#   what llama-quantize itself takes where Q6_K's 256-value blocks do not fit a row).
# Left out: MXFP4, which llama.cpp uses only for mixture-of-experts tensors (Phi has none).
GGUF_TYPES = {
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q5_1": "Q5_1",
    "q5_0": "Q5_0",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
    "tq2_0": "TQ2_0",  # ternary: for models trained ternary (BitNet-style); any other model loses its weights
    "tq1_0": "TQ1_0",
    "f32": "F32",
}
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0")

# transformers names -> llama.cpp's (gguf-py's TENSOR_NAMES for MODEL_ARCH.PHI2 / PHI3); ".weight"/".bias" kept.
GGUF_TOP_NAMES = {
    "phi": {"model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm", "lm_head": "output"},
    "phi3": {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"},
}
GGUF_BLOCK_NAMES = {
    "phi": {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.dense": "attn_output",
        "mlp.fc1": "ffn_up",
        "mlp.fc2": "ffn_down",
    },
    "phi3": {
        "input_layernorm": "attn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
}
# the split patterns of the BPE pre-tokenizers llama.cpp knows by these names (Phi-4-mini: o200k; cl100k)
BPE_PRE_TOKENIZERS = {
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "dbrx": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
}

# An Ollama folder: the GGUF and the Modelfile (docs/modelfile.md) beside it, named once in checkpoint.INNER_FILES
OLLAMA_GGUF, MODELFILE = INNER_FILES


def export_hf(
    model: str | os.PathLike,
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``model`` (+ ``adapter`` merged) as a transformers ``CausalLM`` checkpoint folder: config.json
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
    hf = set_dtype(config.to_hf_dict(), str(target).removeprefix("torch."))
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

    ``gguf_type`` is one of ``GGUF_TYPES``, quantized by gguf-py's ``gguf.quants`` (llama.cpp's reference
    quantizers in numpy). For a checkpoint folder the file is, byte for byte, what llama.cpp makes of it:
    ``convert_hf_to_gguf.py --outtype TYPE`` for f32, f16, bf16, q8_0, tq1_0 and tq2_0; for q4_0, q4_1, q5_0
    and q5_1 the converter's f16 file run through ``llama-quantize --output-tensor-type q8_0 ... TYPE`` (plain
    llama-quantize differs only in output.weight, Q6_K where its rows fit 256-value blocks). As in llama.cpp,
    1-D tensors (norms, biases, LongRoPE's factors) stay f32, a matrix whose rows do not fit the type's blocks
    falls back to f16, and the ternary types keep token_embd and output in f16. Tensors are converted and
    written one at a time, so memory stays near one copy of the checkpoint as stored (fp32 when merging).
    """
    gguf = _import_gguf()
    if gguf_type not in GGUF_TYPES:
        raise PhikitError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    out_file = Path(out_file)
    if out_file.is_dir():
        raise PhikitError(f"{out_file} is a folder; a GGUF export is one file, e.g. {out_file / 'model.gguf'}")
    if out_file.exists() and not overwrite:
        raise PhikitError(
            f"{out_file} already exists; choose a new file name or overwrite (--overwrite, overwrite=True)"
        )
    check_writable(out_file)  # before the model loads
    folder, config = _full_precision_source(model)
    if folder.resolve() in out_file.resolve().parents:
        raise PhikitError(
            f"{out_file} is inside the source model's folder {folder}; it could replace the checkpoint's own "
            "files: write the GGUF file elsewhere"
        )
    if config.qk_layernorm:
        raise PhikitError(
            f"{folder / 'config.json'}: qk_layernorm is true, but llama.cpp's phi2 architecture has no q/k "
            "LayerNorms; export this model with --format hf instead"
        )
    vocab = gguf_vocabulary(folder, config)  # before the weights: a tokenizer llama.cpp cannot take fails fast
    net = _load_merged(folder, config, adapter, progress)
    file_type = gguf.LlamaFileType.ALL_F32 if gguf_type == "f32" else gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(path=None, arch=GGUF_ARCHS[config.family])
        try:
            plan = _tensor_plan(net, config, folder, gguf_type)
            n_params = sum(t.numel() for _, t, _, _ in plan)
            hub_id = None if Path(model).exists() else str(model)
            converter = gguf_type in CONVERTER_TYPES
            _add_metadata(writer, config, folder, hub_id, n_params, file_type if converter else None)
            vocab.add_to(writer)
            if not converter:  # llama-quantize copies the f16 file's keys, then sets these two: they move last
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                writer.add_file_type(file_type)
            for name, tensor, qtype, _ in plan:
                nbytes = _gguf_nbytes(tuple(tensor.shape), qtype)
                writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, tensor, qtype, via_f16 in tqdm(
                plan, desc="writing GGUF", unit="tensor", disable=None if progress else True
            ):
                data = tensor.detach().to("cpu", torch.float32).numpy()
                if via_f16:  # what llama-quantize reads from the converter's f16 file
                    data = data.astype(np.float16).astype(np.float32)
                writer.write_tensor_data(gguf.quants.quantize(data, qtype))
        finally:
            writer.close()

    made = [p for p in out_file.parents if not p.exists()]  # folders this export creates, innermost first
    try:
        atomic_write(out_file, write)
    except BaseException:
        for folder_made in made:  # left empty by the failure: they go again
            with contextlib.suppress(OSError):
                folder_made.rmdir()
        raise
    return out_file


def export_ollama(
    model: str | os.PathLike,
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    gguf_type: str = "f16",
    template: str | Template | ChatTemplate = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a folder for ``ollama create NAME -f OUT/Modelfile``: ``model.gguf`` (``export_gguf``) and a
    Modelfile whose TEMPLATE renders prompts as phikit's ``template`` does (``auto``: the checkpoint's chat
    template where it has one, else ``instruct``) and whose ``PARAMETER stop`` lines end replies where phikit
    ends them (the template's stop strings; with a chat template, the tokenizer's stop tokens). Each file is
    written atomically, the GGUF first, so a Modelfile never points at a missing or half-written model."""
    from phikit.tokenizer import Tokenizer

    out = Path(out)
    folder, config = _full_precision_source(model)
    tokenizer = Tokenizer(folder)
    if template == "auto":
        template = "chat" if tokenizer.chat_template else "instruct"
    template = get_template(template, tokenizer)
    check_output_folder(out, overwrite, folder)
    stops = [tokenizer.decode([i]) for i in sorted(tokenizer.stop_ids)] if isinstance(template, ChatTemplate) else None
    # a 128k (LongRoPE) model's window would have Ollama keep a cache of tens of GB for every chat (Phi-3.5-mini:
    # 51 GB at fp16) and take the long factors for short prompts: its original context instead, as Ollama's own
    longrope = getattr(config, "longrope", None)
    context = longrope.original_max_position_embeddings if longrope else config.max_position_embeddings
    modelfile = ollama_modelfile(template, f"./{OLLAMA_GGUF}", context, _license(folder), stops)
    existed = out.exists()
    try:
        export_gguf(model, out / OLLAMA_GGUF, adapter, gguf_type, overwrite=True, progress=progress)
        atomic_write(out / MODELFILE, lambda tmp: tmp.write_text(modelfile, encoding="utf-8"))
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a folder made for this export and left empty by its failure goes again
        raise
    return out


def ollama_modelfile(
    template: str | Template | ChatTemplate,
    source: str,
    context_length: int | None = None,
    license_text: str | None = None,
    stops: list[str] | None = None,
) -> str:
    """An Ollama Modelfile (docs/modelfile.md) for the GGUF at ``source``, with phikit's ``template``.

    TEMPLATE is Go template syntax over Ollama's ``.System``, ``.Prompt`` and ``.Response``, executed per turn.
    A format template: ``{prompt}`` becomes ``{{ .Prompt }}``; a SYSTEM prompt, if a user sets one, goes first
    on its own line. Earlier turns of a chat render with their reply, ``{{ .Response }}``, after a space and
    followed by the template's separator, as phikit's ``render_chat`` does (phikit also strips the reply; Go
    templates cannot); for the turn being answered Ollama drops everything from the ``.Response`` block on,
    leaving exactly ``template.render(prompt)``. A chat template: see ``_chat_go_template``. Values with a
    newline or a quote are quoted with triple double quotes, others with double quotes; the grammar has no
    escapes, so a newline in a stop string is a real newline inside the quotes. ``PARAMETER stop``: ``stops``
    where given, else the template's stop strings. ``PARAMETER num_ctx`` is ``context_length``.
    """
    if isinstance(template, ChatTemplate):
        text = _chat_go_template(template)
    else:
        template = get_template(template)
        before, _, after = template.prompt.partition("{prompt}")
        text = (
            "{{ if .System }}{{ .System }}\n{{ end }}"
            + _go_literal(before)
            + "{{ .Prompt }}"
            + _go_literal(after)
            + "{{ if .Response }} {{ .Response }}"
            + _go_literal(template.separator)
            + "{{ end }}"
        )
    lines = [
        f"# Ollama Modelfile written by phikit (template {template.name}); make the model with",
        "#   ollama create NAME -f Modelfile",
        f"FROM {source}",
        f"TEMPLATE {_modelfile_quote(text)}",
    ]
    lines += [f"PARAMETER stop {_modelfile_quote(stop)}" for stop in (template.stop if stops is None else stops)]
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    if license_text and '"""' not in license_text:
        lines.append(f"LICENSE {_modelfile_quote(license_text.strip())}")
    return "\n".join(lines) + "\n"


def _chat_go_template(template: ChatTemplate) -> str:
    """A checkpoint's Jinja chat template as Ollama's per-turn Go template, for templates that write each
    message on its own (Phi-3's ``<|user|>\\n{content}<|end|>\\n``, Phi-4-mini's ``<|user|>{content}<|end|>``):
    each role's text around its content is found by rendering one-message conversations with a marker for
    the content, and the result is checked by rendering whole conversations both ways. Gives
    ``{{ if .System }}<system text>{{ end }}{{ if .Prompt }}<user text>{{ end }}<generation prompt>
    {{ .Response }}<assistant's closing text>``, as Ollama's own phi3 Modelfile; a template it cannot write so
    (one that looks across messages) is refused naming why."""
    marker = "\x00PHIKIT\x00"
    ending = template.render_messages([], add_generation_prompt=False)  # what closes a conversation (EOS)
    start = template.render_messages([], add_generation_prompt=True)

    def around(role: str) -> tuple[str, str]:
        text = template.render_messages([{"role": role, "content": marker}], add_generation_prompt=False)
        if not text.endswith(ending) or text.count(marker) != 1:
            raise PhikitError("the checkpoint's chat template does not write messages one by one; give --template")
        before, after = text[: len(text) - len(ending)].split(marker)
        return before, after

    (sys_before, sys_after), (user_before, user_after), (bot_before, bot_after) = map(
        around, ("system", "user", "assistant")
    )
    generation = start[len(ending) :] if start.startswith(ending) else start
    conversations = [
        [{"role": "user", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for messages in conversations:
        by_parts = ""
        wrappers = {"system": (sys_before, sys_after), "user": (user_before, user_after)}
        for m in messages:
            before, after = wrappers.get(m["role"], (bot_before, bot_after))
            by_parts += before + m["content"] + after
        if template.render_messages(messages, add_generation_prompt=True) != by_parts + generation:
            raise PhikitError("the checkpoint's chat template does not write messages one by one; give --template")
    if generation != bot_before:
        raise PhikitError("the chat template's generation prompt is not its assistant turn's opening; give --template")
    go = _go_literal
    return (
        f"{{{{ if .System }}}}{go(sys_before)}{{{{ .System }}}}{go(sys_after)}{{{{ end }}}}"
        f"{{{{ if .Prompt }}}}{go(user_before)}{{{{ .Prompt }}}}{go(user_after)}{{{{ end }}}}"
        f"{go(bot_before)}{{{{ .Response }}}}{go(bot_after)}"
    )


def _go_literal(text: str) -> str:
    """``text`` as literal output of a Go template that Ollama's Modelfile parser keeps as it is: plain
    characters as they are; braces (``{`` next to an action would change it: ``{{{ .Prompt }}}``), double
    quotes (the Modelfile's own quotes have no escapes) and characters a parser may trim or a reader cannot
    see (controls, no-break and other Unicode spaces, zero-width joiners, other format characters) inside
    ``{{ "..." }}`` string actions, written with Go's escapes."""
    out, special = [], []

    def flush() -> None:
        if special:
            out.append('{{ "' + "".join(_go_escape(ch) for ch in special) + '" }}')
            special.clear()

    for ch in text:
        if ch in '{}"' or (ch not in " \n" and unicodedata.category(ch)[0] in "CZ"):
            special.append(ch)
        else:
            flush()
            out.append(ch)
    flush()
    return "".join(out)


def _go_escape(ch: str) -> str:
    """One character inside a Go interpreted string literal."""
    if ch in '"\\':
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    if ch.isprintable() and ch not in "\u00a0":
        return ch
    return f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}"


def _modelfile_quote(value: str) -> str:
    """A Modelfile value in quotes: triple quotes where it spans lines or holds a quote. The grammar has no
    escapes, so a value holding three quotes or ending with one (it would run into the closing ones) cannot
    be written: a PhikitError saying so."""
    if '"""' in value or (value.endswith('"') and ("\n" in value or '"' in value)):
        raise PhikitError(
            f"{value!r} cannot be written in an Ollama Modelfile, whose quotes have no escapes; "
            'use a template and stop strings without """ and not ending with "'
        )
    return f'"""{value}"""' if "\n" in value or '"' in value else f'"{value}"'


def _license(folder: Path) -> str | None:
    """The checkpoint's license text (microsoft/phi-2 ships LICENSE), for the Modelfile's LICENSE."""
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8", errors="replace")
    return None


def gguf_tensor_name(name: str, family: str = "phi") -> str:
    """llama.cpp's name for a transformers tensor of ``family``: ``model.layers.3.mlp.fc1.bias`` ->
    ``blk.3.ffn_up.bias`` (phi2), ``model.layers.3.mlp.gate_up_proj.weight`` -> ``blk.3.ffn_up.weight`` (phi3)."""
    module, _, kind = name.rpartition(".")
    top, block = GGUF_TOP_NAMES[family], GGUF_BLOCK_NAMES[family]
    if module in top:
        return f"{top[module]}.{kind}"
    parts = module.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in block:
        return f"blk.{parts[2]}.{block[parts[3]]}.{kind}"
    arch = GGUF_ARCHS[family]
    raise PhikitError(f"tensor {name} has no llama.cpp {arch} counterpart; the model cannot be exported to GGUF")


class GGUFVocabulary:
    """The tokenizer keys a GGUF file carries, as llama.cpp's converter writes them for the checkpoint:
    ``model`` "gpt2" (byte-level BPE: Phi-2, Phi-4, Phi-4-mini; with merges) or "llama" (SentencePiece:
    Phi-3/3.5, with scores), the pre-tokenizer's name, tokens, token types, and gguf-py's ``SpecialVocab``
    (special ids, add_bos/add_eos, the chat template)."""

    def __init__(self, folder: Path, model: str, pre: str, tokens: list, token_types: list[int], scores=None):
        import gguf

        self.folder, self.model, self.pre = folder, model, pre
        self.tokens, self.token_types, self.scores = tokens, token_types, scores
        # special ids, add_bos/add_eos, chat template and (BPE) merges: read once, written by every export
        self.special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
        if model == "gpt2" and not self.special.merges:
            raise PhikitError(
                f"{folder}: no BPE merges found in tokenizer.json or merges.txt; the tokenizer is incomplete"
            )

    def add_to(self, writer) -> None:
        import gguf

        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)
        if self.model == "llama":
            return
        if not any(gguf.Keys.Tokenizer.ADD_EOS in kv for kv in writer.kv_data):
            # the gguf-py llama.cpp vendors sets it (false) for a ByteLevel post-processor, Phi's; released
            # gguf-py (0.19) does not: written where the converter writes it, last
            writer.add_add_eos_token(False)


def gguf_vocabulary(folder: Path, config) -> GGUFVocabulary:
    """The checkpoint's tokenizer as llama.cpp's converter writes it (``Phi2Model`` / ``Phi3MiniModel``): a
    Phi-3-family checkpoint whose tokenizer_config.json names GPT2Tokenizer (Phi-4, Phi-4-mini) and every
    Phi-2 take the byte-level BPE path, other Phi-3 checkpoints the SentencePiece one (tokenizer.model).
    Built once per tokenizer (its files unchanged) and family in a process: o200k's 200k tokens and 446k
    merges take seconds to read."""
    files = sorted(
        f for f in folder.iterdir() if f.name.startswith(("tokenizer", "added_tokens", "special", "vocab", "merges"))
    )
    key = (
        str(folder.resolve()),
        config.family,
        config.vocab_size,
        tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files),
    )
    if key not in _VOCABULARIES:
        _VOCABULARIES.clear()  # one at a time: they are large
        _VOCABULARIES[key] = _gguf_vocabulary(folder, config)
    return _VOCABULARIES[key]


_VOCABULARIES: dict[tuple, GGUFVocabulary] = {}


def _gguf_vocabulary(folder: Path, config) -> GGUFVocabulary:
    if config.family == "phi3":
        settings = folder / "tokenizer_config.json"
        tokenizer_class = json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None
        if tokenizer_class != "GPT2Tokenizer":
            return _sentencepiece_vocabulary(folder, config.vocab_size)
    tokens, types, pre = gguf_vocab(folder, config.vocab_size)
    return GGUFVocabulary(folder, "gpt2", pre, tokens, types)


def gguf_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """The GGUF token list, token types and BPE pre-tokenizer name of a byte-level BPE tokenizer.

    As llama.cpp's converter: tokens in their byte-level form (``Ġthe``), ids the tokenizer lacks up to the
    model's ``vocab_size`` rows filled with ``[PAD<id>]`` of type UNUSED (Phi-2: 50295 tokens, 51200 rows),
    added special tokens (and ``<|...|>``) CONTROL, other added tokens USER_DEFINED.

    The converter names the pre-tokenizer by hashing how the tokenizer splits a test string; we name it by
    the split rule itself, for the ones the Phi family uses: GPT-2's regex (microsoft/phi-2 hashes to
    ``phi-2``, GPT-2's own tokenizer to ``gpt-2``, which llama.cpp runs identically; ``phi-2`` when it has
    Phi's added whitespace-run tokens), o200k's (Phi-4-mini: ``gpt-4o``) and cl100k's (``dbrx``).
    """
    import gguf

    from phikit.tokenizer import Tokenizer

    backend = Tokenizer(folder)._tok  # the ``tokenizers.Tokenizer`` (also built from vocab.json + merges.txt)
    model_type = type(backend.model).__name__
    added = backend.get_added_tokens_decoder()
    pre = _bpe_pre_tokenizer(backend, added) if model_type == "BPE" else None
    if pre is None:
        raise PhikitError(
            f"{folder}: the tokenizer is {model_type} with a pre-tokenizer llama.cpp's converter does not name "
            "(GPT-2's, o200k's or cl100k's split rule); export with --format hf instead"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise PhikitError(
            f"{folder}: the tokenizer has id {max(vocab.values())} but config.json vocab_size is {vocab_size}; "
            "the tokenizer does not belong to this model"
        )
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
    return tokens, [int(t) for t in types], pre


def _bpe_pre_tokenizer(backend, added) -> str | None:
    """llama.cpp's name for a byte-level BPE tokenizer's split rule, or None for one it has no name for."""
    spec = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):  # GPT-2's regex
        whitespace_runs = any(not t.special and t.content.strip() == "" for t in added.values())
        return "phi-2" if whitespace_runs else "gpt-2"
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[1].get("type") == "ByteLevel"
        and not parts[1].get("use_regex", True)
    ):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        return next((name for name, known in BPE_PRE_TOKENIZERS.items() if known == pattern), None)
    return None


def _sentencepiece_vocabulary(folder: Path, vocab_size: int) -> GGUFVocabulary:
    """Phi-3's SentencePiece vocabulary as ``Phi3MiniModel.set_vocab`` writes it: every row ``[PAD<id>]``
    (UNUSED, score -10000) unless tokenizer.model has the piece (its score and type: NORMAL, UNKNOWN, CONTROL,
    UNUSED, BYTE); then the added tokens of added_tokens.json, tokenizer_config.json's added_tokens_decoder
    and tokenizer.json's added_tokens, in that order, USER_DEFINED with score -1000 (CONTROL where special)."""
    import gguf

    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise PhikitError(f"{folder}: no tokenizer.model; llama.cpp's converter writes Phi-3's vocabulary from it")
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise PhikitError("exporting Phi-3's SentencePiece vocabulary needs: pip install sentencepiece") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_file))
    kinds = gguf.TokenType  # the converter's SentencePieceTokenTypes has the same values
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [kinds.UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i)
        types[i] = (
            kinds.UNKNOWN
            if sp.IsUnknown(i)
            else kinds.CONTROL
            if sp.IsControl(i)
            else kinds.UNUSED
            if sp.IsUnused(i)
            else kinds.BYTE
            if sp.IsByte(i)
            else kinds.NORMAL
        )

    def add(token_id: int, text: str, special: bool = False) -> None:
        tokens[token_id], scores[token_id] = text.encode("utf-8"), -1000.0
        types[token_id] = kinds.CONTROL if special else kinds.USER_DEFINED

    for text, token_id in _json(folder / "added_tokens.json").items():
        if token_id < vocab_size:
            add(token_id, text)
    for token_id, data in _json(folder / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        add(int(token_id), data["content"], bool(data.get("special")))
    for data in _json(folder / "tokenizer.json").get("added_tokens", []):
        add(int(data["id"]), data["content"], bool(data.get("special")))
    return GGUFVocabulary(folder, "llama", "default", tokens, [int(t) for t in types], scores)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


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
    config = read_config(folder / "config.json")
    quantization = config.extra.get("quantization_config")
    if quantization:
        kind = quantization.get("format") or quantization.get("quant_method") or "quantized"
        raise PhikitError(
            f"{folder / 'config.json'} has quantization_config ({kind}): the checkpoint is quantized; use the "
            "full-precision checkpoint it came from (for a smaller GGUF, export that with --type q8_0 or q4_0)"
        )
    return folder, config


def _load_merged(folder: Path, config: PhiConfig, adapter, progress: bool, dtype=None) -> CausalLM:
    """The model on CPU with the adapter folded in: fp32 when merging, else ``dtype`` or the dtype it is stored
    in (exact, and half the memory of fp32 for an fp16/bf16 checkpoint)."""
    if adapter is None:
        stored = dtype or DTYPES.get(config.torch_dtype or "float32", torch.float32)
        return load_model(folder, dtype=stored, device="cpu", progress=progress)
    from phikit.lora import load_adapter, merge_lora

    net = load_model(folder, dtype=torch.float32, device="cpu", progress=progress)
    load_adapter(net, adapter)
    return merge_lora(net)


def _tensor_plan(net: CausalLM, config, folder: Path, gguf_type: str) -> list[tuple[str, torch.Tensor, object, bool]]:
    """(GGUF name, tensor, GGML type, round to f16 first) of every tensor, with llama.cpp's type rules:
    1-D tensors f32; matrices ``gguf_type``, or f16 where its blocks do not fit a row; the ternary types keep
    token_embd and output in f16 (the converter's rule), the llama-quantize types put output (token_embd
    where the head is tied and there is no output) in Q8_0.

    Order: the converter's: LongRoPE's factor tensors first (its extra tensors), then the stored tensors in
    the order it meets them (shard files sorted by name, each in its safetensors header's order); tensors
    not stored under their own name (a legacy checkpoint's renamed ones) follow in the model's order; a head
    tied to the embedding is not written (llama.cpp reads token_embd for it). llama-quantize writes its
    input's tensors sorted by (layer, name), the ones outside layers first; so do the types made its way."""
    import gguf

    state = net.state_dict()
    tied = (
        "lm_head.weight" in state
        and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    )
    if tied:
        del state["lm_head.weight"]
    stored = [name for name in _stored_names(folder) if name in state]
    order = stored + [name for name in state if name not in set(stored)]
    matrix_type = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type]]
    via_f16 = gguf_type not in CONVERTER_TYPES
    head = "token_embd.weight" if tied else "output.weight"
    plan = []
    if getattr(config, "longrope", None) is not None:
        longrope = config.longrope
        for name, factors in (
            ("rope_factors_long.weight", longrope.long_factor),
            ("rope_factors_short.weight", longrope.short_factor),
        ):
            plan.append((name, torch.tensor(factors, dtype=torch.float32), gguf.GGMLQuantizationType.F32, False))
    for name in order:
        tensor, gguf_name = state[name], gguf_tensor_name(name, config.family)
        qtype = matrix_type
        if tensor.dim() <= 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif gguf_name.split(".")[0] in ("token_embd", "output") and gguf_type.startswith("tq"):
            qtype = gguf.GGMLQuantizationType.F16
        elif gguf_name == head and via_f16:
            qtype = gguf.GGMLQuantizationType.Q8_0
        if tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16
        plan.append((gguf_name, tensor, qtype, via_f16 and tensor.dim() > 1))
    if via_f16:
        plan.sort(key=lambda entry: (_layer(entry[0]), entry[0]))
    return plan


def _layer(gguf_name: str) -> int:
    """The block a GGUF tensor belongs to (``blk.3.attn_q.weight`` -> 3), -1 outside the blocks."""
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1


def _stored_names(folder: Path) -> list[str]:
    """Tensor names as the safetensors files of ``folder`` store them, file by file (none for .bin files)."""
    names = []
    for file in weight_files(folder):
        if file.suffix != ".safetensors":
            return []
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))  # keeps the file's key order
        names += [name for name in header if name != "__metadata__"]
    return names


def _gguf_nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def _add_metadata(writer, config, folder: Path, hub_id: str | None, n_params: int, file_type) -> None:
    """The general.* and architecture keys llama.cpp's converter writes for the family, in its order
    (general.file_type and general.quantization_version left to the caller when ``file_type`` is None).

    general.* come from gguf-py's ``Metadata`` as in the converter (name from the folder's name or model
    card, size label, license and tags of a README, sampling defaults of generation_config.json); a model
    given as a Hub id is named by it, as the converter names a ``--remote`` one.
    phi2: two keys are written from the config where the converter assumes Phi-2's values:
    feed_forward_length (it writes 4 x hidden) and head_count_kv (it writes head_count); both are equal for
    every Phi release; rope.freq_base only where it differs from llama.cpp's default 10000 (the converter
    omits it). phi3 (``Phi3MiniModel``): LongRoPE's attention factor first (the converter sets it while
    collecting its extra tensors, before any other key), computed as it does from max / original context;
    rope.dimension_count as int(partial factor x hidden) / heads; sliding_window 0 where there is none.
    """
    import gguf

    if getattr(config, "longrope", None) is not None:
        original = config.original_max_position_embeddings
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    metadata = gguf.Metadata.load(None, folder, None, n_params)
    metadata.name = hub_id or metadata.name or folder.name
    metadata.size_label = metadata.size_label or gguf.size_label(n_params, 0, 0, 0)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    writer.add_context_length(config.max_position_embeddings)
    if config.family == "phi3":
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if config.family == "phi3":
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(
            int(config.partial_rotary_factor * config.hidden_size) // config.num_attention_heads
        )
        writer.add_rope_freq_base(config.rope_theta)
        if file_type is not None:
            writer.add_file_type(file_type)
        writer.add_sliding_window(config.sliding_window or 0)
    else:
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_rope_dimension_count(config.rotary_dim)
        if config.rope_theta != 10000.0:
            writer.add_rope_freq_base(config.rope_theta)
        if file_type is not None:
            writer.add_file_type(file_type)
        writer.add_add_bos_token(False)  # Phi is trained without a BOS token
    if file_type is not None:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
