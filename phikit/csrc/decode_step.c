/* ---- a whole decoding step through the decoder layers, one call ----
 * Per layer: h = LayerNorm(x); attention (q/k/v gemv, rotary, cache write, attention, dense) and MLP (fc1,
 * gelu, fc2) both read h; x = (attn + mlp) + x, the order model.py adds them in. Doing this in C removes
 * ~25 PyTorch ops and Python calls per layer (~11 ms of Python per token on Phi-2, the time of ~15% of an
 * int4 step). The linears are the gemv kernels above, so each dot product is accumulated as in the
 * layer-by-layer path. */
typedef struct {
    int64_t kind, n, k, group;
    const void *w, *scale, *minimum;
    const float *bias;
} Linear;

enum { LAYER_PHI = 0, LAYER_PHI3 = 1 };

/* One decoder layer. LAYER_PHI (Phi-1/1.5/2): x + attention(LN(x)) + MLP(LN(x)), one LayerNorm (ln_weight,
 * ln_bias), q k v dense, gelu MLP fc1 fc2. LAYER_PHI3 (Phi-3/3.5/4): x + attention(RMSNorm(x)), then
 * + MLP(RMSNorm(x)) with ln_weight and ln2_weight (input_layernorm, post_attention_layernorm); q is the
 * fused qkv_proj (k, v unused), dense o_proj, fc1 the fused gate_up_proj (SwiGLU), fc2 down_proj. */
struct Layer {
    int64_t arch;
    const float *ln_weight, *ln_bias, *ln2_weight;
    Linear q, k, v, dense, fc1, fc2;
};

/* 0, or DECODE_UNKNOWN_KIND for a weight kind this library has no gemv for (never guessed as int4) */
static int64_t linear(const Linear *l, const float *x, int64_t M, float *y) {
    switch (l->kind) {
    case KIND_F32: phikit_gemv_f32(x, M, l->k, l->w, l->n, NULL, l->bias, y); return 0;
    case KIND_BF16: phikit_gemv_bf16(x, M, l->k, l->w, l->n, NULL, l->bias, y); return 0;
    case KIND_F16: phikit_gemv_f16(x, M, l->k, l->w, l->n, NULL, l->bias, y); return 0;
    case KIND_I8: phikit_gemv_i8(x, M, l->k, l->w, l->n, l->scale, l->bias, y); return 0;
    case KIND_I4: phikit_gemv_i4(x, M, l->k, l->w, l->n, l->group, l->scale, l->minimum, l->bias, y); return 0;
    case KIND_BF16_DP: phikit_gemv_bf16_dp(x, M, l->k, l->w, l->n, l->bias, y); return 0;
    default: return DECODE_UNKNOWN_KIND;
    }
}

/* y = (x - mean) / sqrt(var + eps) * w + b over n values (n % 8 == 0), two passes in fp32 as PyTorch does */
static void layer_norm(const float *x, int64_t n, const float *w, const float *b, float eps, float *y) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
    float mean = hsum(s) / (float)n;
    __m256 vm = _mm256_set1_ps(mean), ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
        ss = _mm256_fmadd_ps(d, d, ss);
    }
    __m256 rstd = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 8) {
        __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), rstd);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(d, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
    }
}

/* x (B, hidden) in place; caches (L, B, KV, S, D), each layer's (B, KV, S, D) contiguous and layer_cache
 * values after the previous one's (fp32, fp16 or int8 as cache_kind says; an int8 cache's scales (L, B, KV, S)
 * with layer_cache / D values a layer); cos/sin (B, R) at each row's position;
 * pos/first as in phikit_attention_decode; inter the MLP's width (Phi-3: half of gate_up_proj's rows).
 * Returns 0, DECODE_NO_MEMORY (a buffer could not be allocated: x untouched unless attention's failed, and
 * then the step is void) or DECODE_UNKNOWN_KIND (nothing done). */
