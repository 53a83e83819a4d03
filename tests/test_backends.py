"""The backends' seams on the CPU: the CUDA backend's graph-replayed decoding and its kernel-table entries run
here on CPU twins (an eager stand-in for graph capture, the same PyTorch / bitsandbytes ops on CPU tensors),
so everything but the CUDA kernels themselves is tested without a GPU; tests/test_gpu.py runs the rest."""

import pytest
import torch
import torch.nn.functional as F

import phikit
from phikit import backends
from phikit.backends import cuda
from phikit.checkpoint import load_model
from phikit.generate import GenerationConfig, generate_tokens
from phikit.models import CausalLM, changed
from phikit.quantize import QuantizedLinear

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]


def eager_capture(step):
    """CPU twin of ``cuda.capture_cuda_graph``: 'replay' re-runs the step into the same output tensor."""
    out = step()
    return (lambda: out.copy_(step())), out


def graphed(model: CausalLM, compiled: bool = False) -> CausalLM:
    cuda.install(model)
    model.decode_step.graph_device, model.decode_step.capture = "cpu", eager_capture
    cuda.set_compiled_layers(model, compiled)
    return model


def greedy(model, prompts, n=10) -> list[list[int]]:
    steps = generate_tokens(model, prompts, GenerationConfig(max_new_tokens=n), pad_id=0)
    return torch.stack(list(steps), dim=1).tolist()


def test_model_and_quantize_import_no_backend():
    import ast
    from pathlib import Path

    root = Path(phikit.__file__).parent
    for path in [*sorted((root / "models").glob("*.py")), root / "quantize.py", root / "config.py"]:
        name = path.name
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m and ("backends" in m or "kernels" in m or "ctypes" in m)], name


@pytest.mark.parametrize("compiled", [False, True])
def test_graph_replayed_decoding_equals_the_plain_model(tiny, monkeypatch, compiled):
    """Batched (left-padded) and single-row greedy decoding through captured steps, with the decoder layer
    compiled (aot_eager: dynamo and functionalisation of the in-place cache writes) or not."""
    monkeypatch.setattr(cuda, "_cuda_layers", {})  # compiled anew, with aot_eager
    monkeypatch.setattr(cuda, "COMPILE_BACKEND", "aot_eager")
    folder, _ = tiny
    plain = load_model(folder, dtype="fp32", device="cpu")
    model = graphed(load_model(folder, dtype="fp32", device="cpu"), compiled)
    for prompts in (PROMPTS, PROMPTS[:1]):
        assert greedy(model, prompts) == greedy(plain, prompts)
    graphs = model.decode_step.graphs
    assert len(graphs) == 2  # one per cache layout and batch
    greedy(model, PROMPTS[:1])  # same cache size again: the allocator may reuse the address, or capture anew
    assert 2 <= len(graphs) <= cuda.MAX_GRAPHS


@pytest.mark.parametrize("variant", ["phi3-4k", "phi3-128k", "phi4-mini"])
def test_graph_replayed_decoding_of_the_phi3_family_equals_the_plain_model(phi3_factory, monkeypatch, variant):
    """Past the sliding window and across LongRoPE's switch (prefilled again through the plain forward), with
    the Phi-3 decoder layer compiled (aot_eager)."""
    monkeypatch.setattr(cuda, "_cuda_layers", {})
    monkeypatch.setattr(cuda, "COMPILE_BACKEND", "aot_eager")
    folder, _ = phi3_factory(variant)
    plain = load_model(folder, dtype="fp32", device="cpu")
    model = graphed(load_model(folder, dtype="fp32", device="cpu"), compiled=True)
    prompts = [list(range(100, 120)), list(range(300, 310))]
    assert greedy(model, prompts, n=30) == greedy(plain, prompts, n=30)
    assert type(model.model.layers[0]).__name__ == "CudaPhi3DecoderLayer"


def test_graph_replayed_steps_with_a_slot_per_row_match_the_plain_model(tiny):
    """Continuous batching's step: rows at their own slots of a larger cache's first rows."""

    folder, _ = tiny
    plain = load_model(folder, dtype="fp32", device="cpu")
    model = graphed(load_model(folder, dtype="fp32", device="cpu"))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([5, 9])

    def step(net) -> torch.Tensor:
        cache = net.new_cache(3, 16)
        with torch.inference_mode():
            for row, n in enumerate(lengths.tolist()):
                net(ids[row : row + 1, :n], torch.arange(n), cache.rows(row))
            rows = cache.rows(0, 2)
            out = [net.decode_step(ids[[0, 1], lengths + i][:, None], (lengths + i)[:, None], rows) for i in range(3)]
        return torch.cat(out, dim=1)

    torch.testing.assert_close(step(model), step(plain), rtol=0, atol=1e-5)
    assert len(model.decode_step.graphs) == 1


