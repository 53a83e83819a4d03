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
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* PHIKIT_API: every function the library exports, declared once, one per line. phikit/kernels.py reads these
 * lines to declare the ctypes signatures (pointer -> c_void_p, int64_t -> c_int64, int -> c_int, float ->
 * c_float), and the compiler checks every definition below against its line, so the two cannot drift. */
typedef struct Layer Layer;
void phikit_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_f16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_bf16_dp(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, float *y);
void phikit_gemv_i8(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_i4(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G, const uint16_t *scale, const uint16_t *minimum, const float *bias, float *y);
void phikit_gelu_tanh(float *x, int64_t n);
int64_t phikit_attention_decode(const float *q, const float *k, const float *v, const float *cos, const float *sin, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t R, void *k_cache, void *v_cache, int64_t S, const int64_t *pos, const int64_t *first, float *out, int64_t cache_f16);
void phikit_rms_norm(const float *x, int64_t B, int64_t n, const float *w, float eps, float *y);
void phikit_silu_mul(const float *gate_up, int64_t B, int64_t n, float *y);
void phikit_gemm(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale, const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y);
void phikit_gemm_vnni(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale, const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y);
int64_t phikit_features(void);
void phikit_quantize_i8(int dtype, const void *w, int64_t N, int64_t K, int8_t *q, float *scale);
void phikit_quantize_i4(int dtype, const void *w, int64_t N, int64_t K, int64_t G, uint8_t *packed, uint16_t *scale16, uint16_t *minimum16);
void phikit_to_bf16(int dtype, const void *src, int64_t n, uint16_t *dst);
void phikit_dequant_bf16(int kind, const void *w, const float *scale, const uint16_t *scale16, const uint16_t *minimum, int64_t G, int64_t K, int64_t n0, int64_t n1, uint16_t *out);
int64_t phikit_decode_layers(const Layer *layers, int64_t L, float *x, int64_t B, int64_t hidden, int64_t inter, float eps, int64_t H, int64_t KV, int64_t D, const float *cos, const float *sin, int64_t R, void *k_cache, void *v_cache, int64_t S, int64_t layer_cache, const int64_t *pos, const int64_t *first, int64_t cache_f16);
/* END PHIKIT_API */

#define ROWS 4 /* weight rows processed together when M == 1 */
/* Software prefetch distance (bytes) in the int8 / int4 gemv: one row at a time is a single stream, which
 * the hardware prefetchers alone keep ~10-20% below the bandwidth a 4-row bf16 stream reaches; measured
 * best on Phi-2's shapes (benchmarks/RESULTS.md). bf16's four streams do better without. */
#ifndef PREFETCH_I8 /* overridable for benchmarks/bench_decode.py --define */
#define PREFETCH_I8 1024
#endif
#ifndef PREFETCH_I4
#define PREFETCH_I4 2048
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float hmin(__m256 v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float f16(uint16_t h) { return _cvtsh_ss(h); }

static inline __m256 load_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* y[m][n] = scale[n] * dot(x[m], W[n]) + bias[n] for float-convertible weights; K % 16 == 0. */
#define DEFINE_GEMV(NAME, WTYPE, LOAD)                                                              \
    void NAME(const float *x, int64_t M, int64_t K, const WTYPE *w, int64_t N, const float *scale,   \
              const float *bias, float *y) {                                                        \
        int64_t blocks = M == 1 ? N / ROWS : 0;                                                     \
        _Pragma("omp parallel") {                                                                   \
            _Pragma("omp for schedule(static) nowait") for (int64_t b = 0; b < blocks; b++) {      \
                int64_t n = b * ROWS;                                                               \
                const WTYPE *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;              \
                __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0,       \
                       a3 = a0, b3 = a0;                                                            \
                for (int64_t k = 0; k < K; k += 16) {                                               \
                    __m256 xl = _mm256_loadu_ps(x + k), xh = _mm256_loadu_ps(x + k + 8);            \
                    a0 = _mm256_fmadd_ps(LOAD(w0 + k), xl, a0);                                     \
                    b0 = _mm256_fmadd_ps(LOAD(w0 + k + 8), xh, b0);                                 \
                    a1 = _mm256_fmadd_ps(LOAD(w1 + k), xl, a1);                                     \
                    b1 = _mm256_fmadd_ps(LOAD(w1 + k + 8), xh, b1);                                 \
                    a2 = _mm256_fmadd_ps(LOAD(w2 + k), xl, a2);                                     \
                    b2 = _mm256_fmadd_ps(LOAD(w2 + k + 8), xh, b2);                                 \
                    a3 = _mm256_fmadd_ps(LOAD(w3 + k), xl, a3);                                     \
                    b3 = _mm256_fmadd_ps(LOAD(w3 + k + 8), xh, b3);                                 \
                }                                                                                   \
                float d[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)),             \
                              hsum(_mm256_add_ps(a2, b2)), hsum(_mm256_add_ps(a3, b3))};            \
                for (int r = 0; r < ROWS; r++)                                                      \
                    y[n + r] = d[r] * (scale ? scale[n + r] : 1.0f) + (bias ? bias[n + r] : 0.0f);  \
            }                                                                                       \
            /* the rest: every row when M > 1 (up to 4 rows of x share each weight load) */         \
            _Pragma("omp for schedule(static)") for (int64_t n = blocks * ROWS; n < N; n++) {       \
                const WTYPE *wr = w + n * K;                                                        \
                for (int64_t m0 = 0; m0 < M; m0 += 4) {                                             \
                    int mb = M - m0 < 4 ? (int)(M - m0) : 4;                                        \
                    __m256 a[4], b[4];                                                              \
                    for (int i = 0; i < 4; i++) a[i] = b[i] = _mm256_setzero_ps();                  \
                    const float *x0 = x + m0 * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;           \
                    if (mb == 4) { /* unrolled so the 8 accumulators stay in registers */           \
                        __m256 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];                           \
                        __m256 b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];                           \
                        for (int64_t k = 0; k < K; k += 16) {                                       \
                            __m256 wl = LOAD(wr + k), wh = LOAD(wr + k + 8);                        \
                            a0 = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x0 + k), a0);                  \
                            b0 = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x0 + k + 8), b0);              \
                            a1 = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x1 + k), a1);                  \
                            b1 = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x1 + k + 8), b1);              \
                            a2 = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x2 + k), a2);                  \
                            b2 = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x2 + k + 8), b2);              \
                            a3 = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x3 + k), a3);                  \
                            b3 = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x3 + k + 8), b3);              \
                        }                                                                           \
                        a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;                                 \
                        b[0] = b0, b[1] = b1, b[2] = b2, b[3] = b3;                                 \
                    } else {                                                                        \
                        for (int64_t k = 0; k < K; k += 16) {                                       \
                            __m256 wl = LOAD(wr + k), wh = LOAD(wr + k + 8);                        \
                            for (int i = 0; i < mb; i++) {                                          \
                                const float *xr = x + (m0 + i) * K + k;                             \
                                a[i] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xr), a[i]);              \
                                b[i] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xr + 8), b[i]);          \
                            }                                                                       \
                        }                                                                           \
                    }                                                                               \
                    for (int i = 0; i < mb; i++)                                                    \
                        y[(m0 + i) * N + n] = hsum(_mm256_add_ps(a[i], b[i])) *                     \
                                                  (scale ? scale[n] : 1.0f) + (bias ? bias[n] : 0.0f); \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

DEFINE_GEMV(phikit_gemv_f32, float, load_f32)
DEFINE_GEMV(phikit_gemv_bf16, uint16_t, load_bf16)
DEFINE_GEMV(phikit_gemv_f16, uint16_t, load_f16)

/* Optional kernels of the wider builds; phikit_features() says which this library has. */
enum { FEATURE_BF16_DP = 1, FEATURE_VNNI = 2 };

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* bf16 weights with AVX-512 BF16: x rounded to bf16 once per call (as llama.cpp rounds activations for
 * its bf16/f16 dot products), then vdpbf16ps multiplies 32 pairs and accumulates in fp32 per instruction,
 * a third of the instructions per weight of the AVX2 path (widen, shift, FMA). Every output is summed the
 * same way whatever M is (four accumulators along k, 128 apart, then (a0 + a1) + (a2 + a3) reduced), so a
 * row's result does not depend on the rows beside it in a batch.
 * Up to 7 rows of x: one row of W at a time, so each thread reads one sequential stream (3-4% more
 * bandwidth than four rows side by side, measured with benchmarks/bench_decode.py, benchmarks/RESULTS.md).
 * 8 rows and more (a batched decoding step, a short prompt): blocks of 2 rows of W x 3 rows of x, 24
 * accumulators in registers, so each weight load feeds three dot products and each activation load two
 * (one row at a time loads both operands for every dot product, and a 16-row step was bound by those
 * loads), 1280 columns at a time (two rows of W and three of x then stay in L1), each block fetching its
 * share of the next two rows of W ahead: a 16-row step of 8 layers x 1280 in 25 instead of 38 ms
 * (benchmarks/RESULTS.md, issue 22).
 * K % 32 == 0. y[m][n] = dot(bf16(x[m]), W[n]) + bias[n]. */
