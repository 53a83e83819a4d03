/* ---- bf16 matrix-vector products with AVX-512 BF16 (phikit_gemv_bf16_dp); generic builds get a stub ---- */
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
