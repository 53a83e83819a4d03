/* ---- gelu (tanh form, "gelu_new") in place ----
 * tanh(u) = 1 - 2 / (exp(2u) + 1) with a vectorised exp: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
 * p a degree-6 Taylor polynomial (relative error below 2e-7 on that interval). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void phikit_gelu_tanh(float *x, int64_t n) {
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), a = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    int64_t vec = n / 8 * 8;
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < vec; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(a, v), _mm256_mul_ps(v, v), v));
        __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(_mm256_add_ps(u, u)), one)));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
    }
    for (int64_t i = vec; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w per row of n values (n % 8 == 0), in fp32 (transformers' RMSNorm). */
void phikit_rms_norm(const float *x, int64_t B, int64_t n, const float *w, float eps, float *y) {
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * n;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / (float)n + eps));
        for (int64_t i = 0; i < n; i += 8)
            _mm256_storeu_ps(y + b * n + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), r)));
    }
}

/* SwiGLU on a fused gate|up projection: y[b][i] = up * silu(gate), gate = gate_up[b][i], up = gate_up[b][n + i]
 * (n % 8 == 0); silu(g) = g / (1 + exp(-g)). */
void phikit_silu_mul(const float *gate_up, int64_t B, int64_t n, float *y) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t b = 0; b < B; b++) {
        const float *gr = gate_up + b * 2 * n, *ur = gr + n;
        for (int64_t i = 0; i < n; i += 8) {
            __m256 g = _mm256_loadu_ps(gr + i);
            __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g)); /* exp256 clamps to +-88 */
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(y + b * n + i, _mm256_mul_ps(_mm256_loadu_ps(ur + i), silu));
        }
    }
}