static inline __attribute__((always_inline)) void bf16_dp_block(const uint16_t *xb, int64_t m0, int mb,
                                                                const uint16_t *w, int64_t n0, int nb,
                                                                int64_t ka, int64_t kb, __m512 *state,
                                                                int64_t kp0, int64_t kp1, int64_t K,
                                                                int64_t N, const float *bias, float *y) {
    /* Columns ka..kb of rows m0.. of x against rows n0.. of W: the accumulators start at zero (ka == 0) or
     * from state, and go back to state (kb < K) or are summed into y. */
    __m512 acc[3][2][4];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++)
            for (int q = 0; q < 4; q++) acc[i][j][q] = ka ? state[(i * 2 + j) * 4 + q] : _mm512_setzero_ps();
    int64_t k = ka, end = kb == K ? K / 128 * 128 : kb;
    for (; k < end; k += 128)
        for (int q = 0; q < 4; q++) {
            __m512i wv[2];
            for (int j = 0; j < nb; j++) {
                if (kp0 + (k - ka) < kp1) /* a share of the rows after these, spread over the blocks of x */
                    _mm_prefetch((const char *)(w + (n0 + 2 + j) * K + kp0 + (k - ka) + 32 * q), _MM_HINT_T0);
                wv[j] = _mm512_loadu_si512((const void *)(w + (n0 + j) * K + k + 32 * q));
                __asm__("" : "+v"(wv[j])); /* kept in a register: GCC would load it again for every row of x */
            }
            for (int i = 0; i < mb; i++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + (m0 + i) * K + k + 32 * q));
                for (int j = 0; j < nb; j++) acc[i][j][q] = _mm512_dpbf16_ps(acc[i][j][q], (__m512bh)wv[j], xv);
            }
        }
    if (kb < K) {
        for (int i = 0; i < mb; i++)
            for (int j = 0; j < nb; j++)
                for (int q = 0; q < 4; q++) state[(i * 2 + j) * 4 + q] = acc[i][j][q];
        return;
    }
    for (; k < K; k += 32)
        for (int j = 0; j < nb; j++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + (n0 + j) * K + k));
            for (int i = 0; i < mb; i++)
                acc[i][j][0] = _mm512_dpbf16_ps(acc[i][j][0], wv,
                                                (__m512bh)_mm512_loadu_si512((const void *)(xb + (m0 + i) * K + k)));
        }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++)
            y[(m0 + i) * N + n0 + j] =
                _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][j][0], acc[i][j][1]),
                                                   _mm512_add_ps(acc[i][j][2], acc[i][j][3]))) +
                (bias ? bias[n0 + j] : 0.0f);
}

enum { DP_CHUNK = 1280, DP_GROUP = 6 }; /* 1280 columns: 3 rows of x and 2 of W stay in a 32 KB L1 */

/* All rows of x against rows n0 (and n0 + 1: nb) of W, in blocks of three rows of x (groups of DP_GROUP
 * blocks), DP_CHUNK columns at a time, the partial sums kept in between so that every output is summed in
 * the same order as in one pass. With prefetch, each block fetches its share of the next two rows of W. */
static inline __attribute__((always_inline)) void bf16_dp_rows(const uint16_t *xb, int64_t M, const uint16_t *w,
                                                               int64_t n0, int nb, int prefetch, int64_t K,
                                                               int64_t N, const float *bias, float *y) {
    __m512 state[DP_GROUP][24];
    int64_t blocks = (M + 2) / 3, steps = K / 128, chunks = (K + DP_CHUNK - 1) / DP_CHUNK, units = chunks * blocks;
    for (int64_t g = 0, u = 0; g < blocks; g += DP_GROUP)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t ka = c * DP_CHUNK, kb = ka + DP_CHUNK < K ? ka + DP_CHUNK : K;
            for (int64_t b = g; b < blocks && b < g + DP_GROUP; b++, u++) {
                int64_t m = 3 * b, rows = M - m >= 3 ? 3 : M - m;
                int64_t kp0 = prefetch ? steps * u / units * 128 : 0;
                int64_t kp1 = prefetch ? steps * (u + 1) / units * 128 : 0;
                __m512 *st = state[b - g];
                if (rows == 3) bf16_dp_block(xb, m, 3, w, n0, nb, ka, kb, st, kp0, kp1, K, N, bias, y);
                else if (rows == 2) bf16_dp_block(xb, m, 2, w, n0, nb, ka, kb, st, kp0, kp1, K, N, bias, y);
                else bf16_dp_block(xb, m, 1, w, n0, nb, ka, kb, st, kp0, kp1, K, N, bias, y);
            }
        }
}

void phikit_gemv_bf16_dp(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias,
                         float *y) {
    uint16_t *xb = aligned_alloc(64, (size_t)((M * K * 2 + 63) / 64 * 64));
    if (!xb) { /* the caller's buffers are all there is: a slower path that needs no memory */
        phikit_gemv_bf16(x, M, K, w, N, NULL, bias, y);
        return;
    }
    for (int64_t i = 0; i < M * K; i += 32) {
        __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(xb + i), (__m512i)v);
    }
    if (M < 8) { /* bound by the weights' stream: one row of W at a time reads it fastest */
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint16_t *wr = w + n * K;
            for (int64_t m = 0; m < M; m++) {
                const uint16_t *xr = xb + m * K;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                int64_t k = 0;
                for (; k + 128 <= K; k += 128) {
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(wr + k)), (__m512bh)_mm512_loadu_si512((const void *)(xr + k)));
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(wr + k + 32)), (__m512bh)_mm512_loadu_si512((const void *)(xr + k + 32)));
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512((const void *)(wr + k + 64)), (__m512bh)_mm512_loadu_si512((const void *)(xr + k + 64)));
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512((const void *)(wr + k + 96)), (__m512bh)_mm512_loadu_si512((const void *)(xr + k + 96)));
                }
                for (; k < K; k += 32)
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(wr + k)), (__m512bh)_mm512_loadu_si512((const void *)(xr + k)));
                y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + (bias ? bias[n] : 0.0f);
            }
        }
    } else { /* bound by the dot products: two rows of W per block, the next two fetched ahead */
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < (N + 1) / 2; p++) {
            if (2 * p + 1 < N) bf16_dp_rows(xb, M, w, 2 * p, 2, 2 * p + 3 < N, K, N, bias, y);
            else bf16_dp_rows(xb, M, w, 2 * p, 1, 0, K, N, bias, y);
        }
    }
    free(xb);
}
#define HAS_BF16_DP FEATURE_BF16_DP
#else
void phikit_gemv_bf16_dp(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias,
                         float *y) {
    phikit_gemv_bf16(x, M, K, w, N, NULL, bias, y); /* never called: phikit_features() reports no BF16_DP */
}
#define HAS_BF16_DP 0
#endif


/* ---- int8: activations rounded to int16 per block of XB values (15-bit, near exact), integer madd ----
 * Lanes accumulate int32 over a whole activation block (at most 4 * 127 * 32767 * XB / 32, no overflow
 * for XB <= 256), then one float multiply-add per block. */

static void quantize_row_i16(const float *x, int64_t K, int64_t XB, int16_t *xq, float *dx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / XB; b++) {
        const float *xb = x + b * XB;
        __m256 amax = _mm256_setzero_ps();
        for (int64_t i = 0; i < XB; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        float d = hmax(amax) / 32767.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        dx[b] = d;
        __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t i = 0; i < XB; i += 16) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vinv));
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), vinv));
            __m256i ac = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8); /* back in order */
            _mm256_storeu_si256((__m256i *)(xq + b * XB + i), ac);
        }
    }
}

/* 32 int8 weights times 32 int16 activations -> 8 int32 lanes. */
static inline __m256i madd_i8_i16(const int8_t *w, const int16_t *x) {
    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
    __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x));
    __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16)));
    return _mm256_add_epi32(p0, p1);
}

static inline __attribute__((always_inline)) __m256 dot_i8(const int8_t *w, const int16_t *xq, const float *dx,
                                                          int64_t K, const int64_t XB) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += XB) {
        __m256i s = _mm256_setzero_si256();
        for (int64_t j = 0; j < XB; j += 32) {
            if ((j & 63) == 0) _mm_prefetch((const char *)(w + k + j) + PREFETCH_I8, _MM_HINT_T0);
            s = _mm256_add_epi32(s, madd_i8_i16(w + k + j, xq + k + j));
        }
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(dx + k / XB), a);
    }
    return a;
}

