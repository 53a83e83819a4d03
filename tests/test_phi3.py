"""The Phi-3 family (Phi-3, Phi-3.5, Phi-4, Phi-4-mini) against transformers' Phi3ForCausalLM on random weights,
fp32, in four configurations (conftest.PHI3_VARIANTS): logits before and after the sliding window and the
LongRoPE switch, cached and batched decoding, and greedy tokens across both."""

import json
import math

import pytest
import torch

import phikit
from phikit.checkpoint import load_model
from phikit.config import Phi3Config
from phikit.errors import PhikitError
from phikit.generate import GenerationConfig, generate_tokens

VARIANTS = ["phi3-4k", "phi3-128k", "phi4-mini", "phi4"]


def random_ids(n: int, vocab: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 30000), (batch, n), generator=g)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_before_and_after_the_window_and_the_switch(phi3_factory, variant):
    """Lengths 10 (inside a 16-token window, before LongRoPE's switch at 32) and 60 (past both)."""
    folder, hf = phi3_factory(variant)
    model = load_model(folder, dtype="fp32", device="cpu")
    assert set(model.state_dict()) == set(hf.state_dict())
    for n in (10, 60):
        ids = random_ids(n, hf.config.vocab_size, batch=2)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_matches_the_full_forward(phi3_factory, variant):
    """A prefill, a chunk on top of the cache and single tokens, past the window (the switch is the
    generation's business: see the greedy test)."""
    folder, hf = phi3_factory(variant)
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = random_ids(30, hf.config.vocab_size)
    cache = model.new_cache(1, 40)
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :8], torch.arange(8), cache), model(ids[:, 8:25], torch.arange(8, 25), cache)]
        pieces += [model(ids[:, t : t + 1], torch.tensor([t]), cache) for t in range(25, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_equal_transformers_generate_for_64_new_tokens(phi3_factory, variant):
    """From a 20-token prompt, 64 greedy tokens run past the 16-token window and LongRoPE's switch at 32,
    where both recompute the cache with the long factors."""
    folder, hf = phi3_factory(variant)
    model = load_model(folder, dtype="fp32", device="cpu")
    prompt = random_ids(20, hf.config.vocab_size, seed=3)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0)[0, 20:].tolist()
    got = [int(t) for t in generate_tokens(model, prompt.tolist(), GenerationConfig(max_new_tokens=64), pad_id=0)]
    assert got == expected


@pytest.mark.parametrize("variant", ["phi3-4k", "phi4-mini"])
def test_left_padded_batches_match_transformers(phi3_factory, variant):
    folder, hf = phi3_factory(variant)
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = random_ids(24, hf.config.vocab_size, batch=2, seed=5)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, :6] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=valid.long()).logits
        got = model(ids, positions=positions, padding_mask=valid)
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-4)


def test_speculative_decoding_across_the_switch_equals_plain_greedy(phi3_factory):
    folder, _ = phi3_factory("phi3-128k")
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    prompt = "Hello world " * 4
    plain = phi.generate(prompt, max_new_tokens=40)
    lookup = phi.generate(prompt, max_new_tokens=40, prompt_lookup=True)
    assert lookup.token_ids == plain.token_ids


def test_hub_and_transformers_5_rope_layouts_read_the_same(phi3_factory, tmp_path):
    """The Hub's Phi-3-128k config.json (top-level rope_theta, rope_scaling of type "longrope", legacy "su")
    and the rope_parameters transformers 5 writes give one config."""
    folder, hf = phi3_factory("phi3-128k")
    saved = json.loads((folder / "config.json").read_text())
    config = Phi3Config.from_dict(saved)
    assert config.longrope is not None and config.longrope.original_max_position_embeddings == 32
    assert config.longrope.attention_factor == pytest.approx(math.sqrt(1 + math.log(256 / 32) / math.log(32)))
    hub = {k: v for k, v in saved.items() if k != "rope_parameters"}
    hub.update(rope_theta=10000.0, rope_scaling={"type": "su", **PHI3_FACTORS(saved)})
    assert Phi3Config.from_dict(hub).longrope == config.longrope
    assert Phi3Config.from_dict({**hub, "eos_token_id": [32000, 32001, 32007]}).eos_token_ids == (32000, 32001, 32007)


