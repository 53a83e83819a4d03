"""LoRA against PEFT on transformers' PhiForCausalLM: same forward, adapters loadable both ways, merging."""

import json
import re

import pytest
import torch

import phikit
from phikit.checkpoint import _LEGACY_BLOCK, convert_legacy, load_model
from phikit.config import PhiConfig
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


def save_peft_adapter(hf, folder, seed=5, **options):
    """Make an adapter with PEFT itself (``options`` as peft.LoraConfig's), its LoRA B and any
    modules_to_save copy set to random values so they matter, save it, and return PEFT's model loaded from
    the folder."""
    from peft import LoraConfig, get_peft_model

    base = type(hf)(hf.config).eval()
    base.load_state_dict(hf.state_dict())
    options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **options}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **options))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
        elif ".modules_to_save." in name:
            p.data.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return peft_model(hf, folder)


def peft_targets(reference) -> list[str]:
    """The layers PEFT put a LoRA on, by their names in the transformers model."""
    from peft.tuners.lora import LoraLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules() if isinstance(m, LoraLayer))


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


def test_target_modules_match_as_peft_matches_them(tiny):
    """A list entry is a module name or its dotted tail, a string is "all-linear" (not the output layer) or a
    regex over the whole name, and modules_to_save are never adapted."""
    folder, _ = tiny

    def wrapped(**options):
        model = inject_lora(load_model(folder, dtype="fp32", device="cpu"), LoRAConfig(r=2, **options))
        return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))

    everything = wrapped(target_modules=TARGETS + ["lm_head"])
    assert wrapped(target_modules="All-Linear") == [n for n in everything if n != "lm_head"]
    with pytest.raises(PhikitError, match="no module matches"):  # fullmatch: names are model.layers.N...q_proj
        wrapped(target_modules=r"q_proj")
    assert wrapped(target_modules=r".*1\.mlp\.fc2") == ["model.layers.1.mlp.fc2"]
    assert wrapped(target_modules=["1.mlp.fc2", "model.layers.0.self_attn.dense"]) == [
        "model.layers.0.self_attn.dense",
        "model.layers.1.mlp.fc2",
    ]
    assert "lm_head" not in wrapped(target_modules=".*", modules_to_save=["lm_head"])


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
    refused = (("use_dora", True), ("lora_bias", True), ("exclude_modules", ["fc1"]), ("layers_to_transform", [0]))
    for option, value in refused:
        config_path.write_text(json.dumps({**config, option: value}))
        with pytest.raises(PhikitError, match=option):
            load_adapter(load_model(folder, dtype="fp32", device="cpu"), tmp_path / "a")
    config_path.write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(PhikitError, match="lists 'lm_head' in modules_to_save but the adapter holds no weights"):
        load_adapter(load_model(folder, dtype="fp32", device="cpu"), tmp_path / "a")
    config_path.write_text(json.dumps({**config, "target_modules": "(q_proj"}))
    with pytest.raises(PhikitError, match=r"adapter_config.json: LoRA target_modules '\(q_proj' is not a regular"):
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


@pytest.mark.parametrize(
    "targets",
    ["all-linear", r".*\.(q_proj|v_proj)", r"model\.layers\.1\.(self_attn\.dense|mlp\.fc\d)", ["fc1", "lm_head"]],
)
def test_all_linear_and_regex_adapters_wrap_the_layers_peft_wraps_with_equal_logits(tiny, tmp_path, targets):
    """PEFT saves "all-linear" as the full module paths it chose (not lm_head) and a regex as the string it
    matches against whole module names; phikit picks the same layers and gives the same logits."""
    folder, hf = tiny
    reference = save_peft_adapter(hf, tmp_path / "peft", target_modules=targets)
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    if targets == "all-linear":
        assert "model.layers.0.self_attn.q_proj" in saved and "lm_head" not in saved
    ours = load_model(folder, dtype="fp32", device="cpu")
    load_adapter(ours, tmp_path / "peft")
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALinear)) == peft_targets(reference)
    ids = ids_for(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-4)


