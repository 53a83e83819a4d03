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

/* One cache row of D values: fp32; fp16 (CACHE_F16) as llama.cpp keeps its KV cache by default, half the bytes a
 * long context reads per token at fp16's 11-bit precision (ample for keys and values of unit-scale activations; the
 * scores and the softmax stay fp32); or int8 (CACHE_I8) with one fp32 scale a row (a token's key or value of one
 * head): D + 4 bytes instead of 2 D, for contexts where the cache is most of what a step reads. A row is quantized
 * symmetrically (scale = max |x| / 127, x / scale rounded to nearest even, as PyTorch's KVCache.update does); its
 * scale multiplies the row's score (keys) or probability (values) once, not each element. */
static inline int64_t kv_size(int kind) { return kind == CACHE_F32 ? 4 : kind == CACHE_F16 ? 2 : 1; }

static inline __m256 load_kv(const void *c, int64_t i, int kind) {
    if (kind == CACHE_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)c + i)));
    if (kind == CACHE_I8) return load_i8((const int8_t *)c + i);
    return _mm256_loadu_ps((const float *)c + i);
}

/* Row ``row`` of a cache (its D values start at element row * D) from x; an int8 row's scale into scales[row]. */
static inline void store_kv(void *c, float *scales, int64_t row, const float *x, int64_t D, int kind) {
    int64_t i = row * D;
    if (kind == CACHE_I8) {
        float amax = 0.0f;
        for (int64_t j = 0; j < D; j++) amax = fmaxf(amax, fabsf(x[j]));
        float scale = amax / 127.0f, div = scale > 0.0f ? scale : 1.0f;
        for (int64_t j = 0; j < D; j++) ((int8_t *)c)[i + j] = (int8_t)lrintf(x[j] / div);
        scales[row] = scale;
        return;
    }
    for (int64_t j = 0; j < D; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        if (kind == CACHE_F16)
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
static inline __attribute__((always_inline)) void prefetch_kv(const void *c, int64_t i, int64_t count, int kind) {
    if (!PREFETCH_KV) return;
    const char *p = (const char *)c + i * kv_size(kind) + PREFETCH_KV;
    for (int64_t b = 0; b < count * kv_size(kind); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

#if defined(__AVX512F__)
#include "avx512/attention_group.h" /* grouped-query heads with zmm registers: group_scores, group_values */
#define GROUP_ATTENTION(G, D) ((G) > 1 && (G) <= 8 && (D) % 16 == 0 && (D) <= 128)
/* one head's values over an int8 cache with zmm registers (fp16 keeps its AVX2 loop, memory-bound there; one-head
 * scores in zmm measured level for fp16 in issue 23's tenth session) */
#define ONE_HEAD_VALUES(kind, D) ((kind) == CACHE_I8 && (D) % 16 == 0 && (D) <= 128)
#else
#define GROUP_ATTENTION(G, D) 0
#define ONE_HEAD_VALUES(kind, D) 0
static inline void group_scores(const void *k, int64_t b, int64_t n, int64_t D, int64_t G, const float *q,
                                float *s, int64_t st, int kind) {}
static inline int group_values(const void *v, int64_t b, int64_t n, int64_t D, int64_t G, const float *s,
                               int64_t st, float *o, int kind) { return 0; }
static inline void one_head_values(const void *v, int64_t b, int64_t n, int64_t D, const float *s, float *o,
                                   int kind) {}
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include "avx512/attention_i8_vnni.h" /* scores over an int8 cache by integer dot products: i8_scores */
#else
#define I8_SCORES(G, D) 0
static inline void i8_scores(const void *k, int64_t b, int64_t n, int64_t D, int64_t G, const float *q, float *s,
                             int64_t st) {}
#endif

/* The attention of one row's G = H / KV query heads of KV head kvh over slots first[b] .. pos[b] into out, with
 * the scores buffer (G stride + 2 G D floats) given: kind is a constant at each call below, so each cache type gets
 * its own loops. Scores of an int8 cache are scaled by their key's scale, probabilities by their value's. */
static inline __attribute__((always_inline)) void attend(const float *q, const float *cos, const float *sin,
                                                         int64_t b, int64_t kvh, int64_t H, int64_t KV, int64_t D,
                                                         int64_t R, const void *k_cache, const void *v_cache,
                                                         const float *k_scale, const float *v_scale, int64_t S,
                                                         const int64_t *pos, const int64_t *first, float *out,
                                                         float *scores, const int kind) {
    const float scale = 1.0f / sqrtf((float)D);
    const int64_t nv = D / 8, G = H / KV;
    int64_t n = pos[b] + 1 - first[b], stride = n + 8;
    int64_t row = (b * KV + kvh) * S + first[b], base = row * D; /* the first attended row and its first element */
    float *qh = scores + G * stride, *o = qh + G * D;            /* G heads' queries and outputs */
    for (int64_t g = 0; g < G; g++) {
        for (int64_t i = 0; i < D; i++) qh[g * D + i] = q[(b * H + kvh * G + g) * D + i] * scale;
        rope(qh + g * D, cos + b * R, sin + b * R, R); /* rope is linear: scaling first is the same */
    }
    if (kind == CACHE_I8 && I8_SCORES(G, D)) {
        i8_scores(k_cache, base, n, D, G, qh, scores, stride);
    } else if (GROUP_ATTENTION(G, D)) {
        group_scores(k_cache, base, n, D, G, qh, scores, stride, kind);
    } else {
        for (int64_t j = 0; j < n; j++) { /* each key once for the group */
            prefetch_kv(k_cache, base + j * D, D, kind);
            for (int64_t g = 0; g < G; g++) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t i = 0; i < nv; i++)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * D + 8 * i),
                                          load_kv(k_cache, base + j * D + 8 * i, kind), acc);
                scores[g * stride + j] = hsum(acc);
            }
        }
    }
    if (kind == CACHE_I8)
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < n; j++) scores[g * stride + j] *= k_scale[row + j];
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
        if (kind == CACHE_I8)
            for (int64_t j = 0; j < n; j++) sc[j] *= inv * v_scale[row + j];
        else
            for (int64_t j = 0; j < n; j++) sc[j] *= inv;
    }
    if (G == 1 && ONE_HEAD_VALUES(kind, D)) {
        one_head_values(v_cache, base, n, D, scores, o, kind);
    } else if (G == 1) { /* one head: its output in registers */
        __m256 acc[16];
        for (int64_t i = 0; i < nv; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            prefetch_kv(v_cache, base + j * D, D, kind);
            __m256 p = _mm256_set1_ps(scores[j]);
            for (int64_t i = 0; i < nv; i++)
                acc[i] = _mm256_fmadd_ps(p, load_kv(v_cache, base + j * D + 8 * i, kind), acc[i]);
        }
        for (int64_t i = 0; i < nv; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
    } else if (GROUP_ATTENTION(G, D) && group_values(v_cache, base, n, D, G, scores, stride, o, kind)) {
        /* done with the outputs in registers */
    } else { /* each value once for the group; the G outputs stay in L1 */
        for (int64_t i = 0; i < G * D; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < n; j++)
            for (int64_t i = 0; i < nv; i++) {
                __m256 val = load_kv(v_cache, base + j * D + 8 * i, kind);
                for (int64_t g = 0; g < G; g++) {
                    float *og = o + g * D + 8 * i;
                    _mm256_storeu_ps(og, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * stride + j]), val,
                                                         _mm256_loadu_ps(og)));
                }
            }
    }
    for (int64_t g = 0; g < G; g++) memcpy(out + (b * H + kvh * G + g) * D, o + g * D, sizeof(float) * (size_t)D);
}

