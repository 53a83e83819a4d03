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
 *   int4       : uint8 [N][K/2], float scale[N][K/G], float minimum[N][K/G]   w = q * scale + minimum
 *                in blocks of 32 weights: byte i of a block holds weight i (low nibble) and
 *                weight i + 16 (high nibble), so one 16-byte load unpacks to 32 weights in order.
 *
 * Every (row of x, row of W) dot product is accumulated the same way whatever M is, so a token
 * decoded alone and the same token inside a batch (speculative verification) get identical results.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#define ROWS 4 /* weight rows processed together when M == 1 */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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
                    for (int64_t k = 0; k < K; k += 16) {                                           \
                        __m256 wl = LOAD(wr + k), wh = LOAD(wr + k + 8);                            \
                        for (int i = 0; i < mb; i++) {                                              \
                            const float *xr = x + (m0 + i) * K + k;                                 \
                            a[i] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xr), a[i]);                  \
                            b[i] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xr + 8), b[i]);              \
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
DEFINE_GEMV(phikit_gemv_i8, int8_t, load_i8)

/* ---- int4: activations quantized to int8 per 32 values, integer dot products (maddubs) ---- */

/* x (K floats) -> xq (K int8), dx[K/32] scales, xsum[K/G] exact group sums of x. */
static void quantize_row(const float *x, int64_t K, int64_t G, int8_t *xq, float *dx, float *xsum) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        dx[b] = d;
        for (int i = 0; i < 32; i++) xq[b * 32 + i] = (int8_t)lrintf(xb[i] * inv);
    }
    for (int64_t g = 0; g < K / G; g++) {
        float s = 0.0f;
        for (int64_t i = 0; i < G; i++) s += x[g * G + i];
        xsum[g] = s;
    }
}

/* 32 unsigned 4-bit weights of one block, in order, as bytes. */
static inline __m256i unpack_nibbles(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    return _mm256_set_m128i(hi, lo);
}

static inline float dot_row_i4(const uint8_t *wr, const float *sc, const float *mn, const int8_t *xq,
                               const float *dx, const float *xsum, int64_t K, int64_t G) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float extra = 0.0f;
    int64_t per_group = G / 32;
    for (int64_t g = 0; g < K / G; g++) {
        __m256 gacc = _mm256_setzero_ps();
        for (int64_t j = 0; j < per_group; j++) {
            int64_t b = g * per_group + j;
            __m256i q = unpack_nibbles(wr + b * 16);
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
            gacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dx[b]), gacc);
        }
        acc = _mm256_fmadd_ps(gacc, _mm256_set1_ps(sc[g]), acc);
        extra += mn[g] * xsum[g];
    }
    return hsum(acc) + extra;
}

void phikit_gemv_i4(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G,
                    const float *scale, const float *minimum, const float *bias, float *y) {
    int8_t *xq = malloc((size_t)(M * K));
    float *dx = malloc(sizeof(float) * (size_t)(M * K / 32));
    float *xsum = malloc(sizeof(float) * (size_t)(M * K / G));
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, G, xq + m * K, dx + m * K / 32, xsum + m * K / G);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * K / 2;
        const float *sc = scale + n * K / G, *mn = minimum + n * K / G;
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = dot_row_i4(wr, sc, mn, xq + m * K, dx + m * K / 32, xsum + m * K / G, K, G) +
                           (bias ? bias[n] : 0.0f);
    }
    free(xq);
    free(dx);
    free(xsum);
}

/* ---- unpacking to fp32, for prefill (many rows of x: a BLAS sgemm on the unpacked weight) ---- */

void phikit_unpack_bf16(const uint16_t *w, int64_t N, int64_t K, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + n * K + k, load_bf16(w + n * K + k));
}

void phikit_unpack_f16(const uint16_t *w, int64_t N, int64_t K, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + n * K + k, load_f16(w + n * K + k));
}

void phikit_unpack_i8(const int8_t *w, const float *scale, int64_t N, int64_t K, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        __m256 s = _mm256_set1_ps(scale[n]);
        for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + n * K + k, _mm256_mul_ps(load_i8(w + n * K + k), s));
    }
}

void phikit_unpack_i4(const uint8_t *w, const float *scale, const float *minimum, int64_t N, int64_t K, int64_t G,
                      float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < K / 32; b++) {
            int64_t g = b * 32 / G;
            __m256 s = _mm256_set1_ps(scale[n * K / G + g]), mn = _mm256_set1_ps(minimum[n * K / G + g]);
            __m256i q = unpack_nibbles(w + n * K / 2 + b * 16);
            float *o = out + n * K + b * 32;
            for (int part = 0; part < 4; part++) {
                __m128i bytes = part < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
                if (part & 1) bytes = _mm_srli_si128(bytes, 8);
                __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                _mm256_storeu_ps(o + part * 8, _mm256_fmadd_ps(v, s, mn));
            }
        }
    }
}
