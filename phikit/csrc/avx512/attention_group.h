/* ---- AVX-512 override of attention.c's grouped-query loops (the G = H / KV > 1 query heads of one KV head) ----
 * Keys: each cached key row is loaded once into zmm registers (D / 16 of them) and multiplied with the G
 * queries (read from L1), one 16-lane reduction per score instead of the AVX2 loop's reload of the key per
 * head and 8-lane sums. Values: the G heads' outputs are accumulated in registers, a chunk of the head
 * dimension at a time (G x CZ accumulators of 16 values, at most 24 of the 32 zmm registers), instead of
 * loading and storing every output vector for every value (the AVX2 loop, bound by those loads and stores:
 * Phi-4-mini int4 after 16k tokens decoded at half the bandwidth limit). Chunks are whole 64-byte lines of
 * an fp16 cache row, so each value is still read once. Every output sums its terms in the same order (key
 * 0 first, one fused multiply-add each) as the generic loop, so values equal it bit for bit; scores are
 * summed in another order than the AVX2 loop's. Needs D % 16 == 0 and D <= 128. */
static inline __m512 load_kv512(const void *c, int64_t i, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)c + i)))
               : _mm512_loadu_ps((const float *)c + i);
}

static inline __attribute__((always_inline)) void group_scores(const void *k_cache, int64_t base, int64_t n,
                                                               int64_t D, int64_t G, const float *qh,
                                                               float *scores, int64_t stride, int f16) {
    const int64_t nz = D / 16;
    for (int64_t j = 0; j < n; j++) {
        __m512 row[8];
        for (int64_t c = 0; c < nz; c++) row[c] = load_kv512(k_cache, base + j * D + 16 * c, f16);
        for (int64_t g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh + g * D), row[0]);
            for (int64_t c = 1; c < nz; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + g * D + 16 * c), row[c], acc);
            scores[g * stride + j] = _mm512_reduce_add_ps(acc);
        }
    }
}

/* o[g][i0 .. i0 + 16 CZ) = sum over j of scores[g][j] * V[j][i0 ..], G and CZ constants after inlining */
static inline __attribute__((always_inline)) void group_values_chunk(const void *v_cache, int64_t base, int64_t n,
                                                                     int64_t D, int64_t i0, const float *scores,
                                                                     int64_t stride, float *o, int f16, const int G,
                                                                     const int CZ) {
    __m512 acc[24];
    for (int t = 0; t < G * CZ; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 val[8];
        for (int c = 0; c < CZ; c++) val[c] = load_kv512(v_cache, base + j * D + i0 + 16 * c, f16);
        for (int g = 0; g < G; g++) {
            __m512 p = _mm512_set1_ps(scores[g * stride + j]);
            for (int c = 0; c < CZ; c++) acc[g * CZ + c] = _mm512_fmadd_ps(p, val[c], acc[g * CZ + c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < CZ; c++) _mm512_storeu_ps(o + g * D + i0 + 16 * c, acc[g * CZ + c]);
}

#define GROUP_VALUES(G_, CZ_)                                                                                      \
    for (; i + (CZ_) <= nz; i += (CZ_))                                                                             \
        group_values_chunk(v_cache, base, n, D, 16 * i, scores, stride, o, f16, G_, CZ_);                          \
    for (; i + 2 <= nz; i += 2) group_values_chunk(v_cache, base, n, D, 16 * i, scores, stride, o, f16, G_, 2);     \
    for (; i < nz; i++) group_values_chunk(v_cache, base, n, D, 16 * i, scores, stride, o, f16, G_, 1);             \
    break;

/* Returns 0 where G is outside 2..8 (the caller's generic loop runs instead). */
static int group_values(const void *v_cache, int64_t base, int64_t n, int64_t D, int64_t G, const float *scores,
                        int64_t stride, float *o, int f16) {
    const int64_t nz = D / 16;
    int64_t i = 0;
    switch (G) {
    case 2: GROUP_VALUES(2, 8)
    case 3: GROUP_VALUES(3, 8)
    case 4: GROUP_VALUES(4, 4)
    case 5: GROUP_VALUES(5, 4)
    case 6: GROUP_VALUES(6, 4)
    case 7: GROUP_VALUES(7, 2)
    case 8: GROUP_VALUES(8, 2)
    default: return 0;
    }
    return 1;
}
#undef GROUP_VALUES
#define HAS_GROUP_ATTENTION 1
