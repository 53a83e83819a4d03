/* ---- matrix-vector products for decoding (1 to 16 rows of x), generic AVX2 ----
 * f32 / bf16 / f16 (one macro), int8 and int4 weights. AVX-512 overrides: avx512/gemv_bf16_zmm.h (bf16 in
 * zmm registers), avx512/gemv_bf16_dp.c (bf16 with vdpbf16ps, its own entry point) and avx512/dot_i8_row.h
 * (the int8 row dot product with vpdpwssd). */
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
#ifndef BF16_ZMM /* 0: the AVX2 loop even in an AVX-512 build (benchmarks/bench_decode.py --define) */
#define BF16_ZMM 1
#endif
#if defined(__AVX512F__) && BF16_ZMM
#include "avx512/gemv_bf16_zmm.h" /* the AVX-512 override of phikit_gemv_bf16 */
#else
DEFINE_GEMV(phikit_gemv_bf16, uint16_t, load_bf16)
#endif
DEFINE_GEMV(phikit_gemv_f16, uint16_t, load_f16)


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
#include "avx512/dot_i8_row.h" /* the AVX-512 VNNI override of dot_i8_row */
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

/* A row's per-group factors before its dot product: coef[g] = weight scale x activation scale, and the minimum
 * terms (minimum x the group's activation sum) in 8 lanes, 8 groups at a time, plus *tail for the groups after
 * the last 8; the row's result adds hsum of the returned vector, then *tail. */
static inline __attribute__((always_inline)) __m256 i4_group_factors(const uint16_t *sc, const uint16_t *mn,
        const float *dx, const float *xsum, int64_t groups, float *coef, float *tail) {
    __m256 extra = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g)));
        __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + g)));
        _mm256_storeu_ps(coef + g, _mm256_mul_ps(s, _mm256_loadu_ps(dx + g)));
        extra = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + g), extra);
    }
    *tail = 0.0f;
    for (; g < groups; g++) {
        coef[g] = f16(sc[g]) * dx[g];
        *tail += f16(mn[g]) * xsum[g];
    }
    return extra;
}

/* dot(x, w) for one row of int4 weights, 64 weights (32 bytes) per step: the low nibbles are weights
 * 0..31 of the block, the high nibbles 32..63. Within a group the int16 pair sums of maddubs are added
 * up directly: each is at most 2 * 15 * 127 = 3810, and a group (G <= 256) adds at most 8 of them.
 * The per-group factors (activation scale x weight scale) and the minimum terms are done 8 groups at a
 * time with vector instructions before the main loop. */
static inline __attribute__((always_inline)) float dot_row_i4(const uint8_t *wr, const uint16_t *sc,
        const uint16_t *mn, const int8_t *xq, const float *dx, const float *xsum, int64_t K, const int64_t G) {
    const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
    int64_t groups = K / G, g;
    float coef[groups], tail;
    __m256 extra = i4_group_factors(sc, mn, dx, xsum, groups, coef, &tail);
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

#ifndef I4_ZMM /* 0: the AVX2 loop even in an AVX-512 VNNI build (benchmarks/bench_decode.py --define) */
#define I4_ZMM 1
#endif
#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && I4_ZMM
#include "avx512/dot_i4_row.h" /* the AVX-512 VNNI override of dot_row_i4 (groups of 64 and more) */
#define HAVE_I4_ZMM 1
#else
#define HAVE_I4_ZMM 0
#endif

void phikit_gemv_i4(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G,
                    const uint16_t *scale, const uint16_t *minimum, const float *bias, float *y) {
    int8_t *xq = malloc((size_t)(M * K));
    float *dx = malloc(sizeof(float) * (size_t)(M * K / G));
    float *xsum = malloc(sizeof(float) * (size_t)(M * K / G));
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, G, xq + m * K, dx + m * K / G, xsum + m * K / G);
/* one copy of the loop per group size, so the compiler unrolls the blocks of a group; DOT reads X */
#define I4_ROWS(GS, DOT, X)                                                                           \
    _Pragma("omp parallel for schedule(static)") for (int64_t n = 0; n < N; n++) {                     \
        const uint8_t *wr = w + n * K / 2;                                                            \
        const uint16_t *sc = scale + n * K / GS, *mn = minimum + n * K / GS;                          \
        for (int64_t m = 0; m < M; m++)                                                               \
            y[m * N + n] = DOT(wr, sc, mn, X + m * K, dx + m * K / GS, xsum + m * K / GS, K, GS) +     \
                           (bias ? bias[n] : 0.0f);                                                   \
    }
    int8_t *xp = NULL; /* the activations laid out for the AVX-512 VNNI loop, where it runs */
#if HAVE_I4_ZMM
    if (K % 128 == 0 && G % 64 == 0 && (xp = malloc((size_t)(M * K))) != NULL) {
        split_i4_pairs(xq, M, K, xp);
        switch (G) {
        case 64: I4_ROWS(64, dot_row_i4_zmm, xp) break;
        case 128: I4_ROWS(128, dot_row_i4_zmm, xp) break;
        default: I4_ROWS(256, dot_row_i4_zmm, xp) break;
        }
    }
#endif
    if (!xp) {
        switch (G) {
        case 32: I4_ROWS(32, dot_row_i4, xq) break;
        case 64: I4_ROWS(64, dot_row_i4, xq) break;
        case 128: I4_ROWS(128, dot_row_i4, xq) break;
        default: I4_ROWS(256, dot_row_i4, xq) break;
        }
    }
    free(xp);
    free(xq);
    free(dx);
    free(xsum);
}