int64_t phikit_decode_layers(const Layer *layers, int64_t L, float *x, int64_t B, int64_t hidden, int64_t inter,
                             float eps, int64_t H, int64_t KV, int64_t D, const float *cos, const float *sin,
                             int64_t R, void *k_cache, void *v_cache, int64_t S, int64_t layer_cache,
                             const int64_t *pos, const int64_t *first, int64_t cache_kind, float *k_scale,
                             float *v_scale) {
    int64_t layer_bytes = layer_cache * kv_size((int)cache_kind);
    int64_t layer_scales = cache_kind == CACHE_I8 ? layer_cache / D : 0;
    int64_t qn = H * D, kvn = KV * D;
    for (int64_t l = 0; l < L; l++) { /* every kind known before anything is written */
        const Layer *ly = layers + l;
        const Linear *all[6] = {&ly->q, &ly->dense, &ly->fc1, &ly->fc2, &ly->k, &ly->v};
        int used = ly->arch == LAYER_PHI ? 6 : 4;
        if (ly->arch != LAYER_PHI && ly->arch != LAYER_PHI3) return DECODE_UNKNOWN_KIND;
        for (int i = 0; i < used; i++)
            if (all[i]->kind < KIND_F32 || all[i]->kind > KIND_BF16_DP) return DECODE_UNKNOWN_KIND;
    }
    /* h: normed x; qkv: Phi-3's fused projection; q k v; a: attention; attn, mlp: the two branches; up: the
     * MLP's hidden (Phi-3: gate | up, 2 x inter); act: Phi-3's SwiGLU output */
    int64_t qkvn = qn + 2 * kvn;
    float *h = malloc(sizeof(float) * (size_t)(B * (hidden + qkvn + qkvn + qn + 2 * hidden + 3 * inter)));
    if (h == NULL) return DECODE_NO_MEMORY;
    float *qkv = h + B * hidden, *q = qkv + B * qkvn, *k = q + B * qn, *v = k + B * kvn, *a = v + B * kvn;
    float *attn = a + B * qn, *mlp = attn + B * hidden, *up = mlp + B * hidden, *act = up + 2 * B * inter;
    int64_t status = 0;
    for (int64_t l = 0; l < L; l++) {
        const Layer *ly = layers + l;
        void *kc = (char *)k_cache + l * layer_bytes, *vc = (char *)v_cache + l * layer_bytes;
        float *ks = k_scale ? k_scale + l * layer_scales : NULL, *vs = v_scale ? v_scale + l * layer_scales : NULL;
        if (ly->arch == LAYER_PHI) {
            for (int64_t b = 0; b < B; b++)
                layer_norm(x + b * hidden, hidden, ly->ln_weight, ly->ln_bias, eps, h + b * hidden);
            linear(&ly->q, h, B, q);
            linear(&ly->k, h, B, k);
            linear(&ly->v, h, B, v);
            status = phikit_attention_decode(q, k, v, cos, sin, B, H, KV, D, R, kc, vc, S, pos, first, a, cache_kind, ks, vs);
            if (status) break;
            linear(&ly->dense, a, B, attn);
            linear(&ly->fc1, h, B, up);
            phikit_gelu_tanh(up, B * inter);
            linear(&ly->fc2, up, B, mlp);
            for (int64_t i = 0; i < B * hidden; i++) x[i] = (attn[i] + mlp[i]) + x[i];
            continue;
        }
        phikit_rms_norm(x, B, hidden, ly->ln_weight, eps, h);
        linear(&ly->q, h, B, qkv);
        for (int64_t b = 0; b < B; b++) {
            const float *row = qkv + b * qkvn;
            memcpy(q + b * qn, row, sizeof(float) * (size_t)qn);
            memcpy(k + b * kvn, row + qn, sizeof(float) * (size_t)kvn);
            memcpy(v + b * kvn, row + qn + kvn, sizeof(float) * (size_t)kvn);
        }
        status = phikit_attention_decode(q, k, v, cos, sin, B, H, KV, D, R, kc, vc, S, pos, first, a, cache_kind, ks, vs);
        if (status) break;
        linear(&ly->dense, a, B, attn);
        for (int64_t i = 0; i < B * hidden; i++) x[i] = x[i] + attn[i];
        phikit_rms_norm(x, B, hidden, ly->ln2_weight, eps, h);
        linear(&ly->fc1, h, B, up);
        phikit_silu_mul(up, B, inter, act);
        linear(&ly->fc2, act, B, mlp);
        for (int64_t i = 0; i < B * hidden; i++) x[i] = x[i] + mlp[i];
    }
    free(h);
    return status;
}
