"""Export: HF folders checked with transformers (and PEFT for merged adapters), GGUF files read back with
gguf-py's own reader and checked against gguf-py's tensor-name tables for llama.cpp's phi2 and phi3 architectures, its
quantizers and transformers' view of Phi-2's tokenizer; Ollama Modelfiles read by a checker of Ollama's
documented grammar and its Go-template rendering. (benchmarks/bench_export_llamacpp.py compares whole files
with llama.cpp's own converter and llama-quantize, and runs them in llama.cpp.)"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import stat

import numpy as np
import pytest
import torch

import phikit
from phikit.cli import main
from phikit.errors import PhikitError
from phikit.export import CONVERTER_TYPES, GGUF_TYPES, export_gguf, export_hf, export_ollama
from phikit.templates import TEMPLATES

gguf = pytest.importorskip("gguf")


def ids_for(hf, n=11):
    return torch.randint(0, hf.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


def peft_adapter(hf, folder):
    """A PEFT LoRA adapter on the attention projections with random (non-zero) B, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    base = type(hf)(hf.config).eval()
    base.load_state_dict(hf.state_dict())
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "dense"], task_type="CAUSAL_LM"),
    )
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(folder)
    return model.eval()


def expected_gguf_names(n_layers: int) -> set[str]:
    """Names llama.cpp expects for a phi2 model, from gguf-py's tables (not ours), less the optional ones
    a Phi checkpoint has no counterpart for: the fused attn_qkv (the converter writes q/k/v apart) and
    ffn_norm (Phi's block has one LayerNorm, attn_norm, feeding attention and MLP)."""
    names = set()
    for tensor in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI2]:
        template = gguf.TENSOR_NAMES[tensor]
        if tensor in (gguf.MODEL_TENSOR.ATTN_QKV, gguf.MODEL_TENSOR.FFN_NORM):
            continue
        for layer in range(n_layers) if "{bid}" in template else [None]:
            base = template.format(bid=layer)
            names.add(f"{base}.weight")
            if tensor not in (gguf.MODEL_TENSOR.TOKEN_EMBD,):
                names.add(f"{base}.bias")
    return names