#ifndef I8_ZMM /* 0: the AVX2 loop even in an AVX-512 VNNI build (benchmarks/bench_decode.py --define) */
#define I8_ZMM 1
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && I8_ZMM
/* The same integer sums with AVX-512 VNNI: 32 weights widened to int16 in one register, multiplied by 32
 * int16 activations and added in pairs into 16 int32 lanes by one vpdpwssd (the AVX2 loop takes two widen,
 * two madd and an add for the same), then one float multiply-add per block: the same exact block sums,
 * fewer instructions per weight byte: +2.5% and +1.5% GB/s in two alternating runs of
 * benchmarks/bench_decode.py --precisions int8 --define I8_ZMM=0 (benchmarks/RESULTS.md). */
static inline __attribute__((always_inline)) float dot_i8_row(const int8_t *w, const int16_t *xq, const float *dx,
                                                             int64_t K, const int64_t XB) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += XB) {
        __m512i s = _mm512_setzero_si512();
        for (int64_t j = 0; j < XB; j += 32) {
            if ((j & 63) == 0) _mm_prefetch((const char *)(w + k + j) + PREFETCH_I8, _MM_HINT_T0);
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k + j)));
            s = _mm512_dpwssd_epi32(s, wv, _mm512_loadu_si512((const void *)(xq + k + j)));
        }
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(dx[k / XB]), a);
    }
    return _mm512_reduce_add_ps(a);
}
#else
static inline __attribute__((always_inline)) float dot_i8_row(const int8_t *w, const int16_t *xq, const float *dx,
                                                             int64_t K, const int64_t XB) {
    return hsum(dot_i8(w, xq, dx, K, XB));
}
#endif

#define I8_ROWS(XB)                                                                                   \
    _Pragma("omp parallel for schedule(static)") for (int64_t n = 0; n < N; n++) {                     \
        for (int64_t m = 0; m < M; m++)                                                               \
            y[m * N + n] = dot_i8_row(w + n * K, xq + m * K, dx + m * (K / XB), K, XB) * scale[n] +      \
                           (bias ? bias[n] : 0.0f);                                                   \
    }

void phikit_gemv_i8(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale,
                    const float *bias, float *y) {
    int64_t XB = K % 256 == 0 ? 256 : 32;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * K));
    float *dx = malloc(sizeof(float) * (size_t)(M * K / 32));
    for (int64_t m = 0; m < M; m++) quantize_row_i16(x + m * K, K, XB, xq + m * K, dx + m * (K / XB));
    if (XB == 256) {
        I8_ROWS(256)
    } else {
        I8_ROWS(32)
    }
    free(xq);
    free(dx);
}

/* ---- int4: activations quantized to int8 per group, integer dot products (maddubs) ---- */

/* 4 x 8 int32 (each within int8 range) -> 32 int8 in order */
static inline __m256i pack_i8(__m256i a, __m256i b, __m256i c, __m256i e) {
    __m256i all = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e)); /* lanes interleaved */
    /* undo the in-lane interleaving of the two packs: dwords 0 4 1 5 2 6 3 7 */
    return _mm256_permutevar8x32_epi32(all, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* x (K floats) -> xq (K int8) with one scale per group of G, and exact group sums of x. G % 32 == 0. */
static void quantize_row(const float *x, int64_t K, int64_t G, int8_t *xq, float *dx, float *xsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < K / G; g++) {
        const float *xg = x + g * G;
        __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int64_t i = 0; i < G; i += 8) {
            __m256 v = _mm256_loadu_ps(xg + i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
            sum = _mm256_add_ps(sum, v);
        }
        float d = hmax(amax) / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        dx[g] = d;
        xsum[g] = hsum(sum);
        __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t i = 0; i < G; i += 32) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i), vinv));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8), vinv));
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 16), vinv));
            __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 24), vinv));
            _mm256_storeu_si256((__m256i *)(xq + g * G + i), pack_i8(a, b, c, e));
        }
    }
}

/* dot(x, w) for one row of int4 weights, 64 weights (32 bytes) per step: the low nibbles are weights
 * 0..31 of the block, the high nibbles 32..63. Within a group the int16 pair sums of maddubs are added
 * up directly: each is at most 2 * 15 * 127 = 3810, and a group (G <= 256) adds at most 8 of them.
 * The per-group factors (activation scale x weight scale) and the minimum terms are done 8 groups at a
 * time with vector instructions before the main loop. */
static inline __attribute__((always_inline)) float dot_row_i4(const uint8_t *wr, const uint16_t *sc,
        const uint16_t *mn, const int8_t *xq, const float *dx, const float *xsum, int64_t K, const int64_t G) {
    const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
    int64_t groups = K / G, g = 0;
    float coef[groups];
    __m256 extra = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8) {
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g)));
        __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + g)));
        _mm256_storeu_ps(coef + g, _mm256_mul_ps(s, _mm256_loadu_ps(dx + g)));
        extra = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + g), extra);
    }
    float tail = 0.0f;
    for (; g < groups; g++) {
        coef[g] = f16(sc[g]) * dx[g];
        tail += f16(mn[g]) * xsum[g];
    }
    __m256 acc = _mm256_setzero_ps();
    if (G == 32) { /* one 64-block holds two groups */
        for (int64_t b = 0; b < K / 64; b++) {
            _mm_prefetch((const char *)(wr + b * 32) + PREFETCH_I4, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(wr + b * 32));
            __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            __m256i s0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + b * 64)));
            __m256i s1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + b * 64 + 32)));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s0, ones)), _mm256_broadcast_ss(coef + 2 * b), acc);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s1, ones)), _mm256_broadcast_ss(coef + 2 * b + 1),
                                  acc);
        }
    } else {
        for (g = 0; g < groups; g++) {
            __m256i gsum = _mm256_setzero_si256();
            for (int64_t j = 0; j < G / 64; j++) {
                const uint8_t *wb = wr + g * G / 2 + j * 32;
                _mm_prefetch((const char *)wb + PREFETCH_I4, _MM_HINT_T0); /* every 32 B: measured best */
                __m256i v = _mm256_loadu_si256((const __m256i *)wb);
                __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                const int8_t *x = xq + g * G + j * 64;
                gsum = _mm256_add_epi16(gsum, _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)));
                gsum = _mm256_add_epi16(gsum, _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(gsum, ones)), _mm256_broadcast_ss(coef + g), acc);
        }
    }
    return hsum(acc) + hsum(extra) + tail;
}

void phikit_gemv_i4(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G,
                    const uint16_t *scale, const uint16_t *minimum, const float *bias, float *y) {
    int8_t *xq = malloc((size_t)(M * K));
    float *dx = malloc(sizeof(float) * (size_t)(M * K / G));
    float *xsum = malloc(sizeof(float) * (size_t)(M * K / G));
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, G, xq + m * K, dx + m * K / G, xsum + m * K / G);
/* one copy of the loop per group size, so the compiler unrolls the blocks of a group */
#define I4_ROWS(GS)                                                                                   \
    _Pragma("omp parallel for schedule(static)") for (int64_t n = 0; n < N; n++) {                     \
        const uint8_t *wr = w + n * K / 2;                                                            \
        const uint16_t *sc = scale + n * K / GS, *mn = minimum + n * K / GS;                          \
        for (int64_t m = 0; m < M; m++)                                                               \
            y[m * N + n] = dot_row_i4(wr, sc, mn, xq + m * K, dx + m * K / GS, xsum + m * K / GS, K, GS) + \
                           (bias ? bias[n] : 0.0f);                                                   \
    }
    switch (G) {
    case 32: I4_ROWS(32) break;
    case 64: I4_ROWS(64) break;
    case 128: I4_ROWS(128) break;
    default: I4_ROWS(256) break;
    }
    free(xq);
    free(dx);
    free(xsum);
}

/* ---- gelu (tanh form, "gelu_new") in place ----
 * tanh(u) = 1 - 2 / (exp(2u) + 1) with a vectorised exp: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
 * p a degree-6 Taylor polynomial (relative error below 2e-7 on that interval). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void phikit_gelu_tanh(float *x, int64_t n) {
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), a = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    int64_t vec = n / 8 * 8;
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < vec; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(a, v), _mm256_mul_ps(v, v), v));
        __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(_mm256_add_ps(u, u)), one)));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
    }
    for (int64_t i = vec; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

/* ---- attention for one new token (decoding), batch rows in parallel with heads ----
 * q (B, H*D) and k, v (B, KV*D) are this token's projections before rotary embedding; cos/sin (B, R)
 * are the rotary tables at each row's position (R = rotary dims, rotated GPT-NeoX style on the first R
 * of each head). Keys/values go into the caches (B, KV, S, D) at slot pos[b]; the query attends to
 * slots first[b] .. pos[b] (first[b] > 0 skips left padding). Scores and softmax in fp32; D % 8 == 0. */
