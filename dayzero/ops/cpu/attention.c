/* Sparse MQA attention over paged KV pools and the lightning-indexer scores on the CPU.
 * Twins: ops/ref.py sparse_attn_paged, indexer_scores_paged.
 *
 * Keys are read straight from the pools by index (no gathered copy). Per query, the keys named by
 * its index rows (-1 / out of range = none; holes are skipped) are taken in blocks of KB = 32:
 *   - the block's rows are transposed once into KT (QK^T operand, key-major lanes) and, for the
 *     attention, converted once to fp32 rows kf (PV operand); every head is served from them;
 *   - logits S[h][j] = q_h . k_j: 8 heads x 32 keys of accumulators, the key index in the vector
 *     lanes, q broadcast from memory. bf16 q with bf16 pools: vdpbf16ps on (d, d+1) pairs
 *     (products of bf16 values are exact in fp32: only the fp32 summation order differs from the
 *     twin; the instruction flushes denormals, |x| < 1.2e-38, to zero); otherwise fp32 FMA;
 *   - online softmax per head in fp32 (running max m, sum l), acc[h] = acc[h] * alpha + P k in
 *     fp32 (4 heads x 64 dims of accumulators per tile).
 * The sink enters only the denominator: out = acc e^(m-M) / (l e^(m-M) + e^(sink-M)), M = max(m,
 * sink); a query with no keys gets 0. Few queries (decode): each query's heads are split between
 * threads (never its keys: a query's output must not depend on the other queries of the call).
 * Pools of an FP8 cache (ops/kvfp8.py: e4m3 nope codes, one power-of-two scale byte per 64 of
 * them, rope dims in bf16 or fp32) are decoded row by row as they are read: to fp32 for the PV
 * operand and, on the vdpbf16ps path, to bf16 for QK^T (codes x 2^k and bf16 rope dims are exact
 * in both), so an FP8 pool gives the same output as a pool holding its decoded values.
 * The indexer shares the block transposition and QK tile; relu, the head weights and the head sum
 * are applied to the accumulators in registers, only fp32 [T] scores are written.
 * AVX-512 (+BF16) paths under #if, with a plain C fallback of the same blocking.
 * On the CPU both ops are compute-bound: 64 heads share each key row (S2: 64 multiply-adds per
 * byte of keys, S3: 32), so the tiles aim at the FMA / vdpbf16ps issue rate, not bandwidth. */
#include "common.h"

#include <stdio.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define DZ_AVX512 1
#if defined(__AVX512BF16__)
#define DZ_DPBF16 1
#endif
#endif

#define KB 32        /* keys per block */
#define DPAD 32      /* head dims padded to a multiple of this (zeros) */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---- scratch ---------------------------------------------------------------------------------
 * grow-only, 64-byte aligned, one per thread (libgomp keeps its workers, so each keeps its own). */
typedef struct {
    void *p;
    size_t n;
} dz_buf;

static _Thread_local dz_buf tls_work, tls_part;