def tensors(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def gguf_name(hf_name: str) -> str:
    from phikit.export import gguf_tensor_name

    return gguf_tensor_name(hf_name)


# ---- HF ----


def test_hf_export_loads_in_transformers_with_equal_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, hf = tiny
    out = export_hf(folder, tmp_path / "hf")
    ids = ids_for(hf)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file()
    half = export_hf(folder, tmp_path / "hf16", dtype="fp16")
    from safetensors import safe_open

    with safe_open(half / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
    assert AutoModelForCausalLM.from_pretrained(half, dtype="auto").dtype == torch.float16  # as stored, not fp32


def test_hf_export_with_an_adapter_equals_peft(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, hf = tiny
    reference = peft_adapter(hf, tmp_path / "adapter")
    out = export_hf(folder, tmp_path / "merged", adapter=tmp_path / "adapter")
    ids = ids_for(hf)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


# ---- GGUF ----


def test_gguf_f32_holds_every_tensor_under_llama_cpp_names(tiny_small_vocab, tmp_path):
    folder, hf = tiny_small_vocab
    out = export_gguf(folder, tmp_path / "m.gguf", gguf_type="f32")
    reader, found = tensors(out)
    assert field(reader, "general.architecture") == "phi2"
    assert set(found) == expected_gguf_names(hf.config.num_hidden_layers)
    for name, value in hf.state_dict().items():
        t = found[gguf_name(name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(t.data).reshape(value.shape), value.numpy())


def test_gguf_metadata_and_vocabulary(tiny, tmp_path, vocab_size):
    from tokenizers import Tokenizer

    folder, hf = tiny
    c = hf.config
    reader, _ = tensors(export_gguf(folder, tmp_path / "m.gguf"))
    assert field(reader, "phi2.block_count") == c.num_hidden_layers
    assert field(reader, "phi2.embedding_length") == c.hidden_size
    assert field(reader, "phi2.feed_forward_length") == c.intermediate_size
    assert field(reader, "phi2.attention.head_count") == c.num_attention_heads
    assert field(reader, "phi2.context_length") == c.max_position_embeddings
    head_dim = c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None))
    assert field(reader, "phi2.rope.dimension_count") == int(head_dim * factor)
    assert field(reader, "phi2.attention.layer_norm_epsilon") == pytest.approx(c.layer_norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == vocab_size
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ("Hello world", " def add(a, b):", "caf\u00e9"):
        for i in reference.encode(text).ids:
            assert tokens[i] == reference.id_to_token(i)
    eos = reference.token_to_id("<|endoftext|>")
    assert tokens[eos] == "<|endoftext|>" and types[eos] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.eos_token_id") == eos
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    padded = reference.get_vocab_size()
    if padded < vocab_size:
        assert types[padded] == gguf.TokenType.UNUSED


def test_gguf_q8_0_matrices_within_quantization_error(tiny_small_vocab, tmp_path):
    folder, hf = tiny_small_vocab
    _, found = tensors(export_gguf(folder, tmp_path / "q.gguf", gguf_type="q8_0"))
    for name, value in hf.state_dict().items():
        t = found[gguf_name(name)]
        if value.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape))
        # one scale d = max|x| / 127 per 32 values, stored in fp16: error <= d/2 + 127 d 2^-11
        d = value.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
        assert ((got - value).reshape(-1, 32).abs() <= d * (0.5 + 127 / 2048) * 1.001).all(), name


def test_gguf_with_an_adapter_holds_the_merged_weights(tiny, tmp_path):
    folder, hf = tiny
    reference = peft_adapter(hf, tmp_path / "adapter")
    merged = reference.merge_and_unload().state_dict()
    _, found = tensors(export_gguf(folder, tmp_path / "m.gguf", adapter=tmp_path / "adapter", gguf_type="f32"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.dense.weight"):
        got = np.asarray(found[gguf_name(name)].data).reshape(merged[name].shape)
        np.testing.assert_allclose(got, merged[name].numpy(), rtol=0, atol=1e-6)


def test_gguf_errors_and_atomic_writes(tiny, checkpoint_factory, tmp_path, monkeypatch):
    folder, _ = tiny
    out = tmp_path / "m.gguf"
    export_gguf(folder, out)
    before = out.read_bytes()
    with pytest.raises(PhikitError, match="already exists"):
        export_gguf(folder, out)
    with pytest.raises(PhikitError, match="is a folder"):
        export_gguf(folder, tmp_path)
    with pytest.raises(PhikitError, match="unknown GGUF type"):
        export_gguf(folder, tmp_path / "x.gguf", gguf_type="q4_k")
    qk_folder, _ = checkpoint_factory(qk_layernorm=True)
    with pytest.raises(PhikitError, match="qk_layernorm"):
        export_gguf(qk_folder, tmp_path / "qk.gguf")
    quantized = phikit.save_quantized(phikit.load(folder, dtype="fp32", device="cpu", quantize="int8"), tmp_path / "q")
    with pytest.raises(PhikitError, match="quantized"):
        export_gguf(quantized, tmp_path / "q.gguf")

    calls = []

    def failing(data, qtype):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return real(data, qtype)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, out, overwrite=True)
    assert out.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.gguf")) == ["m.gguf"]
    calls.clear()
    with pytest.raises(OSError, match="disk full"):  # into folders it makes: they go again
        export_gguf(folder, tmp_path / "new" / "deeper" / "m.gguf")
    assert not (tmp_path / "new").exists()


def test_export_command(tiny, tmp_path, capsys):
    folder, _ = tiny
    assert main(["export", "--model", str(folder), "--format", "gguf", "--type", "q8_0", str(tmp_path / "a.gguf")]) == 0
    assert "wrote" in capsys.readouterr().err
    reader, _ = tensors(tmp_path / "a.gguf")
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["export", "-m", str(folder), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["export", "-m", str(folder), str(tmp_path / "hf")]) != 0
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--format" in capsys.readouterr().out


# ---- GGUF: Phi-2's tokenizer ----


def test_gguf_vocabulary_of_phi2_tokenizer_is_the_converters(phi2_tokenizer_dir, tokenizer_dir, tmp_path):
    """The keys llama.cpp's convert_hf_to_gguf.py writes for microsoft/phi-2's tokenizer, from transformers'
    own reading of it: pre-tokenizer phi-2, GPT-2 tokens NORMAL, <|endoftext|> CONTROL, the 38 added
    whitespace runs USER_DEFINED as raw text, and ids up to the model's 51,200 rows [PAD<id>] UNUSED."""
    from conftest import make_checkpoint
    from transformers import AutoTokenizer

    folder = tmp_path / "phi2-vocab"
    make_checkpoint(folder, tokenizer_dir, 51200, num_hidden_layers=1)
    reader, _ = tensors(export_gguf(folder, tmp_path / "m.gguf"))
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.pre") == "phi-2"
    assert len(tokens) == len(types) == 51200

    reference = AutoTokenizer.from_pretrained(phi2_tokenizer_dir)
    added = reference.added_tokens_decoder
    assert len(reference) == 50295 and len(added) == 39
    for i, text in {i: t for t, i in reference.get_vocab().items()}.items():
        assert tokens[i] == text, i
        if i not in added:
            assert types[i] == gguf.TokenType.NORMAL, i
        elif added[i].special:
            assert types[i] == gguf.TokenType.CONTROL, i
        else:
            assert types[i] == gguf.TokenType.USER_DEFINED and text.strip(" \t") == "", i
    assert tokens[50257] == " " * 31 and tokens[50294] == "\t\t"  # runs as text, not byte-level "ĠĠ"
    assert sum(t == gguf.TokenType.USER_DEFINED for t in types) == 38
    assert tokens[50295:] == [f"[PAD{i}]" for i in range(50295, 51200)]
    assert set(types[50295:]) == {gguf.TokenType.UNUSED}
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id"):
        assert field(reader, f"tokenizer.ggml.{key}") == 50256
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.add_eos_token") is False
    merges = (phi2_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert field(reader, "tokenizer.ggml.merges") == [m for m in merges if m]


@pytest.mark.slow
def test_gguf_keys_and_tensors_in_the_converters_order(tiny, tmp_path):
    """The converter writes general.* from gguf-py's Metadata (name from the folder), then phi2.*, then the
    vocabulary, and the tensors in the order the safetensors file stores them; llama-quantize moves
    quantization_version and file_type last and sorts tensors by (layer, name)."""
    folder, _ = tiny
    header = (folder / "model.safetensors").read_bytes()
    stored = [n for n in json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")]) if n != "__metadata__"]
    reader, _ = tensors(export_gguf(folder, tmp_path / "f16.gguf"))
    assert [t.name for t in reader.tensors] == [gguf_name(n) for n in stored]
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys[:4] == ["general.architecture", "general.type", "general.name", "general.size_label"]
    assert field(reader, "general.name") == gguf.Metadata.load(None, folder, None, 1).name
    assert keys.index("general.file_type") < keys.index("tokenizer.ggml.model")
    assert keys[-1] == "tokenizer.ggml.add_eos_token"

    reader, _ = tensors(export_gguf(folder, tmp_path / "q4.gguf", gguf_type="q4_0"))
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys[-2:] == ["general.quantization_version", "general.file_type"]
    names = [t.name for t in reader.tensors]
    layer = [int(n.split(".")[1]) if n.startswith("blk.") else -1 for n in names]
    assert list(zip(layer, names)) == sorted(zip(layer, names))


# ---- GGUF: every type gguf-py quantizes ----

FP16_STEP = 2.0**-11  # relative rounding error of a value (a block's scale or minimum) stored in fp16


def error_bound(x: np.ndarray, qtype) -> np.ndarray:
    """Largest |dequantized - x| llama.cpp's reference quantizer allows, per value of ``x`` (rows of blocks)."""
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return np.zeros_like(x)
    if qtype == t.F16:
        return np.abs(x) * FP16_STEP + 2.0**-25
    if qtype == t.BF16:
        return np.abs(x) * 2.0**-8
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    b = x.reshape(-1, block)
    amax, low, high = np.abs(b).max(-1, keepdims=True), b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    if qtype in (t.Q4_0, t.Q5_0):  # d = amax / 2^(bits-1); the largest value's sign gets one step fewer: d
        levels = 8 if qtype == t.Q4_0 else 16
        d = amax / levels
        bound = d + levels * d * FP16_STEP
    elif qtype in (t.Q4_1, t.Q5_1):  # d = (max - min) / (2^bits - 1), offset min: half a step
        steps = 15 if qtype == t.Q4_1 else 31
        d = (high - low) / steps
        bound = d / 2 + (steps * d + np.abs(low)) * FP16_STEP
    elif qtype == t.Q8_0:
        d = amax / 127
        bound = d / 2 + 127 * d * FP16_STEP
    elif qtype in (t.TQ1_0, t.TQ2_0):  # ternary: {-1, 0, 1} x amax
        bound = amax / 2 + amax * FP16_STEP
    else:
        raise AssertionError(f"no bound for {qtype.name}")
    return np.broadcast_to(bound, b.shape).reshape(x.shape)


@pytest.mark.parametrize("gguf_type", [t for t in GGUF_TYPES if t not in ("f16", "f32", "q8_0")])
def test_gguf_quantized_types_within_their_error_bound_and_equal_gguf_py(tiny_small_vocab, tmp_path, gguf_type):
    """Matrices in the type (f16 where the rows do not fit its blocks; ternary types keep token_embd/output
    f16; llama-quantize's types put output in q8_0), within the format's error bound of what was quantized,
    and byte for byte gguf-py's quantizer on it: the weights themselves for the converter's types, the
    weights rounded to f16 (the converter's f16 file) for llama-quantize's."""
    folder, hf = tiny_small_vocab
    reader, found = tensors(export_gguf(folder, tmp_path / "q.gguf", gguf_type=gguf_type))
    assert field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]
    via_f16 = gguf_type not in CONVERTER_TYPES
    wanted = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type]]
    seen = set()
    for name, value in hf.state_dict().items():
        t = found[gguf_name(name)]
        source = value.numpy()
        if value.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(np.asarray(t.data), source)
            continue
        expected = wanted
        if gguf_type.startswith("tq") and name in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = gguf.GGMLQuantizationType.F16
        elif via_f16 and name == "lm_head.weight":
            expected = gguf.GGMLQuantizationType.Q8_0
        if value.shape[-1] % gguf.GGML_QUANT_SIZES[expected][0]:
            expected = gguf.GGMLQuantizationType.F16
        assert t.tensor_type == expected, (name, t.tensor_type.name)
        seen.add(expected)
        quantized = source.astype(np.float16).astype(np.float32) if via_f16 else source
        assert np.asarray(t.data).tobytes() == gguf.quants.quantize(quantized, expected).tobytes(), name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape)
        error = np.abs(got.astype(np.float64) - quantized)
        assert (error <= error_bound(quantized.astype(np.float64), expected) * 1.0001 + 1e-12).all(), name
    assert wanted in seen  # the tiny model's rows (64, 256) fit every type's blocks somewhere