static void rope(float *x, const float *cos, const float *sin, int64_t R) {
    int64_t half = R / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One cache row of D values: fp32, or fp16 (cache_f16) as llama.cpp keeps its KV cache: half the bytes a
 * long context reads per token, at fp16's 11-bit precision (ample for keys and values of unit-scale
 * activations; the scores and the softmax stay fp32). */
static inline __m256 load_kv(const void *c, int64_t i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)c + i)))
               : _mm256_loadu_ps((const float *)c + i);
}

static inline void store_kv(void *c, int64_t i, const float *x, int64_t D, int f16) {
    for (int64_t j = 0; j < D; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        if (f16)
            _mm_storeu_si128((__m128i *)((uint16_t *)c + i + j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        else
            _mm256_storeu_ps((float *)c + i + j, v);
    }
}

/* One new token per row: rotary on q and k, k and v written at slot pos[b], then softmax attention of each
 * query head over slots first[b] .. pos[b] (first > 0: a sliding window). Grouped-query heads: the G = H / KV
 * query heads of a KV head are done together, so each cached key and value is read once per group, not once
 * per query head (at long contexts the cache is what a step reads). Each head's arithmetic is the same as
 * alone. Returns 0, or DECODE_NO_MEMORY (scores buffer) with nothing written after the cache. */
int64_t phikit_attention_decode(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                                int64_t B, int64_t H, int64_t KV, int64_t D, int64_t R, void *k_cache,
                                void *v_cache, int64_t S, const int64_t *pos, const int64_t *first, float *out,
                                int64_t cache_f16) {
    const int f16 = cache_f16 != 0;
    /* write the rotated keys and the values first, so every head sees them */
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < KV; h++) {
            float kr[D];
            for (int64_t i = 0; i < D; i++) kr[i] = k[(b * KV + h) * D + i];
            rope(kr, cos + b * R, sin + b * R, R);
            int64_t slot = ((b * KV + h) * S + pos[b]) * D;
            store_kv(k_cache, slot, kr, D, f16);
            store_kv(v_cache, slot, v + (b * KV + h) * D, D, f16);
        }
    }
    float scale = 1.0f / sqrtf((float)D);
    int64_t nv = D / 8, G = H / KV, failed = 0;
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kvh = 0; kvh < KV; kvh++) {
            int64_t n = pos[b] + 1 - first[b], stride = n + 8;
            int64_t base = ((b * KV + kvh) * S + first[b]) * D; /* element index of the first attended row */
            float *scores = malloc(sizeof(float) * (size_t)(G * stride + G * D * 2));
            if (scores == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            float *qh = scores + G * stride, *o = qh + G * D; /* G heads' queries and outputs */
            for (int64_t g = 0; g < G; g++) {
                for (int64_t i = 0; i < D; i++) qh[g * D + i] = q[(b * H + kvh * G + g) * D + i] * scale;
                rope(qh + g * D, cos + b * R, sin + b * R, R); /* rope is linear: scaling first is the same */
            }
            for (int64_t j = 0; j < n; j++) /* each key once for the group */
                for (int64_t g = 0; g < G; g++) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t i = 0; i < nv; i++)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * D + 8 * i),
                                              load_kv(k_cache, base + j * D + 8 * i, f16), acc);
                    scores[g * stride + j] = hsum(acc);
                }
            for (int64_t g = 0; g < G; g++) {
                float *sc = scores + g * stride, m = -INFINITY;
                for (int64_t j = 0; j < n; j++) m = fmaxf(m, sc[j]);
                for (int64_t j = n; j < n + 8; j++) sc[j] = -INFINITY;
                __m256 mx = _mm256_set1_ps(m), total = _mm256_setzero_ps();
                for (int64_t j = 0; j < n; j += 8) {
                    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mx));
                    _mm256_storeu_ps(sc + j, e);
                    total = _mm256_add_ps(total, e);
                }
                float inv = 1.0f / hsum(total);
                for (int64_t j = 0; j < n; j++) sc[j] *= inv;
            }
            if (G == 1) { /* one head: its output in registers */
                __m256 acc[16];
                for (int64_t i = 0; i < nv; i++) acc[i] = _mm256_setzero_ps();
                for (int64_t j = 0; j < n; j++) {
                    __m256 p = _mm256_set1_ps(scores[j]);
                    for (int64_t i = 0; i < nv; i++)
                        acc[i] = _mm256_fmadd_ps(p, load_kv(v_cache, base + j * D + 8 * i, f16), acc[i]);
                }
                for (int64_t i = 0; i < nv; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
            } else { /* each value once for the group; the G outputs stay in L1 */
                for (int64_t i = 0; i < G * D; i++) o[i] = 0.0f;
                for (int64_t j = 0; j < n; j++)
                    for (int64_t i = 0; i < nv; i++) {
                        __m256 val = load_kv(v_cache, base + j * D + 8 * i, f16);
                        for (int64_t g = 0; g < G; g++) {
                            float *og = o + g * D + 8 * i;
                            _mm256_storeu_ps(og, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * stride + j]), val,
                                                                 _mm256_loadu_ps(og)));
                        }
                    }
            }
            for (int64_t g = 0; g < G; g++)
                memcpy(out + (b * H + kvh * G + g) * D, o + g * D, sizeof(float) * (size_t)D);
            free(scores);
        }
    }
    return failed ? -1 : 0;
}

/* y = x / sqrt(mean(x^2) + eps) * w per row of n values (n % 8 == 0), in fp32 (transformers' RMSNorm). */
void phikit_rms_norm(const float *x, int64_t B, int64_t n, const float *w, float eps, float *y) {
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * n;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / (float)n + eps));
        for (int64_t i = 0; i < n; i += 8)
            _mm256_storeu_ps(y + b * n + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), r)));
    }
}

/* SwiGLU on a fused gate|up projection: y[b][i] = up * silu(gate), gate = gate_up[b][i], up = gate_up[b][n + i]
 * (n % 8 == 0); silu(g) = g / (1 + exp(-g)). */
void phikit_silu_mul(const float *gate_up, int64_t B, int64_t n, float *y) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t b = 0; b < B; b++) {
        const float *gr = gate_up + b * 2 * n, *ur = gr + n;
        for (int64_t i = 0; i < n; i += 8) {
            __m256 g = _mm256_loadu_ps(gr + i);
            __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g)); /* exp256 clamps to +-88 */
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(y + b * n + i, _mm256_mul_ps(_mm256_loadu_ps(ur + i), silu));
        }
    }
}


/* ---- GEMM for prefill: y (M x N) = x (M x K) @ W^T + bias, W in any of the formats above ----
 * BLIS-style: W is unpacked to fp32 a panel of 16 output rows x KC at a time, transposed so the 16 values
 * of one k are contiguous, and a 6 x 16 register-blocked kernel (12 accumulators, 2 FMAs per loaded
 * activation) runs over every 6 rows of x, packed k-major so its broadcasts read one stream. Unpacking
 * inside the GEMM means no fp32 copy of the weight is ever materialised, and MKL (which picks slow code
 * paths on AMD CPUs) is not used. */
#define MR 6
#define NR 16
#define KC 256
#define MC 516 /* rows of x per block: a 516 x 256 fp32 block is about one L2 */
#define PANEL_ROWS(mc, p) ((mc) - (p) * MR < MR ? (int)((mc) - (p) * MR) : MR) /* rows of x in panel p */

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_I8 = 3, KIND_I4 = 4, KIND_BF16_DP = 5 };
enum { DECODE_NO_MEMORY = -1, DECODE_UNKNOWN_KIND = -2 }; /* phikit_decode_layers' errors */