static void *buf_get(dz_buf *b, size_t bytes) {
    if (b->n < bytes) {
        free(b->p);
        size_t n = (bytes + 4095) & ~(size_t)4095;
        b->p = aligned_alloc(64, n);
        if (!b->p) {
            fprintf(stderr, "dayzero attention kernels: out of memory (%zu bytes of scratch)\n", n);
            abort();
        }
        b->n = n;
    }
    return b->p;
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static inline int64_t idx_at(const void *idx, int i64, int64_t i) {
    return i64 ? ((const int64_t *)idx)[i] : (int64_t)((const int32_t *)idx)[i];
}

/* e^x for x <= 0 (0 below -87, and for -inf), ~2 ulp; branch-free so that loops vectorise */
static inline float exp_neg(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -87.0f ? -87.0f : x;
    float n = __builtin_rintf(xc * log2e);
    float r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return x < -87.0f ? 0.0f : p * s;
}

/* e4m3fn code -> value (0x7f / 0xff: NaN) */
static float e4m3_lut[256];

__attribute__((constructor)) static void e4m3_init(void) {
    for (int c = 0; c < 256; c++) {
        int e = (c >> 3) & 15, m = c & 7;
        float v = e ? ldexpf(1.0f + (float)m / 8.0f, e - 7) : ldexpf((float)m, -9);
        if (e == 15 && m == 7) v = NAN;
        e4m3_lut[c] = (c & 0x80) ? -v : v;
    }
}

/* UE8M0 scale byte -> 2^(b - 127) */
static inline float e8m0_f32(uint8_t b) {
    uint32_t u = b ? (uint32_t)b << 23 : 0x00400000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* pool row formats (source_t.fmt); bytes per stride unit */
enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_FP8_BF16 = 2, FMT_FP8_F32 = 3 };
static inline int64_t fmt_unit(int fmt) { return fmt == FMT_F32 ? 4 : fmt == FMT_BF16 ? 2 : 1; }

/* layout of an FP8-packed row (ops/kvfp8.py Fp8Layout), in bytes */
typedef struct {
    int64_t nope, rope_off, scale_off;
} fp8_layout_t;

/* fp32 copy of an FP8-packed row of n values (nope codes, then rope dims in bf16 or fp32), zero
 * padded to np; dstb (if not NULL): the same values as bf16 (exact: see the file comment) */
static void row_fp8(float *restrict dst, uint16_t *restrict dstb, const uint8_t *row, int rope_bf16,
                    const fp8_layout_t *lay, int64_t n, int64_t np) {
    const int64_t nope = lay->nope;
    for (int64_t b0 = 0; b0 < nope; b0 += 64) {
        float s = e8m0_f32(row[lay->scale_off + b0 / 64]);
        int64_t e = b0 + 64 < nope ? b0 + 64 : nope;
#pragma omp simd
        for (int64_t i = b0; i < e; i++) dst[i] = e4m3_lut[row[i]] * s;
    }
    const uint8_t *rp = row + lay->rope_off;
    if (rope_bf16) {
        for (int64_t i = 0; i < n - nope; i++) {
            uint16_t h;
            memcpy(&h, rp + 2 * i, 2);
            dst[nope + i] = dz_bf16_to_f32(h);
        }
    } else {
        memcpy(dst + nope, rp, (size_t)(n - nope) * 4);
    }
    for (int64_t i = n; i < np; i++) dst[i] = 0.0f;
    if (dstb) {
#pragma omp simd
        for (int64_t i = 0; i < np; i++) {
            uint32_t u;
            memcpy(&u, dst + i, 4);
            dstb[i] = (uint16_t)(u >> 16);
        }
    }
}

/* fp32 copy of n elements of a row (fp32 or bf16), zero padded to np */
static inline void row_f32(float *restrict dst, const void *src, int bf16, int64_t n, int64_t np) {
    if (bf16) {
        const uint16_t *h = (const uint16_t *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)h[i] << 16;
            float f;
            memcpy(&f, &u, 4);
            dst[i] = f;
        }
    } else {
        memcpy(dst, src, (size_t)n * 4);
    }
    for (int64_t i = n; i < np; i++) dst[i] = 0.0f;
}

#if DZ_AVX512
/* in-place transpose of 16 x 16 32-bit elements: r[i] lane c -> r[c] lane i */
ALWAYS_INLINE void tr16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int k = 0; k < 4; k++) {
        t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
        t[k + 4] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
        t[k + 8] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
        t[k + 12] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
        r[k + 4] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0x88);
        r[k + 12] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0xDD);
    }
}

/* KT [W][KB] 32-bit words: KT[w][j] = word w of key row j (rows[j], W words of which `valid` hold
 * data: the rest and rows j >= nk are zero). Word = one fp32 (fp32 rows) or a pair of bf16
 * (bf16 rows, for vdpbf16ps). `rows` are all fp32 or all bf16; n = elements per row. */
static void build_kt(uint32_t *restrict kt, const void *const *rows, int nk, int64_t n, int bf16, int64_t W) {
    for (int g = 0; g < (nk + 15) / 16; g++) {
        for (int64_t w0 = 0; w0 < W; w0 += 16) {
            __m512 r[16];
            int64_t left = n - (bf16 ? 2 * w0 : w0); /* elements left in a row from this chunk */
            for (int i = 0; i < 16; i++) {
                int j = g * 16 + i;
                if (j >= nk || left <= 0) {
                    r[i] = _mm512_setzero_ps();
                } else if (bf16) {
                    const uint16_t *p = (const uint16_t *)rows[j] + 2 * w0;
                    __mmask32 m = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
                    r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, p));
                } else {
                    const float *p = (const float *)rows[j] + w0;
                    __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
                    r[i] = _mm512_maskz_loadu_ps(m, p);
                }
            }
            tr16(r);
            for (int i = 0; i < 16; i++) _mm512_store_ps((float *)kt + (w0 + i) * KB + g * 16, r[i]);
        }
    }
}

