"""Checkpoint loading: shards, legacy layouts, configs, and the errors users see."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

from phikit import kernels
from phikit.checkpoint import load_model, resolve_model_path
from phikit.config import PhiConfig
from phikit.errors import PhikitError
from phikit.models import config_from_dict

PUBLISHED_PHI2_CONFIG = {  # microsoft/phi-2 config.json as published (transformers 4.37 keys)
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "vocab_size": 51200,
}


def logits_of(model, vocab, n=11):
    ids = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids)


def test_published_phi2_config_and_rope_parameters_agree():
    old = PhiConfig.from_dict(PUBLISHED_PHI2_CONFIG)
    new_raw = {k: v for k, v in PUBLISHED_PHI2_CONFIG.items() if k not in ("partial_rotary_factor", "rope_theta")}
    new_raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}
    new = PhiConfig.from_dict(new_raw)
    assert old.as_dict() == new.as_dict()
    assert (old.head_dim, old.rotary_dim, old.rope_theta) == (80, 32, 10000.0)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(PhikitError, match="model_type 'llama' is not a model phikit runs.*'phi', 'phi3'"):
        config_from_dict({**PUBLISHED_PHI2_CONFIG, "model_type": "llama"})
    with pytest.raises(PhikitError, match="model_type 'phi3' is not a Phi-1/1.5/2 model"):
        PhiConfig.from_dict({**PUBLISHED_PHI2_CONFIG, "model_type": "phi3"})
    with pytest.raises(PhikitError, match="missing required key.*hidden_size"):
        PhiConfig.from_dict({k: v for k, v in PUBLISHED_PHI2_CONFIG.items() if k != "hidden_size"})
    with pytest.raises(PhikitError, match="rope type 'dynamic' is not supported"):
        PhiConfig.from_dict({**PUBLISHED_PHI2_CONFIG, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(PhikitError, match="config.json: not valid JSON"):
        PhiConfig.from_json(bad)


def test_sharded_checkpoint_loads_like_single_file(checkpoint_factory, tiny):
    folder, hf = checkpoint_factory(max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    sharded = load_model(folder, dtype="fp32", device="cpu")
    single = load_model(tiny[0], dtype="fp32", device="cpu")
    torch.testing.assert_close(
        logits_of(sharded, hf.config.vocab_size), logits_of(single, hf.config.vocab_size), rtol=0, atol=0
    )


@pytest.mark.parametrize("stored", [torch.float16, torch.float32, torch.bfloat16])  # bf16: mapped, no copy
def test_bf16_load_has_the_bits_of_transformers_bf16_load(checkpoint_factory, stored):
    from transformers import PhiForCausalLM as HFPhi

    folder, _ = checkpoint_factory(dtype=stored)
    ours = load_model(folder, dtype="bf16", device="cpu").state_dict()
    theirs = HFPhi.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    for name, t in theirs.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], t), name


def _mapped_bytes(folder) -> int:
    """Bytes of this process's memory maps of files in ``folder`` (Linux /proc/self/maps)."""
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith(str(folder)):
                begin, end = (int(x, 16) for x in parts[0].split("-"))
                total += end - begin
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_kept_as_stored_are_the_files_pages_and_quantized_ones_are_unmapped(checkpoint_factory):
    """A weight loaded in the dtype it is stored in views the file's pages (no read buffer, no copy); one
    that is quantized while loading is read from its map and unmapped with it, so the file's pages do not
    stay in the process (peak memory of a quantized load: the quantized weights, not a shard more)."""
    import gc

    from phikit.api import load

    folder, hf = checkpoint_factory(dtype=torch.bfloat16, hidden_size=256, intermediate_size=1024)
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    quantized = load(folder, dtype="bf16", device="cpu", quantize="int8")
    gc.collect()
    embedding = quantized.model.model.embed_tokens.weight
    small = sum(t.numel() * 2 + 8192 for t in hf.state_dict().values() if t.dim() == 1)  # norms, biases
    kept = embedding.numel() * 2 + small  # and the embedding: kept as stored, mapped
    assert _mapped_bytes(folder) <= kept < stored / 2
    del quantized, embedding
    gc.collect()
    model = load_model(folder, dtype="bf16", device="cpu")
    assert _mapped_bytes(folder) >= stored * 0.95  # every weight is a view of the file
    weight = model.model.layers[0].mlp.fc1.weight
    assert torch.equal(weight, hf.model.layers[0].mlp.fc1.weight.to(torch.bfloat16))
    weight.data.add_(1)  # a private map: writing changes the process's copy, never the file
    assert torch.equal(
        load_model(folder, dtype="bf16", device="cpu").model.layers[0].mlp.fc1.weight,
        hf.model.layers[0].mlp.fc1.weight.to(torch.bfloat16),
    )