/* Bp[k * NR + j] = W[n0 + j][k0 + k] as fp32, for k < kc */
static void pack_panel(int kind, const void *w, const float *scale, const uint16_t *scale16,
                       const uint16_t *minimum, int64_t G, int64_t K, int64_t n0, int64_t k0, int64_t kc,
                       float *Bp) {
    float rows[NR][KC];
    for (int64_t j = 0; j < NR; j++) {
        int64_t n = n0 + j;
        float *row = rows[j];
        switch (kind) {
        case KIND_F32: memcpy(row, (const float *)w + n * K + k0, (size_t)kc * sizeof(float)); break;
        case KIND_BF16:
            for (int64_t k = 0; k < kc; k += 8) _mm256_storeu_ps(row + k, load_bf16((const uint16_t *)w + n * K + k0 + k));
            break;
        case KIND_F16:
            for (int64_t k = 0; k < kc; k += 8) _mm256_storeu_ps(row + k, load_f16((const uint16_t *)w + n * K + k0 + k));
            break;
        case KIND_I8: {
            __m256 s = _mm256_set1_ps(scale[n]);
            for (int64_t k = 0; k < kc; k += 8)
                _mm256_storeu_ps(row + k, _mm256_mul_ps(load_i8((const int8_t *)w + n * K + k0 + k), s));
            break;
        }
        default: { /* int4, 64-blocks: k0 and kc are multiples of 64 */
            const uint8_t *wr = (const uint8_t *)w + n * K / 2;
            for (int64_t k = 0; k < kc; k += 64) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wr + (k0 + k) / 2));
                __m256i mask = _mm256_set1_epi8(0x0F);
                __m256i halves[2] = {_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)};
                for (int h = 0; h < 2; h++) {
                    int64_t g = (k0 + k + h * 32) / G;
                    __m256 s = _mm256_set1_ps(f16(scale16[n * (K / G) + g]));
                    __m256 mn = _mm256_set1_ps(f16(minimum[n * (K / G) + g]));
                    for (int part = 0; part < 4; part++) {
                        __m128i bytes = part < 2 ? _mm256_castsi256_si128(halves[h]) : _mm256_extracti128_si256(halves[h], 1);
                        if (part & 1) bytes = _mm_srli_si128(bytes, 8);
                        __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                        _mm256_storeu_ps(row + k + h * 32 + part * 8, _mm256_fmadd_ps(q, s, mn));
                    }
                }
            }
        }
        }
    }
    /* transpose 8 x 8 blocks: Bp[k][j] = rows[j][k] */
    for (int64_t j0 = 0; j0 < NR; j0 += 8) {
        for (int64_t k = 0; k < kc; k += 8) {
            __m256 r[8], t[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(rows[j0 + i] + k);
            t[0] = _mm256_unpacklo_ps(r[0], r[1]); t[1] = _mm256_unpackhi_ps(r[0], r[1]);
            t[2] = _mm256_unpacklo_ps(r[2], r[3]); t[3] = _mm256_unpackhi_ps(r[2], r[3]);
            t[4] = _mm256_unpacklo_ps(r[4], r[5]); t[5] = _mm256_unpackhi_ps(r[4], r[5]);
            t[6] = _mm256_unpacklo_ps(r[6], r[7]); t[7] = _mm256_unpackhi_ps(r[6], r[7]);
            r[0] = _mm256_shuffle_ps(t[0], t[2], 0x44); r[1] = _mm256_shuffle_ps(t[0], t[2], 0xEE);
            r[2] = _mm256_shuffle_ps(t[1], t[3], 0x44); r[3] = _mm256_shuffle_ps(t[1], t[3], 0xEE);
            r[4] = _mm256_shuffle_ps(t[4], t[6], 0x44); r[5] = _mm256_shuffle_ps(t[4], t[6], 0xEE);
            r[6] = _mm256_shuffle_ps(t[5], t[7], 0x44); r[7] = _mm256_shuffle_ps(t[5], t[7], 0xEE);
            for (int i = 0; i < 4; i++) {
                _mm256_storeu_ps(Bp + (k + i) * NR + j0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
                _mm256_storeu_ps(Bp + (k + i + 4) * NR + j0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
            }
        }
    }
}

/* C (rows x 16, row stride ldc, rows <= 6) = sum_k Ap[k][i] * Bp[k][j] + (C itself for a later block of k,
 * else the bias row or zero). Ap is a packed panel of 6 rows of x, k-major, zero past the last row. Each
 * block's sum starts from zero and is added to C at the end (a blocked sum: more accurate than accumulating
 * onto C). */
static inline __attribute__((always_inline)) void kernel_6x16(int64_t kc, const float *Ap, const float *Bp, float *C,
                                                              int64_t ldc, int rows, const float *bias, int accumulate) {
    __m256 c[MR][2];
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(Bp + k * NR), b1 = _mm256_load_ps(Bp + k * NR + 8);
        const float *a = Ap + k * MR;
        __m256 av;
        av = _mm256_broadcast_ss(a);     c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    c[0][0] = c00, c[0][1] = c01, c[1][0] = c10, c[1][1] = c11, c[2][0] = c20, c[2][1] = c21;
    c[3][0] = c30, c[3][1] = c31, c[4][0] = c40, c[4][1] = c41, c[5][0] = c50, c[5][1] = c51;
    for (int i = 0; i < rows; i++) {
        float *ci = C + i * ldc;
        __m256 s0 = accumulate ? _mm256_loadu_ps(ci) : bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        __m256 s1 = accumulate ? _mm256_loadu_ps(ci + 8) : bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
        _mm256_storeu_ps(ci, _mm256_add_ps(c[i][0], s0));
        _mm256_storeu_ps(ci + 8, _mm256_add_ps(c[i][1], s1));
    }
}

/* x: M x K fp32, y: M x N. N % 16 == 0, K % 64 == 0.
 * Per block of MC rows of x: the block is packed once, every KC slice of it, into 6-row panels (shared by
 * both threads, from L2/L3). Each thread then takes blocks of NC output columns, and for each runs every
 * KC slice in order: 16-row panels of W unpacked to fp32 in L1, the kernel over every row panel. The C
 * block (MC x NC, 256 KB) stays in L2 across the slices; sweeping all N per slice instead re-read C from
 * L3 once per slice (21 MB for fc1 at 512 rows). Each C element still adds its slices in k order, so the
 * result is bit for bit that of the previous loop order; same-process A/B (benchmarks/RESULTS.md): fc1
 * +9%, the other shapes level. Earlier, packing x into panels and prefetching C tiles gave 1.09-1.24x. */
#define NC 128
void phikit_gemm(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale,
                 const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y) {
    int64_t mc_max = M < MC ? (M + MR - 1) / MR * MR : MC;
    int64_t slices = (K + KC - 1) / KC;
    float *Ap = aligned_alloc(64, (size_t)(mc_max * slices * KC) * sizeof(float));
#pragma omp parallel
    {
        float *Bp = aligned_alloc(64, KC * NR * sizeof(float));
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
            int64_t mc = M - m0 < MC ? M - m0 : MC, panels = (mc + MR - 1) / MR;
#pragma omp for schedule(static) collapse(2)
            for (int64_t s = 0; s < slices; s++) {
                for (int64_t p = 0; p < panels; p++) { /* Ap[s][p][k][i] = x[m0 + 6p + i][s KC + k], 0 past row M */
                    int64_t k0 = s * KC, kc = K - k0 < KC ? K - k0 : KC;
                    const float *src = x + (m0 + p * MR) * K + k0;
                    float *dst = Ap + s * mc_max * KC + p * MR * kc;
                    int rows = PANEL_ROWS(mc, p);
                    for (int64_t k = 0; k < kc; k++)
                        for (int i = 0; i < MR; i++) dst[k * MR + i] = i < rows ? src[i * K + k] : 0.0f;
                }
            }
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < N; nb += NC) {
                int64_t n_end = nb + NC < N ? nb + NC : N;
                for (int64_t s = 0; s < slices; s++) {
                    int64_t k0 = s * KC, kc = K - k0 < KC ? K - k0 : KC;
                    const float *A = Ap + s * mc_max * KC;
                    for (int64_t n0 = nb; n0 < n_end; n0 += NR) {
                        pack_panel(kind, w, scale, scale16, minimum, G, K, n0, k0, kc, Bp);
                        for (int64_t p = 0; p < panels; p++)
                            kernel_6x16(kc, A + p * MR * kc, Bp, y + (m0 + p * MR) * N + n0, N, PANEL_ROWS(mc, p),
                                        bias ? bias + n0 : NULL, k0 > 0);
                    }
                }
            }
        }
        free(Bp);
    }
    free(Ap);
}


