/*
 * phikit CPU kernels: weight-only matrix-vector products for decoding (few rows of activations),
 * and weight unpacking for prefill. x86-64 with AVX2 + FMA + F16C; OpenMP over output rows.
 *
 * Why hand-written: at batch 1 a decode step reads every weight once, so speed is memory bandwidth.
 * PyTorch's CPU kernels reach about half of it on AVX2 machines for bf16 and int8 weights and are
 * compute-bound for int4; these loops stream the weights once at close to the bandwidth limit.
 *
 * Layouts (row n of W is output feature n, K contiguous):
 *   f32        : float [N][K]
 *   bf16 / f16 : uint16 [N][K]
 *   int8       : int8 [N][K], float scale[N]            w = q * scale
 *   int4       : uint8 [N][K/2], fp16 scale[N][K/G], fp16 minimum[N][K/G]   w = q * scale + minimum
 *                in blocks of 64 weights: byte i of a block holds weight i (low nibble) and
 *                weight i + 32 (high nibble), so one 32-byte load unpacks to 64 weights in order.
 *
 * Every (row of x, row of W) dot product is accumulated the same way whatever M is, so a token
 * decoded alone and the same token inside a batch (speculative verification) get identical results.
 *
 * The library is one translation unit (this file) built from the parts below, so the compiler inlines
 * across them as before the split; each operation lives in one file, generic AVX2 code first and, where
 * the CPU has more, an AVX-512 override beside it in avx512/ (selected at compile time by the build's
 * flags: phikit/kernels/build.py builds one library per instruction set):
 *   phikit.h              the exported functions (PHIKIT_API block), weight kinds, vector helpers
 *   gemv.c                decoding's matrix-vector products: f32, bf16, f16, int8, int4
 *     avx512/gemv_bf16_zmm.h  bf16 in zmm registers (AVX-512F)
 *     avx512/gemv_bf16_dp.c   bf16 with AVX-512 BF16 dot products
 *     avx512/dot_i8_row.h     int8 rows with AVX-512 VNNI
 *   activations.c         gelu (tanh form), RMSNorm, SwiGLU
 *   attention.c           rotary embedding, KV-cache write and attention for one new token
 *     avx512/attention_group.h  grouped-query heads in zmm registers
 *     avx512/attention_i8_vnni.h  scores over an int8 KV cache with AVX-512 VNNI
 *   gemm.c                prefill's GEMM over any weight format
 *     avx512/gemm_vnni.c      int8 / int4 prefill with AVX-512 VNNI
 *   weights.c             quantization while loading, bf16 conversion, dequantization for prefill
 *   decode_step.c         a whole decoding step through every layer (Phi and Phi-3 layers)
 */
#include "phikit.h"

#include "gemv.c"
#include "avx512/gemv_bf16_dp.c"
#include "activations.c"
#include "attention.c"
#include "gemm.c"
#include "avx512/gemm_vnni.c"
#include "weights.c"
#include "decode_step.c"

int64_t phikit_features(void) { return HAS_BF16_DP | HAS_VNNI; }
