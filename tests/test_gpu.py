"""On a CUDA/ROCm GPU (skipped without one): logits and greedy generation against transformers, graph-replayed
and compiled decoding against eager, the quantized kernels against their dequantized reference and NF4
against bitsandbytes' own, QLoRA whose adapter PEFT loads, speculative and batched generation, the server.
``benchmarks/gpu_check.sh`` runs these first."""

import json
import threading

import pytest
import torch
import torch.nn.functional as F

import phikit
from phikit import backends
from phikit.backends import cuda
from phikit.config import PhiConfig
from phikit.generate import GenerationConfig, generate, generate_tokens
from phikit.quantize import QuantizedLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]

# head_dim 80 and a rotary dim of 32, as Phi-2's; K multiple of 64 for int4
SHAPE = dict(hidden_size=320, num_attention_heads=4, intermediate_size=1280, partial_rotary_factor=0.4)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROMPTS = ["Hello world", "def add(a, b):", "The lighthouse keeper climbed"]


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory(**SHAPE)[0]


def transformers_model(folder, dtype: str, **kwargs):
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], attn_implementation="sdpa", **kwargs)
    return (model if "quantization_config" in kwargs else model.cuda()).eval()


def ids_for(vocab: int, n: int = 33, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, min(vocab, 5000), (batch, n), generator=torch.Generator().manual_seed(seed)).cuda()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_logits_match_transformers(ckpt, dtype):
    """As close to fp32 as transformers' own fp16/bf16 model is (both checked against transformers fp32)."""
    phi = phikit.load(ckpt, dtype=dtype, device="cuda")
    ids = ids_for(phi.model.config.vocab_size)
    with torch.inference_mode():
        exact = transformers_model(ckpt, "fp32")(ids).logits
        theirs = transformers_model(ckpt, dtype)(ids).logits
        ours = phi.model(ids)
    assert ours.dtype == DTYPES[dtype] and torch.isfinite(ours).all()
    assert relative(ours, exact) <= 1.5 * relative(theirs, exact) + 1e-3


def _assert_same_greedy_up_to_near_ties(hf, prompt_ids: list[int], ours: list[int], theirs: list[int]) -> None:
    """Equal tokens, or a first difference where transformers' own logits nearly tie (fp16 rounding)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            with torch.inference_mode():
                logits = hf(torch.tensor([prompt_ids + theirs[:i]], device="cuda")).logits[0, -1].float()
            assert (logits[b] - logits[a]).item() < 0.05, f"step {i}: {a} vs {b}"
            return


def test_greedy_generation_equals_transformers_fp16(ckpt):
    phi = phikit.load(ckpt, dtype="fp16", device="cuda")
    hf = transformers_model(ckpt, "fp16")
    for prompt in PROMPTS:
        ids = phi.tokenizer.encode(prompt)
        ours = phi.generate(prompt, max_new_tokens=24).token_ids
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([ids], device="cuda"),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=phi.tokenizer.eos_id,
                eos_token_id=phi.tokenizer.eos_id,
            )
        theirs = [t for t in out[0, len(ids) :].tolist() if t != phi.tokenizer.eos_id]
        _assert_same_greedy_up_to_near_ties(hf, ids, ours, theirs[: len(ours)])


def forced_logits(model, prompt: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Logits of a prefill and then one token at a time (teacher-forced), through ``model``'s decoding."""
    cache = model.new_cache(prompt.shape[0], 256)
    with torch.inference_mode():
        out = [model(prompt, torch.arange(prompt.shape[1], device="cuda"), cache, last_only=True)]
        for i in range(forced.shape[1]):
            slot = torch.tensor([prompt.shape[1] + i], device="cuda")
            out.append(model.decode_step(forced[:, i : i + 1], slot, cache))
    return torch.cat(out, dim=1).float()


@pytest.mark.parametrize("compiled", [False, True])
def test_graph_replayed_decoding_equals_eager(ckpt, compiled):
    """bf16 logits step by step (the graph's masked attention over the whole cache and, compiled, fused
    kernels round differently from eager's), then fp32 greedy tokens, equal."""
    for dtype in ("bf16", "fp32"):
        model = phikit.load(ckpt, dtype=dtype, device="cuda").model
        cuda.set_compiled_layers(model, compiled)
        vocab = model.config.vocab_size
        if dtype == "bf16":
            prompt, forced = ids_for(vocab, 12), ids_for(vocab, 20, seed=1)
            model.decode_step.enabled = True
            graphed = forced_logits(model, prompt, forced)
            assert len(model.decode_step.graphs) == 1
            model.decode_step.enabled = False
            assert relative(graphed, forced_logits(model, prompt, forced)) < 1e-2
            continue
        config = GenerationConfig(max_new_tokens=16)
        model.decode_step.enabled = True
        greedy = [s.tolist() for s in generate_tokens(model, [[5, 6, 7], [8, 9]], config, 0)]
        assert len(model.decode_step.graphs) == 1
        model.decode_step.enabled = False
        assert greedy == [s.tolist() for s in generate_tokens(model, [[5, 6, 7], [8, 9]], config, 0)]