/* ---- int8 / int4 prefill with AVX-512 VNNI: activations quantized to int8, integer dot products ----
 * What llama.cpp does for its Q8_0/Q4_0 prefill, for phikit's layouts: x is quantized to int8 per block of
 * XB values (int8: 64; int4: the weight group) with a float scale per block, and vpdpbusd multiplies 64
 * unsigned weight bytes by 64 signed activation bytes into 16 int32 sums per instruction (4x the multiply
 * rate of fp32 FMAs). Weights stay in their format in memory: a panel of 32 output rows x 256 k is unpacked
 * to bytes in L1 as the GEMM goes (int4: the nibble, 0..15; int8: w + 128, corrected by -128 x the block's
 * activation sum), in VNNI order, then a 6 x 32 kernel runs it over every row of x. Per block b of XB:
 *   int8: y[m][n] += dx[m][b] * (dot(w + 128, xq) - 128 * sum(xq))        (times scale[n] at the end)
 *   int4: y[m][n] += dx[m][b] * (scale[n][b] * dot(q, xq) + minimum[n][b] * sum(xq))
 * so y is the exact product of the dequantized weight with x rounded to int8 (about 0.4% of each block's
 * largest value), as llama.cpp's Q4_1 x Q8_1 (the minimum term taken with x's exact sum instead would add
 * the rounding errors of x times the all-positive codes, 2-3x the error).
 * N % 32 == 0, K % 64 == 0 (int4: K % G == 0, G in 32..256). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VNR 32
#define VMR 6
#define VKC 256

/* Bq[(k / 4) * 128 + j * 4 + k % 4] = byte of W[n0 + j][k0 + k]; fs/fm[b * VNR + j]: int4 scale and
 * minimum of row n0 + j in block b of the slice (int4 only). */
static void pack_panel_vnni(int kind, const void *w, const uint16_t *scale16, const uint16_t *minimum, int64_t G,
                            int64_t K, int64_t n0, int64_t k0, int64_t kc, uint8_t *Bq, float *fs, float *fm) {
    uint32_t rows[VNR][VKC / 4] __attribute__((aligned(64)));
    const __m256i mask = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80);
    for (int64_t j = 0; j < VNR; j++) {
        int64_t n = n0 + j;
        uint8_t *row = (uint8_t *)rows[j];
        if (kind == KIND_I8) {
            const int8_t *src = (const int8_t *)w + n * K + k0;
            for (int64_t k = 0; k < kc; k += 32)
                _mm256_store_si256((__m256i *)(row + k), _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(src + k)), flip));
        } else {
            const uint8_t *src = (const uint8_t *)w + n * K / 2 + k0 / 2;
            for (int64_t k = 0; k < kc; k += 64) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(src + k / 2));
                _mm256_store_si256((__m256i *)(row + k), _mm256_and_si256(v, mask));
                _mm256_store_si256((__m256i *)(row + k + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
            }
            for (int64_t b = 0; b < kc / G; b++) {
                fs[b * VNR + j] = f16(scale16[n * (K / G) + k0 / G + b]);
                fm[b * VNR + j] = f16(minimum[n * (K / G) + k0 / G + b]);
            }
        }
    }
    uint32_t *B32 = (uint32_t *)Bq; /* B32[q * VNR + j] = rows[j][q], by 16 x 16 transposes of dwords */
    for (int64_t j0 = 0; j0 < VNR; j0 += 16)
        for (int64_t q0 = 0; q0 < kc / 4; q0 += 16) {
            __m512i r[16], t[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512((const void *)&rows[j0 + i][q0]);
            for (int i = 0; i < 16; i += 2) {
                t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
                t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) { /* r[i + c], lane L: rows i..i+3 of dword 4L + c */
                r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
                r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
                r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
                r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
            }
            for (int c = 0; c < 4; c++) {
                __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
                __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
                _mm512_store_si512((void *)(B32 + (q0 + c) * VNR + j0), _mm512_shuffle_i32x4(x0, y0, 0x88));
                _mm512_store_si512((void *)(B32 + (q0 + 4 + c) * VNR + j0), _mm512_shuffle_i32x4(x1, y1, 0x88));
                _mm512_store_si512((void *)(B32 + (q0 + 8 + c) * VNR + j0), _mm512_shuffle_i32x4(x0, y0, 0xDD));
                _mm512_store_si512((void *)(B32 + (q0 + 12 + c) * VNR + j0), _mm512_shuffle_i32x4(x1, y1, 0xDD));
            }
        }
}

/* One slice (kc of K) of C rows m0.. (rows <= 6) x 32 columns. xr[i]: quantized row i at k0; dx/aux: its
 * per-block scales and (int8) -128 x block sums as int32 or (int4) dx x block sums, at k0's block. */
static inline __attribute__((always_inline)) void kernel_vnni(const int kind, int64_t kc, const int64_t XB,
        const uint8_t *Bq, const float *fs, const float *fm, const int8_t *const *xr, const float *const *dx,
        const void *const *aux, int rows, float *C, int64_t ldc, const float *scale, const float *bias,
        int accumulate) {
    __m512 y[VMR][2];
    for (int i = 0; i < VMR; i++) y[i][0] = y[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kc / XB; b++) {
        __m512i acc[VMR][2];
        for (int i = 0; i < VMR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        const uint8_t *B = Bq + b * XB * VNR;
        for (int64_t q = 0; q < XB / 4; q++) {
            __m512i w0 = _mm512_load_si512((const void *)(B + q * 4 * VNR));
            __m512i w1 = _mm512_load_si512((const void *)(B + q * 4 * VNR + 64));
#pragma GCC unroll 6
            for (int i = 0; i < VMR; i++) {
                __m512i a = _mm512_set1_epi32(*(const int32_t *)(xr[i] + b * XB + q * 4));
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, a);
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, a);
            }
        }
        if (kind == KIND_I8) {
#pragma GCC unroll 6
            for (int i = 0; i < VMR; i++) {
                __m512i c = _mm512_set1_epi32(((const int32_t *)aux[i])[b]);
                __m512 d = _mm512_set1_ps(dx[i][b]);
                y[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[i][0], c)), d, y[i][0]);
                y[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[i][1], c)), d, y[i][1]);
            }
        } else {
            __m512 s0 = _mm512_loadu_ps(fs + b * VNR), s1 = _mm512_loadu_ps(fs + b * VNR + 16);
            __m512 n0 = _mm512_loadu_ps(fm + b * VNR), n1 = _mm512_loadu_ps(fm + b * VNR + 16);
#pragma GCC unroll 6
            for (int i = 0; i < VMR; i++) {
                __m512 d = _mm512_set1_ps(dx[i][b]), t = _mm512_set1_ps(((const float *)aux[i])[b]);
                y[i][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][0]), s0), d, y[i][0]);
                y[i][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][1]), s1), d, y[i][1]);
                y[i][0] = _mm512_fmadd_ps(n0, t, y[i][0]);
                y[i][1] = _mm512_fmadd_ps(n1, t, y[i][1]);
            }
        }
    }
    __m512 sc0 = _mm512_set1_ps(1.0f), sc1 = sc0;
    if (kind == KIND_I8) sc0 = _mm512_loadu_ps(scale), sc1 = _mm512_loadu_ps(scale + 16);
    for (int i = 0; i < rows; i++) {
        float *ci = C + i * ldc;
        __m512 b0 = accumulate ? _mm512_loadu_ps(ci) : bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
        __m512 b1 = accumulate ? _mm512_loadu_ps(ci + 16) : bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
        _mm512_storeu_ps(ci, _mm512_fmadd_ps(y[i][0], sc0, b0));
        _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(y[i][1], sc1, b1));
    }
}

void phikit_gemm_vnni(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale,
                      const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y) {
    const int64_t XB = kind == KIND_I8 ? 64 : G, blocks = K / XB;
    /* xq slice by slice: the VKC bytes of row m in slice s at xq + s * VKC * M + m * kc(s), so a slice's rows
     * are contiguous (rows K bytes apart alias in the caches when K is a multiple of 2048, e.g. fc2's 10240) */
    int8_t *xq = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *dx = malloc(sizeof(float) * (size_t)(M * blocks));
    float *xsum = malloc(sizeof(float) * (size_t)(M * blocks));
    int32_t *corr = malloc(sizeof(int32_t) * (size_t)(M * blocks));
#pragma omp parallel
    {
        int8_t *row = malloc((size_t)K);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            quantize_row(x + m * K, K, XB, row, dx + m * blocks, xsum + m * blocks);
            for (int64_t b = 0; b < blocks; b++) {
                int32_t sum = 0;
                for (int64_t i = 0; i < XB; i++) sum += row[b * XB + i];
                corr[m * blocks + b] = -128 * sum;
                xsum[m * blocks + b] = dx[m * blocks + b] * (float)sum; /* the sum of x as rounded */
            }
            for (int64_t k0 = 0; k0 < K; k0 += VKC) {
                int64_t kc = K - k0 < VKC ? K - k0 : VKC;
                memcpy(xq + k0 * M + m * kc, row + k0, (size_t)kc);
            }
        }
        free(row);
    }
    const void *aux_base = kind == KIND_I8 ? (const void *)corr : (const void *)xsum;
    size_t aux_size = kind == KIND_I8 ? sizeof(int32_t) : sizeof(float);
