"""The CUDA backend (NVIDIA; AMD ROCm through the same ``torch.cuda`` API): kernels that others maintain,
and decoding steps replayed from CUDA graphs.

- fp16/bf16: the plain model as is: cuBLAS matmuls and SDPA's flash / memory-efficient attention, whose
  fp32 accumulators keep Phi-2's scores from overflowing fp16.
- int4: PyTorch's tinygemm (``_weight_int4pack_mm``, Ampere and newer, bf16 activations); int8:
  PyTorch's ``_weight_int8pack_mm``; NF4: bitsandbytes (``matmul_4bit``, whose gemv serves batch 1).
  Where tinygemm or the int8 op do not run (T4 is sm75; ROCm) bitsandbytes' 4-bit / 8-bit kernels do.
  The weight is never dequantized whole per call. ``kernel_names(model)`` says which ran.
- Decoding: batch-1 decoding is bound by launching ~1000 small kernels per token, not by the GPU. The
  model's ``decode_step`` (``CudaGraphStep``) captures a one-token step (a slot per row, static shapes, a
  preallocated cache) once per cache and batch as a CUDA graph and replays it, as gpt-fast does with
  ``mode="reduce-overhead"``; graphs are keyed by the cache's layout, the batch and the model's ``version``
  (bumped when adapters are loaded or merged). The decoder layer of that step is first compiled by
  ``torch.compile`` (one layer's code, reused by every layer: seconds, not minutes) so its element-wise ops
  fuse. Prefill stays eager: it is never recompiled per length. The compile specialises on the first
  shape and, on a second, recompiles once with dynamic shapes (torch's automatic dynamic), so the server's
  batch sizes (rounded up to powers of two by its engine) and generation's cache lengths (rounded up to 256)
  do not compile once each; past torch's recompile limit it fails loudly, turning compiling off with one
  line on stderr, instead of running eager unseen. ``PHIKIT_CUDA_GRAPHS=0`` / ``PHIKIT_CUDA_COMPILE=0``
  turn either off.
- Memory: a weight whose kernel keeps its own layout (tinygemm's int4, bitsandbytes' NF4) has the
  checkpoint's layout moved to host memory, where ``state_dict`` (saving) and the autograd path read it: the
  GPU holds one layout. int8 kernels read the checkpoint's codes themselves.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from phikit.kernels.build import _env_off
from phikit.models import CausalLM
from phikit.quantize import QuantizedLinear, bnb_available, int4_scales_and_zeros, unpack_nibbles

MAX_GRAPHS = 8  # captured decoding steps kept (the server's batch sizes, a generate call's cache)
COMPILE_BACKEND = "inductor"  # torch.compile's backend for the decoder layers (the CPU twin tests use aot_eager)


@dataclass
class Packed:
    """A kernel's own layout of a layer's weight, made once at load time; ``name`` says which kernel.
    ``own_layout``: the kernel reads these tensors only, not the layer's checkpoint buffers."""

    name: str
    tensors: tuple
    own_layout: bool = False


REFERENCE = Packed("reference (dequantized per call: bitsandbytes is not usable here)", ())
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"phikit: {message}", file=sys.stderr)


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _flat(x: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, k).to(dtype).contiguous()