/* acc[i][v] = sum_w q_i[w] (x) KT[w][16v..16v+15] over W words for HT heads and NV key vectors.
 * Word products: fp32 FMA, or vdpbf16ps on bf16 pairs (bf16 = 1). */
ALWAYS_INLINE void qk_tile(__m512 acc[8][2], const uint32_t *restrict q, int64_t qstride,
                           const uint32_t *restrict kt, int64_t W, int HT, int NV, int bf16) {
    for (int i = 0; i < HT; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t w = 0; w < W; w++) {
        __m512 k[2];
        for (int v = 0; v < NV; v++) k[v] = _mm512_load_ps((const float *)kt + w * KB + 16 * v);
#pragma GCC unroll 8
        for (int i = 0; i < HT; i++) {
            if (bf16) {
#if DZ_DPBF16
                __m512bh qb = (__m512bh)_mm512_set1_epi32((int)q[i * qstride + w]);
                for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], qb, (__m512bh)k[v]);
#endif
            } else {
                __m512 qb = _mm512_set1_ps(((const float *)q)[i * qstride + w]);
                for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(qb, k[v], acc[i][v]);
            }
        }
    }
}

#define QK_DISPATCH(BODY_HT_NV)                                              \
    switch (ht * 4 + nv * 2 + bf16) {                                        \
    case 8 * 4 + 2 * 2 + 0: BODY_HT_NV(8, 2, 0); break;                      \
    case 8 * 4 + 1 * 2 + 0: BODY_HT_NV(8, 1, 0); break;                      \
    case 4 * 4 + 2 * 2 + 0: BODY_HT_NV(4, 2, 0); break;                      \
    case 4 * 4 + 1 * 2 + 0: BODY_HT_NV(4, 1, 0); break;                      \
    case 2 * 4 + 2 * 2 + 0: BODY_HT_NV(2, 2, 0); break;                      \
    case 2 * 4 + 1 * 2 + 0: BODY_HT_NV(2, 1, 0); break;                      \
    case 1 * 4 + 2 * 2 + 0: BODY_HT_NV(1, 2, 0); break;                      \
    case 1 * 4 + 1 * 2 + 0: BODY_HT_NV(1, 1, 0); break;                      \
    case 8 * 4 + 2 * 2 + 1: BODY_HT_NV(8, 2, 1); break;                      \
    case 8 * 4 + 1 * 2 + 1: BODY_HT_NV(8, 1, 1); break;                      \
    case 4 * 4 + 2 * 2 + 1: BODY_HT_NV(4, 2, 1); break;                      \
    case 4 * 4 + 1 * 2 + 1: BODY_HT_NV(4, 1, 1); break;                      \
    case 2 * 4 + 2 * 2 + 1: BODY_HT_NV(2, 2, 1); break;                      \
    case 2 * 4 + 1 * 2 + 1: BODY_HT_NV(2, 1, 1); break;                      \
    case 1 * 4 + 2 * 2 + 1: BODY_HT_NV(1, 2, 1); break;                      \
    default: BODY_HT_NV(1, 1, 1); break;                                     \
    }

