/* ---- AVX-512 override of gemv.c's bf16 gemv (AVX-512F only: no bf16 dot products needed) ----
 * A 64-byte load holds 32 bf16 weights, two to a 32-bit lane: the high half of a lane masked off below is
 * already the fp32 value of the odd weight, the lane shifted up by 16 bits that of the even one. So 32
 * weights cost one load, an and, a shift and two fused multiply-adds against the activations split once
 * per call into their even and odd positions, where the AVX2 loop widens every 8 weights with a shuffle
 * (the shuffle port is the one both loops share with the 512-bit multiply-adds on Intel cores).
 * Every (row of x, row of W) pair is summed the same way in the one-row blocks and in the batched rows, so
 * a row's result is the same bits alone or in a batch, as gemv.c's other kernels. (K is a multiple of 64:
 * ops.py checks; the AVX2 loop is kept for a K that is not a multiple of 32 and for a failed allocation.) */
/* Bytes ahead of each weight row's loads (0: none; benchmarks/bench_decode.py --define): on the Xeon 1024 read
 * 25.7 GB/s against 22.9 without, 24.6 against 23.9 at 2048, 28.1 against 28.4 at 512 (level). */
#ifndef PREFETCH_BF16
#define PREFETCH_BF16 1024
#endif

static DEFINE_GEMV(gemv_bf16_ymm, uint16_t, load_bf16)

static inline __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline __m512 bf16_odd(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* x (M, K) -> xs: row m's even positions at xs + m * K, its odd ones at xs + m * K + K / 2. */
static void split_even_odd(const float *x, int64_t M, int64_t K, float *xs) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float *e = xs + m * K, *o = e + K / 2;
        for (int64_t k = 0; k < K; k += 32) {
            __m512 lo = _mm512_loadu_ps(xr + k), hi = _mm512_loadu_ps(xr + k + 16);
            _mm512_storeu_ps(e + k / 2, _mm512_permutex2var_ps(lo, even, hi));
            _mm512_storeu_ps(o + k / 2, _mm512_permutex2var_ps(lo, odd, hi));
        }
    }
}

void phikit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *scale,
                      const float *bias, float *y) {
    float *xs = K % 32 ? NULL : malloc((size_t)(M * K) * sizeof(float));
    if (!xs) { /* a K the split does not take (or no memory for it): the AVX2 loop */
        gemv_bf16_ymm(x, M, K, w, N, scale, bias, y);
        return;
    }
    split_even_odd(x, M, K, xs);
    const int64_t H = K / 2, blocks = M == 1 ? N / ROWS : 0;
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; b++) {
            int64_t n = b * ROWS;
            const uint16_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
            __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0, e2 = e0, o2 = e0, e3 = e0, o3 = e0;
            for (int64_t k = 0; k < K; k += 32) {
#if PREFETCH_BF16
                _mm_prefetch((const char *)(w0 + k) + PREFETCH_BF16, _MM_HINT_T0);
                _mm_prefetch((const char *)(w1 + k) + PREFETCH_BF16, _MM_HINT_T0);
                _mm_prefetch((const char *)(w2 + k) + PREFETCH_BF16, _MM_HINT_T0);
                _mm_prefetch((const char *)(w3 + k) + PREFETCH_BF16, _MM_HINT_T0);
#endif
                __m512 xe = _mm512_loadu_ps(xs + k / 2), xo = _mm512_loadu_ps(xs + H + k / 2);
                __m512i v0 = _mm512_loadu_si512(w0 + k), v1 = _mm512_loadu_si512(w1 + k);
                __m512i v2 = _mm512_loadu_si512(w2 + k), v3 = _mm512_loadu_si512(w3 + k);
                e0 = _mm512_fmadd_ps(bf16_even(v0), xe, e0), o0 = _mm512_fmadd_ps(bf16_odd(v0), xo, o0);
                e1 = _mm512_fmadd_ps(bf16_even(v1), xe, e1), o1 = _mm512_fmadd_ps(bf16_odd(v1), xo, o1);
                e2 = _mm512_fmadd_ps(bf16_even(v2), xe, e2), o2 = _mm512_fmadd_ps(bf16_odd(v2), xo, o2);
                e3 = _mm512_fmadd_ps(bf16_even(v3), xe, e3), o3 = _mm512_fmadd_ps(bf16_odd(v3), xo, o3);
            }
            float d[4] = {_mm512_reduce_add_ps(_mm512_add_ps(e0, o0)), _mm512_reduce_add_ps(_mm512_add_ps(e1, o1)),
                          _mm512_reduce_add_ps(_mm512_add_ps(e2, o2)), _mm512_reduce_add_ps(_mm512_add_ps(e3, o3))};
            for (int r = 0; r < ROWS; r++) y[n + r] = d[r] * (scale ? scale[n + r] : 1.0f) + (bias ? bias[n + r] : 0.0f);
        }
        /* the rest: every row when M > 1 (up to 4 rows of x share each weight load), summed as above */
#pragma omp for schedule(static)
        for (int64_t n = blocks * ROWS; n < N; n++) {
            const uint16_t *wr = w + n * K;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                int mb = M - m0 < 4 ? (int)(M - m0) : 4;
                const float *x0 = xs + m0 * K;
                __m512 e[4], o[4];
                for (int i = 0; i < 4; i++) e[i] = o[i] = _mm512_setzero_ps();
                if (mb == 4) { /* unrolled so the 8 accumulators stay in registers */
                    __m512 e0 = e[0], e1 = e[1], e2 = e[2], e3 = e[3], o0 = o[0], o1 = o[1], o2 = o[2], o3 = o[3];
                    for (int64_t k = 0; k < K; k += 32) {
                        __m512i v = _mm512_loadu_si512(wr + k);
                        __m512 we = bf16_even(v), wo = bf16_odd(v);
                        const float *xk = x0 + k / 2;
                        e0 = _mm512_fmadd_ps(we, _mm512_loadu_ps(xk), e0);
                        o0 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xk + H), o0);
                        e1 = _mm512_fmadd_ps(we, _mm512_loadu_ps(xk + K), e1);
                        o1 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xk + K + H), o1);
                        e2 = _mm512_fmadd_ps(we, _mm512_loadu_ps(xk + 2 * K), e2);
                        o2 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xk + 2 * K + H), o2);
                        e3 = _mm512_fmadd_ps(we, _mm512_loadu_ps(xk + 3 * K), e3);
                        o3 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xk + 3 * K + H), o3);
                    }
                    e[0] = e0, e[1] = e1, e[2] = e2, e[3] = e3, o[0] = o0, o[1] = o1, o[2] = o2, o[3] = o3;
                } else {
                    for (int64_t k = 0; k < K; k += 32) {
                        __m512i v = _mm512_loadu_si512(wr + k);
                        __m512 we = bf16_even(v), wo = bf16_odd(v);
                        for (int i = 0; i < mb; i++) {
                            const float *xk = x0 + i * K + k / 2;
                            e[i] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xk), e[i]);
                            o[i] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xk + H), o[i]);
                        }
                    }
                }
                for (int i = 0; i < mb; i++)
                    y[(m0 + i) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(e[i], o[i])) * (scale ? scale[n] : 1.0f) +
                                          (bias ? bias[n] : 0.0f);
            }
        }
    }
    free(xs);
}