def _add_bias(y: torch.Tensor, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def tinygemm_supported(device: torch.device) -> bool:
    """PyTorch's int4 kernel needs an NVIDIA GPU of compute capability 8.0 (Ampere) or newer; on ROCm its
    availability is not assumed either way: ``prepare_int4`` tries it on the first layer against the
    reference and falls back to bitsandbytes where it fails."""
    if device.type != "cuda":
        return False
    return torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (8, 0)


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def _bnb_4bit(layer: QuantizedLinear, why: str) -> Packed:
    """bitsandbytes NF4 (double quantization, blocks of 64) made from the layer's dequantized weight; the
    reference where bitsandbytes cannot be imported (said once on stderr, not at the first forward)."""
    if not bnb_available():
        _warn_once(f"bitsandbytes is not usable here: {layer.format} layers run dequantized (slow){why}")
        return REFERENCE
    import bitsandbytes.functional as bnbf

    weight = layer.dequantized().to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return Packed(f"bitsandbytes matmul_4bit nf4{why}", (packed, state), own_layout=True)


def _run_bnb_4bit(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    import bitsandbytes as bnb

    packed, state = layer.packed.tensors
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    y = bnb.matmul_4bit(x.to(dtype), packed.t(), quant_state=state)
    return _add_bias(y, layer, x)


_high_nibble_first: list[bool] = []  # tinygemm's nibble order, checked once per process against the reference


def _matches_reference(layer: QuantizedLinear, run) -> bool:
    """Whether ``run`` (bf16 activations -> outputs) gives x @ dequantized.T within bf16's rounding."""
    probe = torch.randn(4, layer.in_features, device=layer.weight.device, dtype=torch.bfloat16)
    expected = probe.float() @ layer.dequantized().t()
    return ((run(probe).float() - expected).norm() / expected.norm()).item() < 5e-2


def _int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales)


def prepare_int4(layer: QuantizedLinear) -> Packed:
    """tinygemm's layout: the codes as uint8 (N, K/2), two columns per byte, through
    ``_convert_weight_to_int4pack``; scales and zeros in bf16 as ``int4_scales_and_zeros`` (tinygemm
    rounds our fp16 scales to bf16). The nibble order is checked against the dequantized reference on
    the first layer, so a kernel that changes its convention is caught at load, not in the output."""
    tiles = _inner_k_tiles(layer.in_features)
    if tinygemm_supported(layer.weight.device) and tiles is not None and layer.out_features % 8 == 0:
        q = unpack_nibbles(layer.weight)
        scales = int4_scales_and_zeros(layer.weight_scale, layer.weight_min)
        for high_first in _high_nibble_first[:1] or [True, False]:
            first, second = (q[:, ::2], q[:, 1::2]) if high_first else (q[:, 1::2], q[:, ::2])
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack(((first << 4) | second).to(torch.uint8), tiles)
                run = functools.partial(_int4pack_mm, packed=packed, group_size=layer.group_size, scales=scales)
                if _high_nibble_first or _matches_reference(layer, run):
                    _high_nibble_first[:] = [high_first]
                    return Packed("torch _weight_int4pack_mm (tinygemm)", (packed, scales), own_layout=True)
            except (RuntimeError, NotImplementedError):
                break
    return _bnb_4bit(layer, " (int4 re-quantized: tinygemm needs an sm80+ NVIDIA GPU)")


def int4_linear(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
    if _needs_grad(x) or layer.packed is REFERENCE:
        return None
    if layer.packed.name.startswith("bitsandbytes"):
        return _run_bnb_4bit(layer, x)
    packed, scales = layer.packed.tensors
    y = _int4pack_mm(_flat(x, layer.in_features, torch.bfloat16), packed, layer.group_size, scales)
    return _add_bias(y, layer, x)


_int8_choice: dict[tuple, str] = {}  # (device, out, in) -> the faster int8 kernel, timed once per process


def _seconds(run, x: torch.Tensor, repeats: int = 20) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    run(x)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        run(x)
    sync()
    return time.perf_counter() - start


def prepare_int8(layer: QuantizedLinear) -> Packed:
    """PyTorch's ``_weight_int8pack_mm`` or bitsandbytes' int8 matmul (our per-row int8 codes are its ``CB``
    and 127 * scale its ``SCB``; activations quantized to int8 per row, as LLM.int8 without outliers),
    whichever is faster for this layer's shape at one row: torch 2.11's CUDA int8pack kernel is a plain
    reference (one thread per output), so it is timed against bitsandbytes once per shape and process, as
    the CPU's autotune does. PyTorch's op is taken only where it gives the reference's answer; without
    either, the reference (dequantized per call)."""
    scales = {dtype: layer.weight_scale.to(dtype) for dtype in (torch.bfloat16, torch.float16)}
    torch_op = Packed("torch _weight_int8pack_mm", (scales,))
    bnb = Packed("bitsandbytes int8_linear_matmul", (layer.weight_scale.float() * 127,))
    try:
        probe = torch.randn(2, layer.in_features, device=layer.weight.device, dtype=torch.bfloat16)
        got = torch.ops.aten._weight_int8pack_mm(probe, layer.weight, scales[torch.bfloat16]).float()
        expected = probe.float() @ layer.dequantized().t()
        torch_works = ((got - expected).norm() / expected.norm()).item() < 1e-2
    except (RuntimeError, NotImplementedError):
        torch_works = False
    if not bnb_available():
        if not torch_works:
            _warn_once("bitsandbytes is not usable here: int8 layers run dequantized (slow)")
        return torch_op if torch_works else REFERENCE
    if not torch_works:
        return bnb
    key = (str(layer.weight.device), layer.out_features, layer.in_features)
    if key not in _int8_choice:
        x = torch.randn(1, layer.in_features, device=layer.weight.device, dtype=torch.bfloat16)
        times = {p.name: _seconds(functools.partial(_int8_run, layer, p), x) for p in (torch_op, bnb)}
        _int8_choice[key] = min(times, key=times.get)
    return torch_op if _int8_choice[key] == torch_op.name else bnb


def _int8_run(layer: QuantizedLinear, packed: Packed, x: torch.Tensor) -> torch.Tensor:
    if packed.name.startswith("bitsandbytes"):  # its CUDA kernels take fp16 activations only
        import bitsandbytes.functional as bnbf

        codes, row_stats, _ = bnbf.int8_vectorwise_quant(x.to(torch.float16))
        acc = bnbf.int8_linear_matmul(codes, layer.weight)
        return bnbf.int8_mm_dequant(acc, row_stats, packed.tensors[0])
    dtype = torch.float16 if x.dtype == torch.float16 else torch.bfloat16
    return torch.ops.aten._weight_int8pack_mm(x.to(dtype), layer.weight, packed.tensors[0][dtype])


def int8_linear(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
    if _needs_grad(x) or layer.packed is REFERENCE:
        return None
    y = _int8_run(layer, layer.packed, x.reshape(-1, layer.in_features).contiguous())
    return _add_bias(y, layer, x)


def prepare_nf4(layer: QuantizedLinear) -> Packed:
    """A phikit-quantized NF4 checkpoint on CUDA: re-packed once for bitsandbytes (its double quantization
    of the block maxima differs from ours; loading from full precision quantizes with bitsandbytes
    directly, as QLoRA does)."""
    return _bnb_4bit(layer, "")


def nf4_linear(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
    if layer.packed is REFERENCE:
        return None
    return _run_bnb_4bit(layer, x)  # bitsandbytes' MatMul4Bit has a backward: QLoRA-style use works


# ---- decoding through CUDA graphs ----


_cuda_layers: dict[type, type] = {}


def cuda_layer_class(cls: type) -> type:
    """A subclass of the decoder layer class ``cls`` whose one-token steps (a slot per row) run its forward
    compiled by ``torch.compile`` when the instance's ``compiled`` is set; one compiled forward per family,
    shared by all its layers."""
    if cls not in _cuda_layers:
        compiled = None

        def forward(self, x, cos, sin, cache, slots, last_only: bool = False):
            nonlocal compiled
            if self.compiled and x.shape[1] == 1 and slots.per_row and not torch.is_grad_enabled():
                if compiled is None:  # dynamic=None: static first, one dynamic recompile on a new shape
                    compiled = torch.compile(cls.forward, dynamic=None, backend=COMPILE_BACKEND)
                return compiled(self, x, cos, sin, cache, slots, last_only)
            return cls.forward(self, x, cos, sin, cache, slots, last_only)

        _cuda_layers[cls] = type(f"Cuda{cls.__name__}", (cls,), {"forward": forward, "compiled": False})
    return _cuda_layers[cls]


def capture_cuda_graph(step) -> tuple:
    """``step`` (a function of no arguments returning a tensor) warmed up on a side stream, as CUDA graph
    capture needs, then captured: returns (replay, the output tensor that each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph.replay, out


@dataclass
class _Graph:
    replay: object
    inputs: dict[str, torch.Tensor | None]
    logits: torch.Tensor


class CudaGraphStep:
    """A model's ``decode_step`` on CUDA: one-token steps replayed from CUDA graphs, one per cache layout and
    batch size, captured on first use (a slot per row over the whole cache, so shapes never change). Graphs
    of an older ``model.version`` are dropped. Anything else, and any step under autograd, in training or
    while compiling, runs the model's forward. ``static``: generation gives it a slot per row and rounds the
    cache up, so one graph serves many lengths."""

    static = True
    graph_device = "cuda"
    capture = staticmethod(capture_cuda_graph)  # the tests' CPU twin replays the step eagerly

    def __init__(self, model: CausalLM, enabled: bool = True):
        self.model, self.enabled = model, enabled
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.version = model.version

    def __getstate__(self) -> dict:  # graphs do not survive a copy or a pickle
        return {"model": self.model, "enabled": self.enabled, "graphs": collections.OrderedDict(), "version": -1}

    def _key(self, input_ids, input_pos, cache, padding_mask):
        if (
            not self.enabled
            or cache is None
            or input_ids.shape[1] != 1
            or input_ids.device.type != self.graph_device
            or self.model.training
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            return None
        layout = (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape, cache.k.stride(), cache.k.dtype)
        mask = None if padding_mask is None else (padding_mask.shape, padding_mask.dtype)
        return (*layout, input_ids.shape[0], mask)

    def __call__(self, input_ids, input_pos, cache, positions=None, padding_mask=None) -> torch.Tensor:
        key = self._key(input_ids, input_pos, cache, padding_mask)
        if key is None:
            return self.model.forward(input_ids, input_pos, cache, positions, padding_mask)
        if self.version != self.model.version:  # modules swapped: every graph replays old kernels
            self.graphs.clear()
            self.version = self.model.version
        b = input_ids.shape[0]
        entry = self.graphs.get(key)
        inputs = entry.inputs if entry is not None else _static_inputs(input_ids, padding_mask)
        slots = input_pos.view(-1, 1).expand(b, 1)
        inputs["ids"].copy_(input_ids)
        inputs["slots"].copy_(slots)
        inputs["positions"].copy_(slots if positions is None else positions.view(-1, 1).expand(b, 1))
        if padding_mask is not None:
            inputs["padding"].copy_(padding_mask)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs, cache)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        entry.replay()
        return entry.logits.clone()

    def _step(self, inputs: dict, cache) -> torch.Tensor:
        return self.model.forward(inputs["ids"], inputs["slots"], cache, inputs["positions"], inputs["padding"])

    def _capture(self, inputs: dict, cache) -> _Graph:
        """Capture the step for these static inputs. The step is first run once as is (the real step: the
        warm-ups and the replay rewrite its cache slot with the same values), which compiles the layer on
        first use; a compile that fails turns compiling off, with one line on stderr."""
        step = functools.partial(self._step, inputs, cache)
        with torch.inference_mode():
            try:
                step()
            except Exception as e:  # noqa: BLE001 - a compiler error must not stop decoding
                if not any(getattr(m, "compiled", False) for m in self.model.modules()):
                    raise
                print(f"phikit: torch.compile failed ({type(e).__name__}: {e}); decoding uncompiled", file=sys.stderr)
                set_compiled_layers(self.model, False)
                step()
            replay, logits = self.capture(step)
        return _Graph(replay, inputs, logits)


def _static_inputs(input_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> dict:
    zeros = lambda: torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)  # noqa: E731
    padding = None if padding_mask is None else torch.ones_like(padding_mask)
    return {"ids": zeros(), "slots": zeros(), "positions": zeros(), "padding": padding}


def set_compiled_layers(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if type(module) in _cuda_layers.values():
            module.compiled = on
    step = getattr(model, "decode_step", None)
    if isinstance(step, CudaGraphStep):
        step.graphs.clear()


PREPARE = {"int4": prepare_int4, "int8": prepare_int8, "nf4": prepare_nf4}


def keep_kernel_layout_only(layer: QuantizedLinear, host: torch.device | str = "cpu") -> None:
    """Move the checkpoint's layout of a layer whose kernel keeps its own (``Packed.own_layout``) to
    ``host``: the GPU then holds one copy of the weight; saving and the autograd path read the host's."""
    if layer.packed is not None and layer.packed.own_layout:
        layer.home = layer.weight.device
        for name, t in layer.tensors().items():
            layer.register_buffer(name, t.to(host))


def loud_recompile_limit() -> None:
    """Past torch's recompile limit, dynamo would run the layer eager without a word; make it raise, so the
    capture's fallback says so on stderr and turns compiling off (a process-wide dynamo setting)."""
    config = torch._dynamo.config
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


def install(model: CausalLM) -> CausalLM:
    """Pack quantized weights for their kernels (one layout on the GPU), compile the decoder layers'
    one-token steps and install a ``decode_step`` that replays CUDA graphs (in place)."""
    compile_layers = not _env_off("PHIKIT_CUDA_COMPILE")
    layer_classes = {type(layer) for layer in model.model.layers}
    moved = False
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.weight.is_cuda:
            module.packed = PREPARE[module.format](module)
            keep_kernel_layout_only(module)
            moved = moved or module.packed.own_layout
        elif type(module) in layer_classes and type(module) not in _cuda_layers.values():
            module.__class__ = cuda_layer_class(type(module))
            module.compiled = compile_layers
    if moved:
        torch.cuda.empty_cache()
    if compile_layers:
        loud_recompile_limit()
    model.decode_step = CudaGraphStep(model, enabled=not _env_off("PHIKIT_CUDA_GRAPHS"))
    return model