/* head tile of at most 8 among {8, 4, 2, 1} */
static inline int head_tile(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* S[h][j] = scale * q_h . k_j for all H heads, keys j < 16 nv (KT built by build_kt) */
static void qk_block(float *restrict S, const uint32_t *restrict q, int64_t qstride, int64_t H,
                     const uint32_t *restrict kt, int64_t W, int nk, int bf16, float scale) {
    int nv = (nk + 15) / 16;
    __m512 sc = _mm512_set1_ps(scale);
    for (int64_t h0 = 0; h0 < H;) {
        int ht = head_tile(H - h0);
        __m512 acc[8][2];
        const uint32_t *qh = q + h0 * qstride;
#define QK_BODY(HT, NV, BF)                                                                   \
    do {                                                                                      \
        qk_tile(acc, qh, qstride, kt, W, HT, NV, BF);                                         \
        for (int i = 0; i < HT; i++)                                                          \
            for (int v = 0; v < NV; v++)                                                      \
                _mm512_store_ps(S + (h0 + i) * KB + 16 * v, _mm512_mul_ps(acc[i][v], sc));    \
    } while (0)
        QK_DISPATCH(QK_BODY)
#undef QK_BODY
        h0 += ht;
    }
}

/* acc[h][:] = acc[h][:] * alpha[h] + sum_{j < nk} P[h][j] kf[j][:] (Dp a multiple of 32) */
static void pv_block(float *restrict acc, const float *restrict P, const float *restrict alpha,
                     const float *restrict kf, int nk, int64_t H, int64_t Dp) {
    for (int64_t c0 = 0; c0 < Dp; c0 += 64) {
        int cw = Dp - c0 >= 64 ? 4 : 2;
        for (int64_t h0 = 0; h0 < H; h0 += 4) {
            int ht = H - h0 >= 4 ? 4 : (int)(H - h0);
            __m512 a[4][4];
#define PV_BODY(HT, CW)                                                                          \
    do {                                                                                         \
        for (int i = 0; i < HT; i++) {                                                           \
            __m512 al = _mm512_set1_ps(alpha[h0 + i]);                                           \
            for (int c = 0; c < CW; c++)                                                         \
                a[i][c] = _mm512_mul_ps(al, _mm512_load_ps(acc + (h0 + i) * Dp + c0 + 16 * c));   \
        }                                                                                        \
        for (int j = 0; j < nk; j++) {                                                           \
            __m512 k[4];                                                                         \
            for (int c = 0; c < CW; c++) {                                                       \
                k[c] = _mm512_load_ps(kf + j * Dp + c0 + 16 * c);                                \
                __asm__("" : "+v"(k[c])); /* keep the row in a register, not folded in every FMA */ \
            }                                                                                    \
            for (int i = 0; i < HT; i++) {                                                       \
                __m512 p = _mm512_set1_ps(P[(h0 + i) * KB + j]);                                 \
                for (int c = 0; c < CW; c++) a[i][c] = _mm512_fmadd_ps(p, k[c], a[i][c]);        \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < HT; i++)                                                             \
            for (int c = 0; c < CW; c++) _mm512_store_ps(acc + (h0 + i) * Dp + c0 + 16 * c, a[i][c]); \
    } while (0)
            switch (ht * 8 + cw) {
            case 4 * 8 + 4: PV_BODY(4, 4); break;
            case 4 * 8 + 2: PV_BODY(4, 2); break;
            case 3 * 8 + 4: PV_BODY(3, 4); break;
            case 3 * 8 + 2: PV_BODY(3, 2); break;
            case 2 * 8 + 4: PV_BODY(2, 4); break;
            case 2 * 8 + 2: PV_BODY(2, 2); break;
            case 1 * 8 + 4: PV_BODY(1, 4); break;
            default: PV_BODY(1, 2); break;
            }
#undef PV_BODY
        }
    }
}

#else /* plain C */

static void qk_block_f32(float *restrict S, const float *restrict q, int64_t qstride, int64_t H,
                         const float *restrict kf, int64_t Dp, int nk, float scale) {
    for (int64_t h = 0; h < H; h++)
        for (int j = 0; j < nk; j++) {
            float s = 0.0f;
            const float *qh = q + h * qstride, *k = kf + j * Dp;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < Dp; d++) s += qh[d] * k[d];
            S[h * KB + j] = s * scale;
        }
}

static void pv_block(float *restrict acc, const float *restrict P, const float *restrict alpha,
                     const float *restrict kf, int nk, int64_t H, int64_t Dp) {
    for (int64_t h = 0; h < H; h++) {
        float *a = acc + h * Dp, al = alpha[h];
#pragma omp simd
        for (int64_t d = 0; d < Dp; d++) a[d] *= al;
        for (int j = 0; j < nk; j++) {
            float p = P[h * KB + j];
            const float *k = kf + j * Dp;
#pragma omp simd
            for (int64_t d = 0; d < Dp; d++) a[d] += p * k[d];
        }
    }
}
#endif

/* ---- sparse attention ------------------------------------------------------------------------ */
typedef struct {
    const void *pool, *idx;
    int fmt, i64; /* fmt: FMT_*; stride in units of fmt_unit(fmt) bytes */
    int64_t stride, istride, P, K;
} source_t;

typedef struct {
    const void *q;
    int q_bf16, dp; /* dp: bf16 pair path (q and every pool bf16 or FP8 with bf16 rope dims, AVX512-BF16) */
    int64_t N, H, D, Dp;
    source_t src[2];
    fp8_layout_t lay; /* of the FP8 sources */
    const float *sink;
    float scale;
} attn_t;

/* online-softmax update of heads' (m, l) with the block logits S [H][KB] (keys j < nk); S becomes
 * the probabilities e^(s - m_new), alpha[h] the rescale of the old accumulator */
#if DZ_AVX512
/* exp_neg on 16 lanes: x <= 0, 0 below -87 (and for -inf) */
ALWAYS_INLINE __m512 exp_neg16(__m512 x) {
    __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

static void softmax_block(float *restrict S, float *restrict m, float *restrict l, float *restrict alpha, int nk,
                          int64_t H) {
    __mmask16 k0 = nk >= 16 ? 0xffff : (__mmask16)((1u << nk) - 1);
    __mmask16 k1 = nk >= 32 ? 0xffff : nk > 16 ? (__mmask16)((1u << (nk - 16)) - 1) : 0;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t h = 0; h < H; h++) {
        float *s = S + h * KB;
        __m512 s0 = _mm512_mask_load_ps(ninf, k0, s), s1 = _mm512_mask_load_ps(ninf, k1, s + 16);
        float mb = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
        float mo = m[h], mn = mo > mb ? mo : mb;
        float al = mo == -INFINITY ? 0.0f : exp_neg(mo - mn);
        __m512 mv = _mm512_set1_ps(mn);
        __m512 p0 = exp_neg16(_mm512_sub_ps(s0, mv)), p1 = exp_neg16(_mm512_sub_ps(s1, mv));
        _mm512_store_ps(s, p0);
        _mm512_store_ps(s + 16, p1);
        m[h] = mn;
        l[h] = l[h] * al + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
        alpha[h] = al;
    }
}
#else
static void softmax_block(float *restrict S, float *restrict m, float *restrict l, float *restrict alpha, int nk,
                          int64_t H) {
    for (int64_t h = 0; h < H; h++) {
        float *s = S + h * KB;
        float mb = -INFINITY;
#pragma omp simd reduction(max : mb)
        for (int j = 0; j < nk; j++) mb = s[j] > mb ? s[j] : mb;
        float mo = m[h], mn = mo > mb ? mo : mb;
        float al = mo == -INFINITY ? 0.0f : exp_neg(mo - mn);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < KB; j++) {
            float p = j < nk ? exp_neg(s[j] - mn) : 0.0f;
            s[j] = p;
            sum += p;
        }
        m[h] = mn;
        l[h] = l[h] * al + sum;
        alpha[h] = al;
    }
}
#endif

