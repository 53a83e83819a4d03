/* ---- int8 / int4 prefill with AVX-512 VNNI: activations quantized to int8, integer dot products ----
 * What llama.cpp does for its Q8_0/Q4_0 prefill, for phikit's layouts: x is quantized to int8 per block of
 * XB values (int8: 64; int4: the weight group) with a float scale per block, and vpdpbusd multiplies 64
 * unsigned weight bytes by 64 signed activation bytes into 16 int32 sums per instruction (4x the multiply
 * rate of fp32 FMAs). Weights stay in their format in memory: a panel of 32 output rows x 256 k is unpacked
 * to bytes in L1 as the GEMM goes (int4: the nibble, 0..15; int8: w + 128, corrected by -128 x the block's
 * activation sum), in VNNI order, then a 6 x 32 kernel runs it over every row of x. Per block b of XB:
 *   int8: y[m][n] += dx[m][b] * (dot(w + 128, xq) - 128 * sum(xq))        (times scale[n] at the end)
 *   int4: y[m][n] += dx[m][b] * (scale[n][b] * dot(q, xq) + minimum[n][b] * sum(xq))
 * so y is the exact product of the dequantized weight with x rounded to int8 (about 0.4% of each block's
 * largest value), as llama.cpp's Q4_1 x Q8_1 (the minimum term taken with x's exact sum instead would add
 * the rounding errors of x times the all-positive codes, 2-3x the error).
 * N % 32 == 0, K % 64 == 0 (int4: K % G == 0, G in 32..256). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VNR 32
#define VMR 6
#define VKC 256

/* Bq[(k / 4) * 128 + j * 4 + k % 4] = byte of W[n0 + j][k0 + k]; fs/fm[b * VNR + j]: int4 scale and
 * minimum of row n0 + j in block b of the slice (int4 only). */
static void pack_panel_vnni(int kind, const void *w, const uint16_t *scale16, const uint16_t *minimum, int64_t G,
                            int64_t K, int64_t n0, int64_t k0, int64_t kc, uint8_t *Bq, float *fs, float *fm) {
    uint32_t rows[VNR][VKC / 4] __attribute__((aligned(64)));
    const __m256i mask = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80);
    for (int64_t j = 0; j < VNR; j++) {
        int64_t n = n0 + j;
        uint8_t *row = (uint8_t *)rows[j];
        if (kind == KIND_I8) {
            const int8_t *src = (const int8_t *)w + n * K + k0;
            for (int64_t k = 0; k < kc; k += 32)
                _mm256_store_si256((__m256i *)(row + k), _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(src + k)), flip));
        } else {
            const uint8_t *src = (const uint8_t *)w + n * K / 2 + k0 / 2;
            for (int64_t k = 0; k < kc; k += 64) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(src + k / 2));
                _mm256_store_si256((__m256i *)(row + k), _mm256_and_si256(v, mask));
                _mm256_store_si256((__m256i *)(row + k + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
            }
            for (int64_t b = 0; b < kc / G; b++) {
                fs[b * VNR + j] = f16(scale16[n * (K / G) + k0 / G + b]);
                fm[b * VNR + j] = f16(minimum[n * (K / G) + k0 / G + b]);
            }
        }
    }
    uint32_t *B32 = (uint32_t *)Bq; /* B32[q * VNR + j] = rows[j][q], by 16 x 16 transposes of dwords */
    for (int64_t j0 = 0; j0 < VNR; j0 += 16)
        for (int64_t q0 = 0; q0 < kc / 4; q0 += 16) {
            __m512i r[16], t[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512((const void *)&rows[j0 + i][q0]);
            for (int i = 0; i < 16; i += 2) {
                t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
                t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) { /* r[i + c], lane L: rows i..i+3 of dword 4L + c */
                r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
                r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
                r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
                r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
            }
            for (int c = 0; c < 4; c++) {
                __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
                __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
                _mm512_store_si512((void *)(B32 + (q0 + c) * VNR + j0), _mm512_shuffle_i32x4(x0, y0, 0x88));
                _mm512_store_si512((void *)(B32 + (q0 + 4 + c) * VNR + j0), _mm512_shuffle_i32x4(x1, y1, 0x88));
                _mm512_store_si512((void *)(B32 + (q0 + 8 + c) * VNR + j0), _mm512_shuffle_i32x4(x0, y0, 0xDD));
                _mm512_store_si512((void *)(B32 + (q0 + 12 + c) * VNR + j0), _mm512_shuffle_i32x4(x1, y1, 0xDD));
            }
        }
}

/* One slice (kc of K) of C rows m0.. (rows <= 6) x 32 columns. xr[i]: quantized row i at k0; dx/aux: its
 * per-block scales and (int8) -128 x block sums as int32 or (int4) dx x block sums, at k0's block. */
