/* ---- AVX-512 override of attention.c's grouped-query loops (the G = H / KV > 1 query heads of one KV head) ----
 * Keys: 16 / G keys at a time, each 16-value chunk of a key loaded once and multiplied with the G queries
 * (read from L1), and the block's G x 16 / G scores reduced together (reduce16: about 3 instructions a score
 * where one 16-lane reduction a score took 8; at 32k tokens of context the scores were half a step's work),
 * instead of the AVX2 loop's reload of the key per head and 8-lane sums. Values: the G heads' outputs are
 * accumulated in registers, a chunk of the head dimension at a time (G x CZ accumulators of 16 values, at
 * most 24 of the 32 zmm registers), instead of loading and storing every output vector for every value (the
 * AVX2 loop, bound by those loads and stores: Phi-4-mini int4 after 16k tokens decoded at half the bandwidth
 * limit). Chunks are whole 64-byte lines of an fp16 cache row (of an int8 row where G <= 6: 64 values or more),
 * so each value is still read once. Every output
 * sums its terms in the same order (key 0 first, one fused multiply-add each) as the generic loop, so values
 * equal it bit for bit; scores are summed in another order than the AVX2 loop's. Needs D % 16 == 0 and
 * D <= 128. */
static inline __m512 load_kv512(const void *c, int64_t i, int kind) {
    if (kind == CACHE_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)c + i)));
    if (kind == CACHE_I8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)c + i))));
    return _mm512_loadu_ps((const float *)c + i);
}

/* The sums of 16 vectors at once: r[4 (t % 4) + t / 4] = the sum of acc[t]'s lanes, each added in the order
 * _mm512_reduce_add_ps adds one vector's lanes (its 256-bit halves, then 128-bit quarters, then elements 0 + 2
 * and 1 + 3, then those two), so every sum is bit-identical to that of one vector at a time, at 45 shuffles and
 * adds for 16 sums instead of about 8 instructions a sum. */
static inline __attribute__((always_inline)) __m512 reduce16(const __m512 *acc) {
    __m512 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++) /* 128-bit quarters 0 + 2 and 1 + 3: two vectors a result */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int k = 0; k < 4; k++) /* (0 + 2) + (1 + 3): quarter i of c[k] is vector 4 k + i's 128-bit sum */
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int k = 0; k < 2; k++) /* elements 0 + 2 and 1 + 3 of two vectors' quarters, interleaved */
        d[k] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * k], c[2 * k + 1]), _mm512_unpackhi_ps(c[2 * k], c[2 * k + 1]));
    return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 2, 3, 2)));
}

/* scores[g][j] = q[g] . K[j] for NK = 16 / G keys at a time: G x NK accumulators (at most 16) in registers,
 * each key chunk loaded once for the G queries, and the G x NK sums reduced together (reduce16). Each score is
 * summed in the same order as one key at a time (the chunks in order, then _mm512_reduce_add_ps's order). */
static inline __attribute__((always_inline)) int64_t group_scores_block(const void *k_cache, int64_t base, int64_t n,
                                                                        int64_t D, const float *qh, float *scores,
                                                                        int64_t stride, int kind, const int G,
                                                                        const int NK) {
    const int64_t nz = D / 16;
    int64_t j0 = 0;
    for (; j0 + NK <= n; j0 += NK) {
        __m512 acc[16], qc[8];
        prefetch_kv(k_cache, base + j0 * D, NK * D, kind);
        #pragma GCC unroll 16
        for (int t = G * NK; t < 16; t++) acc[t] = _mm512_setzero_ps();
        #pragma GCC unroll 16
        for (int g = 0; g < G; g++) qc[g] = _mm512_loadu_ps(qh + g * D);
        #pragma GCC unroll 16
        for (int j = 0; j < NK; j++) {
            const __m512 key = load_kv512(k_cache, base + (j0 + j) * D, kind);
            #pragma GCC unroll 16
            for (int g = 0; g < G; g++) acc[g * NK + j] = _mm512_mul_ps(qc[g], key);
        }
        for (int64_t c = 1; c < nz; c++) {
            #pragma GCC unroll 16
            for (int g = 0; g < G; g++) qc[g] = _mm512_loadu_ps(qh + g * D + 16 * c);
            #pragma GCC unroll 16
            for (int j = 0; j < NK; j++) {
                const __m512 key = load_kv512(k_cache, base + (j0 + j) * D + 16 * c, kind);
                #pragma GCC unroll 16
                for (int g = 0; g < G; g++) acc[g * NK + j] = _mm512_fmadd_ps(qc[g], key, acc[g * NK + j]);
            }
        }
        float r[16];
        _mm512_storeu_ps(r, reduce16(acc));
        #pragma GCC unroll 16
        for (int g = 0; g < G; g++)
            #pragma GCC unroll 16
            for (int j = 0; j < NK; j++) {
                const int t = g * NK + j;
                scores[g * stride + j0 + j] = r[4 * (t % 4) + t / 4];
            }
    }
    return j0;
}

