/* ---- GEMM for prefill: y (M x N) = x (M x K) @ W^T + bias, W in any of the formats above ----
 * BLIS-style: W is unpacked to fp32 a panel of 16 output rows x KC at a time, transposed so the 16 values
 * of one k are contiguous, and a 6 x 16 register-blocked kernel (12 accumulators, 2 FMAs per loaded
 * activation) runs over every 6 rows of x, packed k-major so its broadcasts read one stream. Unpacking
 * inside the GEMM means no fp32 copy of the weight is ever materialised, and MKL (which picks slow code
 * paths on AMD CPUs) is not used. */
#define MR 6
#define NR 16
#define KC 256
#define MC 516 /* rows of x per block: a 516 x 256 fp32 block is about one L2 */
#define PANEL_ROWS(mc, p) ((mc) - (p) * MR < MR ? (int)((mc) - (p) * MR) : MR) /* rows of x in panel p */

/* Bp[k * NR + j] = W[n0 + j][k0 + k] as fp32, for k < kc */
static void pack_panel(int kind, const void *w, const float *scale, const uint16_t *scale16,
                       const uint16_t *minimum, int64_t G, int64_t K, int64_t n0, int64_t k0, int64_t kc,
                       float *Bp) {
    float rows[NR][KC];
    for (int64_t j = 0; j < NR; j++) {
        int64_t n = n0 + j;
        float *row = rows[j];
        switch (kind) {
        case KIND_F32: memcpy(row, (const float *)w + n * K + k0, (size_t)kc * sizeof(float)); break;
        case KIND_BF16:
            for (int64_t k = 0; k < kc; k += 8) _mm256_storeu_ps(row + k, load_bf16((const uint16_t *)w + n * K + k0 + k));
            break;
        case KIND_F16:
            for (int64_t k = 0; k < kc; k += 8) _mm256_storeu_ps(row + k, load_f16((const uint16_t *)w + n * K + k0 + k));
            break;
        case KIND_I8: {
            __m256 s = _mm256_set1_ps(scale[n]);
            for (int64_t k = 0; k < kc; k += 8)
                _mm256_storeu_ps(row + k, _mm256_mul_ps(load_i8((const int8_t *)w + n * K + k0 + k), s));
            break;
        }
        default: { /* int4, 64-blocks: k0 and kc are multiples of 64 */
            const uint8_t *wr = (const uint8_t *)w + n * K / 2;
            for (int64_t k = 0; k < kc; k += 64) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wr + (k0 + k) / 2));
                __m256i mask = _mm256_set1_epi8(0x0F);
                __m256i halves[2] = {_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)};
                for (int h = 0; h < 2; h++) {
                    int64_t g = (k0 + k + h * 32) / G;
                    __m256 s = _mm256_set1_ps(f16(scale16[n * (K / G) + g]));
                    __m256 mn = _mm256_set1_ps(f16(minimum[n * (K / G) + g]));
                    for (int part = 0; part < 4; part++) {
                        __m128i bytes = part < 2 ? _mm256_castsi256_si128(halves[h]) : _mm256_extracti128_si256(halves[h], 1);
                        if (part & 1) bytes = _mm_srli_si128(bytes, 8);
                        __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                        _mm256_storeu_ps(row + k + h * 32 + part * 8, _mm256_fmadd_ps(q, s, mn));
                    }
                }
            }
        }
        }
    }
    /* transpose 8 x 8 blocks: Bp[k][j] = rows[j][k] */
    for (int64_t j0 = 0; j0 < NR; j0 += 8) {
        for (int64_t k = 0; k < kc; k += 8) {
            __m256 r[8], t[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(rows[j0 + i] + k);
            t[0] = _mm256_unpacklo_ps(r[0], r[1]); t[1] = _mm256_unpackhi_ps(r[0], r[1]);
            t[2] = _mm256_unpacklo_ps(r[2], r[3]); t[3] = _mm256_unpackhi_ps(r[2], r[3]);
            t[4] = _mm256_unpacklo_ps(r[4], r[5]); t[5] = _mm256_unpackhi_ps(r[4], r[5]);
            t[6] = _mm256_unpacklo_ps(r[6], r[7]); t[7] = _mm256_unpackhi_ps(r[6], r[7]);
            r[0] = _mm256_shuffle_ps(t[0], t[2], 0x44); r[1] = _mm256_shuffle_ps(t[0], t[2], 0xEE);
            r[2] = _mm256_shuffle_ps(t[1], t[3], 0x44); r[3] = _mm256_shuffle_ps(t[1], t[3], 0xEE);
            r[4] = _mm256_shuffle_ps(t[4], t[6], 0x44); r[5] = _mm256_shuffle_ps(t[4], t[6], 0xEE);
            r[6] = _mm256_shuffle_ps(t[5], t[7], 0x44); r[7] = _mm256_shuffle_ps(t[5], t[7], 0xEE);
            for (int i = 0; i < 4; i++) {
                _mm256_storeu_ps(Bp + (k + i) * NR + j0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
                _mm256_storeu_ps(Bp + (k + i + 4) * NR + j0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
            }
        }
    }
}

/* C (rows x 16, row stride ldc, rows <= 6) = sum_k Ap[k][i] * Bp[k][j] + (C itself for a later block of k,
 * else the bias row or zero). Ap is a packed panel of 6 rows of x, k-major, zero past the last row. Each
 * block's sum starts from zero and is added to C at the end (a blocked sum: more accurate than accumulating
 * onto C). */
static inline __attribute__((always_inline)) void kernel_6x16(int64_t kc, const float *Ap, const float *Bp, float *C,
                                                              int64_t ldc, int rows, const float *bias, int accumulate) {
    __m256 c[MR][2];
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(Bp + k * NR), b1 = _mm256_load_ps(Bp + k * NR + 8);
        const float *a = Ap + k * MR;
        __m256 av;
        av = _mm256_broadcast_ss(a);     c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    c[0][0] = c00, c[0][1] = c01, c[1][0] = c10, c[1][1] = c11, c[2][0] = c20, c[2][1] = c21;
    c[3][0] = c30, c[3][1] = c31, c[4][0] = c40, c[4][1] = c41, c[5][0] = c50, c[5][1] = c51;
    for (int i = 0; i < rows; i++) {
        float *ci = C + i * ldc;
        __m256 s0 = accumulate ? _mm256_loadu_ps(ci) : bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        __m256 s1 = accumulate ? _mm256_loadu_ps(ci + 8) : bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
        _mm256_storeu_ps(ci, _mm256_add_ps(c[i][0], s0));
        _mm256_storeu_ps(ci + 8, _mm256_add_ps(c[i][1], s1));
    }
}

/* x: M x K fp32, y: M x N. N % 16 == 0, K % 64 == 0.
 * Per block of MC rows of x: the block is packed once, every KC slice of it, into 6-row panels (shared by
 * both threads, from L2/L3). Each thread then takes blocks of NC output columns, and for each runs every
 * KC slice in order: 16-row panels of W unpacked to fp32 in L1, the kernel over every row panel. The C
 * block (MC x NC, 256 KB) stays in L2 across the slices; sweeping all N per slice instead re-read C from
 * L3 once per slice (21 MB for fc1 at 512 rows). Each C element still adds its slices in k order, so the
 * result is bit for bit that of the previous loop order; same-process A/B (benchmarks/RESULTS.md): fc1
 * +9%, the other shapes level. Earlier, packing x into panels and prefetching C tiles gave 1.09-1.24x. */
#define NC 128
void phikit_gemm(int kind, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *scale,
                 const uint16_t *scale16, const uint16_t *minimum, int64_t G, const float *bias, float *y) {
    int64_t mc_max = M < MC ? (M + MR - 1) / MR * MR : MC;
    int64_t slices = (K + KC - 1) / KC;
    float *Ap = aligned_alloc(64, (size_t)(mc_max * slices * KC) * sizeof(float));
#pragma omp parallel
    {
        float *Bp = aligned_alloc(64, KC * NR * sizeof(float));
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
            int64_t mc = M - m0 < MC ? M - m0 : MC, panels = (mc + MR - 1) / MR;
#pragma omp for schedule(static) collapse(2)
            for (int64_t s = 0; s < slices; s++) {
                for (int64_t p = 0; p < panels; p++) { /* Ap[s][p][k][i] = x[m0 + 6p + i][s KC + k], 0 past row M */
                    int64_t k0 = s * KC, kc = K - k0 < KC ? K - k0 : KC;
                    const float *src = x + (m0 + p * MR) * K + k0;
                    float *dst = Ap + s * mc_max * KC + p * MR * kc;
                    int rows = PANEL_ROWS(mc, p);
                    for (int64_t k = 0; k < kc; k++)
                        for (int i = 0; i < MR; i++) dst[k * MR + i] = i < rows ? src[i * K + k] : 0.0f;
                }
            }
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < N; nb += NC) {
                int64_t n_end = nb + NC < N ? nb + NC : N;
                for (int64_t s = 0; s < slices; s++) {
                    int64_t k0 = s * KC, kc = K - k0 < KC ? K - k0 : KC;
                    const float *A = Ap + s * mc_max * KC;
                    for (int64_t n0 = nb; n0 < n_end; n0 += NR) {
                        pack_panel(kind, w, scale, scale16, minimum, G, K, n0, k0, kc, Bp);
                        for (int64_t p = 0; p < panels; p++)
                            kernel_6x16(kc, A + p * MR * kc, Bp, y + (m0 + p * MR) * N + n0, N, PANEL_ROWS(mc, p),
                                        bias ? bias + n0 : NULL, k0 > 0);
                    }
                }
            }
        }
        free(Bp);
    }
    free(Ap);
}