def PHI3_FACTORS(saved: dict) -> dict:  # noqa: N802
    rope = saved["rope_parameters"]
    return {"short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "short_factor"),
        ({"rope_parameters": {"rope_type": "dynamic"}}, "rope type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"eos_token_id": ["x"]}, "eos_token_id"),
    ],
)
def test_config_mistakes_are_named(phi3_factory, change, message):
    folder, _ = phi3_factory("phi3-4k")
    saved = json.loads((folder / "config.json").read_text())
    with pytest.raises(PhikitError, match=message):
        Phi3Config.from_dict({**saved, **change}, "config.json")


def test_tied_embeddings_load_as_one_tensor_and_a_quantized_head_apart(phi3_factory):
    folder, _ = phi3_factory("phi4-mini")
    model = load_model(folder, dtype="fp32", device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantized = phikit.load(folder, dtype="fp32", device="cpu", quantize="int8").model
    assert quantized.lm_head.format == "int8" and quantized.model.embed_tokens.weight.dtype == torch.float32


# ---- the rest of the toolkit on the family: adapters, merge, export, quantize, fine-tune, serve ----

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def peft_adapter(hf, folder, targets=TARGETS, seed=5):
    """A LoRA made by PEFT itself on the transformers model (random B, so it matters), saved to ``folder``;
    returns PEFT's model loaded from there."""
    from peft import LoraConfig, PeftModel, get_peft_model

    def copy():
        base = type(hf)(hf.config).eval()
        base.load_state_dict(hf.state_dict())
        return base

    model = get_peft_model(copy(), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(folder)
    return PeftModel.from_pretrained(copy(), folder).eval()


@pytest.mark.parametrize("variant", ["phi3-128k", "phi4-mini"])
@pytest.mark.parametrize("targets", [TARGETS, "all-linear"])
def test_peft_adapters_on_the_fused_layers_load_both_ways(phi3_factory, tmp_path, variant, targets):
    from peft import PeftModel

    from phikit.lora import LoRAConfig, inject_lora, load_adapter, save_adapter

    folder, hf = phi3_factory(variant)
    reference = peft_adapter(hf, tmp_path / "peft", targets)
    ours = load_adapter(load_model(folder, dtype="fp32", device="cpu"), tmp_path / "peft")
    ids = random_ids(40, hf.config.vocab_size, batch=2)  # past LongRoPE's switch
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-4)

    mine = inject_lora(
        load_model(folder, dtype="fp32", device="cpu"), LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=targets)
    )
    torch.manual_seed(3)
    for name, p in mine.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    save_adapter(mine, tmp_path / "ours")
    base = type(hf)(hf.config).eval()
    base.load_state_dict(hf.state_dict())
    theirs = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(ids), theirs(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["phi3-128k", "phi4-mini"])
