/* ---- AVX-512 VNNI override of gemv.c's dot_i8_row (included there in builds that have VNNI) ---- */
/* The same integer sums with AVX-512 VNNI: 32 weights widened to int16 in one register, multiplied by 32
 * int16 activations and added in pairs into 16 int32 lanes by one vpdpwssd (the AVX2 loop takes two widen,
 * two madd and an add for the same), then one float multiply-add per block: the same exact block sums,
 * fewer instructions per weight byte: +2.5% and +1.5% GB/s in two alternating runs of
 * benchmarks/bench_decode.py --precisions int8 --define I8_ZMM=0 (benchmarks/RESULTS.md). */
static inline __attribute__((always_inline)) float dot_i8_row(const int8_t *w, const int16_t *xq, const float *dx,
                                                             int64_t K, const int64_t XB) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += XB) {
        __m512i s = _mm512_setzero_si512();
        for (int64_t j = 0; j < XB; j += 32) {
            if ((j & 63) == 0) _mm_prefetch((const char *)(w + k + j) + PREFETCH_I8, _MM_HINT_T0);
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k + j)));
            s = _mm512_dpwssd_epi32(s, wv, _mm512_loadu_si512((const void *)(xq + k + j)));
        }
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(dx[k / XB]), a);
    }
    return _mm512_reduce_add_ps(a);
}