#pragma omp parallel
    {
        uint8_t *Bq = aligned_alloc(64, VKC * VNR);
        float fs[(VKC / 32) * VNR], fm[(VKC / 32) * VNR];
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += VNR) {
            for (int64_t k0 = 0; k0 < K; k0 += VKC) {
                int64_t kc = K - k0 < VKC ? K - k0 : VKC;
                pack_panel_vnni(kind, w, scale16, minimum, G, K, n0, k0, kc, Bq, fs, fm);
                for (int64_t m0 = 0; m0 < M; m0 += VMR) {
                    int rows = M - m0 < VMR ? (int)(M - m0) : VMR;
                    const int8_t *xr[VMR];
                    const float *dr[VMR];
                    const void *ar[VMR];
                    for (int i = 0; i < VMR; i++) {
                        int64_t m = m0 + (i < rows ? i : 0);
                        xr[i] = xq + k0 * M + m * kc;
                        dr[i] = dx + m * blocks + k0 / XB;
                        ar[i] = (const char *)aux_base + (size_t)(m * blocks + k0 / XB) * aux_size;
                    }
                    float *C = y + m0 * N + n0;
                    const float *bn = bias ? bias + n0 : NULL;
                    if (kind == KIND_I8)
                        kernel_vnni(KIND_I8, kc, 64, Bq, fs, fm, xr, dr, ar, rows, C, N, scale + n0, bn, k0 > 0);
                    else
                        kernel_vnni(KIND_I4, kc, XB, Bq, fs, fm, xr, dr, ar, rows, C, N, NULL, bn, k0 > 0);
                }
            }
        }
        free(Bq);
    }
    free(xq);
    free(dx);
    free(xsum);
    free(corr);
}
#define HAS_VNNI FEATURE_VNNI
#else
void phikit_gemm_vnni(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale,
                      const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y) {
    phikit_gemm(kind, x, M, K, w, N, scale, scale16, minimum, G, bias, y); /* never called: no FEATURE_VNNI */
}
#define HAS_VNNI 0
#endif

int64_t phikit_features(void) { return HAS_BF16_DP | HAS_VNNI; }

/* ---- weight quantization while loading: quantize.py's reference quantizers (quantize_int8,
 * quantize_int4), the same fp32 operations in the same order, so the results are equal bit for bit; one
 * pass over each row instead of PyTorch's dozen whole-tensor passes (a 2.7B model: ~25 s -> ~1 s).
 * Source weights are f32, bf16 or f16 (dtype 0, 1, 2); rounding is to nearest even, as torch.round and
 * Tensor.half do. */
static inline __m256 load_any(int dtype, const void *w, int64_t i) {
    return dtype == 0 ? _mm256_loadu_ps((const float *)w + i)
         : dtype == 1 ? load_bf16((const uint16_t *)w + i) : load_f16((const uint16_t *)w + i);
}

/* q = round(w / scale) clamped to [-127, 127], scale = max(amax|w| / 127, 1e-12) per row; K % 32 == 0 */
void phikit_quantize_i8(int dtype, const void *w, int64_t N, int64_t K, int8_t *q, float *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int64_t row = n * K;
        __m256 amax = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8)
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load_any(dtype, w, row + k)));
        float s = fmaxf(hmax(amax) / 127.0f, 1e-12f);
        scale[n] = s;
        __m256 vs = _mm256_set1_ps(s);
        for (int64_t k = 0; k < K; k += 32) {
            __m256i c[4];
            for (int j = 0; j < 4; j++) {
                __m256 v = _mm256_round_ps(_mm256_div_ps(load_any(dtype, w, row + k + 8 * j), vs),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                c[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
            }
            _mm256_storeu_si256((__m256i *)(q + row + k), pack_i8(c[0], c[1], c[2], c[3]));
        }
    }
}

/* Per group of G in a row: minimum = fp16(min), scale = fp16(max((max - minimum) / 15, 1e-7)),
 * code = round((w - minimum) / scale) clamped to [0, 15], packed in blocks of 64 as the int4 layout above.
 * K % 64 == 0, G in 32..256 dividing K. */
void phikit_quantize_i4(int dtype, const void *w, int64_t N, int64_t K, int64_t G, uint8_t *packed,
                        uint16_t *scale16, uint16_t *minimum16) {
    const __m256 zero = _mm256_setzero_ps(), fifteen = _mm256_set1_ps(15.0f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int64_t row = n * K;
        float sc[K / 32], mn[K / 32]; /* per group; K / G <= K / 32 entries */
        for (int64_t g = 0; g < K / G; g++) {
            __m256 vmin = load_any(dtype, w, row + g * G), vmax = vmin;
            for (int64_t i = 8; i < G; i += 8) {
                __m256 v = load_any(dtype, w, row + g * G + i);
                vmin = _mm256_min_ps(vmin, v), vmax = _mm256_max_ps(vmax, v);
            }
            uint16_t low = _cvtss_sh(hmin(vmin), _MM_FROUND_TO_NEAREST_INT); /* rounded to nearest even */
            float lowf = _cvtsh_ss(low);
            uint16_t s = _cvtss_sh(fmaxf((hmax(vmax) - lowf) / 15.0f, 1e-7f), _MM_FROUND_TO_NEAREST_INT);
            minimum16[n * (K / G) + g] = low, scale16[n * (K / G) + g] = s;
            mn[g] = lowf, sc[g] = _cvtsh_ss(s);
        }
        for (int64_t b = 0; b < K; b += 64) {
            __m256i half[2];
            for (int h = 0; h < 2; h++) { /* codes of weights b + 32h .. b + 32h + 31 */
                int64_t g = (b + 32 * h) / G;
                __m256 vmn = _mm256_set1_ps(mn[g]), vsc = _mm256_set1_ps(sc[g]);
                __m256i c[4];
                for (int j = 0; j < 4; j++) {
                    __m256 v = _mm256_sub_ps(load_any(dtype, w, row + b + 32 * h + 8 * j), vmn);
                    v = _mm256_round_ps(_mm256_div_ps(v, vsc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    c[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), fifteen));
                }
                half[h] = pack_i8(c[0], c[1], c[2], c[3]);
            }
            _mm256_storeu_si256((__m256i *)(packed + (row + b) / 2),
                                _mm256_or_si256(half[0], _mm256_slli_epi16(half[1], 4)));
        }
    }
}

/* fp32/fp16 -> bf16, rounded to nearest even (NaN -> 0x7FC0), as Tensor.to(torch.bfloat16) does; PyTorch's
 * fp16 -> bf16 conversion runs at ~0.7 G elements/s here, a quarter of loading a checkpoint. */
void phikit_to_bf16(int dtype, const void *src, int64_t n, uint16_t *dst) {
    const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
    int64_t vec = n / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < vec; i += 8) {
        __m256 v = load_any(dtype, src, i);
        __m256i bits = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(bits, 16), lsb)));
        r = _mm256_srli_epi32(r, 16);
        r = _mm256_blendv_epi8(nan, r, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8); /* 8 x u16 in the low half */
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_castsi256_si128(packed));
    }
    for (int64_t i = vec; i < n; i++) {
        float f = dtype == 0 ? ((const float *)src)[i] : f16(((const uint16_t *)src)[i]);
        uint32_t bits;
        memcpy(&bits, &f, 4);
        dst[i] = f != f ? 0x7FC0 : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
}

/* 8 fp32 -> 8 bf16 (round to nearest even; the weights here are finite) */
static inline __m128i to_bf16x8(__m256 v) {
    const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    __m256i bits = _mm256_castps_si256(v);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(bits, 16), lsb))), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
}

/* Rows n0..n1 of W (any kind above) as bf16, out[(n - n0) * K + k]: weight panels for PyTorch's bf16
 * matmul in prefill (phikit.backends.cpu, path "dequant_bf16"). K % 64 == 0. */
void phikit_dequant_bf16(int kind, const void *w, const float *scale, const uint16_t *scale16,
                         const uint16_t *minimum, int64_t G, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        uint16_t *o = out + (n - n0) * K;
        if (kind == KIND_BF16) {
            memcpy(o, (const uint16_t *)w + n * K, (size_t)K * 2);
            continue;
        }
        for (int64_t k = 0; k < K; k += 64) {
            __m256 v[8];
            if (kind == KIND_I4) {
                const uint8_t *wr = (const uint8_t *)w + (n * K + k) / 2;
                __m256i bytes = _mm256_loadu_si256((const __m256i *)wr), mask = _mm256_set1_epi8(0x0F);
                __m256i halves[2] = {_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask)};
                for (int h = 0; h < 2; h++) {
                    int64_t g = (k + h * 32) / G;
                    __m256 s = _mm256_set1_ps(f16(scale16[n * (K / G) + g])), mn = _mm256_set1_ps(f16(minimum[n * (K / G) + g]));
                    for (int part = 0; part < 4; part++) {
                        __m128i b = part < 2 ? _mm256_castsi256_si128(halves[h]) : _mm256_extracti128_si256(halves[h], 1);
                        if (part & 1) b = _mm_srli_si128(b, 8);
                        v[h * 4 + part] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), s, mn);
                    }
                }
            } else {
                for (int i = 0; i < 8; i++) {
                    int64_t at = n * K + k + 8 * i;
                    v[i] = kind == KIND_F32  ? load_f32((const float *)w + at)
                           : kind == KIND_F16 ? load_f16((const uint16_t *)w + at)
                                              : _mm256_mul_ps(load_i8((const int8_t *)w + at), _mm256_set1_ps(scale[n]));
                }
            }
            for (int i = 0; i < 8; i++) _mm_storeu_si128((__m128i *)(o + k + 8 * i), to_bf16x8(v[i]));
        }
    }
}

