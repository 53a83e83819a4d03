/* phikit CPU kernels: what every part shares. See cpu_kernels.c for the map of the library. */
#ifndef PHIKIT_H
#define PHIKIT_H
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* PHIKIT_API: every function the library exports, declared once, one per line. phikit/kernels/build.py reads these
 * lines to declare the ctypes signatures (pointer -> c_void_p, int64_t -> c_int64, int -> c_int, float ->
 * c_float), and the compiler checks every definition below against its line, so the two cannot drift. */
typedef struct Layer Layer;
void phikit_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_f16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_bf16_dp(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, float *y);
void phikit_gemv_i8(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const float *scale, const float *bias, float *y);
void phikit_gemv_i4(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t G, const uint16_t *scale, const uint16_t *minimum, const float *bias, float *y);
void phikit_gelu_tanh(float *x, int64_t n);
int64_t phikit_attention_decode(const float *q, const float *k, const float *v, const float *cos, const float *sin, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t R, void *k_cache, void *v_cache, int64_t S, const int64_t *pos, const int64_t *first, float *out, int64_t cache_kind, float *k_scale, float *v_scale);
void phikit_rms_norm(const float *x, int64_t B, int64_t n, const float *w, float eps, float *y);
void phikit_silu_mul(const float *gate_up, int64_t B, int64_t n, float *y);
void phikit_gemm(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale, const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y);
void phikit_gemm_vnni(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale, const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y);
int64_t phikit_features(void);
void phikit_quantize_i8(int dtype, const void *w, int64_t N, int64_t K, int8_t *q, float *scale);
void phikit_quantize_i4(int dtype, const void *w, int64_t N, int64_t K, int64_t G, uint8_t *packed, uint16_t *scale16, uint16_t *minimum16);
void phikit_to_bf16(int dtype, const void *src, int64_t n, uint16_t *dst);
void phikit_dequant_bf16(int kind, const void *w, const float *scale, const uint16_t *scale16, const uint16_t *minimum, int64_t G, int64_t K, int64_t n0, int64_t n1, uint16_t *out);
int64_t phikit_decode_layers(const Layer *layers, int64_t L, float *x, int64_t B, int64_t hidden, int64_t inter, float eps, int64_t H, int64_t KV, int64_t D, const float *cos, const float *sin, int64_t R, void *k_cache, void *v_cache, int64_t S, int64_t layer_cache, const int64_t *pos, const int64_t *first, int64_t cache_kind, float *k_scale, float *v_scale);
/* END PHIKIT_API */

/* Optional kernels of the wider builds; phikit_features() says which this library has. */
enum { FEATURE_BF16_DP = 1, FEATURE_VNNI = 2 };
/* Weight formats, as phikit/kernels/ops.py's GEMM_KINDS and PLAN_KINDS number them. */
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_I8 = 3, KIND_I4 = 4, KIND_BF16_DP = 5 };
enum { DECODE_NO_MEMORY = -1, DECODE_UNKNOWN_KIND = -2 }; /* phikit_decode_layers' errors */
/* KV-cache element types (phikit/kernels/ops.py's CACHE_KINDS): int8 rows carry one fp32 scale each. */
enum { CACHE_F32 = 0, CACHE_F16 = 1, CACHE_I8 = 2 };

#define ROWS 4 /* weight rows processed together when M == 1 */
/* Software prefetch distance (bytes) in the int8 / int4 gemv: one row at a time is a single stream,
 * which the hardware prefetchers alone kept ~10-20% below the bandwidth a 4-row bf16 stream reaches on 4 KB
 * pages; measured on Phi-2's shapes (benchmarks/RESULTS.md). With weights on 2 MB pages the best distance
 * depends on the VM's phase: Phi-3-mini int8 decoded 24-28% faster 256 bytes ahead where tensor.sum read ~70
 * GB/s and 20-30% slower where it read ~37 (issue 23, seventh session), so 1024 stayed; on an Intel Xeon
 * (ninth session) int8 read 2048 bytes ahead at 22.6 GB/s against 20.3 at 1024 (4096: 22.6), as on the EPYC
 * (33.4 against 31.9 in one run, level in another): 2048. int4's 2048 is within 0-8% of 128-256 on the EPYC,
 * and beat 1024 by 10% and 4096 by 2% on the Xeon. The AVX2 bf16 loop's 4-row streams do better without;
 * the zmm one takes PREFETCH_BF16 (avx512/gemv_bf16_zmm.h). */
#ifndef PREFETCH_I8 /* overridable for benchmarks/bench_decode.py --define */
#define PREFETCH_I8 2048
#endif
#ifndef PREFETCH_I4
#define PREFETCH_I4 2048
#endif

/* ---- vector helpers (AVX2) ---- */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float hmin(__m256 v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float f16(uint16_t h) { return _cvtsh_ss(h); }

static inline __m256 load_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* y[m][n] = scale[n] * dot(x[m], W[n]) + bias[n] for float-convertible weights; K % 16 == 0. */

#endif /* PHIKIT_H */
