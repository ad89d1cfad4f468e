/* fp32 GEMM with fp32 or bf16 weights on the CPU (the LM head, routers, compressor projections:
 * dense weights whose math is fp32). Twin: ops/ref.py fp32_linear.
 * x fp32 [M, K], w [O, K] fp32 or bf16 (upcast exactly in registers), out fp32 [M, O].
 * Weight rows are streamed once for up to MB activation rows; threads split the output rows. */
#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MB 4

static void rows_block(const float *x, int64_t m0, int64_t mb, int64_t K, const void *w, int bf16, int64_t o,
                       float *out, int64_t O) {
    float acc[MB];
#if defined(__AVX512F__)
    __m512 v[MB];
    for (int i = 0; i < mb; i++) v[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv;
        if (bf16) {
            __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + o * K + k));
            wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        } else {
            wv = _mm512_loadu_ps((const float *)w + o * K + k);
        }
        for (int i = 0; i < mb; i++) v[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (m0 + i) * K + k), v[i]);
    }
    for (int i = 0; i < mb; i++) acc[i] = _mm512_reduce_add_ps(v[i]);
#else
    float lane[MB][8];
    for (int i = 0; i < mb; i++)
        for (int l = 0; l < 8; l++) lane[i][l] = 0.0f;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        float wv[8];
        for (int l = 0; l < 8; l++) wv[l] = bf16 ? dz_bf16_to_f32(((const uint16_t *)w)[o * K + k + l])
                                                 : ((const float *)w)[o * K + k + l];
        for (int i = 0; i < mb; i++)
            for (int l = 0; l < 8; l++) lane[i][l] += wv[l] * x[(m0 + i) * K + k + l];
    }
    for (int i = 0; i < mb; i++) {
        float s = 0.0f;
        for (int l = 0; l < 8; l++) s += lane[i][l];
        acc[i] = s;
    }
#endif
    for (; k < K; k++) {
        float wk = bf16 ? dz_bf16_to_f32(((const uint16_t *)w)[o * K + k]) : ((const float *)w)[o * K + k];
        for (int i = 0; i < mb; i++) acc[i] += wk * x[(m0 + i) * K + k];
    }
    for (int i = 0; i < mb; i++) out[(m0 + i) * O + o] = acc[i];
}

void dz_fp32_linear(const float *x, int64_t M, int64_t K, const void *w, int64_t bf16, int64_t O, float *out,
                    int64_t nthreads) {
    int nt = dz_threads(nthreads, O);
    int64_t work = M * K * O;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && work >= (1 << 18))
    for (int64_t o = 0; o < O; o++)
        for (int64_t m0 = 0; m0 < M; m0 += MB)
            rows_block(x, m0, M - m0 < MB ? M - m0 : MB, K, w, (int)bf16, o, out, O);
}