def test_rslora_adapter_with_dropout_equals_peft_and_repeats_itself(tiny, tmp_path):
    """use_rslora scales by alpha / sqrt(r) (8 / 4 here, not 8 / 16); lora_dropout 0.05 is off at inference."""
    folder, hf = tiny
    options = dict(r=16, lora_alpha=8, lora_dropout=0.05, use_rslora=True, target_modules=TARGETS)
    reference = save_peft_adapter(hf, tmp_path / "rs", **options)
    phi = phikit.load(folder, dtype="fp32", device="cpu", adapter=tmp_path / "rs")
    assert phi.model.model.layers[0].self_attn.q_proj.scaling == 2.0
    ids = ids_for(hf)
    with torch.no_grad():
        first, second = phi.model(ids), phi.model(ids)
        torch.testing.assert_close(first, reference(ids).logits, rtol=0, atol=1e-4)
    assert torch.equal(first, second)
    merged = phikit.api.merge_adapter(folder, tmp_path / "rs", tmp_path / "merged")
    with torch.no_grad():
        expected = reference.merge_and_unload()(ids).logits
        via_phikit = load_model(merged, dtype="fp32", device="cpu")(ids)
    torch.testing.assert_close(via_phikit, expected, rtol=0, atol=1e-4)


def test_modules_to_save_lm_head_replaces_it_unmerged_merged_and_over_a_quantized_head(tiny, tmp_path):
    """TRL recipes train lm_head whole (modules_to_save): PEFT saves it as base_model.model.lm_head.weight
    and .bias; phikit puts it in place of lm_head, keeps it when merging, and over an int8 model (whose
    lm_head is quantized) uses it in full precision."""
    from safetensors.torch import load_file
    from transformers import PhiForCausalLM

    folder, hf = tiny
    adapter = tmp_path / "head"
    reference = save_peft_adapter(hf, adapter, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    saved = load_file(adapter / "adapter_model.safetensors")
    assert {"base_model.model.lm_head.weight", "base_model.model.lm_head.bias"} <= set(saved)
    head = saved["base_model.model.lm_head.weight"]
    assert not torch.equal(head, hf.lm_head.weight)
    ours = load_model(folder, dtype="fp32", device="cpu")
    load_adapter(ours, adapter)
    assert torch.equal(ours.lm_head.weight, head) and not isinstance(ours.lm_head, LoRALinear)
    quantized = phikit.load(folder, dtype="fp32", device="cpu", quantize="int8", adapter=adapter).model
    assert quantized.lm_head.weight.dtype == torch.float32 and torch.equal(quantized.lm_head.weight, head)
    ids = ids_for(hf)
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=1e-4)
        without = phikit.load(folder, dtype="fp32", device="cpu", quantize="int8").model(ids)
        assert (quantized(ids) - expected).norm() < 0.5 * (without - expected).norm()  # int8 rounding remains
    merged = phikit.api.merge_adapter(folder, adapter, tmp_path / "merged")
    with torch.no_grad():
        expected = reference.merge_and_unload()(ids).logits
        via_transformers = PhiForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(via_transformers, expected, rtol=0, atol=1e-4)


