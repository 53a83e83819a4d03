"""The operations of the CPU kernel library: checked wrappers that call C (``phikit/csrc``).

Every call goes through a wrapper that checks each tensor's device, dtype, shape and contiguity (and the
cache slots' range) before any pointer reaches C: a mistake is a ValueError, never a read past a buffer.
Decoding's matrix-vector products (``gemv``, ``gemv_bf16_dp``), prefill's GEMMs (``gemm``, ``gemm_vnni``,
``dequant_bf16``), one token's attention, RMSNorm, SwiGLU and gelu, and the whole decoding step
(``plan_array`` + ``decode_layers``).
"""

from __future__ import annotations

import ctypes

import torch

from phikit.kernels.build import FEATURE_BF16_DP, FEATURE_VNNI, MAX_ROWS, has, library
from phikit.quantize import GROUP_SIZES  # the int4 groups the C kernels have a loop for

# ---- checks before any pointer reaches C ----


def check(what: str, t: torch.Tensor | None, dtypes, shape: tuple | None = None, optional: bool = False) -> None:
    """``t`` is a contiguous CPU tensor of one of ``dtypes`` (a dtype or a tuple) and, if given, ``shape``;
    else a ValueError naming ``what``."""
    if t is None and optional:
        return
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    problem = None
    if not isinstance(t, torch.Tensor):
        problem = f"got {type(t).__name__}"
    elif t.device.type != "cpu":
        problem = f"on {t.device}"
    elif t.dtype not in dtypes:
        problem = f"dtype {t.dtype}"
    elif shape is not None and tuple(t.shape) != tuple(shape):
        problem = f"shape {tuple(t.shape)}"
    elif not t.is_contiguous():
        problem = "not contiguous"
    if problem:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"phikit CPU kernel: {what} must be a contiguous CPU {names} tensor of shape {shape}: {problem}"
        )


WEIGHT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "int8": torch.int8}