static inline __attribute__((always_inline)) void group_scores(const void *k_cache, int64_t base, int64_t n,
                                                               int64_t D, int64_t G, const float *qh,
                                                               float *scores, int64_t stride, int kind) {
    const int64_t nz = D / 16;
    int64_t j = 0;
    switch (G) { /* whole blocks of 16 / G keys; the rest one key at a time below */
    case 2: j = group_scores_block(k_cache, base, n, D, qh, scores, stride, kind, 2, 8); break;
    case 3: j = group_scores_block(k_cache, base, n, D, qh, scores, stride, kind, 3, 5); break;
    case 4: j = group_scores_block(k_cache, base, n, D, qh, scores, stride, kind, 4, 4); break;
    case 5: j = group_scores_block(k_cache, base, n, D, qh, scores, stride, kind, 5, 3); break;
    case 6: j = group_scores_block(k_cache, base, n, D, qh, scores, stride, kind, 6, 2); break;
    case 7: j = group_scores_block(k_cache, base, n, D, qh, scores, stride, kind, 7, 2); break;
    case 8: j = group_scores_block(k_cache, base, n, D, qh, scores, stride, kind, 8, 2); break;
    }
    for (; j < n; j++) {
        __m512 row[8];
        for (int64_t c = 0; c < nz; c++) row[c] = load_kv512(k_cache, base + j * D + 16 * c, kind);
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
                                                                     int64_t stride, float *o, int kind, const int G,
                                                                     const int CZ) {
    __m512 acc[24];
    for (int t = 0; t < G * CZ; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 val[8];
        prefetch_kv(v_cache, base + j * D + i0, 16 * CZ, kind);
        for (int c = 0; c < CZ; c++) val[c] = load_kv512(v_cache, base + j * D + i0 + 16 * c, kind);
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
        group_values_chunk(v_cache, base, n, D, 16 * i, scores, stride, o, kind, G_, CZ_);                         \
    for (; i + 2 <= nz; i += 2) group_values_chunk(v_cache, base, n, D, 16 * i, scores, stride, o, kind, G_, 2);    \
    for (; i < nz; i++) group_values_chunk(v_cache, base, n, D, 16 * i, scores, stride, o, kind, G_, 1);            \
    break;

/* Returns 0 where G is outside 2..8 (the caller's generic loop runs instead). */
static inline __attribute__((always_inline)) int group_values(const void *v_cache, int64_t base, int64_t n, int64_t D,
                                                              int64_t G, const float *scores, int64_t stride,
                                                              float *o, int kind) {
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

/* One query head's output (G = 1), all D / 16 chunks of a row in registers at once: each value read once. */
static inline __attribute__((always_inline)) void one_head_values(const void *v_cache, int64_t base, int64_t n,
                                                                  int64_t D, const float *scores, float *o,
                                                                  int kind) {
    switch (D / 16) {
    case 1: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 1); break;
    case 2: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 2); break;
    case 3: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 3); break;
    case 4: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 4); break;
    case 5: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 5); break;
    case 6: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 6); break;
    case 7: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 7); break;
    case 8: group_values_chunk(v_cache, base, n, D, 0, scores, 0, o, kind, 1, 8); break;
    }
}
#define HAS_GROUP_ATTENTION 1