/* One new token per row: rotary on q and k, k and v written at slot pos[b], then softmax attention of each
 * query head over slots first[b] .. pos[b] (first > 0: a sliding window). Grouped-query heads: the G = H / KV
 * query heads of a KV head are done together, so each cached key and value is read once per group, not once
 * per query head (at long contexts the cache is what a step reads). Each head's arithmetic is the same as
 * alone. cache_kind: CACHE_F32, CACHE_F16 or CACHE_I8 (then k_scale / v_scale (B, KV, S): each row's scale).
 * Returns 0, or DECODE_NO_MEMORY (scores buffer) with nothing written after the cache. */
int64_t phikit_attention_decode(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                                int64_t B, int64_t H, int64_t KV, int64_t D, int64_t R, void *k_cache,
                                void *v_cache, int64_t S, const int64_t *pos, const int64_t *first, float *out,
                                int64_t cache_kind, float *k_scale, float *v_scale) {
    const int kind = (int)cache_kind;
    /* write the rotated keys and the values first, so every head sees them */
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < KV; h++) {
            float kr[D];
            for (int64_t i = 0; i < D; i++) kr[i] = k[(b * KV + h) * D + i];
            rope(kr, cos + b * R, sin + b * R, R);
            int64_t row = (b * KV + h) * S + pos[b];
            store_kv(k_cache, k_scale, row, kr, D, kind);
            store_kv(v_cache, v_scale, row, v + (b * KV + h) * D, D, kind);
        }
    }
    int64_t G = H / KV, failed = 0;
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kvh = 0; kvh < KV; kvh++) {
            int64_t stride = pos[b] + 1 - first[b] + 8;
            float *scores = malloc(sizeof(float) * (size_t)(G * stride + G * D * 2));
            if (scores == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const void *kc = k_cache, *vc = v_cache;
            if (kind == CACHE_I8)
                attend(q, cos, sin, b, kvh, H, KV, D, R, kc, vc, k_scale, v_scale, S, pos, first, out, scores, CACHE_I8);
            else if (kind == CACHE_F16)
                attend(q, cos, sin, b, kvh, H, KV, D, R, kc, vc, NULL, NULL, S, pos, first, out, scores, CACHE_F16);
            else
                attend(q, cos, sin, b, kvh, H, KV, D, R, kc, vc, NULL, NULL, S, pos, first, out, scores, CACHE_F32);
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