def test_graphs_are_not_used_under_autograd_or_in_training(tiny):
    folder, _ = tiny
    model = graphed(load_model(folder, dtype="fp32", device="cpu"))
    cache = model.new_cache(1, 8)
    model(torch.tensor([[5, 6]]), torch.arange(2), cache)
    model.decode_step(torch.tensor([[7]]), torch.tensor([2]), cache)  # grad enabled: the plain step
    assert not model.decode_step.graphs
    model.train()
    with torch.inference_mode():
        model.decode_step(torch.tensor([[7]]), torch.tensor([2]), cache)
    assert not model.decode_step.graphs
    model.eval()
    with torch.inference_mode():
        model.decode_step(torch.tensor([[7]]), torch.tensor([2]), cache)
    assert len(model.decode_step.graphs) == 1


def test_a_swapped_module_is_captured_anew_once_the_model_says_it_changed(tiny):
    folder, _ = tiny
    model = graphed(load_model(folder, dtype="fp32", device="cpu"))
    before = greedy(model, PROMPTS[:1])
    with torch.no_grad():
        fc2 = model.model.layers[0].mlp.fc2
        replacement = torch.nn.Linear(fc2.in_features, fc2.out_features)
        replacement.weight.copy_(fc2.weight * 3)
        replacement.bias.copy_(fc2.bias)
        model.model.layers[0].mlp.fc2 = replacement
    changed(model)  # what lora.inject_lora / load_adapter / merge_lora do
    after = greedy(model, PROMPTS[:1])
    plain = load_model(folder, dtype="fp32", device="cpu")
    with torch.no_grad():
        plain.model.layers[0].mlp.fc2.weight.mul_(3)
    assert after == greedy(plain, PROMPTS[:1]) and after != before


# ---- the CUDA kernel table's entries on CPU tensors ----

N, K = 64, 256


def _layer(fmt: str) -> QuantizedLinear:
    torch.manual_seed(0)
    layer = QuantizedLinear.from_weight(torch.randn(N, K) * 0.05, torch.randn(N) * 0.1, fmt, 64)
    return layer


def _relative_error(layer: QuantizedLinear, x: torch.Tensor) -> float:
    expected = F.linear(x.float(), layer.dequantized(), layer.bias)
    with torch.inference_mode():
        got = layer(x).float()
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("rows", [1, 7])
def test_cuda_int8_entry_on_cpu_tensors(rows):
    layer = _layer("int8")
    layer.packed = cuda.prepare_int8(layer)
    layer.kernel = cuda.int8_linear
    assert layer.packed.name == "torch _weight_int8pack_mm"
    assert _relative_error(layer, torch.randn(2, rows, K, dtype=torch.bfloat16)) < 1e-2


def test_cuda_int8_entry_falls_back_to_bitsandbytes(monkeypatch):
    pytest.importorskip("bitsandbytes")
    layer = _layer("int8")

    def missing(*args):
        raise NotImplementedError("not on this device")

    with monkeypatch.context() as m:
        m.setattr(torch.ops.aten, "_weight_int8pack_mm", missing)
        layer.packed = cuda.prepare_int8(layer)
    layer.kernel = cuda.int8_linear
    assert layer.packed.name.startswith("bitsandbytes")
    assert _relative_error(layer, torch.randn(3, K, dtype=torch.bfloat16)) < 2e-2  # activations to int8 per row


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_cuda_4bit_entries_through_bitsandbytes_on_cpu_tensors(fmt):
    """Without tinygemm (a CPU tensor here, a T4 or ROCm there) int4 goes to bitsandbytes' 4-bit kernels,
    as phikit-quantized NF4 does: re-quantized once, so within 4-bit rounding of the reference."""
    pytest.importorskip("bitsandbytes")
    layer = _layer(fmt)
    layer.packed = cuda.PREPARE[fmt](layer)
    layer.kernel = backends.KERNELS[(fmt, "cuda")]
    assert layer.packed.name.startswith("bitsandbytes matmul_4bit nf4")
    assert _relative_error(layer, torch.randn(1, 1, K, dtype=torch.bfloat16)) < 0.15
    x = torch.randn(4, K, requires_grad=True)
    layer(x).sum().backward()  # int4's entry declines under autograd (the reference runs); nf4 has a backward
    assert x.grad is not None


def test_kernel_names_say_what_runs(tiny):
    folder, _ = tiny
    assert backends.kernel_names(phikit.load(folder, device="cpu", quantize="int8").model) == ["int8: cpu.int8_linear"]
    assert backends.kernel_names(phikit.load(folder, dtype="bf16", device="cpu").model)[0].startswith("bfloat16: ")


