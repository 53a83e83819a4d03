/* ---- bf16 matrix-vector products with AVX-512 BF16 (phikit_gemv_bf16_dp); generic builds get a stub ---- */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* bf16 weights with AVX-512 BF16: x rounded to bf16 once per call (as llama.cpp rounds activations for
 * its bf16/f16 dot products), then vdpbf16ps multiplies 32 pairs and accumulates in fp32 per instruction,
 * a third of the instructions per weight of the AVX2 path (widen, shift, FMA).
 *
 * The lanes of one zmm register are 4 rows of x (its four 128-bit lanes) x 4 pairs of columns (the 32-bit
 * lanes): x is laid out once per call so that one 64-byte load holds 8 columns of 4 rows, and 8 columns of
 * a row of W (16 bytes, read where they lie, no repacking) are broadcast to the four 128-bit lanes. Each
 * broadcast then feeds one vdpbf16ps per 4 rows of x, and each load of x one per row of W in the block:
 * 16 rows of x x 6 rows of W take 4 + 6 loads for 24 instructions in 24 accumulators. The dot-product
 * form before it (a row of W against a row of x, 32 pairs a load, 2 x 3 rows blocked) needed 5 loads per
 * 6 instructions and ran a 16-row step of 8 layers x 1280 + a 51,200-row head at 31 ms where this runs it
 * at 20-21 (on 2 Zen 4 cores: ~350 of the ~470 GFLOP/s two cores' vdpbf16ps can issue; PyTorch's bf16 GEMM
 * 420 at 256 rows), at 16 ms instead of 23.5 with 8 rows, and one row (bf16_dp_one_row) as fast as before
 * (every weight read once; a bandwidth-bound stream): benchmarks/RESULTS.md, issue 22.
 *
 * Every output is summed the same way whatever M is: lane c of (row m, row n) adds the pairs 4g + c of
 * columns in order of g, then ((c0 + c1) + (c2 + c3)) + bias, so a row's result does not depend on the
 * rows beside it in a batch (rows past M are zeros in their own lanes). K % 8 == 0.
 * y[m][n] = dot(bf16(x[m]), W[n]) + bias[n]. */
enum { DP_PREFETCH_EVERY = 4 }; /* 4 groups of 8 columns: one 64-byte line of each row of the next block */

/* The one order every output's four lanes are summed in, whichever path made them: lane 4q of t gets
 * (c0 + c1) + (c2 + c3) of a's 128-bit lane q, in registers (two in-lane permutes; fp32 addition commutes, so
 * the same bits as adding the lanes one by one, which cost 10% of a 16-row step). */
static inline __attribute__((always_inline)) void bf16_dp_lane_sums(__m512 a, float *t) {
    a = _mm512_add_ps(a, _mm512_permute_ps(a, 0xB1));
    _mm512_storeu_ps(t, _mm512_add_ps(a, _mm512_permute_ps(a, 0x4E)));
}

static inline __attribute__((always_inline)) void bf16_dp_block(const uint16_t *xq, int mb, const uint16_t *w,
                                                                int64_t n0, int nb, const uint16_t *next,
                                                                int64_t K, int64_t M, int64_t N,
                                                                const float *bias, float *y) {
    /* Rows n0 .. n0 + nb of W against all 4 * mb rows of xq; next: the first row of the block after this
     * one (each of its nb rows fetched ahead a line at a time), or NULL. */
    __m512 acc[8][4];
    for (int i = 0; i < nb; i++)
        for (int b = 0; b < mb; b++) acc[i][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 8; g++) {
        __m512bh xv[4];
        for (int b = 0; b < mb; b++) xv[b] = (__m512bh)_mm512_loadu_si512((const void *)(xq + (g * mb + b) * 32));
        if (next && g % DP_PREFETCH_EVERY == 0)
            for (int i = 0; i < nb; i++) _mm_prefetch((const char *)(next + i * K + 8 * g), _MM_HINT_T0);
        for (int i = 0; i < nb; i++) {
            __m512bh wv = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(w + (n0 + i) * K + 8 * g)));
            for (int b = 0; b < mb; b++) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], wv, xv[b]);
        }
    }
    float t[8][4][16]; /* lane 4q of t[i][b]: row 4b + q's dot product with row n0 + i */
    for (int i = 0; i < nb; i++)
        for (int b = 0; b < mb; b++) bf16_dp_lane_sums(acc[i][b], t[i][b]);
    for (int b = 0; b < mb; b++)
        for (int q = 0; q < 4 && 4 * b + q < M; q++)
            for (int i = 0; i < nb; i++) y[(4 * b + q) * N + n0 + i] = t[i][b][4 * q] + (bias ? bias[n0 + i] : 0.0f);
}

/* One row of x (a decoding step of one sequence), bound by the weights' stream: 8 rows of W a block, each
 * read 64 bytes at a time (16-byte reads of 8 rows side by side decoded Phi-2 bf16 6% slower than the
 * dot-product kernel before, which read one row of W at a time). Four rows' 64 bytes (4 groups of 8
 * columns) are transposed in 128-bit lanes, so lane (r, c) of a register is row n0 + r, pair 4g + c: the
 * same sums in the same order as bf16_dp_block's lane (q, c) for one row of x, so the bits are the same.
 * K % 32 == 0 (4 groups), 8 rows of W from n0. */