def test_merged_export_loads_in_transformers_with_equal_logits(phi3_factory, tmp_path, variant):
    from transformers import Phi3ForCausalLM

    folder, hf = phi3_factory(variant)
    reference = peft_adapter(hf, tmp_path / "peft")
    merged = phikit.api.merge_adapter(folder, tmp_path / "peft", tmp_path / "merged")
    ids = random_ids(40, hf.config.vocab_size, batch=2)
    with torch.no_grad():
        expected = reference.merge_and_unload()(ids).logits
        via_transformers = Phi3ForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
        via_phikit = load_model(merged, dtype="fp32", device="cpu")(ids)
    torch.testing.assert_close(via_transformers, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(via_phikit, expected, rtol=0, atol=1e-4)
    saved = json.loads((merged / "config.json").read_text())
    assert saved["model_type"] == "phi3" and (merged / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("variant", ["phi3-4k", "phi4-mini"])
def test_quantized_models_match_transformers_with_dequantized_weights_and_reload(phi3_factory, tmp_path, variant, fmt):
    """The fused layers quantized (int4 groups along the input), a tied head quantized apart from the
    embedding (which stays as it was); a `phikit quantize` folder reloads to the same logits and is marked
    for phikit alone."""
    from transformers import Phi3ForCausalLM

    from phikit import kernels
    from phikit.quantize import QuantizedLinear

    folder, hf = phi3_factory(variant)
    phi = phikit.load(folder, dtype="fp32", device="cpu", quantize=fmt)
    layer = phi.model.model.layers[0]
    assert {layer.self_attn.qkv_proj.format, layer.mlp.gate_up_proj.format, phi.model.lm_head.format} == {fmt}
    torch.testing.assert_close(phi.model.model.embed_tokens.weight, hf.model.embed_tokens.weight, rtol=0, atol=0)
    config = type(hf.config).from_dict({**hf.config.to_dict(), "tie_word_embeddings": False})
    reference = Phi3ForCausalLM(config).eval()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    for name, module in phi.model.named_modules():
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = module.dequantized()
    reference.load_state_dict(state)
    ids = random_ids(24, hf.config.vocab_size)
    with torch.no_grad():
        got, expected = phi.model(ids), reference(ids).logits
    limit = 0.05 if fmt == "int4" and kernels.available() else 1e-4  # int4's kernel rounds activations to int8
    assert ((got - expected).norm() / expected.norm()).item() < limit
    out = phikit.save_quantized(phi, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["model_type"] == "phikit_quantized_phi3"
    again = phikit.load(out, dtype="fp32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), got, rtol=0, atol=1e-5)


def test_generation_stops_at_the_turn_end_token(phi3_factory):
    """<|end|> ends a reply (and is not part of it) as the EOS does: here made the model's choice by giving
    its output row the direction of the third greedy token's, ten times longer."""
    folder, _ = phi3_factory("phi3-4k")
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    end = phi.tokenizer._tok.token_to_id("<|end|>")
    free = phi.generate("Hello", template="chat", max_new_tokens=8)
    assert free.finish_reason == "length" and end not in free.token_ids
    with torch.no_grad():
        phi.model.lm_head.weight[end] = phi.model.lm_head.weight[free.token_ids[2]] * 10
    stopped = phi.generate("Hello", template="chat", max_new_tokens=8)
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 2 and "<|end|>" not in stopped.text


@pytest.mark.slow
def test_finetuning_on_chat_messages_trains_the_replies(phi3_factory, tmp_path):
    """recipes/tiny-phi3-chat-cpu.yaml: messages written with the checkpoint's chat template, loss on the
    assistant's turns only; the loss falls and the adapter loads in PEFT with equal logits."""
    from pathlib import Path

    from peft import PeftModel

    from phikit.train import TrainConfig, finetune

    repo = Path(__file__).resolve().parents[1]
    folder, hf = phi3_factory("phi4-mini")
    config = TrainConfig.from_yaml(
        repo / "recipes" / "tiny-phi3-chat-cpu.yaml",
        {
            "model": str(folder),
            "output_dir": str(tmp_path / "run"),
            "data": str(repo / "recipes/data/tiny-chat.jsonl"),
            "epochs": 4,
        },
    )
    adapter = finetune(config, progress=False)
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert losses[-1] < 0.7 * losses[0]
    tuned = phikit.load(folder, dtype="fp32", device="cpu", adapter=adapter)
    base = type(hf)(hf.config).eval()
    base.load_state_dict(hf.state_dict())
    reference = PeftModel.from_pretrained(base, adapter).eval()
    ids = random_ids(12, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(ids), reference(ids).logits, rtol=0, atol=1e-4)


def test_perplexity_equals_transformers_loss(phi3_factory, tmp_path):
    from phikit.evaluate import perplexity

    folder, hf = phi3_factory("phi3-4k")
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    ids = random_ids(40, hf.config.vocab_size)
    result = perplexity(phi.model, ids[0].tolist(), context=64)
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_server_chat_uses_the_checkpoint_template_stops_at_end_and_serves_adapters(phi3_factory, tmp_path):
    """/v1/chat/completions writes messages with the checkpoint's chat template (a system message included),
    ends the reply at <|end|>, and serves a PEFT adapter on the fused layers as its own model, in one batch
    with the base."""
    pytest.importorskip("uvicorn")
    from serving import Server

    from phikit.serve import create_app
    from phikit.templates import get_template

    folder, hf = phi3_factory("phi4-mini")
    peft_adapter(hf, tmp_path / "peft")
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a joke"}]
    prompt = get_template("chat", phi.tokenizer).render_messages(messages)
    from conftest import PHI4_MINI_TOKENIZER

    if PHI4_MINI_TOKENIZER.is_dir():  # Phi-4-mini's own template (else the fallback's, Phi-3's)
        assert prompt == "<|system|>Be brief.<|end|><|user|>Tell me a joke<|end|><|assistant|>"
    expected = phi.generate(prompt, max_new_tokens=12)
    tuned = phikit.load(folder, dtype="fp32", device="cpu", adapter=tmp_path / "peft").generate(
        prompt, max_new_tokens=12
    )
    app = create_app(phi.model, phi.tokenizer, "mini", adapters={"tuned": str(tmp_path / "peft")})
    with Server(app) as s:
        client = s.client()
        reply = client.chat.completions.create(model="mini", messages=messages, max_tokens=12, temperature=0)
        other = client.chat.completions.create(model="tuned", messages=messages, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == expected.text
        assert other.choices[0].message.content == tuned.text != expected.text
        end = phi.tokenizer._tok.token_to_id("<|end|>")
        stopped = client.chat.completions.create(
            model="mini", messages=messages, max_tokens=12, temperature=0, logit_bias={str(end): 100}
        )  # <|end|> first: an empty reply that stopped
        assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == ""


def test_sharded_hub_layout_with_generation_config_eos_list(phi3_factory, tmp_path):
    """A checkpoint as the Hub ships Phi-3-mini: safetensors shards with an index, config.json in the older
    layout (top-level rope_theta, rope_scaling), generation_config.json listing three EOS ids."""
    import shutil

    folder, hf = phi3_factory("phi3-128k")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "added_tokens", "special_tokens")):
            shutil.copyfile(f, sharded / f.name)
    saved = json.loads((sharded / "config.json").read_text())
    rope = saved.pop("rope_parameters")
    saved.update(
        rope_theta=rope["rope_theta"], rope_scaling={"type": "longrope", **PHI3_FACTORS({"rope_parameters": rope})}
    )
    (sharded / "config.json").write_text(json.dumps(saved))
    (sharded / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, 32001, 32007]}))
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    phi = phikit.load(sharded, dtype="fp32", device="cpu")
    assert phi.model.config.longrope is not None
    assert {32000, 32001, 32007} <= phi.tokenizer.stop_ids or phi.tokenizer.vocab_size < 32000
    ids = random_ids(40, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(phi.model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_qlora_on_an_nf4_base_trains_and_saves_a_peft_adapter(phi3_factory, tmp_path):
    from pathlib import Path

    from phikit.train import TrainConfig, finetune

    repo = Path(__file__).resolve().parents[1]
    folder, _ = phi3_factory("phi3-4k")
    overrides = {"model": str(folder), "output_dir": str(tmp_path / "run"), "max_steps": 6, "quantize": "nf4"}
    overrides["data"] = str(repo / "recipes/data/tiny-chat.jsonl")
    adapter = finetune(TrainConfig.from_yaml(repo / "recipes" / "tiny-phi3-chat-cpu.yaml", overrides), progress=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    tuned = phikit.load(folder, dtype="fp32", device="cpu", quantize="nf4", adapter=adapter)
    assert tuned.generate("Hi", template="chat", max_new_tokens=4).token_ids


def test_the_default_prompt_suite_writes_a_chat_model_in_its_chat_template(phi3_factory):
    from phikit.evaluate import load_suite, run_suite

    folder, _ = phi3_factory("phi3-4k")
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    result = run_suite(phi, None, max_new_tokens=4)[0]
    item = load_suite().prompts[0]
    assert result["template"] == "chat"
    assert result["text"] == phi.generate(item.prompt, template="chat", max_new_tokens=4).text


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_the_one_call_decoding_step_equals_the_modules(phi3_factory, variant, dtype, step_against_modules):
    """The CPU backend's decode step (every layer in one C call: RMSNorm, fused qkv, grouped-query attention
    over the cache, the window, partial rotary and LongRoPE tables, SwiGLU) against the modules' forward on
    the same cache contents: two rows at their own positions (continuous batching), past the window."""
    from phikit import kernels

    if not kernels.available():
        pytest.skip("CPU kernels unavailable")
    folder, hf = phi3_factory(variant)
    quantize = dtype if dtype.startswith("int") else None
    model = phikit.load(folder, dtype="fp32" if quantize else dtype, device="cpu", quantize=quantize).model
    assert model.decode_step.plan() is not None
    ids = random_ids(30, hf.config.vocab_size, batch=2, seed=1)
    pairs, _, _ = step_against_modules(model, ids)
    for got, want in pairs:
        if dtype == "fp32":
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        else:  # activations rounded to bf16 or int8 turn last-bit differences of the norms into roundings:
            # on these random int4 weights a 1e-6 relative change of the norms' output moves logits 2-7%
            assert float((got - want).norm() / want.norm()) < (0.1 if dtype == "int4" else 0.02)


def test_greedy_tokens_equal_with_and_without_the_kernels(phi3_factory):
    """fp32, every variant: 40 greedy tokens with the kernels (the one-call step) and with PHIKIT_NO_KERNELS=1
    (PyTorch's ops alone, in a fresh process)."""
    import os
    import subprocess
    import sys

    from phikit import kernels

    if not kernels.available():
        pytest.skip("CPU kernels unavailable")
    folders = {variant: str(phi3_factory(variant)[0]) for variant in VARIANTS}
    code = (
        "import json, sys, torch, phikit\n"
        "from phikit.generate import GenerationConfig, generate_tokens\n"
        "out = {}\n"
        "for name, folder in json.loads(sys.argv[1]).items():\n"
        "    m = phikit.load(folder, dtype='fp32', device='cpu').model\n"
        "    g = torch.Generator().manual_seed(3)\n"
        "    prompt = torch.randint(0, min(1000, m.config.vocab_size), (1, 20), generator=g)\n"
        "    cfg = GenerationConfig(max_new_tokens=40)\n"
        "    out[name] = [int(t) for t in generate_tokens(m, prompt.tolist(), cfg, pad_id=0)]\n"
        "print(json.dumps(out))\n"
    )

    def tokens(**env) -> dict:
        run = [sys.executable, "-c", code, json.dumps(folders)]
        done = subprocess.run(run, capture_output=True, text=True, env={**os.environ, **env}, timeout=300, check=True)
        return json.loads(done.stdout)

    assert tokens() == tokens(PHIKIT_NO_KERNELS="1")


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_prompt_prefilled_in_chunks_equals_one_forward(phi3_factory, variant):
    """``prefill`` in chunks of 7 over a 45-token prompt (past the 16-token window and LongRoPE's switch):
    the same last logits and the same cache as one forward, and decoding goes on from it equally; the
    chunks of a LongRoPE prompt past the switch take the long factors from the first chunk, as one forward."""
    folder, hf = phi3_factory(variant)
    model = load_model(folder, dtype="fp32", device="cpu")
    ids = random_ids(45, hf.config.vocab_size, batch=2, seed=4)
    slots = torch.arange(45)
    with torch.no_grad():
        whole, chunked = model.new_cache(2, 50), model.new_cache(2, 50)
        expected = model(ids, slots, whole, last_only=True)
        got = model.prefill(ids, slots, chunked, chunk=7)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(chunked.k, whole.k, rtol=0, atol=1e-5)
        nxt = expected.argmax(-1)
        torch.testing.assert_close(
            model(nxt, torch.tensor([45]), chunked), model(nxt, torch.tensor([45]), whole), rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("variant", ["phi3-4k", "phi4-mini"])
def test_left_padded_rows_decode_in_the_one_c_call(phi3_factory, variant, monkeypatch):
    """A batch of prompts of different lengths decodes through the CPU backend's one C call (each row
    attending from its first real slot; under Phi-3-4k's sliding window of 16, from the later of the two)
    with the fp16 cache of bf16 weights, and every row's greedy tokens are those of its prompt alone."""
    import phikit.backends.cpu as cpu
    from phikit import kernels
    from phikit.generate import GenerationConfig, generate_tokens

    if not kernels.available():
        pytest.skip(f"no CPU kernels here: {kernels.why_unavailable()}")
    folder, _ = phi3_factory(variant)
    model = phikit.load(folder, dtype="bf16", device="cpu").model
    calls = []
    original = kernels.decode_layers
    monkeypatch.setattr(cpu.kernels, "decode_layers", lambda *a, **k: calls.append(a[6]) or original(*a, **k))
    prompts = [random_ids(10, 300, seed=1)[0].tolist(), random_ids(4, 300, seed=2)[0].tolist()]
    config = GenerationConfig(max_new_tokens=20)  # within Phi-4-mini's LongRoPE switch (32), past the window

    def greedy(batch):
        return torch.stack(list(generate_tokens(model, batch, config, pad_id=0)), dim=1).tolist()

    together = greedy(prompts)
    assert len(calls) == 19  # every step after the prefill
    assert together == greedy(prompts[:1]) + greedy(prompts[1:])