/* one query n, heads [h0, h1), over every key of the concatenated sources: (m, l, acc) with acc
 * [h1 - h0][Dp]. A head's arithmetic does not depend on which heads share the call. */
static void attn_range(const attn_t *a, int64_t n, int64_t h0, int64_t h1, float *restrict acc, float *restrict m,
                       float *restrict l) {
    const int64_t H = h1 - h0, D = a->D, Dp = a->Dp, lo = 0, hi = a->src[0].K + a->src[1].K;
    float *ws = (float *)buf_get(&tls_work, sizeof(float) * (size_t)(H * Dp + Dp * KB + KB * Dp + H * KB + H +
                                                                     KB * Dp / 2 + 64));
    float *qf = ws, *kt = qf + H * Dp, *kf = kt + Dp * KB, *S = kf + KB * Dp, *alpha = S + H * KB;
    uint16_t *kb = (uint16_t *)(alpha + H); /* bf16 copies of decoded FP8 rows (dp path) */
    int dp = a->dp;
    /* q in the QK word format: fp32 (Dp words a row) or bf16 pairs (Dp / 2 words a row) */
    if (dp) {
        uint16_t *qb = (uint16_t *)qf;
        for (int64_t h = 0; h < H; h++) {
            memcpy(qb + h * Dp, (const uint16_t *)a->q + (n * a->H + h0 + h) * D, (size_t)D * 2);
            memset(qb + h * Dp + D, 0, (size_t)(Dp - D) * 2);
        }
    } else {
        for (int64_t h = 0; h < H; h++)
            row_f32(qf + h * Dp, (const char *)a->q + (n * a->H + h0 + h) * D * (a->q_bf16 ? 2 : 4), a->q_bf16, D, Dp);
    }
    memset(acc, 0, sizeof(float) * (size_t)(H * Dp));
    for (int64_t h = 0; h < H; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    const void *rows[KB];
    int rbf[KB];
    int nk = 0;
    int64_t K0 = a->src[0].K;
    for (int64_t pos = lo; pos <= hi; pos++) {
        if (pos < hi) {
            const source_t *s = &a->src[pos < K0 ? 0 : 1];
            int64_t k = pos < K0 ? pos : pos - K0;
            int64_t r = idx_at(s->idx, s->i64, n * s->istride + k);
            if (r < 0 || r >= s->P) continue;
            rows[nk] = (const char *)s->pool + r * s->stride * fmt_unit(s->fmt);
            rbf[nk] = s->fmt;
            if (++nk < KB) continue;
        }
        if (nk == 0) break;
        for (int j = 0; j < nk; j++) {
            if (rbf[j] >= FMT_FP8_BF16) {
                row_fp8(kf + j * Dp, dp ? kb + j * Dp : NULL, (const uint8_t *)rows[j], rbf[j] == FMT_FP8_BF16, &a->lay,
                        D, Dp);
                if (dp) rows[j] = kb + j * Dp;
            } else {
                row_f32(kf + j * Dp, rows[j], rbf[j], D, Dp);
            }
        }
#if DZ_AVX512
        if (dp) {
            build_kt((uint32_t *)kt, rows, nk, D, 1, Dp / 2);
            qk_block(S, (const uint32_t *)qf, Dp / 2, H, (const uint32_t *)kt, Dp / 2, nk, 1, a->scale);
        } else {
            const void *frows[KB];
            for (int j = 0; j < nk; j++) frows[j] = kf + j * Dp;
            build_kt((uint32_t *)kt, frows, nk, Dp, 0, Dp);
            qk_block(S, (const uint32_t *)qf, Dp, H, (const uint32_t *)kt, Dp, nk, 0, a->scale);
        }
#else
        (void)kt;
        qk_block_f32(S, qf, Dp, H, kf, Dp, nk, a->scale);
#endif
        softmax_block(S, m, l, alpha, nk, H);
        pv_block(acc, S, alpha, kf, nk, H, Dp);
        nk = 0;
    }
}

static void attn_store(void *out, int bf16, const float *acc, float f, int64_t D) {
    if (bf16) {
        uint16_t *o = (uint16_t *)out;
        for (int64_t d = 0; d < D; d++) o[d] = dz_f32_to_bf16(acc[d] * f);
    } else {
        float *o = (float *)out;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = acc[d] * f;
    }
}

/* q [N,H,D] (bf16 flag); sources i = 0, 1: pool [P_i rows, stride_i units apart] in format fmt_i
 * (FMT_*: fp32, bf16, or FP8-packed rows of the layout (nope, rope_off, scale_off) with bf16 or
 * fp32 rope dims; stride in bytes for those), idx [N rows istride_i apart, K_i] int32/int64 (i64
 * flag), -1 = none (K_1 = 0: one source); sink fp32 [H]; out [N,H,D] in q's dtype. */
void dz_sparse_attn(const void *q, int64_t q_bf16, int64_t N, int64_t H, int64_t D,
                    const void *pool0, int64_t bf0, int64_t stride0, int64_t P0, const void *idx0, int64_t i64_0,
                    int64_t istride0, int64_t K0,
                    const void *pool1, int64_t bf1, int64_t stride1, int64_t P1, const void *idx1, int64_t i64_1,
                    int64_t istride1, int64_t K1,
                    const float *sink, float scale, void *out, int64_t nthreads,
                    int64_t nope, int64_t rope_off, int64_t scale_off) {
    if (N <= 0 || H <= 0 || D <= 0) return;
    attn_t a;
    a.q = q;
    a.q_bf16 = (int)q_bf16;
    a.N = N, a.H = H, a.D = D, a.Dp = round_up(D, DPAD);
    a.src[0] = (source_t){pool0, idx0, (int)bf0, (int)i64_0, stride0, istride0, P0, K0};
    a.src[1] = (source_t){pool1, idx1, (int)bf1, (int)i64_1, stride1, istride1, P1, K1};
    a.lay = (fp8_layout_t){nope, rope_off, scale_off};
    a.sink = sink;
    a.scale = scale;
#if DZ_DPBF16
    a.dp = q_bf16 && (K0 == 0 || bf0 == FMT_BF16 || bf0 == FMT_FP8_BF16) &&
           (K1 == 0 || bf1 == FMT_BF16 || bf1 == FMT_FP8_BF16);
#else
    a.dp = 0;
#endif
    const int64_t Kt = K0 + K1, Dp = a.Dp;
    /* threads: a multiply-add count below ~1/4 M runs on one (a fork costs more than it saves) */
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    if (N * Kt * H * Dp * 2 < (1 << 18)) nt = 1;
    /* few queries (decode): each query's heads are cut into G groups (>= 4 heads each) so that N * G
     * tasks fill the threads. Heads, never keys: a split of the key range would merge partial
     * softmaxes in an order that depends on the number of queries in the call, and so would a
     * query's output (batch invariance); a head's result does not depend on the heads beside it. */
    int64_t G = 1;
    if (nt > 1 && N < 4 * nt && N % nt) {
        int64_t g = N, b = nt;
        while (b) { int64_t t = g % b; g = b; b = t; }
        G = nt / g;
        if (G > H / 4) G = H / 4 > 1 ? H / 4 : 1;
    }
    const int64_t tasks = N * G;
    if (nt > tasks) nt = tasks;
    const int ob = (int)q_bf16;
#pragma omp parallel for num_threads((int)nt) schedule(static) if (nt > 1)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t n = t / G, h0 = H * (t % G) / G, h1 = H * (t % G + 1) / G;
        float *w = (float *)buf_get(&tls_part, sizeof(float) * (size_t)(H * (Dp + 2)));
        float *acc = w, *m = w + H * Dp, *l = m + H;
        attn_range(&a, n, h0, h1, acc, m, l);
        for (int64_t i = 0; i < h1 - h0; i++) {
            const float sk = sink[h0 + i], mx = m[i] > sk ? m[i] : sk;
            const float c = m[i] == -INFINITY ? 0.0f : expf(m[i] - mx);
            const float f = c / (l[i] * c + expf(sk - mx));
            attn_store((char *)out + (n * H + h0 + i) * D * (ob ? 2 : 4), ob, acc + i * Dp, f, D);
        }
    }
}