def legacy_state_dict(hf, layout: str) -> dict[str, torch.Tensor]:
    """transformers weights renamed to the remote-code layouts of the first Phi releases."""
    sd, n = hf.state_dict(), hf.config.num_hidden_layers
    block = "transformer.h.{}" if layout == "phi-msft" else "layers.{}"
    offset = 0 if layout == "phi-msft" else 1
    out = {
        ("transformer.embd.wte.weight" if layout == "phi-msft" else "layers.0.wte.weight"): sd[
            "model.embed_tokens.weight"
        ]
    }
    head = "lm_head" if layout == "phi-msft" else f"layers.{n + 1}"
    for kind in ("weight", "bias"):
        out[f"{head}.ln.{kind}"] = sd[f"model.final_layernorm.{kind}"]
        out[f"{head}.linear.{kind}"] = sd[f"lm_head.{kind}"]
        for i in range(n):
            src, dst = f"model.layers.{i}", block.format(i + offset)
            out[f"{dst}.ln.{kind}"] = sd[f"{src}.input_layernorm.{kind}"]
            out[f"{dst}.mixer.Wqkv.{kind}"] = torch.cat([sd[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}.mixer.out_proj.{kind}"] = sd[f"{src}.self_attn.dense.{kind}"]
            out[f"{dst}.mlp.fc1.{kind}"] = sd[f"{src}.mlp.fc1.{kind}"]
            out[f"{dst}.mlp.fc2.{kind}"] = sd[f"{src}.mlp.fc2.{kind}"]
    out[f"{block.format(offset)}.mixer.rotary_emb.inv_freq"] = torch.ones(8)  # a buffer the loader skips
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("layout", ["phi-msft", "mixformer-sequential"])
def test_legacy_layout_loads_to_same_logits(tmp_path, tiny, layout):
    folder, hf = tiny
    c = hf.config
    save_file(legacy_state_dict(hf, layout), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": layout,
                "n_embd": c.hidden_size,
                "n_layer": c.num_hidden_layers,
                "n_head": c.num_attention_heads,
                "n_inner": c.intermediate_size,
                "n_positions": c.max_position_embeddings,
                "vocab_size": c.vocab_size,
                "rotary_dim": int(c.hidden_size // c.num_attention_heads * c.rope_parameters["partial_rotary_factor"]),
                "activation_function": "gelu_new",
                "layer_norm_epsilon": c.layer_norm_eps,
                "pad_vocab_size_multiple": 64,
            }
        )
    )
    legacy = load_model(tmp_path, dtype="fp32", device="cpu")
    with torch.no_grad():
        ids = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(legacy(ids), hf(ids).logits, rtol=0, atol=1e-5)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_error_names_the_file(checkpoint_factory, tmp_path):
    folder = copy_checkpoint(checkpoint_factory(max_shard_size="100KB")[0], tmp_path / "ckpt")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(PhikitError, match=f"{shard.name}.*truncated or corrupt"):
        load_model(folder, dtype="fp32", device="cpu")


def test_corrupt_single_file_error_names_the_file(tiny, tmp_path):
    folder = copy_checkpoint(tiny[0], tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PhikitError, match="model.safetensors.*truncated or corrupt"):
        load_model(folder, dtype="fp32", device="cpu")


def test_missing_shard_error_names_the_shard(checkpoint_factory, tmp_path):
    folder = copy_checkpoint(checkpoint_factory(max_shard_size="100KB")[0], tmp_path / "ckpt")
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(PhikitError, match=f"missing: {shard.name}"):
        load_model(folder, dtype="fp32", device="cpu")


def test_missing_files_and_mismatched_shapes(tiny, tmp_path):
    folder = copy_checkpoint(tiny[0], tmp_path / "ckpt")
    (folder / "config.json").rename(folder / "config.bak")
    with pytest.raises(PhikitError, match="config.json not found"):
        load_model(folder, dtype="fp32", device="cpu")
    raw = json.loads((folder / "config.bak").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "intermediate_size": 128}))
    with pytest.raises(PhikitError, match="fc1.(weight|bias) has shape .* config and weights do not match"):
        load_model(folder, dtype="fp32", device="cpu")
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "model.safetensors").unlink()
    with pytest.raises(PhikitError, match="no weights found"):
        load_model(folder, dtype="fp32", device="cpu")
    with pytest.raises(PhikitError, match="no such model folder"):
        resolve_model_path(tmp_path / "does-not-exist")


