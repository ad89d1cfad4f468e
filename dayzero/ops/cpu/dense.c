/* fp32 GEMM with fp32 or bf16 weights on the CPU (the LM head, routers, compressor projections:
 * dense weights whose math is fp32). Twin: ops/ref.py fp32_linear.
 * x fp32 [M, K], w [O, K] fp32 or bf16 (upcast exactly in registers), out fp32 [M, O].
 *
 * Register tiles of OB output rows x MB activation rows: each weight vector loaded once feeds MB
 * rows, and OB * MB independent accumulator chains hide the FMA latency (one chain per output,
 * as in a dot product, would leave the core waiting on each add). Decode (M = 1..2) uses 8 x 2
 * tiles, larger M 4 x 4; threads split the output rows in whole tiles. */
#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 wload(const void *w, int bf16, int64_t i) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)w + i);
}

static inline __m512 wload_tail(const void *w, int bf16, int64_t i, __mmask16 m) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)w + i);
}

/* out[m0 + i, o0 + j] for i < mb <= MB, j < ob <= OB (ob, mb below the tile: padded lanes reuse
 * row 0, their results are dropped) */
#define TILE(OB, MB)                                                                                      \
    static void tile_##OB##x##MB(const float *x, int64_t m0, int64_t mb, int64_t K, const void *w,         \
                                 int bf16, int64_t o0, int64_t ob, float *out, int64_t O) {                \
        __m512 acc[OB][MB];                                                                                 \
        const float *xr[MB];                                                                                \
        int64_t wr[OB];                                                                                     \
        for (int i = 0; i < MB; i++) xr[i] = x + (m0 + (i < mb ? i : 0)) * K;                               \
        for (int j = 0; j < OB; j++) wr[j] = (o0 + (j < ob ? j : 0)) * K;                                   \
        for (int j = 0; j < OB; j++)                                                                        \
            for (int i = 0; i < MB; i++) acc[j][i] = _mm512_setzero_ps();                                   \
        int64_t k = 0;                                                                                      \
        for (; k + 16 <= K; k += 16) {                                                                      \
            __m512 xv[MB];                                                                                  \
            for (int i = 0; i < MB; i++) xv[i] = _mm512_loadu_ps(xr[i] + k);                                \
            for (int j = 0; j < OB; j++) {                                                                  \
                __m512 wv = wload(w, bf16, wr[j] + k);                                                      \
                for (int i = 0; i < MB; i++) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);             \
            }                                                                                               \
        }                                                                                                   \
        if (k < K) {                                                                                        \
            __mmask16 msk = (__mmask16)((1u << (K - k)) - 1u);                                              \
            __m512 xv[MB];                                                                                  \
            for (int i = 0; i < MB; i++) xv[i] = _mm512_maskz_loadu_ps(msk, xr[i] + k);                    \
            for (int j = 0; j < OB; j++) {                                                                  \
                __m512 wv = wload_tail(w, bf16, wr[j] + k, msk);                                            \
                for (int i = 0; i < MB; i++) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);             \
            }                                                                                               \
        }                                                                                                   \
        for (int i = 0; i < mb; i++)                                                                        \
            for (int j = 0; j < ob; j++) out[(m0 + i) * O + o0 + j] = _mm512_reduce_add_ps(acc[j][i]);      \
    }
#else
/* portable C: the same tiles with 8 lanes per accumulator (the compiler vectorises the lanes) */
#define TILE(OB, MB)                                                                                      \
    static void tile_##OB##x##MB(const float *x, int64_t m0, int64_t mb, int64_t K, const void *w,         \
                                 int bf16, int64_t o0, int64_t ob, float *out, int64_t O) {                \
        float acc[OB][MB][8];                                                                               \
        const float *xr[MB];                                                                                \
        int64_t wr[OB];                                                                                     \
        for (int i = 0; i < MB; i++) xr[i] = x + (m0 + (i < mb ? i : 0)) * K;                               \
        for (int j = 0; j < OB; j++) wr[j] = (o0 + (j < ob ? j : 0)) * K;                                   \
        for (int j = 0; j < OB; j++)                                                                        \
            for (int i = 0; i < MB; i++)                                                                    \
                for (int l = 0; l < 8; l++) acc[j][i][l] = 0.0f;                                            \
        int64_t k = 0;                                                                                      \
        for (; k + 8 <= K; k += 8)                                                                          \
            for (int j = 0; j < OB; j++) {                                                                  \
                float wv[8];                                                                                \
                for (int l = 0; l < 8; l++) wv[l] = dz_load(w, wr[j] + k + l, bf16);                        \
                for (int i = 0; i < MB; i++)                                                                \
                    for (int l = 0; l < 8; l++) acc[j][i][l] += wv[l] * xr[i][k + l];                       \
            }                                                                                               \
        for (int i = 0; i < mb; i++)                                                                        \
            for (int j = 0; j < ob; j++) {                                                                  \
                float s = 0.0f;                                                                             \
                for (int l = 0; l < 8; l++) s += acc[j][i][l];                                              \
                for (int64_t t = k; t < K; t++) s += dz_load(w, wr[j] + t, bf16) * xr[i][t];                \
                out[(m0 + i) * O + o0 + j] = s;                                                             \
            }                                                                                               \
    }
#endif

TILE(8, 2)
TILE(4, 4)

void dz_fp32_linear(const float *x, int64_t M, int64_t K, const void *w, int64_t bf16, int64_t O, float *out,
                    int64_t nthreads) {
    int small = M <= 2;
    int64_t OB = small ? 8 : 4, MB = small ? 2 : 4;
    int64_t tiles = (O + OB - 1) / OB;
    int nt = dz_threads(nthreads, tiles);
    int64_t work = M * K * O;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && work >= (1 << 19))
    for (int64_t t = 0; t < tiles; t++) {
        int64_t o0 = t * OB, ob = O - o0 < OB ? O - o0 : OB;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int64_t mb = M - m0 < MB ? M - m0 : MB;
            if (small)
                tile_8x2(x, m0, mb, K, w, (int)bf16, o0, ob, out, O);
            else
                tile_4x4(x, m0, mb, K, w, (int)bf16, o0, ob, out, O);
        }
    }
}
