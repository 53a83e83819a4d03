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

/* Bytes of the cache prefetched ahead of the rows being read (0: none). Phi-4-mini int4 after 16,384 tokens
 * (`phikit bench --depth 16384`, an Intel Xeon, builds alternating): none 4.20-4.97 tok/s, 512 bytes 4.93-5.24,
 * 1024 4.89-5.59, 2048 5.67-5.96, 4096 5.36-5.89; after 32,768: none 2.92-3.06, 2048 3.75-3.87; Phi-3-mini (one
 * query head a KV head) after 16,384: none 2.40-2.45, 2048 2.92-2.95. Measured with the AVX-512 build on that
 * Xeon only (benchmarks/RESULTS.md, issue 23, ninth session); the AVX2 build takes the same distance. */
#ifndef PREFETCH_KV
#define PREFETCH_KV 2048
#endif

/* Software prefetch of the 64-byte lines of elements [i, i + count) of a cache, PREFETCH_KV bytes ahead. */
static inline __attribute__((always_inline)) void prefetch_kv(const void *c, int64_t i, int64_t count, int f16) {
    if (!PREFETCH_KV) return;
    const char *p = (const char *)c + i * (f16 ? 2 : 4) + PREFETCH_KV;
    for (int64_t b = 0; b < count * (f16 ? 2 : 4); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

#if defined(__AVX512F__)
#include "avx512/attention_group.h" /* grouped-query heads with zmm registers: group_scores, group_values */
#define GROUP_ATTENTION(G, D) ((G) > 1 && (G) <= 8 && (D) % 16 == 0 && (D) <= 128)
#else
#define GROUP_ATTENTION(G, D) 0
static inline void group_scores(const void *k, int64_t b, int64_t n, int64_t D, int64_t G, const float *q,
                                float *s, int64_t st, int f16) {}
static inline int group_values(const void *v, int64_t b, int64_t n, int64_t D, int64_t G, const float *s,
                               int64_t st, float *o, int f16) { return 0; }
#endif

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
            if (GROUP_ATTENTION(G, D)) {
                group_scores(k_cache, base, n, D, G, qh, scores, stride, f16);
            } else {
                for (int64_t j = 0; j < n; j++) { /* each key once for the group */
                    prefetch_kv(k_cache, base + j * D, D, f16);
                    for (int64_t g = 0; g < G; g++) {
                        __m256 acc = _mm256_setzero_ps();
                        for (int64_t i = 0; i < nv; i++)
                            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * D + 8 * i),
                                                  load_kv(k_cache, base + j * D + 8 * i, f16), acc);
                        scores[g * stride + j] = hsum(acc);
                    }
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float *sc = scores + g * stride, m = -INFINITY;
                __m256 vm = _mm256_set1_ps(-INFINITY); /* the max 8 lanes at a time: fmaxf's chain was serial */
                int64_t j8 = 0;
                for (; j8 + 8 <= n; j8 += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sc + j8));
                if (j8 > 0) m = hmax(vm);
                for (; j8 < n; j8++) m = fmaxf(m, sc[j8]);
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
                    prefetch_kv(v_cache, base + j * D, D, f16);
                    __m256 p = _mm256_set1_ps(scores[j]);
                    for (int64_t i = 0; i < nv; i++)
                        acc[i] = _mm256_fmadd_ps(p, load_kv(v_cache, base + j * D + 8 * i, f16), acc[i]);
                }
                for (int64_t i = 0; i < nv; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
            } else if (GROUP_ATTENTION(G, D) && group_values(v_cache, base, n, D, G, scores, stride, o, f16)) {
                /* done with the outputs in registers */
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