static inline __attribute__((always_inline)) void kernel_vnni(const int kind, int64_t kc, const int64_t XB,
        const uint8_t *Bq, const float *fs, const float *fm, const int8_t *const *xr, const float *const *dx,
        const void *const *aux, int rows, float *C, int64_t ldc, const float *scale, const float *bias,
        int accumulate) {
    __m512 y[VMR][2];
    for (int i = 0; i < VMR; i++) y[i][0] = y[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kc / XB; b++) {
        __m512i acc[VMR][2];
        for (int i = 0; i < VMR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        const uint8_t *B = Bq + b * XB * VNR;
        for (int64_t q = 0; q < XB / 4; q++) {
            __m512i w0 = _mm512_load_si512((const void *)(B + q * 4 * VNR));
            __m512i w1 = _mm512_load_si512((const void *)(B + q * 4 * VNR + 64));
#pragma GCC unroll 6
            for (int i = 0; i < VMR; i++) {
                __m512i a = _mm512_set1_epi32(*(const int32_t *)(xr[i] + b * XB + q * 4));
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, a);
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, a);
            }
        }
        if (kind == KIND_I8) {
#pragma GCC unroll 6
            for (int i = 0; i < VMR; i++) {
                __m512i c = _mm512_set1_epi32(((const int32_t *)aux[i])[b]);
                __m512 d = _mm512_set1_ps(dx[i][b]);
                y[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[i][0], c)), d, y[i][0]);
                y[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[i][1], c)), d, y[i][1]);
            }
        } else {
            __m512 s0 = _mm512_loadu_ps(fs + b * VNR), s1 = _mm512_loadu_ps(fs + b * VNR + 16);
            __m512 n0 = _mm512_loadu_ps(fm + b * VNR), n1 = _mm512_loadu_ps(fm + b * VNR + 16);
#pragma GCC unroll 6
            for (int i = 0; i < VMR; i++) {
                __m512 d = _mm512_set1_ps(dx[i][b]), t = _mm512_set1_ps(((const float *)aux[i])[b]);
                y[i][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][0]), s0), d, y[i][0]);
                y[i][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][1]), s1), d, y[i][1]);
                y[i][0] = _mm512_fmadd_ps(n0, t, y[i][0]);
                y[i][1] = _mm512_fmadd_ps(n1, t, y[i][1]);
            }
        }
    }
    __m512 sc0 = _mm512_set1_ps(1.0f), sc1 = sc0;
    if (kind == KIND_I8) sc0 = _mm512_loadu_ps(scale), sc1 = _mm512_loadu_ps(scale + 16);
    for (int i = 0; i < rows; i++) {
        float *ci = C + i * ldc;
        __m512 b0 = accumulate ? _mm512_loadu_ps(ci) : bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
        __m512 b1 = accumulate ? _mm512_loadu_ps(ci + 16) : bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
        _mm512_storeu_ps(ci, _mm512_fmadd_ps(y[i][0], sc0, b0));
        _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(y[i][1], sc1, b1));
    }
}

void phikit_gemm_vnni(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale,
                      const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y) {
    const int64_t XB = kind == KIND_I8 ? 64 : G, blocks = K / XB;
    /* xq slice by slice: the VKC bytes of row m in slice s at xq + s * VKC * M + m * kc(s), so a slice's rows
     * are contiguous (rows K bytes apart alias in the caches when K is a multiple of 2048, e.g. fc2's 10240) */
    int8_t *xq = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *dx = malloc(sizeof(float) * (size_t)(M * blocks));
    float *xsum = malloc(sizeof(float) * (size_t)(M * blocks));
    int32_t *corr = malloc(sizeof(int32_t) * (size_t)(M * blocks));
#pragma omp parallel
    {
        int8_t *row = malloc((size_t)K);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            quantize_row(x + m * K, K, XB, row, dx + m * blocks, xsum + m * blocks);
            for (int64_t b = 0; b < blocks; b++) {
                int32_t sum = 0;
                for (int64_t i = 0; i < XB; i++) sum += row[b * XB + i];
                corr[m * blocks + b] = -128 * sum;
                xsum[m * blocks + b] = dx[m * blocks + b] * (float)sum; /* the sum of x as rounded */
            }
            for (int64_t k0 = 0; k0 < K; k0 += VKC) {
                int64_t kc = K - k0 < VKC ? K - k0 : VKC;
                memcpy(xq + k0 * M + m * kc, row + k0, (size_t)kc);
            }
        }
        free(row);
    }
    const void *aux_base = kind == KIND_I8 ? (const void *)corr : (const void *)xsum;
    size_t aux_size = kind == KIND_I8 ? sizeof(int32_t) : sizeof(float);
#pragma omp parallel
    {
        uint8_t *Bq = aligned_alloc(64, VKC * VNR);
        float fs[(VKC / 32) * VNR], fm[(VKC / 32) * VNR];
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += VNR) {
            for (int64_t k0 = 0; k0 < K; k0 += VKC) {
                int64_t kc = K - k0 < VKC ? K - k0 : VKC;
                pack_panel_vnni(kind, w, scale16, minimum, G, K, n0, k0, kc, Bq, fs, fm);
                for (int64_t m0 = 0; m0 < M; m0 += VMR) {
                    int rows = M - m0 < VMR ? (int)(M - m0) : VMR;
                    const int8_t *xr[VMR];
                    const float *dr[VMR];
                    const void *ar[VMR];
                    for (int i = 0; i < VMR; i++) {
                        int64_t m = m0 + (i < rows ? i : 0);
                        xr[i] = xq + k0 * M + m * kc;
                        dr[i] = dx + m * blocks + k0 / XB;
                        ar[i] = (const char *)aux_base + (size_t)(m * blocks + k0 / XB) * aux_size;
                    }
                    float *C = y + m0 * N + n0;
                    const float *bn = bias ? bias + n0 : NULL;
                    if (kind == KIND_I8)
                        kernel_vnni(KIND_I8, kc, 64, Bq, fs, fm, xr, dr, ar, rows, C, N, scale + n0, bn, k0 > 0);
                    else
                        kernel_vnni(KIND_I4, kc, XB, Bq, fs, fm, xr, dr, ar, rows, C, N, NULL, bn, k0 > 0);
                }
            }
        }
        free(Bq);
    }
    free(xq);
    free(dx);
    free(xsum);
    free(corr);
}
#define HAS_VNNI FEATURE_VNNI
#else
void phikit_gemm_vnni(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale,
                      const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y) {
    phikit_gemm(kind, x, M, K, w, N, scale, scale16, minimum, G, bias, y); /* never called: no FEATURE_VNNI */
}
#define HAS_VNNI 0
#endif