static void bf16_dp_one_row(const uint16_t *xb, const uint16_t *w, int64_t n0, int64_t K, const float *bias,
                            float *y) {
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32) {
        __m512i x4 = _mm512_loadu_si512((const void *)(xb + k)), xv[4]; /* groups k / 8 + h in every lane */
        xv[0] = _mm512_shuffle_i32x4(x4, x4, 0x00);
        xv[1] = _mm512_shuffle_i32x4(x4, x4, 0x55);
        xv[2] = _mm512_shuffle_i32x4(x4, x4, 0xAA);
        xv[3] = _mm512_shuffle_i32x4(x4, x4, 0xFF);
        for (int z = 0; z < 2; z++) {
            __m512i a[4], t[4];
            for (int r = 0; r < 4; r++) a[r] = _mm512_loadu_si512((const void *)(w + (n0 + 4 * z + r) * K + k));
            t[0] = _mm512_shuffle_i32x4(a[0], a[1], 0x44); /* lanes (row, group) -> (group, row) */
            t[1] = _mm512_shuffle_i32x4(a[0], a[1], 0xEE);
            t[2] = _mm512_shuffle_i32x4(a[2], a[3], 0x44);
            t[3] = _mm512_shuffle_i32x4(a[2], a[3], 0xEE);
            a[0] = _mm512_shuffle_i32x4(t[0], t[2], 0x88);
            a[1] = _mm512_shuffle_i32x4(t[0], t[2], 0xDD);
            a[2] = _mm512_shuffle_i32x4(t[1], t[3], 0x88);
            a[3] = _mm512_shuffle_i32x4(t[1], t[3], 0xDD);
            for (int h = 0; h < 4; h++) acc[z] = _mm512_dpbf16_ps(acc[z], (__m512bh)a[h], (__m512bh)xv[h]);
        }
    }
    for (int z = 0; z < 2; z++) {
        float t[16]; /* lane 4r: row n0 + 4z + r's dot product */
        bf16_dp_lane_sums(acc[z], t);
        for (int r = 0; r < 4; r++) y[n0 + 4 * z + r] = t[4 * r] + (bias ? bias[n0 + 4 * z + r] : 0.0f);
    }
}

/* rows of W per block for mb blocks of 4 rows of x: nb * mb accumulators, at most 24 of the 32 registers */
static int bf16_dp_rows(int mb) { return mb == 4 ? 6 : mb == 3 ? 7 : 8; }

void phikit_gemv_bf16_dp(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias,
                         float *y) {
    int mb = (int)((M + 3) / 4), rows = bf16_dp_rows(mb);
    if (M == 1 && K % 32 == 0 && N % 8 == 0) { /* x as it is, in bf16 */
        uint16_t *xb = aligned_alloc(64, (size_t)(K * 2));
        if (!xb) {
            phikit_gemv_bf16(x, M, K, w, N, NULL, bias, y);
            return;
        }
        for (int64_t k = 0; k < K; k += 8)
            _mm_storeu_si128((__m128i *)(xb + k), (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(x + k)));
#pragma omp parallel for schedule(static)
        for (int64_t u = 0; u < N / 8; u++) bf16_dp_one_row(xb, w, 8 * u, K, bias, y);
        free(xb);
        return;
    }
    if (mb > 4) { /* more rows than one block of registers holds: 16 at a time (the callers send <= 16) */
        for (int64_t m = 0; m < M; m += 16)
            phikit_gemv_bf16_dp(x + m * K, M - m < 16 ? M - m : 16, K, w, N, bias, y + m * N);
        return;
    }
    /* xq[(g * mb + b) * 32 + q * 8 + e] = bf16(x[4b + q][8g + e]); rows past M are zeros */
    uint16_t *xq = aligned_alloc(64, (size_t)(mb * 4 * K * 2));
    if (!xq) { /* the caller's buffers are all there is: a slower path that needs no memory */
        phikit_gemv_bf16(x, M, K, w, N, NULL, bias, y);
        return;
    }
    for (int64_t m = 0; m < 4 * mb; m++)
        for (int64_t g = 0; g < K / 8; g++) {
            __m128i v = m < M ? (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(x + m * K + 8 * g)) : _mm_setzero_si128();
            _mm_storeu_si128((__m128i *)(xq + (g * mb + m / 4) * 32 + (m % 4) * 8), v);
        }
    int64_t blocks = (N + rows - 1) / rows;
    /* 16 blocks a claim: a thread the server's threads preempt no longer holds up the other (the batched
     * step ran in 27.7 instead of 28.6 ms inside bench_serve); within a claim a thread fetches its next block */
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t u = 0; u < blocks; u++) {
        int64_t n0 = u * rows;
        int nb = N - n0 < rows ? (int)(N - n0) : rows;
        const uint16_t *next = N - (n0 + nb) >= nb ? w + (n0 + nb) * K : NULL;
        /* whole blocks: one copy of the block per mb, its loops unrolled over registers; the short block at
         * the end of W: the same sums with mb and nb known at run time only (slower, once per call) */
        if (nb == rows && mb == 4) bf16_dp_block(xq, 4, w, n0, 6, next, K, M, N, bias, y);
        else if (nb == rows && mb == 3) bf16_dp_block(xq, 3, w, n0, 7, next, K, M, N, bias, y);
        else if (nb == rows && mb == 2) bf16_dp_block(xq, 2, w, n0, 8, next, K, M, N, bias, y);
        else if (nb == rows) bf16_dp_block(xq, 1, w, n0, 8, next, K, M, N, bias, y);
        else bf16_dp_block(xq, mb, w, n0, nb, next, K, M, N, bias, y);
    }
    free(xq);
}
#define HAS_BF16_DP FEATURE_BF16_DP
#else
void phikit_gemv_bf16_dp(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias,
                         float *y) {
    phikit_gemv_bf16(x, M, K, w, N, NULL, bias, y); /* never called: phikit_features() reports no BF16_DP */
}
#define HAS_BF16_DP 0
#endif