def test_unreachable_hub_points_to_model_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PhikitError, match="--model PATH"):
        resolve_model_path("microsoft/phi-2")


def _vm_flags(address: int) -> list[str]:
    """VmFlags of this process's memory mapping that holds ``address`` (Linux /proc/self/smaps)."""
    from phikit.pagecache import smaps_entry

    return (smaps_entry(address) or {}).get("VmFlags", "").split()


def test_large_weights_read_into_buffers_keep_their_values(tmp_path):
    """Read buffers (the fp16 -> bf16 path) stay on 4 KB pages, faster to fill from a file than fresh 2 MB ones."""
    from safetensors.torch import load_file

    from phikit.checkpoint import read_safetensors

    tensors = {"big": torch.randn(1024, 1536), "small": torch.randn(3, 5).half()}  # 6 MB and 30 bytes
    save_file(tensors, tmp_path / "w.safetensors")
    read = dict(read_safetensors(tmp_path / "w.safetensors"))
    for name, t in load_file(tmp_path / "w.safetensors").items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t), name
    if sys.platform.startswith("linux"):
        assert "hg" not in _vm_flags(read["big"].data_ptr())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page advice is Linux only")
def test_a_weight_in_huge_page_memory_saves_only_its_own_bytes(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("PHIKIT_HUGE_PAGES", "1")
    values = torch.randn(1024, 1536)  # 6 MB
    big = kernels.empty_weight(values.shape, torch.float32).copy_(values)
    assert big.data_ptr() % kernels.HUGE_PAGE == 0 and "hg" in _vm_flags(big.data_ptr())
    # a view into a longer buffer: saving writes only the tensor's own bytes
    save_file({"big": big}, tmp_path / "again.safetensors")
    torch.save(big, tmp_path / "again.pt")
    assert (tmp_path / "again.safetensors").stat().st_size < big.numel() * 4 + 1024
    assert torch.equal(load_file(tmp_path / "again.safetensors")["big"], values)
    assert torch.equal(torch.load(tmp_path / "again.pt"), values)


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PHIKIT_HUGE_PAGES", "0")
    t = kernels.empty_weight((1024, 1024), torch.float32)
    assert t.untyped_storage().nbytes() == t.numel() * 4


@pytest.mark.skipif(not kernels.thp_enabled(), reason="Linux transparent huge pages are off or absent here")
def test_huge_pages_are_the_default_where_linux_offers_them(monkeypatch):
    monkeypatch.delenv("PHIKIT_HUGE_PAGES", raising=False)
    t = kernels.empty_weight((1024, 1024), torch.float32)
    assert t.data_ptr() % kernels.HUGE_PAGE == 0 and "hg" in _vm_flags(t.data_ptr())


def _rewrite(folder, change):
    """Apply ``change(state)`` to a checkpoint folder's model.safetensors."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_weights_that_do_not_fit_the_config_are_refused(checkpoint_factory, tmp_path):
    folder, _ = checkpoint_factory(num_hidden_layers=3)
    fewer = _copy(folder, tmp_path)
    config = json.loads((fewer / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (fewer / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhikitError, match=r"model\.layers\.2\..* has no place"):
        load_model(fewer, dtype="fp32", device="cpu")
    ints = _copy(folder, tmp_path / "b")
    _rewrite(ints, lambda s: s.update({"model.layers.0.mlp.fc1.weight": s["model.layers.0.mlp.fc1.weight"].int()}))
    with pytest.raises(PhikitError, match=r"fc1\.weight is torch\.int32, not a floating-point weight"):
        load_model(ints, dtype="fp32", device="cpu")


def test_quantized_buffers_of_the_wrong_dtype_are_refused_before_any_kernel(tiny, tmp_path):
    from safetensors.torch import load_file

    import phikit
    from phikit.checkpoint import QUANTIZED_WEIGHTS

    folder, _ = tiny
    out = phikit.save_quantized(phikit.load(folder, dtype="fp32", device="cpu", quantize="int4"), tmp_path / "q")
    state = load_file(out / QUANTIZED_WEIGHTS)
    state["model.layers.0.self_attn.q_proj.weight_scale"] = state[
        "model.layers.0.self_attn.q_proj.weight_scale"
    ].float()
    save_file(state, out / QUANTIZED_WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(PhikitError, match=r"q_proj\.weight_scale is torch\.float32"):
        phikit.load(out, device="cpu")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny, tmp_path):
    import phikit

    folder, _ = tiny
    small = _copy(folder, tmp_path)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 16
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhikitError, match="the tokenizer has .* tokens but config.json's vocab_size is 16"):
        phikit.load(small, device="cpu")


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_attention_heads", 0),
        ("vocab_size", -1),
        ("num_hidden_layers", "two"),
        ("hidden_size", None),
        ("intermediate_size", 1.5),
        ("layer_norm_eps", "tiny"),
        ("rope_theta", -1),
        ("max_position_embeddings", True),
    ],
)
def test_bad_config_values_name_the_key(tmp_path, key, value):
    raw = {**PUBLISHED_PHI2_CONFIG, key: value}
    with pytest.raises(PhikitError, match=key):
        PhiConfig.from_dict(raw)


def test_a_hub_that_never_answers_is_given_up(tmp_path):
    """A server that accepts connections and never answers (the download used to hang silently)."""
    import os
    import socket
    import subprocess
    import threading
    import time
    from pathlib import Path

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(16)], daemon=True).start()
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}",
        "HF_HOME": str(tmp_path / "hf"),
        "PHIKIT_HUB_TIMEOUT": "2",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    env.pop("HF_HUB_OFFLINE", None)
    code = "from phikit.cli import main; raise SystemExit(main(['generate', '--model', 'owner/model', 'hi']))"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and time.perf_counter() - started < 30
    assert "fetching owner/model from the Hugging Face Hub" in result.stderr
    assert "no progress for 2 s" in result.stderr
    server.close()


@pytest.mark.skipif(not kernels.thp_enabled(), reason="Linux transparent huge pages are off or absent here")
def test_a_cpu_models_kv_cache_is_zeroed_memory_on_huge_pages(tiny, monkeypatch):
    """The CPU backend places KV caches as it places weights (a long context's cache is what a step reads)."""
    import phikit

    monkeypatch.delenv("PHIKIT_HUGE_PAGES", raising=False)
    model = phikit.load(tiny[0], device="cpu").model
    tokens = 2 * 4 * kernels.HUGE_PAGE // model.kv_cache_bytes(1)  # 8 MB of keys, 8 of values
    cache = model.new_cache(1, tokens)
    for t in (cache.k, cache.v):
        assert t.data_ptr() % kernels.HUGE_PAGE == 0 and "hg" in _vm_flags(t.data_ptr())
        assert not t.any()
    assert cache.k.nbytes + cache.v.nbytes == model.kv_cache_bytes(tokens)
