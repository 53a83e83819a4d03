"""LoRA against PEFT on transformers' PhiForCausalLM: same forward, adapters loadable both ways, merging."""

import json

import pytest
import torch

import phikit
from phikit.checkpoint import load_model
from phikit.errors import PhikitError
from phikit.lora import LoRAConfig, LoRALinear, inject_lora, load_adapter, save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


def ids_for(hf, n=13, seed=0):
    return torch.randint(0, hf.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def peft_model(hf, folder=None, targets=TARGETS, r=4, alpha=8):
    """PEFT LoRA on a copy of the transformers model, with random (non-zero) B so the adapter matters."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = type(hf)(hf.config).eval()
    base.load_state_dict(hf.state_dict())
    if folder is not None:
        return PeftModel.from_pretrained(base, folder).eval()
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    )
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model.eval()


def test_peft_adapter_loads_into_phikit_with_equal_logits(tiny, tmp_path):
    folder, hf = tiny
    reference = peft_model(hf)
    reference.save_pretrained(tmp_path / "peft")
    ours = load_model(folder, dtype="fp32", device="cpu")
    load_adapter(ours, tmp_path / "peft")
    ids = ids_for(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-5)


def test_phikit_adapter_loads_into_peft_with_equal_logits(tiny, tmp_path):
    folder, hf = tiny
    ours = load_model(folder, dtype="fp32", device="cpu")
    inject_lora(ours, LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS))
    torch.manual_seed(3)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    save_adapter(ours, tmp_path / "ours", base_model=str(folder))
    reference = peft_model(hf, tmp_path / "ours")
    ids = ids_for(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and sorted(config["target_modules"]) == sorted(TARGETS)


def test_only_adapters_are_trainable_and_a_fresh_adapter_changes_nothing(tiny):
    folder, hf = tiny
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = ids_for(hf)
    with torch.no_grad():
        before = model(ids)
    inject_lora(model, LoRAConfig(r=4, alpha=4, dropout=0.1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * hf.config.num_hidden_layers
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    model.train()
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A" in n)


def test_legacy_target_names_are_aliases():
    assert LoRAConfig(target_modules=["Wqkv", "out_proj"]).target_modules == ["q_proj", "k_proj", "v_proj", "dense"]
    with pytest.raises(PhikitError, match="unknown LoRA target module 'qkv'"):
        LoRAConfig(target_modules=["qkv"])


def test_merged_checkpoint_loads_in_transformers_and_phikit(tiny, tmp_path):
    from transformers import PhiForCausalLM

    folder, hf = tiny
    reference = peft_model(hf)
    reference.save_pretrained(tmp_path / "peft")
    merged_dir = phikit.api.merge_adapter(folder, tmp_path / "peft", tmp_path / "merged")
    ids = ids_for(hf)
    with torch.no_grad():
        expected = reference.merge_and_unload()(ids).logits
        via_transformers = PhiForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(ids).logits
        via_phikit = load_model(merged_dir, dtype="fp32", device="cpu")(ids)
    torch.testing.assert_close(via_transformers, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(via_phikit, expected, rtol=0, atol=1e-5)
    assert (merged_dir / "tokenizer.json").is_file()


def test_adapter_over_a_quantized_base(tiny, tmp_path):
    folder, hf = tiny
    reference = peft_model(hf)
    reference.save_pretrained(tmp_path / "peft")
    quantized = phikit.load(folder, dtype="fp32", device="cpu", quantize="int8", adapter=tmp_path / "peft")
    plain = phikit.load(folder, dtype="fp32", device="cpu", quantize="int8")
    ids = ids_for(hf)
    with torch.no_grad():
        with_adapter, without = quantized.model(ids), plain.model(ids)
        expected = reference(ids).logits
    # the adapter moves the quantized model the way it moves the full-precision one
    assert (with_adapter - expected).norm() < 0.5 * (without - expected).norm()


def test_adapter_errors(tiny, tmp_path):
    folder, hf = tiny
    model = load_model(folder, dtype="fp32", device="cpu")
    with pytest.raises(PhikitError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    reference = peft_model(hf, r=4)
    reference.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["r"] = 2
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PhikitError, match="has shape"):
        load_adapter(load_model(folder, dtype="fp32", device="cpu"), tmp_path / "peft")


def test_an_adapter_with_dropout_is_deterministic_at_inference_and_equals_peft(tiny, tmp_path):
    """PEFT-made adapter with lora_dropout 0.05 (the guanaco recipe's): phikit's inference (load with an
    adapter, generate) has no dropout, so it equals PEFT in eval mode and repeats itself exactly."""
    from peft import LoraConfig, get_peft_model

    folder, hf = tiny
    base = type(hf)(hf.config).eval()
    base.load_state_dict(hf.state_dict())
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS[:4], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "peft")
    reference = peft_model(hf, tmp_path / "peft")
    phi = phikit.load(folder, dtype="fp32", device="cpu", adapter=tmp_path / "peft")
    ids = ids_for(hf)
    with torch.no_grad():
        first, second = phi.model(ids), phi.model(ids)
        torch.testing.assert_close(first, reference(ids).logits, rtol=0, atol=1e-4)
    assert torch.equal(first, second)
    outputs = {tuple(phi.generate("Hello world", max_new_tokens=12).token_ids) for _ in range(3)}
    assert len(outputs) == 1


def test_adapters_that_do_not_fit_or_use_unsupported_options_are_refused(tiny, tmp_path):
    folder, hf = tiny
    peft_model(hf, r=4).save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 8}))
    model = load_model(folder, dtype="fp32", device="cpu")
    with pytest.raises(PhikitError, match=r"lora_A\.weight has shape \(4, 64\).*r=8"):
        load_adapter(model, tmp_path / "a")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before anything was added
    for option, value in (("modules_to_save", ["lm_head"]), ("lora_bias", True), ("exclude_modules", ["fc1"])):
        config_path.write_text(json.dumps({**config, option: value}))
        with pytest.raises(PhikitError, match=option):
            load_adapter(load_model(folder, dtype="fp32", device="cpu"), tmp_path / "a")
    config_path.write_text(json.dumps({**config, "target_modules": ["embed_tokens"]}))
    with pytest.raises(PhikitError, match="embed_tokens"):
        load_adapter(load_model(folder, dtype="fp32", device="cpu"), tmp_path / "a")


def test_an_lm_head_adapter_equals_peft(tiny, tmp_path):
    folder, hf = tiny
    peft_model(hf, targets=["q_proj", "lm_head"]).save_pretrained(tmp_path / "head")
    reference = peft_model(hf, tmp_path / "head")
    ours = phikit.load(folder, dtype="fp32", device="cpu", adapter=tmp_path / "head").model
    ids = ids_for(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-4)
