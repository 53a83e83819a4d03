"""Export: HF folders checked with transformers (and PEFT for merged adapters), GGUF files read back with
gguf-py's own reader and checked against gguf-py's tensor-name table for llama.cpp's phi2 architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import phikit
from phikit.cli import main
from phikit.errors import PhikitError
from phikit.export import export_gguf, export_hf

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


def test_gguf_f32_holds_every_tensor_under_llama_cpp_names(tiny, tmp_path):
    folder, hf = tiny
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


def test_gguf_q8_0_matrices_within_quantization_error(tiny, tmp_path):
    folder, hf = tiny
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
