/* ---- weight quantization while loading: quantize.py's reference quantizers (quantize_int8,
 * quantize_int4), the same fp32 operations in the same order, so the results are equal bit for bit; one
 * pass over each row instead of PyTorch's dozen whole-tensor passes (a 2.7B model: ~25 s -> ~1 s).
 * Source weights are f32, bf16 or f16 (dtype 0, 1, 2); rounding is to nearest even, as torch.round and
 * Tensor.half do. */
static inline __m256 load_any(int dtype, const void *w, int64_t i) {
    return dtype == 0 ? _mm256_loadu_ps((const float *)w + i)
         : dtype == 1 ? load_bf16((const uint16_t *)w + i) : load_f16((const uint16_t *)w + i);
}

/* q = round(w / scale) clamped to [-127, 127], scale = max(amax|w| / 127, 1e-12) per row; K % 32 == 0 */
void phikit_quantize_i8(int dtype, const void *w, int64_t N, int64_t K, int8_t *q, float *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int64_t row = n * K;
        __m256 amax = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8)
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load_any(dtype, w, row + k)));
        float s = fmaxf(hmax(amax) / 127.0f, 1e-12f);
        scale[n] = s;
        __m256 vs = _mm256_set1_ps(s);
        for (int64_t k = 0; k < K; k += 32) {
            __m256i c[4];
            for (int j = 0; j < 4; j++) {
                __m256 v = _mm256_round_ps(_mm256_div_ps(load_any(dtype, w, row + k + 8 * j), vs),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                c[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
            }
            _mm256_storeu_si256((__m256i *)(q + row + k), pack_i8(c[0], c[1], c[2], c[3]));
        }
    }
}

/* Per group of G in a row: minimum = fp16(min), scale = fp16(max((max - minimum) / 15, 1e-7)),
 * code = round((w - minimum) / scale) clamped to [0, 15], packed in blocks of 64 as the int4 layout above.
 * K % 64 == 0, G in 32..256 dividing K. */
void phikit_quantize_i4(int dtype, const void *w, int64_t N, int64_t K, int64_t G, uint8_t *packed,
                        uint16_t *scale16, uint16_t *minimum16) {
    const __m256 zero = _mm256_setzero_ps(), fifteen = _mm256_set1_ps(15.0f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int64_t row = n * K;
        float sc[K / 32], mn[K / 32]; /* per group; K / G <= K / 32 entries */
        for (int64_t g = 0; g < K / G; g++) {
            __m256 vmin = load_any(dtype, w, row + g * G), vmax = vmin;
            for (int64_t i = 8; i < G; i += 8) {
                __m256 v = load_any(dtype, w, row + g * G + i);
                vmin = _mm256_min_ps(vmin, v), vmax = _mm256_max_ps(vmax, v);
            }
            uint16_t low = _cvtss_sh(hmin(vmin), _MM_FROUND_TO_NEAREST_INT); /* rounded to nearest even */
            float lowf = _cvtsh_ss(low);
            uint16_t s = _cvtss_sh(fmaxf((hmax(vmax) - lowf) / 15.0f, 1e-7f), _MM_FROUND_TO_NEAREST_INT);
            minimum16[n * (K / G) + g] = low, scale16[n * (K / G) + g] = s;
            mn[g] = lowf, sc[g] = _cvtsh_ss(s);
        }
        for (int64_t b = 0; b < K; b += 64) {
            __m256i half[2];
            for (int h = 0; h < 2; h++) { /* codes of weights b + 32h .. b + 32h + 31 */
                int64_t g = (b + 32 * h) / G;
                __m256 vmn = _mm256_set1_ps(mn[g]), vsc = _mm256_set1_ps(sc[g]);
                __m256i c[4];
                for (int j = 0; j < 4; j++) {
                    __m256 v = _mm256_sub_ps(load_any(dtype, w, row + b + 32 * h + 8 * j), vmn);
                    v = _mm256_round_ps(_mm256_div_ps(v, vsc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    c[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), fifteen));
                }
                half[h] = pack_i8(c[0], c[1], c[2], c[3]);
            }
            _mm256_storeu_si256((__m256i *)(packed + (row + b) / 2),
                                _mm256_or_si256(half[0], _mm256_slli_epi16(half[1], 4)));
        }
    }
}

