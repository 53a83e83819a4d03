/* ---- AVX-512 VNNI override of gemv.c's int4 row dot product, for groups of 64 weights or more ----
 * One 64-byte load holds two 64-weight blocks (32 bytes each: low nibbles weights 0..31, high nibbles
 * 32..63). The activations are laid out once per call so that the 64 bytes against the low nibbles are
 * [block 0's x 0..31, block 1's x 0..31] and those against the high ones [block 0's x 32..63, block 1's
 * x 32..63] (split_i4_pairs); then two vpdpbusd give each 32-bit lane the exact sum of 8 products, lanes
 * 0-7 for block 0 and 8-15 for block 1, where the AVX2 loop takes two maddubs, two adds and a madd per
 * block. The block sums are the same integers; they are scaled per group and added in another order than
 * the AVX2 loop's, the same way for every row of x (a row's result is the same bits alone or in a batch).
 * Taken where K % 128 == 0 and G % 64 == 0; gemv.c's loop elsewhere. */

/* xq (K int8 per row, M rows) -> xp: every 128 bytes' middle two 32-byte quarters swapped. */
static void split_i4_pairs(const int8_t *xq, int64_t M, int64_t K, int8_t *xp) {
    for (int64_t i = 0; i < M * K; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(xq + i)), b = _mm256_loadu_si256((const __m256i *)(xq + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(xq + i + 64)), d = _mm256_loadu_si256((const __m256i *)(xq + i + 96));
        _mm256_storeu_si256((__m256i *)(xp + i), a);
        _mm256_storeu_si256((__m256i *)(xp + i + 32), c);
        _mm256_storeu_si256((__m256i *)(xp + i + 64), b);
        _mm256_storeu_si256((__m256i *)(xp + i + 96), d);
    }
}

static inline __attribute__((always_inline)) float dot_row_i4_zmm(const uint8_t *wr, const uint16_t *sc,
        const uint16_t *mn, const int8_t *xp, const float *dx, const float *xsum, int64_t K, const int64_t G) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    int64_t groups = K / G, g;
    float coef[groups], tail;
    __m256 extra = i4_group_factors(sc, mn, dx, xsum, groups, coef, &tail);
    __m512 acc = _mm512_setzero_ps();
    if (G == 64) { /* a load holds two groups: lanes 0-7 take coef[g], lanes 8-15 coef[g + 1] */
        const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        for (int64_t p = 0; p < K / 128; p++) {
            _mm_prefetch((const char *)(wr + p * 64) + PREFETCH_I4, _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512(wr + p * 64);
            __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp + p * 128));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(xp + p * 128 + 64));
            __m512 c = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(coef + 2 * p)))));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), c, acc);
        }
    } else { /* a group is G / 128 whole loads */
        for (g = 0; g < groups; g++) {
            __m512i s = _mm512_setzero_si512();
            for (int64_t j = 0; j < G / 128; j++) {
                int64_t p = g * (G / 128) + j;
                _mm_prefetch((const char *)(wr + p * 64) + PREFETCH_I4, _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512(wr + p * 64);
                __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512(xp + p * 128));
                s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(xp + p * 128 + 64));
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(coef[g]), acc);
        }
    }
    return _mm512_reduce_add_ps(acc) + hsum(extra) + tail;
}