def test_the_multi_adapter_server_refuses_modules_to_save_naming_the_folder(tiny, tmp_path):
    from phikit.serve.adapters import load_adapters

    folder, hf = tiny
    save_peft_adapter(hf, tmp_path / "head", target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = load_model(folder, dtype="fp32", device="cpu")
    message = (
        rf"{re.escape(str(tmp_path / 'head'))}: replaces whole weights \(modules_to_save: lm_head\.(weight|bias)\)"
    )
    with pytest.raises(PhikitError, match=message):
        load_adapters(model, {"head": tmp_path / "head"}, max_rows=2)


def legacy_state(hf) -> dict[str, torch.Tensor]:
    """transformers' weights under the remote-code (phi-msft) names, q, k and v fused into Wqkv by rows: the
    loader's renames (phikit.checkpoint._LEGACY_BLOCK) read backwards."""
    native = hf.state_dict()
    state = {"transformer.embd.wte.weight": native["model.embed_tokens.weight"]}
    for kind in ("weight", "bias"):
        state[f"lm_head.ln.{kind}"] = native[f"model.final_layernorm.{kind}"]
        state[f"lm_head.linear.{kind}"] = native[f"lm_head.{kind}"]
        for i in range(hf.config.num_hidden_layers):
            layer = f"model.layers.{i}"
            qkv = [native[f"{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            state[f"transformer.h.{i}.mixer.Wqkv.{kind}"] = torch.cat(qkv)
            for old, new in _LEGACY_BLOCK.items():
                state[f"transformer.h.{i}.{old}.{kind}"] = native[f"{layer}.{new}.{kind}"]
    return state


def from_legacy(state: dict[str, torch.Tensor], folder) -> dict[str, torch.Tensor]:
    """A legacy state under transformers' names, by the loader's conversion."""
    config = PhiConfig.from_json(folder / "config.json")
    return {new: t for name, tensor in state.items() for new, t in convert_legacy(name, tensor, config)}


LEGACY_LAYERS = ("mixer.Wqkv", "mixer.out_proj", "mlp.fc1", "mlp.fc2")
LEGACY_HEAD = ("lm_head.ln.weight", "lm_head.ln.bias", "lm_head.linear.weight", "lm_head.linear.bias")


@pytest.mark.parametrize(
    "targets, layers, options",
    [
        (["Wqkv", "out_proj", "fc1", "fc2"], LEGACY_LAYERS, {}),
        ("full paths", LEGACY_LAYERS, {"modules_to_save": ["lm_head"], "use_rslora": True}),
        (r"transformer\.h\.\d+\.mixer\.(Wqkv|out_proj)", LEGACY_LAYERS[:2], {"lora_dropout": 0.05}),
    ],
)
def test_legacy_layout_adapter_equals_merging_it_into_the_legacy_weights(tiny, tmp_path, targets, layers, options):
    """Many published Phi-2 adapters target the remote-code layout (transformer.h.N.mixer.Wqkv ...). phikit
    splits the fused Wqkv LoRA (A shared, B cut into q, k and v rows); the reference merges W + scale B A
    into the legacy fused weights, converts them with the loader's renames, and runs transformers. With
    modules_to_save lm_head the legacy head (its layer norm and linear layer) is replaced whole."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import PhiForCausalLM

    folder, hf = tiny
    legacy = legacy_state(hf)
    native = hf.state_dict()
    assert all(torch.equal(t, native[name]) for name, t in from_legacy(legacy, folder).items())
    assert from_legacy(legacy, folder).keys() == native.keys()  # the loader reads it back as transformers'
    r, alpha = 4, 8
    scaling = alpha / r**0.5 if options.get("use_rslora") else alpha / r
    modules = [f"transformer.h.{i}.{m}" for i in range(hf.config.num_hidden_layers) for m in layers]
    generator = torch.Generator().manual_seed(11)
    tensors, merged = {}, dict(legacy)
    for module in modules:
        out_features, in_features = legacy[f"{module}.weight"].shape  # Wqkv: (3 * hidden, hidden)
        a = torch.randn(r, in_features, generator=generator) * 0.1
        b = torch.randn(out_features, r, generator=generator) * 0.1
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
        merged[f"{module}.weight"] = legacy[f"{module}.weight"] + scaling * b @ a
    if options.get("modules_to_save"):
        for name in LEGACY_HEAD:
            tensors[name] = merged[name] = legacy[name] + 0.1 * torch.randn(legacy[name].shape, generator=generator)
    adapter = tmp_path / "legacy"
    targets = modules if targets == "full paths" else targets  # as PEFT saves "all-linear"
    LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", **options).save_pretrained(adapter)
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, adapter / "adapter_model.safetensors")

    reference = PhiForCausalLM(hf.config).eval()
    reference.load_state_dict(from_legacy(merged, folder))
    ours = load_model(folder, dtype="fp32", device="cpu")
    load_adapter(ours, adapter)
    merged_dir = phikit.api.merge_adapter(folder, adapter, tmp_path / "merged")
    ids = ids_for(hf)
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=1e-4)
        via_transformers = PhiForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(via_transformers, expected, rtol=0, atol=1e-4)


def test_a_legacy_adapter_for_another_model_is_refused_naming_the_tensor(tiny, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder, hf = tiny
    hidden = hf.config.hidden_size
    tensors = {
        "base_model.model.transformer.h.0.mixer.Wqkv.lora_A.weight": torch.zeros(4, hidden),
        "base_model.model.transformer.h.0.mixer.Wqkv.lora_B.weight": torch.zeros(2 * hidden, 4),  # not q + k + v
    }
    LoraConfig(r=4, target_modules=["Wqkv"], task_type="CAUSAL_LM").save_pretrained(tmp_path / "bad")
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")
    with pytest.raises(PhikitError, match=r"transformer\.h\.0\.mixer\.Wqkv.*does not split into this model's q, k"):
        load_adapter(load_model(folder, dtype="fp32", device="cpu"), tmp_path / "bad")