@pytest.mark.parametrize("fmt,limit", [("int8", 1e-2), ("int4", 2e-2), ("nf4", 2e-2)])
def test_quantized_layers_match_their_dequantized_reference(fmt, limit):
    """Phi-2's shapes; int4 through tinygemm on sm80+ (its bf16 scales round ours), nf4 re-packed for
    bitsandbytes and compared with bitsandbytes' own dequantization of it."""
    torch.manual_seed(0)
    weight, bias = torch.randn(2560, 2560, device="cuda") * 0.02, torch.randn(2560, device="cuda") * 0.1
    layer = QuantizedLinear.from_weight(weight, bias, fmt, 64, "cuda")
    backends.bind_kernel(layer)
    layer.packed = cuda.PREPARE[fmt](layer)
    if fmt == "int4" and cuda.tinygemm_supported(weight.device):
        assert "tinygemm" in layer.packed.name
    if fmt == "int8" and layer.packed.name.startswith("bitsandbytes"):  # timed faster: int8 activations too
        limit = 2e-2
    reference = layer.dequantized().to(weight.device)
    if fmt == "nf4":
        import bitsandbytes.functional as bnbf

        reference = bnbf.dequantize_4bit(*layer.packed.tensors).float()
    for rows in (1, 5, 64):
        x = torch.randn(rows, 2560, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            got = layer(x)
        assert relative(got, F.linear(x.float(), reference, bias)) < limit, (fmt, rows, layer.packed.name)


def test_nf4_model_matches_transformers_with_bitsandbytes(ckpt):
    from transformers import BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs_model = transformers_model(ckpt, "bf16", quantization_config=bnb_config, device_map={"": 0})
    phi = phikit.load(ckpt, dtype="bf16", device="cuda", quantize="nf4")
    assert "bitsandbytes Linear4bit nf4" in backends.kernel_names(phi.model)
    ids = ids_for(phi.model.config.vocab_size)
    with torch.inference_mode():
        theirs, ours = theirs_model(ids).logits, phi.model(ids)
        exact = transformers_model(ckpt, "fp32")(ids).logits
    assert relative(ours, theirs) < 0.02 and relative(ours, exact) < 1.5 * relative(theirs, exact) + 1e-3
    tokens = phi.generate(PROMPTS[0], max_new_tokens=16).token_ids  # decoding through graphs with bnb's gemv
    assert len(tokens) > 0


def test_qlora_learns_and_its_adapter_loads_in_peft(ckpt, tmp_path):
    from pathlib import Path

    from peft import PeftModel

    from phikit.train import TrainConfig, finetune

    data = Path(__file__).resolve().parents[1] / "recipes" / "data" / "tiny-instructions.jsonl"
    config = TrainConfig(
        model=str(ckpt),
        output_dir=str(tmp_path / "run"),
        data=str(data),
        data_format="text",
        template="guanaco",
        quantize="nf4",
        dtype="bf16",
        device="cuda",
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.05,
        seq_len=128,
        packing=True,
        batch_size=4,
        grad_accum=1,
        lr=2e-3,
        warmup_steps=3,
        max_steps=30,
        optimizer="paged_adamw_8bit",
        gradient_checkpointing=True,
        eval_every=1000,
        save_every=1000,
    )
    adapter = finetune(config, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0]
    ids = ids_for(PhiConfig.from_json(ckpt / "config.json").vocab_size)
    with torch.inference_mode():
        peft = PeftModel.from_pretrained(transformers_model(ckpt, "fp32"), adapter).eval()
        expected = peft(ids).logits
        got = phikit.load(ckpt, dtype="fp32", device="cuda", adapter=adapter).model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_speculative_and_batched_generation(ckpt, checkpoint_factory):
    phi = phikit.load(ckpt, dtype="fp32", device="cuda")
    draft = phikit.load(checkpoint_factory(seed=3, **SHAPE)[0], dtype="fp32", device="cuda").model
    for prompt in PROMPTS:
        greedy = phi.generate(prompt, max_new_tokens=24).token_ids
        assert phi.generate(prompt, max_new_tokens=24, prompt_lookup=True).token_ids == greedy
        assert generate(phi.model, phi.tokenizer, prompt, draft=draft, max_new_tokens=24).token_ids == greedy
    batched = phi.generate(PROMPTS, max_new_tokens=16)
    assert [c.token_ids for c in batched] == [phi.generate(p, max_new_tokens=16).token_ids for p in PROMPTS]


def test_server_answers(ckpt):
    from fastapi.testclient import TestClient

    from phikit.serve import create_app

    phi = phikit.load(ckpt, dtype="fp32", device="cuda")
    app = create_app(phi.model, phi.tokenizer, "tiny", "guanaco", max_batch=4, max_queue=16)
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["text"] == phi.generate(PROMPTS[0], max_new_tokens=16).text
        replies = []

        def ask(prompt):
            replies.append(client.post("/v1/completions", json={**body, "prompt": prompt}))

        threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in replies] == [200] * 6
        messages = [{"role": "user", "content": "Hi"}]
        chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert chat.status_code == 200