# ---- Ollama ----

OLLAMA_INSTRUCTIONS = {"from", "parameter", "template", "system", "adapter", "license", "message"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs by Ollama's documented Modelfile grammar (docs/modelfile.md):
    ``# comment`` lines, ``INSTRUCTION arguments`` with case-insensitive instructions, ``PARAMETER name
    value``; an argument is ``\"\"\"...\"\"\"`` (may span lines), ``"..."`` or the rest of the line, with no
    escapes. FROM is required. Anything else is a syntax error."""
    commands, pos = [], 0
    line = re.compile(r"[ \t]*(?:#[^\n]*)?\n")
    while pos < len(text):
        if m := line.match(text, pos):
            pos = m.end()
            continue
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, pos)
        assert m and m.group(1).lower() in OLLAMA_INSTRUCTIONS, f"unknown instruction at {text[pos : pos + 40]!r}"
        name, pos = m.group(1).lower(), m.end()
        if name == "parameter":
            m = re.compile(r"([A-Za-z0-9_]+)[ \t]+").match(text, pos)
            assert m, f"PARAMETER without a name at {text[pos : pos + 40]!r}"
            name, pos = m.group(1), m.end()
        for quote in ('"""', '"', ""):
            if text.startswith(quote, pos):
                break
        if quote:
            end = text.index(quote, pos + len(quote))
            assert quote == '"""' or "\n" not in text[pos:end], "a newline inside single quotes"
            value, pos = text[pos + len(quote) : end], end + len(quote)
            assert re.compile(r"[ \t]*(\n|$)").match(text, pos), f"text after the closing quote at {pos}"
        else:
            end = text.find("\n", pos) % (len(text) + 1)
            value, pos = text[pos:end].strip(), end
        commands.append((name, value))
    assert any(name == "from" for name, _ in commands), "no FROM line"
    return commands


def render_go_template(template: str, values: dict[str, str], cut_at_response: bool) -> str:
    """The Go-template subset a Modelfile TEMPLATE uses here (``{{ .Field }}``, ``{{ if .Field }}`` ...
    ``{{ end }}``, ``{{ "text" }}``), executed as Ollama executes a template without ``.Messages``: earlier
    turns whole, the turn being answered cut before the first top-level node that mentions ``.Response``."""
    parts = re.split(r'({{(?:"(?:\\.|[^"\\])*"|[^"])*?}})', template)  # an action; "}}" may sit in its string
    out, skipping, depth = [], 0, 0
    for part in parts:
        action = part[2:-2].strip() if part.startswith("{{") else None
        if action is None:
            if not skipping:
                out.append(part)
            continue
        if depth == 0 and cut_at_response and ".Response" in action:
            break
        if action.startswith("if "):
            depth += 1
            if skipping or not values.get(action[3:].strip().removeprefix(".")):
                skipping += 1
        elif action == "end":
            depth -= 1
            skipping = max(skipping - 1, 0)
        elif action.startswith('"'):
            out.append("" if skipping else ast.literal_eval(action))  # Go's escapes: \\n \\" \\uXXXX \\UXXXXXXXX
        else:
            assert action.startswith("."), action
            out.append("" if skipping else values.get(action[1:], ""))
    return "".join(out)


@pytest.mark.parametrize("name", ["instruct", "guanaco"])
def test_ollama_export_renders_and_stops_as_phikit(tiny, tmp_path, name):
    folder, hf = tiny
    template = TEMPLATES[name]
    old = os.umask(0o027)
    try:
        out = export_ollama(folder, tmp_path / "ollama", gguf_type="q8_0", template=name)
    finally:
        os.umask(old)
    for path in (out / "Modelfile", out / "model.gguf"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]  # no temporary files left
    commands = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    assert commands[0][0] == "from" and (out / commands[0][1]).resolve() == (out / "model.gguf").resolve()
    assert field(tensors(out / commands[0][1])[0], "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tuple(v for k, v in commands if k == "stop") == template.stop
    assert dict(commands)["num_ctx"] == str(hf.config.max_position_embeddings)
    (text,) = [v for k, v in commands if k == "template"]
    question, earlier = "What is 2 + 2?\n  Show\tyour work.", [("Capital of France?", "Paris.")]
    assert render_go_template(text, {"Prompt": question}, cut_at_response=True) == template.render(question)
    before = render_go_template(text, {"Prompt": earlier[0][0], "Response": earlier[0][1]}, cut_at_response=False)
    assert before + template.render(question) == template.render_chat(earlier, question)
    with_system = render_go_template(text, {"System": "Be brief.", "Prompt": question}, cut_at_response=True)
    assert with_system == "Be brief.\n" + template.render(question)


def test_ollama_modelfile_quotes_what_needs_quoting():
    from phikit.export import ollama_modelfile

    text = ollama_modelfile("User {{x}}: {prompt}\\nBot:", "/models/a b.gguf", None, 'MIT "as is"\nline 2')
    commands = parse_modelfile(text)
    assert commands[0] == ("from", "/models/a b.gguf")
    assert dict(commands)["stop"] == "User {{x}}:" and dict(commands)["license"] == 'MIT "as is"\nline 2'
    rendered = render_go_template(dict(commands)["template"], {"Prompt": "hi"}, cut_at_response=True)
    assert rendered == "User {{x}}: hi\nBot:"
    with pytest.raises(PhikitError, match="Modelfile"):
        ollama_modelfile('Say """{prompt}"""', "./m.gguf")


def test_ollama_command_and_its_errors(tiny, tmp_path, capsys):
    folder, _ = tiny
    out = tmp_path / "ollama"
    args = ["export", "-m", str(folder), "--format", "ollama", "--type", "q4_0", "--template", "guanaco"]
    assert main([*args, str(out)]) == 0
    assert "ollama create" in capsys.readouterr().err
    commands = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    assert [v for k, v in commands if k == "stop"] == list(TEMPLATES["guanaco"].stop)
    assert field(tensors(out / "model.gguf")[0], "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert main([*args, str(out)]) != 0
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "-m", str(folder), "--format", "gguf", "--template", "guanaco", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert "--template is for --format ollama" in err and "Traceback" not in err


# ---- the Phi-3 family (benchmarks/bench_export_llamacpp.py compares whole files with llama.cpp's converter) ----


def skip_without_sentencepiece_model(folder) -> None:
    """Phi-3's GGUF vocabulary comes from tokenizer.model, as llama.cpp's converter reads it; the fallback
    tokenizer of a fresh clone (no ../shared) has none."""
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    if settings.get("tokenizer_class") != "GPT2Tokenizer" and not (folder / "tokenizer.model").is_file():
        pytest.skip("Phi-3's tokenizer.model is in ../shared/data/phi3-tokenizer (absent here)")


def expected_phi3_names(n_layers: int, longrope: bool, tied: bool) -> set[str]:
    """Names llama.cpp's phi3 architecture loads, from gguf-py's tables: every tensor of MODEL_ARCH.PHI3 but
    the separate q/k/v (the checkpoint's qkv is fused) and, for a tied head, output."""
    skip = {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V}
    if not longrope:
        skip |= {gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT}
    if tied:
        skip.add(gguf.MODEL_TENSOR.OUTPUT)
    names = set()
    for tensor in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI3]:
        if tensor in skip:
            continue
        template = gguf.TENSOR_NAMES[tensor]
        for layer in range(n_layers) if "{bid}" in template else [None]:
            names.add(f"{template.format(bid=layer)}.weight")
    return names


@pytest.fixture(scope="module")
def phi3_gguf(phi3_factory, tmp_path_factory):
    """``phi3_gguf(variant) -> (reader, tensors by name)`` of the variant's f32 export, made and read once
    (gguf-py takes about ten seconds to read Phi-4-mini's 200k tokens and 400k merges)."""
    made = {}

    def get(variant):
        if variant not in made:
            folder, _ = phi3_factory(variant)
            skip_without_sentencepiece_model(folder)
            made[variant] = tensors(export_gguf(folder, tmp_path_factory.mktemp("gguf") / "m.gguf", gguf_type="f32"))
        return made[variant]

    return get


@pytest.mark.parametrize("variant", ["phi3-4k", "phi3-128k", pytest.param("phi4-mini", marks=pytest.mark.slow), "phi4"])
def test_phi3_gguf_has_llama_cpp_names_rope_factors_and_keys(phi3_factory, phi3_gguf, variant):
    folder, hf = phi3_factory(variant)
    skip_without_sentencepiece_model(folder)
    config = hf.config
    longrope = config.rope_parameters.get("rope_type") == "longrope"
    reader, by_name = phi3_gguf(variant)
    assert field(reader, "general.architecture") == "phi3"
    assert set(by_name) == expected_phi3_names(config.num_hidden_layers, longrope, config.tie_word_embeddings)
    state = hf.state_dict()
    np.testing.assert_array_equal(
        by_name["blk.1.ffn_up.weight"].data, state["model.layers.1.mlp.gate_up_proj.weight"].numpy()
    )
    np.testing.assert_array_equal(
        by_name["blk.0.attn_qkv.weight"].data, state["model.layers.0.self_attn.qkv_proj.weight"].numpy()
    )
    rotary = int(config.rope_parameters["partial_rotary_factor"] * config.hidden_size) // config.num_attention_heads
    assert field(reader, "phi3.rope.dimension_count") == rotary
    assert field(reader, "phi3.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "phi3.rope.freq_base") == config.rope_parameters["rope_theta"]
    assert field(reader, "phi3.attention.sliding_window") == (config.sliding_window or 0)
    assert field(reader, "phi3.rope.scaling.original_context_length") == config.original_max_position_embeddings
    if longrope:
        np.testing.assert_array_equal(
            by_name["rope_factors_long.weight"].data, np.float32(config.rope_parameters["long_factor"])
        )
        np.testing.assert_array_equal(
            by_name["rope_factors_short.weight"].data, np.float32(config.rope_parameters["short_factor"])
        )
        factor = config.max_position_embeddings / config.original_max_position_embeddings
        expected = math.sqrt(1 + math.log(factor) / math.log(config.original_max_position_embeddings))
        assert field(reader, "phi3.rope.scaling.attn_factor") == pytest.approx(expected)
        assert list(reader.fields)[:2] == ["GGUF.version", "GGUF.tensor_count"]
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size
    assert field(reader, "tokenizer.ggml.eos_token_id") == config.eos_token_id
    assert "tokenizer.chat_template" in reader.fields


@pytest.mark.slow
def test_phi3_gguf_vocabularies_are_the_tokenizers(phi3_factory, phi3_gguf):
    """Phi-3's SentencePiece vocabulary (model "llama": tokenizer.model's pieces and scores, the chat tokens as
    control tokens) and Phi-4-mini's o200k (model "gpt2", pre-tokenizer "gpt-4o", merges)."""
    spm = pytest.importorskip("sentencepiece")
    from conftest import PHI3_TOKENIZER, PHI4_MINI_TOKENIZER

    if not (PHI3_TOKENIZER.is_dir() and PHI4_MINI_TOKENIZER.is_dir()):
        pytest.skip("the Phi-3 and Phi-4-mini tokenizers are in ../shared/data")
    folder, _ = phi3_factory("phi3-4k")
    reader, _ = phi3_gguf("phi3-4k")
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("llama", "default")
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    for i in (3, 100, 259, 1000, 31999):  # <unk>, <s>, </s> are also added tokens: score -1000, as the converter
        assert tokens[i] == processor.IdToPiece(i) and scores[i] == pytest.approx(processor.GetScore(i))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[32007] == "<|end|>" and types[32007] == gguf.TokenType.CONTROL
    assert tokens[32063] == "[PAD32063]" and types[32063] == gguf.TokenType.UNUSED
    reader, _ = phi3_gguf("phi4-mini")
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-4o")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert tokens[200020] == "<|end|>" and types[200020] == gguf.TokenType.CONTROL
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reads token_embd
    assert len(field(reader, "tokenizer.ggml.merges")) > 400_000


@pytest.mark.parametrize("variant", ["phi3-4k", "phi4-mini", "phi3-128k"])
def test_ollama_export_of_a_chat_model_renders_its_chat_template_and_stops_at_its_end(phi3_factory, tmp_path, variant):
    from phikit.templates import get_template
    from phikit.tokenizer import Tokenizer

    folder, _ = phi3_factory(variant)
    skip_without_sentencepiece_model(folder)
    out = export_ollama(folder, tmp_path / "ollama", gguf_type="q8_0")
    commands = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    (text,) = [v for k, v in commands if k == "template"]
    template = get_template("chat", Tokenizer(folder))
    system, question, earlier = "Be brief.", "What is 2 + 2?\n  Show\tyour work.", ("Capital of France?", "Paris.")
    values = {"System": system, "Prompt": question}
    assert render_go_template(text, values, cut_at_response=True) == template.render_messages(
        [{"role": "system", "content": system}, {"role": "user", "content": question}]
    )
    before = render_go_template(text, {"Prompt": earlier[0], "Response": earlier[1]}, cut_at_response=False)
    assert before + render_go_template(text, {"Prompt": question}, cut_at_response=True) == template.render_chat(
        [earlier], question
    )
    assert "<|end|>" in [v for k, v in commands if k == "stop"]
    config = json.loads((folder / "config.json").read_text())  # a LongRoPE model's window: its original context
    longrope = config.get("rope_scaling") or config.get("rope_parameters", {}).get("long_factor")
    expected = config["original_max_position_embeddings"] if longrope else config["max_position_embeddings"]
    assert dict(commands)["num_ctx"] == str(expected)
    assert (int(expected) < config["max_position_embeddings"]) == (variant != "phi3-4k")


@pytest.mark.parametrize(
    "template",
    ["{{prompt}}", "User: {prompt} }}{{ x", "\u00a0Q\u200d: {prompt}\u00a0\nA:", 'Q: {prompt} "quoted" \\ now\t'],
)
def test_ollama_templates_with_braces_and_invisible_characters_render_as_phikit(template):
    """Braces next to the prompt and characters a parser could trim or a reader cannot see are written as
    Go string actions: the TEMPLATE parses (Ollama's grammar) and renders exactly phikit's text."""
    from phikit.export import ollama_modelfile
    from phikit.templates import get_template

    text = ollama_modelfile(template, "./m.gguf")
    commands = dict(parse_modelfile(text))
    rendered = render_go_template(commands["template"], {"Prompt": "2+2?"}, cut_at_response=True)
    assert rendered == get_template(template).render("2+2?")
    assert "\u00a0" not in commands["template"] and "\u200d" not in commands["template"]


def test_a_gguf_export_into_the_source_folder_is_refused(tiny, tmp_path):
    import shutil

    folder, _ = tiny
    source = tmp_path / "model"
    shutil.copytree(folder, source)
    for target in (source / "model.safetensors", source / "new.gguf"):
        with pytest.raises(PhikitError, match="inside the source model's folder"):
            export_gguf(source, target, gguf_type="f32", overwrite=True)
    assert (source / "model.safetensors").stat().st_size > 1000


def test_replacing_a_folder_never_leaves_neither(tmp_path, monkeypatch):
    """--overwrite of an exported folder: the old folder is renamed aside before the new one takes its place;
    a crash between the two renames leaves both on disk."""
    import os

    from phikit.checkpoint import replace_folder

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    real, calls = os.replace, []

    def crash_on_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real(a, b)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, out)
    monkeypatch.setattr(os, "replace", real)
    assert (new / "new.txt").read_text() == "new"
    assert [p.read_text() for p in tmp_path.glob(".out.old-*/out/old.txt")] == ["old"]
    replace_folder(new, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "new.txt").read_text() == "new"

    import shutil

    newer = tmp_path / "newer"
    newer.mkdir()
    real_rmtree = shutil.rmtree

    def interrupted_once(path, *args, **kwargs):  # a Ctrl-C while the old copy is being deleted
        monkeypatch.setattr(shutil, "rmtree", real_rmtree)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(newer, tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir() and not list(tmp_path.glob(".fresh.old-*"))  # new in place, old gone


def test_an_export_into_a_symlinked_folder_is_refused(tiny, tmp_path):
    folder, _ = tiny
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PhikitError, match="symbolic link"):
        export_hf(folder, tmp_path / "link", overwrite=True)


def test_a_stop_string_a_modelfile_cannot_hold_is_refused_with_the_reason():
    from phikit.export import ollama_modelfile

    with pytest.raises(PhikitError, match='not ending with "'):
        ollama_modelfile('Say: "{prompt}"', "./m.gguf")  # its turn marker, a stop string, ends with a quote
