/* ---- AVX-512 VNNI override of attention.c's scores over an int8 KV cache (query heads in groups of 1..8) ----
 * The float loops convert every int8 key value to fp32 (two instructions a 16 values) before G fused
 * multiply-adds: with the cache at half fp16's bytes they, not memory, bounded a step (Phi-4-mini's shape at
 * 32k tokens: 15 GB/s of cache on two cores, where fp16's loops read 19). Here each query is split into two
 * int8 vectors, hi = round(q / s) and lo = round((q / s - hi) x 256), s = max |q| / 127, so q = s (hi + lo / 256)
 * to 1/512 of a step (about 4e-5 of max |q|: the scores move in their fifth digit, where rounding a key to int8
 * moves them in the third), and a 64-byte line of a key meets each with one VPDPBUSD (64 products summed four
 * to a lane). VPDPBUSD takes one operand unsigned: the key's codes + 128 (a sign-bit flip), whose extra
 * 128 x sum(q) is subtracted once a head. Per (head, key) the two integer sums are combined as (hi << 8) + lo
 * (exact: at most 128 x 255 x 127 x 257 < 2^31), 16 of them reduced together, and converted once; the caller
 * then scales each score by its key's scale as in the float loops. Needs D % 16 == 0, D <= 128, G <= 8. */
#define I8_SCORES(G, D) ((G) >= 1 && (G) <= 8 && (D) % 16 == 0 && (D) <= 128)

/* The sums of 16 int32 vectors' lanes, as reduce16 (attention_group.h) orders them: r[4 (t % 4) + t / 4] is
 * acc[t]'s (integer sums: exact in any order). */
static inline __attribute__((always_inline)) __m512i reduce16_epi32(const __m512i *acc) {
    __m512i b[8], c[4], d[2];
    for (int k = 0; k < 8; k++)
        b[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                                _mm512_shuffle_i32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int k = 0; k < 4; k++)
        c[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int k = 0; k < 2; k++)
        d[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(c[2 * k], c[2 * k + 1]),
                                _mm512_unpackhi_epi32(c[2 * k], c[2 * k + 1]));
    const __m512 d0 = _mm512_castsi512_ps(d[0]), d1 = _mm512_castsi512_ps(d[1]);
    return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(d0, d1, _MM_SHUFFLE(1, 0, 1, 0))),
                            _mm512_castps_si512(_mm512_shuffle_ps(d0, d1, _MM_SHUFFLE(3, 2, 3, 2))));
}

/* The integer sum (hi << 8) + lo of one key against the G queries, for each head into acc[g * NK + j]. */
static inline __attribute__((always_inline)) void i8_key(const int8_t *key, int64_t nc, __mmask64 tail,
                                                         const int8_t *hi, const int8_t *lo, __m512i *acc, int j,
                                                         const int G, const int NK) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i h[8], l[8];
    for (int g = 0; g < G; g++) h[g] = l[g] = _mm512_setzero_si512();
    for (int64_t c = 0; c < nc; c++) {
        const __mmask64 m = c == nc - 1 ? tail : ~(__mmask64)0;
        const __m512i k = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, key + 64 * c), flip); /* codes + 128 */
        for (int g = 0; g < G; g++) {
            h[g] = _mm512_dpbusd_epi32(h[g], k, _mm512_loadu_si512(hi + g * 128 + 64 * c));
            l[g] = _mm512_dpbusd_epi32(l[g], k, _mm512_loadu_si512(lo + g * 128 + 64 * c));
        }
    }
    for (int g = 0; g < G; g++) acc[g * NK + j] = _mm512_add_epi32(_mm512_slli_epi32(h[g], 8), l[g]);
}

static inline __attribute__((always_inline)) void i8_scores_g(const int8_t *kc, int64_t n, int64_t D,
                                                              const int8_t *hi, const int8_t *lo,
                                                              const int32_t *offset, const float *unit, float *scores,
                                                              int64_t stride, const int G) {
    const int NK = 16 / G;
    const int64_t nc = (D + 63) / 64;
    const __mmask64 tail = D % 64 ? ((__mmask64)1 << (D % 64)) - 1 : ~(__mmask64)0;
    int64_t j0 = 0;
    for (; j0 + NK <= n; j0 += NK) {
        __m512i acc[16];
        prefetch_kv(kc, j0 * D, NK * D, CACHE_I8);
        for (int t = G * NK; t < 16; t++) acc[t] = _mm512_setzero_si512();
        for (int j = 0; j < NK; j++) i8_key(kc + (j0 + j) * D, nc, tail, hi, lo, acc, j, G, NK);
        int32_t r[16];
        _mm512_storeu_si512(r, reduce16_epi32(acc));
        for (int g = 0; g < G; g++)
            for (int j = 0; j < NK; j++) {
                const int t = g * NK + j;
                scores[g * stride + j0 + j] = (float)(r[4 * (t % 4) + t / 4] - offset[g]) * unit[g];
            }
    }
    for (; j0 < n; j0++) { /* the last keys one at a time */
        __m512i acc[8];
        i8_key(kc + j0 * D, nc, tail, hi, lo, acc, 0, G, 1);
        for (int g = 0; g < G; g++)
            scores[g * stride + j0] = (float)(_mm512_reduce_add_epi32(acc[g]) - offset[g]) * unit[g];
    }
}

/* scores[g][j] = q[g] . codes of key j (rows from element base of the cache), to the caller's key scaling. */
static inline __attribute__((always_inline)) void i8_scores(const void *k_cache, int64_t base, int64_t n, int64_t D,
                                                            int64_t G, const float *qh, float *scores,
                                                            int64_t stride) {
    int8_t hi[8 * 128] __attribute__((aligned(64))), lo[8 * 128] __attribute__((aligned(64)));
    int32_t offset[8];
    float unit[8];
    for (int64_t g = 0; g < G; g++) {
        const float *q = qh + g * D;
        float amax = 0.0f;
        for (int64_t i = 0; i < D; i++) amax = fmaxf(amax, fabsf(q[i]));
        const float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        int32_t sum = 0;
        for (int64_t i = 0; i < 128; i++) {
            int h = 0, l = 0;
            if (i < D) {
                const float a = q[i] * inv;
                h = (int)lrintf(a);
                l = (int)lrintf((a - (float)h) * 256.0f);
                l = l > 127 ? 127 : l < -127 ? -127 : l;
            }
            hi[g * 128 + i] = (int8_t)h;
            lo[g * 128 + i] = (int8_t)l;
            sum += 256 * h + l;
        }
        offset[g] = 128 * sum;
        unit[g] = s / 256.0f;
    }
    const int8_t *kc = (const int8_t *)k_cache + base;
    switch (G) {
    case 1: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 1); break;
    case 2: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 2); break;
    case 3: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 3); break;
    case 4: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 4); break;
    case 5: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 5); break;
    case 6: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 6); break;
    case 7: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 7); break;
    case 8: i8_scores_g(kc, n, D, hi, lo, offset, unit, scores, stride, 8); break;
    }
}