/* ---- indexer scores -------------------------------------------------------------------------- */
#define IDX_CHUNK 256 /* keys per task */

/* q [N,H,D] (bf16 flag), w fp32 [N,H], pool [P rows, stride apart] (bf16 flag), idx [N rows istride
 * apart, T] int32/int64 -> out fp32 [N,T] = sum_h w[n,h] relu(q[n,h] . pool[idx[n,t]]), -inf where
 * idx < 0 (or >= P). */
void dz_indexer_scores(const void *q, int64_t q_bf16, int64_t N, int64_t H, int64_t D, const float *wts,
                       const void *pool, int64_t p_bf16, int64_t stride, int64_t P, const void *idx, int64_t i64,
                       int64_t istride, int64_t T, float *out, int64_t nthreads) {
    if (N <= 0 || T <= 0) return;
    const int64_t Dp = round_up(D, DPAD), chunks = (T + IDX_CHUNK - 1) / IDX_CHUNK, tasks = N * chunks;
#if DZ_DPBF16
    const int dp = q_bf16 && p_bf16;
#else
    const int dp = 0;
#endif
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    if (N * T * H * Dp < (1 << 18)) nt = 1;
    if (nt > tasks) nt = tasks;
    const int esz = p_bf16 ? 2 : 4;
#pragma omp parallel for num_threads((int)nt) schedule(static) if (nt > 1)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t n = task / chunks, t0 = task % chunks * IDX_CHUNK;
        int64_t t1 = t0 + IDX_CHUNK < T ? t0 + IDX_CHUNK : T;
        float *ws = (float *)buf_get(&tls_work, sizeof(float) * (size_t)(H * Dp + Dp * KB + KB * Dp + H * KB + 64));
        float *qf = ws, *kt = qf + H * Dp, *kf = kt + Dp * KB, *S = kf + KB * Dp;
        (void)kt;
        (void)S;
        if (dp) {
            uint16_t *qb = (uint16_t *)qf;
            for (int64_t h = 0; h < H; h++) {
                memcpy(qb + h * Dp, (const uint16_t *)q + (n * H + h) * D, (size_t)D * 2);
                memset(qb + h * Dp + D, 0, (size_t)(Dp - D) * 2);
            }
        } else {
            for (int64_t h = 0; h < H; h++)
                row_f32(qf + h * Dp, (const char *)q + (n * H + h) * D * (q_bf16 ? 2 : 4), (int)q_bf16, D, Dp);
        }
        const float *wn = wts + n * H;
        for (int64_t b = t0; b < t1; b += KB) {
            int nk = t1 - b < KB ? (int)(t1 - b) : KB;
            const void *rows[KB];
            int ok[KB], any = 0;
            for (int j = 0; j < nk; j++) {
                int64_t r = idx_at(idx, (int)i64, n * istride + b + j);
                ok[j] = r >= 0 && r < P;
                any |= ok[j];
                rows[j] = (const char *)pool + (ok[j] ? r : 0) * stride * esz;
            }
            float *o = out + n * T + b;
            if (!any) {
                for (int j = 0; j < nk; j++) o[j] = -INFINITY;
                continue;
            }
            float res[KB];
#if DZ_AVX512
            if (dp) {
                build_kt((uint32_t *)kt, rows, nk, D, 1, Dp / 2);
            } else {
                const void *frows[KB];
                for (int j = 0; j < nk; j++) {
                    row_f32(kf + j * Dp, rows[j], (int)p_bf16, D, Dp);
                    frows[j] = kf + j * Dp;
                }
                build_kt((uint32_t *)kt, frows, nk, Dp, 0, Dp);
            }
            int64_t W = dp ? Dp / 2 : Dp;
            int nv = (nk + 15) / 16;
            __m512 r[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t h0 = 0; h0 < H;) {
                int ht = head_tile(H - h0), bf16 = dp;
                __m512 acc[8][2];
                const uint32_t *qh = (const uint32_t *)qf + h0 * W;
#define IX_BODY(HT, NV, BF)                                                                             \
    do {                                                                                                \
        qk_tile(acc, qh, W, (const uint32_t *)kt, W, HT, NV, BF);                                       \
        for (int i = 0; i < HT; i++) {                                                                  \
            __m512 wv = _mm512_set1_ps(wn[h0 + i]);                                                     \
            for (int v = 0; v < NV; v++)                                                                \
                r[v] = _mm512_fmadd_ps(wv, _mm512_max_ps(acc[i][v], _mm512_setzero_ps()), r[v]);        \
        }                                                                                               \
    } while (0)
                QK_DISPATCH(IX_BODY)
#undef IX_BODY
                h0 += ht;
            }
            _mm512_storeu_ps(res, r[0]);
            _mm512_storeu_ps(res + 16, r[1]);
#else
            for (int j = 0; j < nk; j++) row_f32(kf + j * Dp, rows[j], (int)p_bf16, D, Dp);
            for (int j = 0; j < nk; j++) res[j] = 0.0f;
            for (int64_t h = 0; h < H; h++) {
                const float *qh = qf + h * Dp;
                for (int j = 0; j < nk; j++) {
                    const float *k = kf + j * Dp;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < Dp; d++) s += qh[d] * k[d];
                    res[j] += wn[h] * (s > 0.0f ? s : 0.0f);
                }
            }
#endif
            for (int j = 0; j < nk; j++) o[j] = ok[j] ? res[j] : -INFINITY;
        }
    }
}

/* ---- packed entry points ---------------------------------------------------------------------
 * The arguments above as one block of int64 (pointers as addresses, the scale as a double), so the
 * Python wrappers pay for one ctypes argument instead of ~25 (attention.py packs them). */
void dz_sparse_attn_packed(const int64_t *a) {
    double scale;
    memcpy(&scale, a + 27, 8);
    dz_sparse_attn((const void *)a[0], a[1], a[2], a[3], a[4],
                   (const void *)a[5], a[6], a[7], a[8], (const void *)a[9], a[10], a[11], a[12],
                   (const void *)a[13], a[14], a[15], a[16], (const void *)a[17], a[18], a[19], a[20],
                   (const float *)a[21], (float)scale, (void *)a[22], a[23], a[24], a[25], a[26]);
}

void dz_indexer_scores_packed(const int64_t *a) {
    dz_indexer_scores((const void *)a[0], a[1], a[2], a[3], a[4], (const float *)a[5], (const void *)a[6], a[7],
                      a[8], a[9], (const void *)a[10], a[11], a[12], a[13], (float *)a[14], a[15]);
}