def test_cuda_int8_fallback_gives_bitsandbytes_fp16_activations(monkeypatch):
    """bitsandbytes 0.50's CUDA int8 quantizer takes float16 only ("A must be float16"): bf16 activations
    are converted for it, and the answer comes back in the activations' dtype."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    layer = _layer("int8")
    real = bnbf.int8_vectorwise_quant

    def fp16_only(A, *args, **kw):
        assert A.dtype == torch.float16, "A must be float16"
        return real(A, *args, **kw)

    monkeypatch.setattr(bnbf, "int8_vectorwise_quant", fp16_only)
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *a: (_ for _ in ()).throw(RuntimeError()))
    layer.packed = cuda.prepare_int8(layer)
    layer.kernel = cuda.int8_linear
    assert layer.packed.name.startswith("bitsandbytes")
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert layer(x).dtype == torch.bfloat16
    assert _relative_error(layer, x) < 2e-2


@pytest.mark.parametrize("faster", ["torch _weight_int8pack_mm", "bitsandbytes int8_linear_matmul"])
def test_cuda_int8_kernel_is_chosen_by_timing_once_per_shape(monkeypatch, faster):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(cuda, "_int8_choice", {})
    timed = []

    def seconds(run, x):
        name = run.args[1].name
        timed.append(name)
        return 1.0 if name == faster else 2.0

    monkeypatch.setattr(cuda, "_seconds", seconds)
    for _ in range(3):
        layer = _layer("int8")
        layer.packed = cuda.prepare_int8(layer)
        layer.kernel = cuda.int8_linear
        assert layer.packed.name == faster
        assert _relative_error(layer, torch.randn(2, K, dtype=torch.bfloat16)) < 2e-2
    assert len(timed) == 2  # both timed once; the next layers of that shape reuse the choice


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_without_bitsandbytes_the_cuda_entries_fall_back_to_the_reference(monkeypatch, capsys, fmt):
    monkeypatch.setattr(cuda, "bnb_available", lambda: False)
    monkeypatch.setattr(cuda, "_warned", set())
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *a: (_ for _ in ()).throw(RuntimeError()))
    layer = _layer(fmt)
    layer.packed = cuda.PREPARE[fmt](layer)
    layer.kernel = backends.KERNELS[(fmt, "cuda")]
    assert layer.packed is cuda.REFERENCE
    assert _relative_error(layer, torch.randn(2, K)) < 1e-5  # dequantized and multiplied
    assert "bitsandbytes is not usable here" in capsys.readouterr().err


def test_a_kernel_with_its_own_layout_leaves_the_checkpoint_layout_on_the_host(monkeypatch):
    """On the GPU only the kernel's layout stays (tinygemm's or bitsandbytes'); the checkpoint's buffers
    move to the host (``meta`` here, so that any read of them by the kernel would fail), the layer still
    computes where it did, LoRA attaches there, and the state dict keeps its names."""
    pytest.importorskip("bitsandbytes")
    from phikit.lora import LoRALinear

    layer = _layer("int4")
    names = set(layer.state_dict())
    layer.packed = cuda.prepare_int4(layer)
    layer.kernel = backends.KERNELS[("int4", "cuda")]
    x = torch.randn(1, 1, K, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = layer(x)
    assert layer.packed.own_layout
    cuda.keep_kernel_layout_only(layer, host="meta")
    assert layer.weight.is_meta and layer.device == torch.device("cpu")
    with torch.inference_mode():
        assert torch.equal(layer(x), before)
    assert set(layer.state_dict()) == names
    assert backends.bind_kernel(layer).kernel is backends.KERNELS[("int4", "cpu")]  # by where it computes
    assert LoRALinear(layer, r=2, alpha=2, dropout=0.0).lora_A.weight.device == torch.device("cpu")


def test_past_the_recompile_limit_decoding_says_so_and_runs_uncompiled(tiny, monkeypatch, capsys):
    """Dynamo would otherwise run the layer eager without a word: here the limit is 1 compile, the second
    batch shape needs another, and the step says so once on stderr, turns compiling off and stays correct."""
    import torch._dynamo

    monkeypatch.setattr(cuda, "_cuda_layers", {})
    monkeypatch.setattr(cuda, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):
        folder, _ = tiny
        plain = load_model(folder, dtype="fp32", device="cpu")
        model = graphed(load_model(folder, dtype="fp32", device="cpu"), compiled=True)
        assert torch._dynamo.config.fail_on_recompile_limit_hit  # install made the limit loud
        for prompts in (PROMPTS, PROMPTS[:1]):
            assert greedy(model, prompts) == greedy(plain, prompts)
    torch._dynamo.reset()
    assert "decoding uncompiled" in capsys.readouterr().err
    assert not any(getattr(m, "compiled", False) for m in model.modules())