/* fp32/fp16 -> bf16, rounded to nearest even (NaN -> 0x7FC0), as Tensor.to(torch.bfloat16) does; PyTorch's
 * fp16 -> bf16 conversion runs at ~0.7 G elements/s here, a quarter of loading a checkpoint. */
void phikit_to_bf16(int dtype, const void *src, int64_t n, uint16_t *dst) {
    const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
    int64_t vec = n / 8 * 8;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < vec; i += 8) {
        __m256 v = load_any(dtype, src, i);
        __m256i bits = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(bits, 16), lsb)));
        r = _mm256_srli_epi32(r, 16);
        r = _mm256_blendv_epi8(nan, r, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8); /* 8 x u16 in the low half */
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_castsi256_si128(packed));
    }
    for (int64_t i = vec; i < n; i++) {
        float f = dtype == 0 ? ((const float *)src)[i] : f16(((const uint16_t *)src)[i]);
        uint32_t bits;
        memcpy(&bits, &f, 4);
        dst[i] = f != f ? 0x7FC0 : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
}

/* 8 fp32 -> 8 bf16 (round to nearest even; the weights here are finite) */
static inline __m128i to_bf16x8(__m256 v) {
    const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    __m256i bits = _mm256_castps_si256(v);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(bits, 16), lsb))), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
}

/* Rows n0..n1 of W (any kind above) as bf16, out[(n - n0) * K + k]: weight panels for PyTorch's bf16
 * matmul in prefill (phikit.backends.cpu, path "dequant_bf16"). K % 64 == 0. */
void phikit_dequant_bf16(int kind, const void *w, const float *scale, const uint16_t *scale16,
                         const uint16_t *minimum, int64_t G, int64_t K, int64_t n0, int64_t n1, uint16_t *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        uint16_t *o = out + (n - n0) * K;
        if (kind == KIND_BF16) {
            memcpy(o, (const uint16_t *)w + n * K, (size_t)K * 2);
            continue;
        }
        for (int64_t k = 0; k < K; k += 64) {
            __m256 v[8];
            if (kind == KIND_I4) {
                const uint8_t *wr = (const uint8_t *)w + (n * K + k) / 2;
                __m256i bytes = _mm256_loadu_si256((const __m256i *)wr), mask = _mm256_set1_epi8(0x0F);
                __m256i halves[2] = {_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask)};
                for (int h = 0; h < 2; h++) {
                    int64_t g = (k + h * 32) / G;
                    __m256 s = _mm256_set1_ps(f16(scale16[n * (K / G) + g])), mn = _mm256_set1_ps(f16(minimum[n * (K / G) + g]));
                    for (int part = 0; part < 4; part++) {
                        __m128i b = part < 2 ? _mm256_castsi256_si128(halves[h]) : _mm256_extracti128_si256(halves[h], 1);
                        if (part & 1) b = _mm_srli_si128(b, 8);
                        v[h * 4 + part] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), s, mn);
                    }
                }
            } else {
                for (int i = 0; i < 8; i++) {
                    int64_t at = n * K + k + 8 * i;
                    v[i] = kind == KIND_F32  ? load_f32((const float *)w + at)
                           : kind == KIND_F16 ? load_f16((const uint16_t *)w + at)
                                              : _mm256_mul_ps(load_i8((const int8_t *)w + at), _mm256_set1_ps(scale[n]));
                }
            }
            for (int i = 0; i < 8; i++) _mm_storeu_si128((__m128i *)(o + k + 8 * i), to_bf16x8(v[i]));
        }
    }
}