def check_linear(what: str, kind: str, weight, scale, minimum, bias, group_size: int) -> tuple[int, int]:
    """A linear layer's tensors as the kernels read them; returns (N, K). Shapes as ``gemv`` documents."""
    if kind not in (*WEIGHT_DTYPES, "int4"):
        raise ValueError(f"phikit CPU kernel: unknown weight kind {kind!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"phikit CPU kernel: {what} weight must be a 2-D tensor")
    n, k = weight.shape[0], weight.shape[1] * (2 if kind == "int4" else 1)
    if k % 64 or n % 16:
        raise ValueError(f"phikit CPU kernel: {what} needs in_features % 64 == 0 and out_features % 16 == 0")
    check(
        f"{what} weight",
        weight,
        torch.uint8 if kind == "int4" else WEIGHT_DTYPES[kind],
        (n, k // 2 if kind == "int4" else k),
    )
    check(f"{what} bias", bias, torch.float32, (n,), optional=True)
    if kind == "int8":
        check(f"{what} scale", scale, torch.float32, (n,))
    elif kind == "int4":
        if group_size not in GROUP_SIZES or k % group_size:
            raise ValueError(f"phikit CPU kernel: {what} int4 group size {group_size} does not divide {k}")
        check(f"{what} scale", scale, torch.float16, (n, k // group_size))
        check(f"{what} minimum", minimum, torch.float16, (n, k // group_size))
    return n, k


def _check_slots(pos: torch.Tensor, first: torch.Tensor, batch: int, slots: int) -> None:
    check("slots", pos, torch.int64, (batch,))
    check("first slots", first, torch.int64, (batch,))
    if batch and not (bool((first >= 0).all()) and bool((first <= pos).all()) and bool((pos < slots).all())):
        raise ValueError(f"phikit CPU kernel: cache slots {pos.tolist()} outside 0..{slots - 1}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv(
    x: torch.Tensor,
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x (M, K) fp32 with M <= MAX_ROWS and W (N, K) in format ``kind``: f32, bf16,
    f16, int8 (+ fp32 scale (N,)) or int4 (uint8 (N, K/2) + fp16 scale and minimum (N, K/group)); bias fp32
    (N,). Returns (M, N) fp32. Needs K % 64 == 0 and N % 16 == 0."""
    lib = library()
    n, k = check_linear("gemv", kind, weight, scale, minimum, bias, group_size)
    m = x.shape[0] if x.dim() == 2 else -1
    check("gemv input", x, torch.float32, (m, k))
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"phikit CPU kernel: gemv takes 1 to {MAX_ROWS} rows, got {m}")
    y = torch.empty(m, n, dtype=torch.float32)
    if kind == "int4":
        lib.phikit_gemv_i4(
            x.data_ptr(),
            m,
            k,
            weight.data_ptr(),
            n,
            group_size,
            scale.data_ptr(),
            minimum.data_ptr(),
            _ptr(bias),
            y.data_ptr(),
        )
    else:
        fn = {
            "f32": lib.phikit_gemv_f32,
            "bf16": lib.phikit_gemv_bf16,
            "f16": lib.phikit_gemv_f16,
            "int8": lib.phikit_gemv_i8,
        }[kind]
        fn(x.data_ptr(), m, k, weight.data_ptr(), n, _ptr(scale), _ptr(bias), y.data_ptr())
    return y


def gemv_bf16_dp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = bf16(x) @ W.T (+ bias) for bf16 W (N, K) with AVX-512 BF16 dot products: x (M, K) fp32,
    M <= MAX_ROWS, is rounded to bf16 first. Only where ``has(FEATURE_BF16_DP)``. Returns (M, N) fp32."""
    if not has(FEATURE_BF16_DP):
        raise ValueError("phikit CPU kernel: this library has no AVX-512 BF16 kernels")
    n, k = check_linear("gemv_bf16_dp", "bf16", weight, None, None, bias, 0)
    m = x.shape[0] if x.dim() == 2 else -1
    check("gemv input", x, torch.float32, (m, k))
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"phikit CPU kernel: gemv takes 1 to {MAX_ROWS} rows, got {m}")
    y = torch.empty(m, n, dtype=torch.float32)
    library().phikit_gemv_bf16_dp(x.data_ptr(), m, k, weight.data_ptr(), n, _ptr(bias), y.data_ptr())
    return y


# KV-cache element types, as phikit.h's CACHE_F32 / CACHE_F16 / CACHE_I8 number them (int8: with a scale a row)
CACHE_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}


def step_tables(
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int | torch.Tensor,
    batch: int,
    window: int | None = None,
    padding: torch.Tensor | None = None,
) -> tuple:
    """The arguments a one-token step's C attention takes: cos/sin (B, R) from the model's (B, 1, 1, R)
    tables, and per row the cache slot written (``start``: one for all rows, or one per row) and the first
    slot attended (0, or under a sliding ``window`` the slot window - 1 before it, as ``Slots``; at least
    ``padding``, each row's count of left-padding slots)."""
    if isinstance(start, torch.Tensor):
        pos = start.to(torch.long).expand(batch).contiguous()
    else:
        pos = torch.full((batch,), start, dtype=torch.long)
    first = (pos - window + 1).clamp(min=0) if window else torch.zeros_like(pos)
    if padding is not None:
        first = torch.maximum(first, padding.to(torch.long))
    return cos[:, 0, 0].contiguous(), sin[:, 0, 0].contiguous(), pos, first


def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    first: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotary embedding, KV-cache write and attention for one new token per row, in one call.

    q (B, H, D), k/v (B, KV, D) fp32 contiguous before rotary; caches (B, KV, S, D) fp32, fp16 or int8 (then
    ``k_scale``/``v_scale`` (B, KV, S) fp32: each row's scale, as ``KVCache`` keeps them), contiguous;
    cos/sin (B, R), pos/first (B,) int64 as ``step_tables`` gives them: write slot and first attended slot.
    Returns (B, H, D)."""
    b, h, d = q.shape if q.dim() == 3 else (0, 0, 0)
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    check("q", q, torch.float32, (b, h, d))
    check("k", k, torch.float32, (b, kv_heads, d))
    check("v", v, torch.float32, (b, kv_heads, d))
    check("k cache", k_cache, tuple(CACHE_KINDS), (b, kv_heads, slots, d))
    check("v cache", v_cache, k_cache.dtype, (b, kv_heads, slots, d))
    scaled = k_cache.dtype == torch.int8
    check("k scale", k_scale, torch.float32, (b, kv_heads, slots), optional=not scaled)
    check("v scale", v_scale, torch.float32, (b, kv_heads, slots), optional=not scaled)
    check("cos", cos, torch.float32, (b, cos.shape[-1]))
    check("sin", sin, torch.float32, tuple(cos.shape))
    if d % 8 or d > 128 or h % kv_heads or cos.shape[-1] > d or cos.shape[-1] % 2:
        raise ValueError(f"phikit CPU kernel: attention needs head_dim % 8 == 0 and <= 128, got {d}")
    _check_slots(pos, first, b, slots)
    out = torch.empty_like(q)
    status = library().phikit_attention_decode(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        b,
        h,
        k.shape[1],
        d,
        cos.shape[-1],
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[2],
        pos.data_ptr(),
        first.data_ptr(),
        out.data_ptr(),
        CACHE_KINDS[k_cache.dtype],
        _ptr(k_scale) if scaled else None,
        _ptr(v_scale) if scaled else None,
    )
    if status != 0:
        raise MemoryError("phikit CPU kernel: attention out of memory")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of a contiguous fp32 (..., n) tensor, n % 8 == 0, with an fp32 weight (n,)."""
    n = x.shape[-1]
    check("RMSNorm input", x, torch.float32, tuple(x.shape))
    check("RMSNorm weight", weight, torch.float32, (n,))
    if n % 8:
        raise ValueError(f"phikit CPU kernel: RMSNorm needs a width % 8 == 0, got {n}")
    out = torch.empty_like(x)
    library().phikit_rms_norm(x.data_ptr(), x.numel() // n, n, weight.data_ptr(), float(eps), out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate|up projection: (..., 2n) fp32 contiguous -> up * silu(gate), (..., n); n % 8 == 0."""
    two_n = gate_up.shape[-1]
    check("SwiGLU input", gate_up, torch.float32, tuple(gate_up.shape))
    if two_n % 16:
        raise ValueError(f"phikit CPU kernel: SwiGLU needs a width % 16 == 0, got {two_n}")
    out = torch.empty(*gate_up.shape[:-1], two_n // 2, dtype=torch.float32)
    library().phikit_silu_mul(gate_up.data_ptr(), gate_up.numel() // two_n, two_n // 2, out.data_ptr())
    return out


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """In-place gelu (tanh form) of a contiguous fp32 tensor; returns it."""
    check("gelu input", x, torch.float32, tuple(x.shape))
    library().phikit_gelu_tanh(x.data_ptr(), x.numel())
    return x


GEMM_KINDS = {"f32": 0, "bf16": 1, "f16": 2, "int8": 3, "int4": 4}
PLAN_KINDS = {**GEMM_KINDS, "bf16_dp": 5}  # the decoding step's linears: bf16 also through gemv_bf16_dp


def gemm(
    x: torch.Tensor,
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for many rows of x (prefill): x (M, K) fp32 contiguous, W as in ``gemv``.
    Returns (M, N) fp32. Needs N % 16 == 0 and K % 64 == 0."""
    return _gemm("gemm", library().phikit_gemm, x, kind, weight, scale, minimum, bias, group_size)


def gemm_vnni(
    x: torch.Tensor,
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for int8 or int4 W with AVX-512 VNNI integer dot products, x quantized to int8
    per block (64 values; int4: per weight group) as llama.cpp does. Arguments as ``gemm``; needs
    N % 32 == 0 and ``has(FEATURE_VNNI)``."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"phikit CPU kernel: gemm_vnni takes int8 or int4 weights, not {kind}")
    if not has(FEATURE_VNNI):
        raise ValueError("phikit CPU kernel: this library has no AVX-512 VNNI kernels")
    if weight.dim() == 2 and weight.shape[0] % 32:
        raise ValueError(f"phikit CPU kernel: gemm_vnni needs out_features % 32 == 0, got {weight.shape[0]}")
    return _gemm("gemm_vnni", library().phikit_gemm_vnni, x, kind, weight, scale, minimum, bias, group_size)


def _gemm(what: str, function, x, kind, weight, scale, minimum, bias, group_size) -> torch.Tensor:
    """Check the arguments of a GEMM entry point (``phikit_gemm``'s signature) and call it."""
    n, k = check_linear(what, kind, weight, scale, minimum, bias, group_size)
    m = x.shape[0] if x.dim() == 2 else -1
    check(f"{what} input", x, torch.float32, (m, k))
    y = torch.empty(m, n, dtype=torch.float32)
    int4 = kind == "int4"
    function(
        GEMM_KINDS[kind],
        x.data_ptr(),
        m,
        k,
        weight.data_ptr(),
        n,
        None if int4 else _ptr(scale),
        _ptr(scale) if int4 else None,
        _ptr(minimum),
        group_size,
        _ptr(bias),
        y.data_ptr(),
    )
    return y


def dequant_bf16(
    kind: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    minimum: torch.Tensor | None,
    group_size: int,
    first: int,
    last: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``first:last`` of a weight in format ``kind`` (as ``gemv`` takes it) as a bf16 (rows, K) tensor,
    written into ``out`` when given (contiguous, at least that big)."""
    n, k = check_linear("dequant", kind, weight, scale, minimum, None, group_size)
    if not 0 <= first <= last <= n:
        raise ValueError(f"phikit CPU kernel: rows {first}:{last} outside 0:{n}")
    rows = last - first
    if out is None:
        out = torch.empty(rows, k, dtype=torch.bfloat16)
    elif out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < rows * k or out.device.type != "cpu":
        raise ValueError("phikit CPU kernel: dequant output must be a contiguous CPU bf16 tensor large enough")
    int4 = kind == "int4"
    library().phikit_dequant_bf16(
        GEMM_KINDS[kind],
        weight.data_ptr(),
        None if int4 else _ptr(scale),
        _ptr(scale) if int4 else None,
        _ptr(minimum),
        group_size,
        k,
        first,
        last,
        out.data_ptr(),
    )
    return out.view(-1)[: rows * k].view(rows, k)


class _Linear(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("kind", "n", "k", "group")] + [
        (name, ctypes.c_void_p) for name in ("w", "scale", "minimum", "bias")
    ]


PROJECTIONS = ("q", "k", "v", "dense", "fc1", "fc2")
# The C step's layer kinds and, per kind, its linears in the order the plan lists them (the C struct's names:
# Phi-3's fused qkv_proj sits in q, o_proj in dense, gate_up_proj in fc1, down_proj in fc2).
LAYER_KINDS = {"phi": (0, PROJECTIONS), "phi3": (1, ("q", "dense", "fc1", "fc2"))}


class _Layer(ctypes.Structure):
    _fields_ = [("arch", ctypes.c_int64)] + [(n, ctypes.c_void_p) for n in ("ln_weight", "ln_bias", "ln2_weight")]
    _fields_ += [(n, _Linear) for n in PROJECTIONS]


def plan_array(plan: list[tuple]) -> ctypes.Array:
    """The ctypes array ``phikit_decode_layers`` reads, from one ``(kind, norms, linears)`` per layer: kind "phi"
    (norms: the LayerNorm's weight and bias; linears q k v dense fc1 fc2) or "phi3" (norms: the two RMSNorm
    weights; linears qkv_proj o_proj gate_up_proj down_proj), each linear as (kind, weight, scale, minimum, fp32
    bias, group size)."""
    array = (_Layer * len(plan))()
    for i, (entry, (arch, norms, linears)) in enumerate(zip(array, plan, strict=True)):
        code, names = LAYER_KINDS[arch]
        entry.arch = code
        hidden = norms[0].numel()
        for j, norm in enumerate(norms):
            check(f"layer {i} norm weight {j}", norm, torch.float32, (hidden,))
        entry.ln_weight = norms[0].data_ptr()
        setattr(entry, "ln_bias" if arch == "phi" else "ln2_weight", norms[1].data_ptr())
        for name, (kind, weight, scale, minimum, bias, group) in zip(names, linears, strict=True):
            if kind == "bf16_dp" and not has(FEATURE_BF16_DP):
                raise ValueError("phikit CPU kernel: this library has no AVX-512 BF16 kernels")
            format_kind = "bf16" if kind == "bf16_dp" else kind
            n, k = check_linear(f"layer {i} {name}", format_kind, weight, scale, minimum, bias, group)
            fields = (PLAN_KINDS[kind], n, k, group, weight.data_ptr(), _ptr(scale), _ptr(minimum))
            setattr(entry, name, _Linear(*fields, _ptr(bias)))
    return array


def decode_layers(
    plan: ctypes.Array,
    x: torch.Tensor,
    config,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache,
    start: int | torch.Tensor,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step through every decoder layer: x (B, 1, hidden) fp32 -> the last layer's output.

    cos/sin (B, 1, 1, rotary_dim) at each row's position; ``cache`` a KVCache (or a view of its first rows)
    whose k/v are fp32, fp16 or int8 (with its scales) with each layer contiguous, written at slot ``start`` (an
    int, or one slot per row as in continuous batching); every slot up to it is attended but a row's first
    ``padding`` slots (left padding: (B,) counts)."""
    x = x.contiguous().clone()
    b, hidden = x.shape[0], config.hidden_size
    cos, sin, pos, first = step_tables(cos, sin, start, b, config.sliding_window, padding)
    check("hidden states", x, torch.float32, (b, 1, hidden))
    check("cos", cos, torch.float32, (b, cos.shape[-1]))
    check("sin", sin, torch.float32, tuple(cos.shape))
    layers, kv, d = len(plan), config.num_key_value_heads, config.head_dim
    slots = cache.k.shape[3]
    for name, t in (("k cache", cache.k), ("v cache", cache.v)):
        layer_ok = t.dim() == 5 and t[0].is_contiguous() and t.stride() == cache.k.stride()
        if not layer_ok or tuple(t.shape) != (layers, b, kv, slots, d) or t.dtype not in CACHE_KINDS:
            raise ValueError(
                f"phikit CPU kernel: {name} must be fp32/fp16/int8 ({layers}, {b}, {kv}, S, {d}), each layer contiguous"
            )
    if cache.v.dtype != cache.k.dtype or d % 8 or d > 128 or cos.shape[-1] > d:
        raise ValueError("phikit CPU kernel: decode step needs head_dim % 8 == 0 and <= 128 and one cache dtype")
    scales = cache.scales
    for name, t in zip(("k scale", "v scale"), scales or ()):
        # (layers, b, kv, S): each layer's contiguous, a layer's scales where its rows are (k's stride / d)
        if t.dtype != torch.float32 or tuple(t.shape) != (layers, b, kv, slots) or not t[0].is_contiguous():
            raise ValueError(f"phikit CPU kernel: {name} must be fp32 ({layers}, {b}, {kv}, S), each layer contiguous")
        if t.stride(0) * d != cache.k.stride(0):
            raise ValueError(f"phikit CPU kernel: {name}'s layers must be as far apart as the cache's rows")
    _check_slots(pos, first, b, slots)
    status = library().phikit_decode_layers(
        ctypes.addressof(plan),
        len(plan),
        x.data_ptr(),
        b,
        config.hidden_size,
        config.intermediate_size,
        config.norm_eps,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        cos.shape[-1],
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        cache.k.shape[3],
        cache.k.stride(0),
        pos.data_ptr(),
        first.data_ptr(),
        CACHE_KINDS[cache.k.dtype],
        scales[0].data_ptr() if scales else None,
        scales[1].data_ptr() if scales else None,
    )
    if status != 0:
        raise (MemoryError if status == -1 else ValueError)(
            "phikit CPU kernel: decode step "
            + ("out of memory" if status == -1 else "met an unknown weight kind or layer kind")
        )
    return x