/* ---- a whole decoding step through the decoder layers, one call ----
 * Per layer: h = LayerNorm(x); attention (q/k/v gemv, rotary, cache write, attention, dense) and MLP (fc1,
 * gelu, fc2) both read h; x = (attn + mlp) + x, the order model.py adds them in. Doing this in C removes
 * ~25 PyTorch ops and Python calls per layer (~11 ms of Python per token on Phi-2, the time of ~15% of an
 * int4 step). The linears are the gemv kernels above, so each dot product is accumulated as in the
 * layer-by-layer path. */
typedef struct {
    int64_t kind, n, k, group;
    const void *w, *scale, *minimum;
    const float *bias;
} Linear;

enum { LAYER_PHI = 0, LAYER_PHI3 = 1 };

/* One decoder layer. LAYER_PHI (Phi-1/1.5/2): x + attention(LN(x)) + MLP(LN(x)), one LayerNorm (ln_weight,
 * ln_bias), q k v dense, gelu MLP fc1 fc2. LAYER_PHI3 (Phi-3/3.5/4): x + attention(RMSNorm(x)), then
 * + MLP(RMSNorm(x)) with ln_weight and ln2_weight (input_layernorm, post_attention_layernorm); q is the
 * fused qkv_proj (k, v unused), dense o_proj, fc1 the fused gate_up_proj (SwiGLU), fc2 down_proj. */
struct Layer {
    int64_t arch;
    const float *ln_weight, *ln_bias, *ln2_weight;
    Linear q, k, v, dense, fc1, fc2;
};

/* 0, or DECODE_UNKNOWN_KIND for a weight kind this library has no gemv for (never guessed as int4) */
static int64_t linear(const Linear *l, const float *x, int64_t M, float *y) {
    switch (l->kind) {
    case KIND_F32: phikit_gemv_f32(x, M, l->k, l->w, l->n, NULL, l->bias, y); return 0;
    case KIND_BF16: phikit_gemv_bf16(x, M, l->k, l->w, l->n, NULL, l->bias, y); return 0;
    case KIND_F16: phikit_gemv_f16(x, M, l->k, l->w, l->n, NULL, l->bias, y); return 0;
    case KIND_I8: phikit_gemv_i8(x, M, l->k, l->w, l->n, l->scale, l->bias, y); return 0;
    case KIND_I4: phikit_gemv_i4(x, M, l->k, l->w, l->n, l->group, l->scale, l->minimum, l->bias, y); return 0;
    case KIND_BF16_DP: phikit_gemv_bf16_dp(x, M, l->k, l->w, l->n, l->bias, y); return 0;
    default: return DECODE_UNKNOWN_KIND;
    }
}

/* y = (x - mean) / sqrt(var + eps) * w + b over n values (n % 8 == 0), two passes in fp32 as PyTorch does */
static void layer_norm(const float *x, int64_t n, const float *w, const float *b, float eps, float *y) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
    float mean = hsum(s) / (float)n;
    __m256 vm = _mm256_set1_ps(mean), ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
        ss = _mm256_fmadd_ps(d, d, ss);
    }
    __m256 rstd = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 8) {
        __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), rstd);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(d, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
    }
}

/* x (B, hidden) in place; caches (L, B, KV, S, D), each layer's (B, KV, S, D) contiguous and layer_cache
 * values after the previous one's (fp32, or fp16 with cache_f16); cos/sin (B, R) at each row's position;
 * pos/first as in phikit_attention_decode; inter the MLP's width (Phi-3: half of gate_up_proj's rows).
 * Returns 0, DECODE_NO_MEMORY (a buffer could not be allocated: x untouched unless attention's failed, and
 * then the step is void) or DECODE_UNKNOWN_KIND (nothing done). */
int64_t phikit_decode_layers(const Layer *layers, int64_t L, float *x, int64_t B, int64_t hidden, int64_t inter,
                             float eps, int64_t H, int64_t KV, int64_t D, const float *cos, const float *sin,
                             int64_t R, void *k_cache, void *v_cache, int64_t S, int64_t layer_cache,
                             const int64_t *pos, const int64_t *first, int64_t cache_f16) {
    int64_t layer_bytes = layer_cache * (cache_f16 ? 2 : 4);
    int64_t qn = H * D, kvn = KV * D;
    for (int64_t l = 0; l < L; l++) { /* every kind known before anything is written */
        const Layer *ly = layers + l;
        const Linear *all[6] = {&ly->q, &ly->dense, &ly->fc1, &ly->fc2, &ly->k, &ly->v};
        int used = ly->arch == LAYER_PHI ? 6 : 4;
        if (ly->arch != LAYER_PHI && ly->arch != LAYER_PHI3) return DECODE_UNKNOWN_KIND;
        for (int i = 0; i < used; i++)
            if (all[i]->kind < KIND_F32 || all[i]->kind > KIND_BF16_DP) return DECODE_UNKNOWN_KIND;
    }
    /* h: normed x; qkv: Phi-3's fused projection; q k v; a: attention; attn, mlp: the two branches; up: the
     * MLP's hidden (Phi-3: gate | up, 2 x inter); act: Phi-3's SwiGLU output */
    int64_t qkvn = qn + 2 * kvn;
    float *h = malloc(sizeof(float) * (size_t)(B * (hidden + qkvn + qkvn + qn + 2 * hidden + 3 * inter)));
    if (h == NULL) return DECODE_NO_MEMORY;
    float *qkv = h + B * hidden, *q = qkv + B * qkvn, *k = q + B * qn, *v = k + B * kvn, *a = v + B * kvn;
    float *attn = a + B * qn, *mlp = attn + B * hidden, *up = mlp + B * hidden, *act = up + 2 * B * inter;
    int64_t status = 0;
    for (int64_t l = 0; l < L; l++) {
        const Layer *ly = layers + l;
        void *kc = (char *)k_cache + l * layer_bytes, *vc = (char *)v_cache + l * layer_bytes;
        if (ly->arch == LAYER_PHI) {
            for (int64_t b = 0; b < B; b++)
                layer_norm(x + b * hidden, hidden, ly->ln_weight, ly->ln_bias, eps, h + b * hidden);
            linear(&ly->q, h, B, q);
            linear(&ly->k, h, B, k);
            linear(&ly->v, h, B, v);
            status = phikit_attention_decode(q, k, v, cos, sin, B, H, KV, D, R, kc, vc, S, pos, first, a, cache_f16);
            if (status) break;
            linear(&ly->dense, a, B, attn);
            linear(&ly->fc1, h, B, up);
            phikit_gelu_tanh(up, B * inter);
            linear(&ly->fc2, up, B, mlp);
            for (int64_t i = 0; i < B * hidden; i++) x[i] = (attn[i] + mlp[i]) + x[i];
            continue;
        }
        phikit_rms_norm(x, B, hidden, ly->ln_weight, eps, h);
        linear(&ly->q, h, B, qkv);
        for (int64_t b = 0; b < B; b++) {
            const float *row = qkv + b * qkvn;
            memcpy(q + b * qn, row, sizeof(float) * (size_t)qn);
            memcpy(k + b * kvn, row + qn, sizeof(float) * (size_t)kvn);
            memcpy(v + b * kvn, row + qn + kvn, sizeof(float) * (size_t)kvn);
        }
        status = phikit_attention_decode(q, k, v, cos, sin, B, H, KV, D, R, kc, vc, S, pos, first, a, cache_f16);
        if (status) break;
        linear(&ly->dense, a, B, attn);
        for (int64_t i = 0; i < B * hidden; i++) x[i] = x[i] + attn[i];
        phikit_rms_norm(x, B, hidden, ly->ln2_weight, eps, h);
        linear(&ly->fc1, h, B, up);
        phikit_silu_mul(up, B, inter, act);
        linear(&ly->fc2, act, B, mlp);
        for (int64_t i = 0; i < B * hidden; i++) x[i] = x[i] + mlp[i];
    }
    free(h);
    return status;
}
