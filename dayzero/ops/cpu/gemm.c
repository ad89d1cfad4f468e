/* Quantized-weight GEMMs on the CPU: FP8 block-scaled linears, MXFP4 linears and the routed-expert
 * MoE over FP4 expert stacks. Twins: ops/ref.py fp8_linear, fp4_linear, moe_experts.
 *
 * Weights are decoded in registers, never materialised, and every decoded weight equals the twin's
 * dequantised W (its fp32 product v * s, rounded to bf16 where the twin casts W to a bf16 x):
 * - FP4 (e2m1 nibbles, low nibble = even k; a scale per 32 along k): per group the 16 signed e2m1
 *   values times the group's scale form a table that each byte indexes twice (vpermps reads the
 *   low 4 index bits: byte & 15 needs no mask, byte >> 4 is the high nibble). Activations are
 *   de-interleaved per group (evens, then odds), so nibbles are never interleaved in registers.
 *   bf16 x (AVX512-BF16): a 32-entry bf16 table covers two groups, vpermw decodes 32 weights per
 *   instruction and vdpbf16ps multiplies pairs exactly, accumulating in fp32.
 * - FP8 e4m3 (128x128 block scales, V4; or 32x32, V4.1: QMat.b32, dz_fp8_linear_b; the block side
 *   is a compile-time constant of each micro-kernel, `lg` = log2 of it, so V4's 128 path is the
 *   code it was): byte s.eeee.mmm moved to fp16 bits s.0eeee.mmm0000000 is the
 *   value times 2^-8 (subnormals included), converted by vcvtph2ps and multiplied by the block
 *   scale times 2^8. The NaN codes 0x7f / 0xff decode as +-480 in the SIMD paths (as in the Triton
 *   kernel; checkpoints never contain them). bf16 x (AVX512-BF16, any number of rows): the scaled
 *   weights are rounded to bf16 (exact for E8M0 scales; the twin's W for fp32 scales) and
 *   vdpbf16ps takes 32 per instruction.
 * - Where a block's E8M0 scale byte allows it (FP8: 7..246 over a row block; FP4: 2..252 over a
 *   row), the vdpbf16ps decode kernels form the same bf16 words by integer operations instead
 *   (fastdecode.h: about half the micro-ops per FP8 weight; FP4 tables without multiplies).
 * Products are exact inside FMAs / vdpbf16ps, sums are fp32, one rounding to x.dtype at the end:
 * results differ from the twins only by fp32 summation order (bf16: and the output rounding of
 * values that differ by it).
 *
 * Batch invariance: every (weight row, activation row) sum is formed in one order whatever the
 * number of rows in the call, the path (decode or many rows) or the block a row falls in: 16 lanes
 * along K, two accumulators (fp32: alternate 16-position halves of each 32; bf16 pairs: alternate
 * 32-position halves of each 64), over all of K, reduced once at the end. So a request's logits
 * do not depend on what else is in the step (tests/engine/test_batch_invariance.py).
 * Blocking (decode, M < ROWS_MIN): one weight row pair shares each activation load with up to
 * MR4 = 4 activation rows (2 x 2 x 4 accumulators; bf16 x with the integer decode: 5-8 rows run
 * one weight row against all of them, 2 x 8, so each weight is decoded once); work items are tiles
 * of <= TILE output rows of blocks of MB = 8 activation rows; K is walked whole. Weight streams are
 * software-prefetched PF bytes ahead. The MoE's decode-sized blocks (bf16 x, E8M0 scales) pair
 * rows of separate streams instead (gate row o with up row o, the halves of a down tile: each
 * stream sequential in memory, see moe_pair_bf), the same sums bit for bit. The micro-kernels
 * keep their accumulators in arrays that gcc
 * holds in registers only across a branch-free innermost loop: their loops are shaped for that
 * (whole 128-weight blocks for FP8, flat group pairs for FP4), with partial blocks after the loop.
 * Many rows (prefill, M >= ROWS_MIN; MoE: an expert's pairs; AVX-512 builds): each weight is
 * decoded once per call into a per-thread buffer of OP rows and a micro-kernel in the decode order
 * runs every row against it: see "many activation rows" below.
 * SIMD: AVX-512 (F+BW+VL, +BF16 for the bf16 kernels), else AVX2+FMA+F16C, else plain C.
 * Threads: OpenMP (torch's libgomp), nthreads from torch.get_num_threads(); work items are
 * dynamically scheduled; calls under PAR_MIN multiply-adds stay on the caller's thread. Results
 * do not depend on the thread count (no reduction is split between threads).
 */
#include "common.h"

#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DZ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DZ_AVX2 1
#endif
#if DZ_AVX512 && defined(__AVX512BF16__)
#define DZ_BF16DOT 1 /* bf16 activations x FP4 weights on vdpbf16ps */
#endif

#define AI static inline __attribute__((always_inline))
#define MB 8    /* activation rows sharing each decoded weight vector */
#define TILE 64 /* output rows per work item at most (results: res[m * TILE + row]) */
#define SUB 16  /* rows whose K-chunks are walked together (weight streams in flight) */
#ifndef PF
#define PF 2048 /* software prefetch distance in weight bytes (rounded up to whole rows) */
#endif
#ifndef FP8_PF2
#define FP8_PF2 8192 /* fp8_micro_bf's byte tables: a second prefetch (into L2) this far ahead where
                      * it is farther than PF's (rows shorter than 4 KiB; docs/BENCHMARKS.md) */
#endif
#define PAR_MIN ((int64_t)1 << 20) /* multiply-adds below which a call stays on the caller's thread */

/* tests: 0 sends bf16 activations through the fp32 kernels as on CPUs without AVX512-BF16 */
static int use_bf16dot = 1;

void dz_gemm_options(int64_t bf16dot) { use_bf16dot = (int)bf16dot; }

/* tests / bench: 0 decodes weights by the float route only, 2 FP8 by the integer route without its
 * byte tables (fastdecode.h: the same bf16 words every way) */
static int use_fast_decode = 1;

void dz_gemm_fast_decode(int64_t on) { use_fast_decode = (int)on; }

/* tests / bench: 0 runs the MoE's decode-sized blocks through the tile walk (the row pairs of
 * moe_pair_bf off: the same results, see there) */
static int use_moe_streams = 1;

void dz_gemm_moe_streams(int64_t on) { use_moe_streams = (int)on; }

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
static float E4M3[256];

__attribute__((constructor)) static void init_tables(void) {
    for (int i = 0; i < 256; i++) E4M3[i] = dz_e4m3((uint8_t)i);
}

static inline float scale_at(const void *s, int64_t i, int e8m0) {
    return e8m0 ? dz_e8m0(((const uint8_t *)s)[i]) : ((const float *)s)[i];
}

static inline float round_to(float v, int bf16) {
    return bf16 ? dz_bf16_to_f32(dz_f32_to_bf16(v)) : v;
}

static void *dz_alloc(int64_t bytes) {
    size_t n = ((size_t)(bytes > 0 ? bytes : 1) + 63) & ~(size_t)63;
    return aligned_alloc(64, n);
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Activation rows for the FP4 kernels, fp32, de-interleaved per 32-group (one scale group):
 * dst[32g + j] = x[32g + 2j] (the low nibbles' k), dst[32g + 16 + j] = x[32g + 2j + 1], j < 16, so a
 * K-chunk of whole groups is contiguous and a group's two halves are one vector load each. */
static inline int64_t g32_pos(int64_t k) { return (k & ~(int64_t)31) + ((k & 1) << 4) + ((k & 31) >> 1); }

static void split_row(const void *x, int bf16, int64_t K, float *dst) {
    for (int64_t g = 0; g < K; g += 32)
        for (int j = 0; j < 16; j++) {
            dst[g + j] = dz_load(x, g + 2 * j, bf16);
            dst[g + 16 + j] = dz_load(x, g + 2 * j + 1, bf16);
        }
}

/* row stride of the fp32 activation buffers: K rounded up to 16 floats, plus 16 so that rows
 * are never a multiple of 4 KiB apart (L1 set aliasing when several rows stream together) */
static inline int64_t pad_ld(int64_t K) { return ((K + 15) & ~(int64_t)15) + 16; }

/* bf16 activation rows for the vdpbf16ps FP4 kernel, de-interleaved per 64 (two scale groups):
 * dst[64c + i] = x[64c + 2i], dst[64c + 32 + i] = x[64c + 2i + 1], i < 32, zeros past K; the
 * row stride (in elements) is K rounded up to 64 plus 32 (no 4 KiB aliasing between rows) */
static inline int64_t g64_pos(int64_t k) { return (k & ~(int64_t)63) + ((k & 1) << 5) + ((k & 63) >> 1); }
static inline int64_t pad_ld64(int64_t K) { return ((K + 63) & ~(int64_t)63) + 32; }

static void split64_row(const uint16_t *x, int64_t K, uint16_t *dst) {
    const int64_t Kp = (K + 63) & ~(int64_t)63;
    for (int64_t c = 0; c < Kp; c += 64)
        for (int i = 0; i < 32; i++) {
            const int64_t e = c + 2 * i;
            dst[c + i] = e < K ? x[e] : 0;
            dst[c + 32 + i] = e + 1 < K ? x[e + 1] : 0;
        }
}

/* ---- FP8 activation simulation (ref.fp8_act_sim, bit-exact) ------------------------------------ */
static inline float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* nearest e4m3 value of |v| <= 448, ties to even, as fp32: v in units of the e4m3 spacing there
 * rounded to an integer by adding 1.5*2^23 (ISO C11 build: no contraction, no reassociation) */
static inline float e4m3_round(float v) {
    float a = fabsf(v);
    uint32_t e = (f2u(a < 0x1p-6f ? 0x1p-6f : a) >> 23) & 0xff;
    float r = (v * u2f((257u - e) << 23) + 12582912.0f) - 12582912.0f;
    return copysignf(r, v) * u2f((e - 3u) << 23); /* a value rounding to zero keeps its sign */
}

/* ref.pow2_scale(amax, 448, 1e-4): smallest power of two s with amax / s <= 448 */
static inline float fp8_scale(float amax) {
    float a = amax < 1e-4f ? 1e-4f : amax;
    uint32_t t = f2u(a / 448.0f);
    uint32_t e = ((t >> 23) & 0xff) + ((t & 0x7fffff) != 0);
    float s = u2f(e << 23);
    if (a / s > 448.0f) s *= 2.0f;
    if (a / (s * 0.5f) <= 448.0f) s *= 0.5f;
    return s;
}

/* simulate one block of n values in place (ref.fp8_act_sim of a 128-block; the twin's zero
 * padding of a partial block changes nothing) */
static void fp8_sim_block(float *p, int64_t n) {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(p[i]);
        bad |= !(a <= 3.4028235e38f);
        amax = a > amax ? a : amax;
    }
    if (bad) { /* NaN or inf in the block: the twin's scale is NaN / inf, every value NaN */
        for (int64_t i = 0; i < n; i++) p[i] = NAN;
        return;
    }
    const float s = fp8_scale(amax);
    int64_t i = 0;
#if defined(__AVX512F__)
    /* the same arithmetic 16 at a time; x / s == x * (1 / s) exactly (s a power of two) */
    const __m512 vs = _mm512_set1_ps(s), vinv = _mm512_set1_ps(1.0f / s), big = _mm512_set1_ps(12582912.0f);
    const __m512i emin = _mm512_set1_epi32(121), absm = _mm512_set1_epi32(0x7fffffff);
    for (; i < n; i += 16) {
        const __mmask16 km = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, p + i), vinv);
        const __m512i e = _mm512_max_epi32(_mm512_srli_epi32(_mm512_and_si512(_mm512_castps_si512(v), absm), 23), emin);
        const __m512 up = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(257), e), 23));
        const __m512 ulp = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(3)), 23));
        __m512 r = _mm512_sub_ps(_mm512_fmadd_ps(v, up, big), big); /* v * up is exact: one rounding */
        r = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(r), _mm512_castps_si512(v), absm, 0xE4));
        _mm512_mask_storeu_ps(p + i, km, _mm512_mul_ps(_mm512_mul_ps(r, ulp), vs));
    }
#endif
    for (; i < n; i++) p[i] = e4m3_round(p[i] / s) * s;
}

/* the same on bf16 values (results are e4m3 values times powers of two: exact in bf16) */
static void fp8_sim_block_bf16(uint16_t *p, int64_t n) {
    float buf[128];
    for (int64_t i = 0; i < n; i++) buf[i] = dz_bf16_to_f32(p[i]);
    fp8_sim_block(buf, n);
    for (int64_t i = 0; i < n; i++) p[i] = dz_f32_to_bf16(buf[i]);
}

/* rows [M, K] (fp32 or bf16, row stride ldx elements) -> ref.fp8_act_sim(x, 128) [M, K], same dtype */
void dz_gemm_fp8_sim(const void *x, int64_t ldx, int64_t bf16, int64_t M, int64_t K, void *out) {
    float *buf = (float *)dz_alloc(K * 4);
    for (int64_t m = 0; m < M; m++) {
        dz_load_row((const char *)x + m * ldx * (bf16 ? 2 : 4), K, (int)bf16, buf);
        for (int64_t k = 0; k < K; k += 128) fp8_sim_block(buf + k, min64(128, K - k));
        dz_store_row((char *)out + m * K * (bf16 ? 2 : 4), K, (int)bf16, buf);
    }
    free(buf);
}

/* ---- micro-kernels: out[m * TILE + r] += W[row r, chunk] . x[m, chunk], r < nr (<= 2), m < mb -------
 * fp4: w = n/2 packed bytes per row (rows ldw bytes apart), s = n/32 group scales (E8M0 bytes or
 *      fp32; rows lds entries apart), xr[m] rows in the split_row layout, n a multiple of 32.
 * fp8: w = n e4m3 bytes per row, s = the block scales of the rows' (common) 128-row block from the
 *      chunk's first 128-block (chunks start on a block), xr[m] plain fp32 rows.
 * rnd: round each scaled weight to bf16 (fp32 scales with bf16 x: the twin's W).
 * The AVX2 and plain C versions take one row (nr = 1; fp8: elem = per-weight scaling for fp32
 * scales, else the block's partial sum is scaled). */
#if DZ_AVX512
AI __m512 rnd_bf16_v(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

AI __m512 e8m0_v(__m128i b) {
    __m512i i = _mm512_cvtepu8_epi32(b);
    __m512i bits = _mm512_slli_epi32(i, 23);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(i, _mm512_setzero_si512()),
                                 _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(bits);
}

/* 16 e4m3 bytes -> fp32 values * 2^-8 */
AI __m512 e4m3_x2m8(__m128i b) {
    __m256i t = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 7);
    t = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));
    return _mm512_cvtph_ps(t);
}

/* nr (1 or 2) weight rows ldw bytes / lds scale entries apart share each activation load;
 * out[m * TILE + r] += row r . x_m. Two accumulators per (row, x row) when few chains would
 * otherwise wait on the FMA latency. */
/* e^x, within 1.25 ulp of the correctly rounded value (Cephes polynomial, range by vscalefps) */
AI __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* the scales of groups g0 .. g0 + ng - 1 (ng <= 16) of nr rows into sc, and the rows visited ~PF
 * bytes later prefetched at the same columns */
AI void fp4_scales16(const uint8_t *w, int64_t ldw, const void *s, int64_t lds, int e8m0, int64_t pfd, int64_t g0,
                     int ng, const int nr, float (*sc)[16]) {
    const __mmask16 km = (__mmask16)((1u << ng) - 1);
    for (int r = 0; r < nr; r++) {
        if (e8m0)
            _mm512_store_ps(sc[r], e8m0_v(_mm_maskz_loadu_epi8(km, (const uint8_t *)s + r * lds + g0)));
        else
            _mm512_store_ps(sc[r], _mm512_maskz_loadu_ps(km, (const float *)s + r * lds + g0));
        for (int64_t o = 0; o < 16 * ng; o += 64) _mm_prefetch((const char *)w + r * ldw + pfd + 16 * g0 + o, _MM_HINT_T0);
    }
}

/* group g of nr rows, scales sg[r], into the accumulators */
AI void fp4_step(const uint8_t *w, int64_t ldw, const float *sg, int rnd, const float *const *xr, int64_t g,
                 const int nr, const int mb, const int two, __m512 (*a0)[MB], __m512 (*a1)[MB]) {
    const __m512 T = _mm512_loadu_ps(E2M1);
    __m512 lo[2], hi[2];
    for (int r = 0; r < nr; r++) {
        __m512 tbl = _mm512_mul_ps(T, _mm512_set1_ps(sg[r]));
        if (rnd) tbl = rnd_bf16_v(tbl);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + r * ldw + 16 * g)));
        lo[r] = _mm512_permutexvar_ps(b, tbl);
        hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl);
    }
    for (int m = 0; m < mb; m++) {
        const __m512 xe = _mm512_loadu_ps(xr[m] + 32 * g), xo = _mm512_loadu_ps(xr[m] + 32 * g + 16);
        for (int r = 0; r < nr; r++) {
            a0[r][m] = _mm512_fmadd_ps(lo[r], xe, a0[r][m]);
            if (two)
                a1[r][m] = _mm512_fmadd_ps(hi[r], xo, a1[r][m]);
            else
                a0[r][m] = _mm512_fmadd_ps(hi[r], xo, a0[r][m]);
        }
    }
}

AI void fp4_micro(const uint8_t *w, int64_t ldw, const void *s, int64_t lds, int e8m0, int rnd,
                  const float *const *xr, int64_t n, const int nr, const int mb, float *out) {
    const int64_t G = n >> 5, pfd = cdiv(PF, nr * ldw) * nr * ldw;
    const int two = 1; /* fixed: a row's sums never depend on mb (batch invariance) */
    __m512 a0[2][MB], a1[2][MB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++) a0[r][m] = a1[r][m] = _mm512_setzero_ps();
    float sc[2][16] __attribute__((aligned(64))), sg[2];
    /* fp32 FMAs are the bound here: the accumulators stored once per 16 groups cost nothing measurable */
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const int ng = (int)min64(16, G - g0);
        fp4_scales16(w, ldw, s, lds, e8m0, pfd, g0, ng, nr, sc);
        for (int j = 0; j < ng; j++) {
            for (int r = 0; r < nr; r++) sg[r] = sc[r][j];
            fp4_step(w, ldw, sg, rnd, xr, g0 + j, nr, mb, two, a0, a1);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++)
            out[m * TILE + r] += _mm512_reduce_add_ps(two ? _mm512_add_ps(a0[r][m], a1[r][m]) : a0[r][m]);
}

/* FP8: 32 weights of nr rows at k (full = 0: the n - k < 32 left, masked) times their scale
 * (E8M0: exact, the same as scaling a block's partial sum; fp32: the twin's fl(v * s)) */
AI void fp8_step(const uint8_t *w, int64_t ldw, __m512 vs, int rnd, const float *const *xr, int64_t k, int64_t left,
                 const int full, const int nr, const int mb, const int two, __m512 (*a0)[MB], __m512 (*a1)[MB]) {
    const __mmask16 ka = (__mmask16)(full || left >= 16 ? 0xffff : (1u << left) - 1);
    const __mmask16 kb = (__mmask16)(full ? 0xffff : left <= 16 ? 0 : (1u << (left - 16)) - 1);
    __m512 wa[2], wb[2];
    for (int r = 0; r < nr; r++) {
        const uint8_t *wr = w + r * ldw + k;
        if (full) {
            wa[r] = e4m3_x2m8(_mm_loadu_si128((const __m128i *)wr));
            wb[r] = e4m3_x2m8(_mm_loadu_si128((const __m128i *)(wr + 16)));
        } else {
            wa[r] = e4m3_x2m8(_mm_maskz_loadu_epi8(ka, wr));
            wb[r] = e4m3_x2m8(_mm_maskz_loadu_epi8(kb, wr + 16));
        }
        wa[r] = _mm512_mul_ps(wa[r], vs);
        wb[r] = _mm512_mul_ps(wb[r], vs);
        if (rnd) {
            wa[r] = rnd_bf16_v(wa[r]);
            wb[r] = rnd_bf16_v(wb[r]);
        }
    }
    for (int m = 0; m < mb; m++) {
        const __m512 xa = full ? _mm512_loadu_ps(xr[m] + k) : _mm512_maskz_loadu_ps(ka, xr[m] + k);
        const __m512 xb = full ? _mm512_loadu_ps(xr[m] + k + 16) : _mm512_maskz_loadu_ps(kb, xr[m] + k + 16);
        for (int r = 0; r < nr; r++) {
            a0[r][m] = _mm512_fmadd_ps(wa[r], xa, a0[r][m]);
            if (two)
                a1[r][m] = _mm512_fmadd_ps(wb[r], xb, a1[r][m]);
            else
                a0[r][m] = _mm512_fmadd_ps(wb[r], xb, a0[r][m]);
        }
    }
}

/* the nr rows are in one 128-row block (callers pair rows 2i, 2i + 1): one scale row s; lg: log2 of
 * the block side (7: 128, 5: 32, a scale per 32-weight step; the same steps and accumulators) */
AI void fp8_micro(const uint8_t *w, int64_t ldw, const void *s, int e8m0, int rnd, const float *const *xr,
                  int64_t n, const int nr, const int mb, float *out, const int lg) {
    const int two = 1; /* fixed: a row's sums never depend on mb (batch invariance) */
    const int64_t pfd = cdiv(PF, nr * ldw) * nr * ldw;
    __m512 a0[2][MB], a1[2][MB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++) a0[r][m] = a1[r][m] = _mm512_setzero_ps();
    const int64_t nf = n & ~(int64_t)127;
    for (int64_t k = 0; k < nf; k += 128) { /* whole blocks: branch-free, accumulators in registers */
        __m512 vs = _mm512_set1_ps(scale_at(s, k >> lg, e8m0) * 256.0f);
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)w + r * ldw + pfd + k, _MM_HINT_T0);
            _mm_prefetch((const char *)w + r * ldw + pfd + k + 64, _MM_HINT_T0);
        }
        for (int i = 0; i < 128; i += 32) {
            if (lg < 7 && i) vs = _mm512_set1_ps(scale_at(s, (k + i) >> lg, e8m0) * 256.0f);
            fp8_step(w, ldw, vs, rnd, xr, k + i, 32, 1, nr, mb, two, a0, a1);
        }
    }
    if (nf < n) { /* the last, partial block (lg < 7: blocks) */
        __m512 vs = _mm512_set1_ps(scale_at(s, nf >> lg, e8m0) * 256.0f);
        int64_t k = nf;
        for (; k + 32 <= n; k += 32) {
            if (lg < 7) vs = _mm512_set1_ps(scale_at(s, k >> lg, e8m0) * 256.0f);
            fp8_step(w, ldw, vs, rnd, xr, k, 32, 1, nr, mb, two, a0, a1);
        }
        if (k < n) {
            if (lg < 7) vs = _mm512_set1_ps(scale_at(s, k >> lg, e8m0) * 256.0f);
            fp8_step(w, ldw, vs, rnd, xr, k, n - k, 0, nr, mb, two, a0, a1);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++)
            out[m * TILE + r] += _mm512_reduce_add_ps(two ? _mm512_add_ps(a0[r][m], a1[r][m]) : a0[r][m]);
}

#if DZ_BF16DOT
/* scale_at without a call (around a call the accumulators would be stored) */
AI float scale_bits(const void *s, int64_t i, int e8m0) {
    if (!e8m0) return ((const float *)s)[i];
    const uint32_t b = ((const uint8_t *)s)[i], u = b ? b << 23 : 0x00400000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#include "fastdecode.h"

/* bf16 x (split64_row layout) with FP4 weights: two groups (64 weights, 32 bytes) per step; the
 * 32-entry bf16 table holds both groups' scaled e2m1 values (exact for E8M0 scales; fp32 scales
 * rounded to bf16 as the twin rounds W), indexed by vpermw with the group in bit 4; vdpbf16ps
 * multiplies pairs exactly and accumulates in fp32 (it flushes subnormals, as the twin's bf16
 * matmul does). An odd last group runs with the upper half zero. */
/* one step: groups g, g + 1 (full = 0: g only, the upper half zero) of nr rows into the accumulators */
AI void fp4_step_bf(const uint8_t *w, int64_t ldw, const float *s0, const float *s1, int64_t g, const int full,
                    const uint16_t *const *xr, const int nr, const int mb, const int two, __m512 (*a0)[MB],
                    __m512 (*a1)[MB]) {
    const __m512 T = _mm512_loadu_ps(E2M1);
    const __m512i m15 = _mm512_set1_epi16(15);
    const __m512i off = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
    __m512i lo[2], hi[2];
    for (int r = 0; r < nr; r++) {
        const __m512 tl = _mm512_mul_ps(T, _mm512_set1_ps(s0[r]));
        const __m512 th = full ? _mm512_mul_ps(T, _mm512_set1_ps(s1[r])) : _mm512_setzero_ps();
        const __m512i tbl = (__m512i)_mm512_cvtne2ps_pbh(th, tl);
        const uint8_t *wb = w + r * ldw + 16 * g;
        const __m256i bytes = full ? _mm256_loadu_si256((const __m256i *)wb) : _mm256_maskz_loadu_epi8(0xffff, wb);
        const __m512i h = _mm512_cvtepu8_epi16(bytes);
        lo[r] = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(h, m15, off, 0xEA), tbl); /* (h & 15) | off */
        hi[r] = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(h, 4), off), tbl);
    }
    for (int m = 0; m < mb; m++) {
        const __m512bh xe = (__m512bh)_mm512_loadu_si512(xr[m] + 32 * g);
        const __m512bh xo = (__m512bh)_mm512_loadu_si512(xr[m] + 32 * g + 32);
        for (int r = 0; r < nr; r++) {
            a0[r][m] = _mm512_dpbf16_ps(a0[r][m], (__m512bh)lo[r], xe);
            if (two)
                a1[r][m] = _mm512_dpbf16_ps(a1[r][m], (__m512bh)hi[r], xo);
            else
                a0[r][m] = _mm512_dpbf16_ps(a0[r][m], (__m512bh)hi[r], xo);
        }
    }
}

#if DZ_FAST_FP4
/* the integer-decode walk of fp4_micro_bf over G groups of nr rows at their own addresses (row r:
 * bytes wr[r], E8M0 scales sr[r], every scale in [FP4_SB_LO, FP4_SB_HI]): whole group pairs, then an
 * odd last group by the float route (the same words). Each row's stream is prefetched pf bytes
 * ahead into L2, once per 64 bytes (T0 prefetches hold an L1 fill buffer for the whole miss: fewer
 * weight lines in flight). */
AI void fp4_fast_rows(const uint8_t *const *wr, const uint8_t *const *sr, int64_t pf, const uint16_t *const *xr,
                      int64_t G, const int nr, const int mb, const int two, __m512 (*a0)[MB], __m512 (*a1)[MB]) {
    const int64_t Ge = G & ~(int64_t)1; /* whole group pairs */
    uint16_t to[2][16] __attribute__((aligned(32)));
    for (int64_t g0 = 0; g0 < Ge; g0 += 16) { /* 8 pairs' table offsets at a time, then their steps */
        const int np = (int)min64(8, (Ge - g0) >> 1);
        fp4_toffs16(sr, g0, 2 * np, nr, to);
        for (int j = 0; j < np; j++) {
            if (!(j & 1))
                for (int r = 0; r < nr; r++) _mm_prefetch((const char *)wr[r] + pf + 16 * (g0 + 2 * j), _MM_HINT_T1);
            fp4_step_fast(wr, to, 2 * j, g0 + 2 * j, xr, nr, mb, two, a0, a1);
        }
    }
    if (Ge < G)
        for (int r = 0; r < nr; r++) {
            const float s0 = scale_bits(sr[r], Ge, 1);
            fp4_step_bf(wr[r], 0, &s0, &s0, Ge, 0, xr, 1, mb, two, a0 + r, a1 + r);
        }
}
#endif

AI void fp4_micro_bf(const uint8_t *w, int64_t ldw, const void *s, int64_t lds, int e8m0, const uint16_t *const *xr,
                     int64_t n, const int nr, const int mb, float *out) {
    const int64_t G = n >> 5, pfd = cdiv(PF, nr * ldw) * nr * ldw;
    const int two = 1; /* fixed: a row's sums never depend on mb (batch invariance) */
    __m512 a0[2][MB], a1[2][MB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++) a0[r][m] = a1[r][m] = _mm512_setzero_ps();
    float s0[2], s1[2];
#if DZ_FAST_FP4
    if (e8m0 && scales_in((const uint8_t *)s, lds, nr, G, FP4_SB_LO, FP4_SB_HI)) { /* fastdecode.h */
        const uint8_t *wr[2] = {w, nr > 1 ? w + ldw : w};
        const uint8_t *sr[2] = {(const uint8_t *)s, nr > 1 ? (const uint8_t *)s + lds : (const uint8_t *)s};
        fp4_fast_rows(wr, sr, pfd, xr, G, nr, mb, two, a0, a1);
    } else
#endif
    if (nr * mb <= 2) {
        /* gcc keeps the accumulator arrays in registers only across a branch-free innermost loop:
         * up to 2 accumulators (decode-bound) the scales are loaded 16 groups at a time and the
         * accumulators stored once per chunk; beyond that one flat loop reads each pair's scales */
        float sc[2][16] __attribute__((aligned(64)));
        for (int64_t g0 = 0; g0 < G; g0 += 16) {
            const int ng = (int)min64(16, G - g0);
            fp4_scales16(w, ldw, s, lds, e8m0, pfd, g0, ng, nr, sc);
            int j = 0;
            for (; j + 1 < ng; j += 2) {
                for (int r = 0; r < nr; r++) s0[r] = sc[r][j], s1[r] = sc[r][j + 1];
                fp4_step_bf(w, ldw, s0, s1, g0 + j, 1, xr, nr, mb, two, a0, a1);
            }
            if (j < ng) {
                for (int r = 0; r < nr; r++) s0[r] = sc[r][j];
                fp4_step_bf(w, ldw, s0, s1, g0 + j, 0, xr, nr, mb, two, a0, a1);
            }
        }
    } else { /* one flat loop over the group pairs */
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            for (int r = 0; r < nr; r++) {
                _mm_prefetch((const char *)w + r * ldw + pfd + 16 * g, _MM_HINT_T0);
                s0[r] = scale_bits(s, r * lds + g, e8m0), s1[r] = scale_bits(s, r * lds + g + 1, e8m0);
            }
            fp4_step_bf(w, ldw, s0, s1, g, 1, xr, nr, mb, two, a0, a1);
        }
        if (g < G) {
            for (int r = 0; r < nr; r++) s0[r] = scale_bits(s, r * lds + g, e8m0);
            fp4_step_bf(w, ldw, s0, s1, g, 0, xr, nr, mb, two, a0, a1);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++)
            out[m * TILE + r] += _mm512_reduce_add_ps(two ? _mm512_add_ps(a0[r][m], a1[r][m]) : a0[r][m]);
}

/* bf16 x (natural order, zeros from K to a multiple of 32) with FP8 weights: 32 weights of nr rows
 * per step, decoded by the fp16 route of e4m3_x2m8, times the block scale (x 2^8) and rounded to
 * bf16 to nearest even (exact for E8M0 scales; for fp32 scales the twin's W, as rows_decode);
 * vdpbf16ps multiplies the pairs exactly and accumulates in fp32. full = 0: the `left` < 32 last
 * weights (masked loads; x is zero there). */
AI void fp8_step_bf(const uint8_t *w, int64_t ldw, __m512 vs, const uint16_t *const *xr, int64_t k, int64_t left,
                    const int full, const int nr, const int mb, const int sel, __m512 (*a0)[MB], __m512 (*a1)[MB]) {
    __m512i wv[2];
    for (int r = 0; r < nr; r++) {
        const uint8_t *wr = w + r * ldw + k;
        const __m256i b = full ? _mm256_loadu_si256((const __m256i *)wr)
                               : _mm256_maskz_loadu_epi8((__mmask32)((1ull << left) - 1), wr);
        __m512i t = _mm512_slli_epi16(_mm512_cvtepu8_epi16(b), 7);
        t = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
        const __m512 lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(t)), vs);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(t, 1)), vs);
        wv[r] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    for (int m = 0; m < mb; m++) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[m] + k);
        for (int r = 0; r < nr; r++) {
            if (sel) /* constant after inlining */
                a1[r][m] = _mm512_dpbf16_ps(a1[r][m], (__m512bh)wv[r], xv);
            else
                a0[r][m] = _mm512_dpbf16_ps(a0[r][m], (__m512bh)wv[r], xv);
        }
    }
}

/* the nr rows are in one 128-row block (one scale row s), as fp8_micro (lg: as there) */
AI void fp8_micro_bf(const uint8_t *w, int64_t ldw, const void *s, int e8m0, const uint16_t *const *xr, int64_t n,
                     const int nr, const int mb, float *out, const int lg) {
    const int two = 1; /* fixed: a row's sums never depend on mb (batch invariance) */
    const int64_t pfd = cdiv(PF, nr * ldw) * nr * ldw, nf = n & ~(int64_t)127;
    __m512 a0[2][MB], a1[2][MB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++) a0[r][m] = a1[r][m] = _mm512_setzero_ps();
    /* whole 128-weight blocks: a branch-free body, so the accumulators stay in registers; the
     * integer decode (fastdecode.h) where every block's E8M0 scale allows it, the same words */
    const int fast = e8m0 && scales_in((const uint8_t *)s, 0, 1, nf >> lg, lg < 7 ? FP8_SB_LO32 : FP8_SB_LO, FP8_SB_HI);
#if DZ_FP8_TAB
    if (fast && lg == 7 && fp8_tab_ok && use_fast_decode == 1) { /* the byte tables (fastdecode.h) */
        const __m512i il = _mm512_load_si512(FP8_IL);
        const int64_t pfd2 = cdiv(FP8_PF2, nr * ldw) * nr * ldw;
        for (int64_t k = 0; k < nf; k += 128) {
            const __m512i *tp = (const __m512i *)FP8_TAB[((const uint8_t *)s)[k >> 7]];
            const __m512i t[4] = {_mm512_load_si512(tp), _mm512_load_si512(tp + 1), _mm512_load_si512(tp + 2),
                                  _mm512_load_si512(tp + 3)};
            for (int r = 0; r < nr; r++) {
                _mm_prefetch((const char *)w + r * ldw + pfd + k, _MM_HINT_T0);
                _mm_prefetch((const char *)w + r * ldw + pfd + k + 64, _MM_HINT_T0);
                if (pfd2 > pfd) { /* short rows: also into L2 from farther ahead */
                    _mm_prefetch((const char *)w + r * ldw + pfd2 + k, _MM_HINT_T1);
                    _mm_prefetch((const char *)w + r * ldw + pfd2 + k + 64, _MM_HINT_T1);
                }
            }
            fp8_tab_step(w, ldw, t, il, xr, k, nr, mb, a0, a1);
            fp8_tab_step(w, ldw, t, il, xr, k + 64, nr, mb, a0, a1);
        }
    } else
#endif
    if (fast) {
        const __m512 codes = e4m3_x2m8(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0));
        __m512i off, sub; /* the block constants at weight kk (lg < 7: each 32-weight step's own block) */
#define FAST_AT(kk)                                                                                               \
    do {                                                                                                          \
        if (lg < 7) {                                                                                             \
            fp8_fast_consts32(((const uint8_t *)s)[(kk) >> lg], &off, &sub);                                      \
        } else {                                                                                                  \
            off = fp8_fast_off(((const uint8_t *)s)[(kk) >> lg]);                                                 \
            sub = fp8_fast_sub(codes, _mm512_set1_ps(scale_bits(s, (kk) >> lg, 1) * 256.0f));                    \
        }                                                                                                         \
    } while (0)
        for (int64_t k = 0; k < nf; k += 128) {
            FAST_AT(k);
            for (int r = 0; r < nr; r++) {
                _mm_prefetch((const char *)w + r * ldw + pfd + k, _MM_HINT_T0);
                _mm_prefetch((const char *)w + r * ldw + pfd + k + 64, _MM_HINT_T0);
            }
            fp8_step_fast(w, ldw, off, sub, xr, k, nr, mb, 0, a0, a1);
            if (lg < 7) FAST_AT(k + 32);
            fp8_step_fast(w, ldw, off, sub, xr, k + 32, nr, mb, two, a0, a1);
            if (lg < 7) FAST_AT(k + 64);
            fp8_step_fast(w, ldw, off, sub, xr, k + 64, nr, mb, 0, a0, a1);
            if (lg < 7) FAST_AT(k + 96);
            fp8_step_fast(w, ldw, off, sub, xr, k + 96, nr, mb, two, a0, a1);
        }
#undef FAST_AT
    }
    __m512 vs; /* the float route's block scale x 2^8 at weight kk (lg < 7: per 32-weight step) */
#define VS_AT(kk) (vs = _mm512_set1_ps(scale_at(s, (kk) >> lg, e8m0) * 256.0f))
    for (int64_t k = fast ? nf : 0; k < nf; k += 128) {
        VS_AT(k);
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)w + r * ldw + pfd + k, _MM_HINT_T0);
            _mm_prefetch((const char *)w + r * ldw + pfd + k + 64, _MM_HINT_T0);
        }
        fp8_step_bf(w, ldw, vs, xr, k, 32, 1, nr, mb, 0, a0, a1);
        if (lg < 7) VS_AT(k + 32);
        fp8_step_bf(w, ldw, vs, xr, k + 32, 32, 1, nr, mb, two, a0, a1);
        if (lg < 7) VS_AT(k + 64);
        fp8_step_bf(w, ldw, vs, xr, k + 64, 32, 1, nr, mb, 0, a0, a1);
        if (lg < 7) VS_AT(k + 96);
        fp8_step_bf(w, ldw, vs, xr, k + 96, 32, 1, nr, mb, two, a0, a1);
    }
    if (nf < n) { /* the last, partial block (lg < 7: blocks) */
        VS_AT(nf);
        int64_t k = nf; /* 32-weight steps alternate a0, a1 as in whole blocks (the many-rows path's order) */
        for (; k + 64 <= n; k += 64) {
            if (lg < 7) VS_AT(k);
            fp8_step_bf(w, ldw, vs, xr, k, 32, 1, nr, mb, 0, a0, a1);
            if (lg < 7) VS_AT(k + 32);
            fp8_step_bf(w, ldw, vs, xr, k + 32, 32, 1, nr, mb, two, a0, a1);
        }
        if (k + 32 <= n) {
            if (lg < 7) VS_AT(k);
            fp8_step_bf(w, ldw, vs, xr, k, 32, 1, nr, mb, 0, a0, a1);
            k += 32;
            if (lg < 7 && k < n) VS_AT(k);
            if (k < n) fp8_step_bf(w, ldw, vs, xr, k, n - k, 0, nr, mb, two, a0, a1);
        } else if (k < n) {
            if (lg < 7) VS_AT(k);
            fp8_step_bf(w, ldw, vs, xr, k, n - k, 0, nr, mb, 0, a0, a1);
        }
    }
#undef VS_AT
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++)
            out[m * TILE + r] += _mm512_reduce_add_ps(two ? _mm512_add_ps(a0[r][m], a1[r][m]) : a0[r][m]);
}
#endif

#elif DZ_AVX2
AI __m256 rnd_bf16_v(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}

AI float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AI __m128i load8(const uint8_t *p) {
    long long q;
    memcpy(&q, p, 8);
    return _mm_cvtsi64_si128(q);
}

/* 8 e4m3 bytes -> fp32 values * 2^-8 */
AI __m256 e4m3_x2m8(__m128i b8) {
    __m128i t = _mm_slli_epi16(_mm_cvtepu8_epi16(b8), 7);
    t = _mm_add_epi16(t, _mm_and_si128(t, _mm_set1_epi16(0x4000)));
    return _mm256_cvtph_ps(t);
}

AI void fp4_micro(const uint8_t *w, const void *s, int e8m0, int rnd, const float *const *xr, int64_t n,
                  const int mb, float *out) {
    const int64_t G = n >> 5;
    const __m256 T = _mm256_loadu_ps(E2M1); /* magnitudes 0 .. 6; bit 3 of a nibble is its sign */
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    __m256 a0[MB], a1[MB];
    for (int m = 0; m < mb; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 tbl = _mm256_mul_ps(T, _mm256_set1_ps(scale_at(s, g, e8m0)));
        if (rnd) tbl = rnd_bf16_v(tbl);
        for (int half = 0; half < 2; half++) {
            const __m256i b = _mm256_cvtepu8_epi32(load8(w + 16 * g + 8 * half));
            const __m256 lo = _mm256_xor_ps(_mm256_permutevar8x32_ps(tbl, b),
                                            _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 28), sign)));
            const __m256 hi = _mm256_xor_ps(_mm256_permutevar8x32_ps(tbl, _mm256_srli_epi32(b, 4)),
                                            _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 24), sign)));
            for (int m = 0; m < mb; m++) {
                a0[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr[m] + 32 * g + 8 * half), a0[m]);
                a1[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr[m] + 32 * g + 16 + 8 * half), a1[m]);
            }
        }
    }
    for (int m = 0; m < mb; m++) out[m * TILE] += hsum256(_mm256_add_ps(a0[m], a1[m]));
}

AI void fp8_micro(const uint8_t *w, const void *s, int e8m0, int elem, int rnd, const float *const *xr,
                  int64_t n, const int mb, float *out, const int lg) {
    __m256 acc[MB], p0[MB];
    float tail[MB];
    for (int m = 0; m < mb; m++) {
        acc[m] = _mm256_setzero_ps();
        tail[m] = 0.0f;
    }
    for (int64_t k0 = 0; k0 < n; k0 += (int64_t)1 << lg) {
        const float sf = scale_at(s, k0 >> lg, e8m0) * 256.0f;
        const __m256 vs = _mm256_set1_ps(sf);
        const int64_t k1 = min64(k0 + ((int64_t)1 << lg), n);
        for (int m = 0; m < mb; m++) p0[m] = _mm256_setzero_ps();
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8) {
            __m256 wa = e4m3_x2m8(load8(w + k));
            if (elem) {
                wa = _mm256_mul_ps(wa, vs);
                if (rnd) wa = rnd_bf16_v(wa);
            }
            for (int m = 0; m < mb; m++) p0[m] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(xr[m] + k), p0[m]);
        }
        for (int m = 0; m < mb; m++) {
            float t = 0.0f;
            for (int64_t kk = k; kk < k1; kk++) {
                const float v = E4M3[w[kk]] * (1.0f / 256.0f);
                t += (elem ? round_to(v * sf, rnd) : v) * xr[m][kk];
            }
            if (elem) {
                acc[m] = _mm256_add_ps(acc[m], p0[m]);
                tail[m] += t;
            } else {
                acc[m] = _mm256_fmadd_ps(p0[m], vs, acc[m]);
                tail[m] += t * sf;
            }
        }
    }
    for (int m = 0; m < mb; m++) out[m * TILE] += hsum256(acc[m]) + tail[m];
}

#else /* plain C */
AI void fp4_micro(const uint8_t *w, const void *s, int e8m0, int rnd, const float *const *xr, int64_t n,
                  const int mb, float *out) {
    const int64_t G = n >> 5;
    float acc[MB];
    for (int m = 0; m < mb; m++) acc[m] = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        const float sc = scale_at(s, g, e8m0);
        float tbl[16];
        for (int i = 0; i < 16; i++) tbl[i] = round_to(E2M1[i] * sc, rnd);
        for (int m = 0; m < mb; m++) {
            const float *xg = xr[m] + 32 * g;
            float t = 0.0f;
            for (int j = 0; j < 16; j++) {
                const uint8_t b = w[16 * g + j];
                t += tbl[b & 15] * xg[j];
                t += tbl[b >> 4] * xg[16 + j];
            }
            acc[m] += t;
        }
    }
    for (int m = 0; m < mb; m++) out[m * TILE] += acc[m];
}

AI void fp8_micro(const uint8_t *w, const void *s, int e8m0, int elem, int rnd, const float *const *xr,
                  int64_t n, const int mb, float *out, const int lg) {
    float acc[MB];
    for (int m = 0; m < mb; m++) acc[m] = 0.0f;
    for (int64_t k0 = 0; k0 < n; k0 += (int64_t)1 << lg) {
        const float sf = scale_at(s, k0 >> lg, e8m0);
        const int64_t k1 = min64(k0 + ((int64_t)1 << lg), n);
        for (int m = 0; m < mb; m++) {
            float t = 0.0f;
            for (int64_t k = k0; k < k1; k++) {
                const float v = E4M3[w[k]];
                t += (elem ? round_to(v * sf, rnd) : v) * xr[m][k];
            }
            acc[m] += elem ? t : t * sf;
        }
    }
    for (int m = 0; m < mb; m++) out[m * TILE] += acc[m];
}
#endif

/* dispatch on (nr, mb) so each shape gets its own register-resident accumulators */
#define MB_CASES(F, NR)                                                                                           \
    case 1: F(NR, 1); break;                                                                                      \
    case 2: F(NR, 2); break;                                                                                      \
    case 3: F(NR, 3); break;                                                                                      \
    case 4: F(NR, 4); break;                                                                                      \
    case 5: F(NR, 5); break;                                                                                      \
    case 6: F(NR, 6); break;                                                                                      \
    case 7: F(NR, 7); break;                                                                                      \
    default: F(NR, MB); break;

#if DZ_AVX512
/* AVX-512: two accumulators per (weight row, activation row) always (a row's sums must not depend
 * on how many rows share the call), so at most MR4 = 4 activation rows per micro-kernel call (2 x
 * 2 x 4 accumulators in registers); more rows run as blocks of 4 over the same (L1-resident) rows */
#define MR4 4
#define MR4_CASES(F, NR)                                                                                          \
    case 1: F(NR, 1); break;                                                                                      \
    case 2: F(NR, 2); break;                                                                                      \
    case 3: F(NR, 3); break;                                                                                      \
    default: F(NR, MR4); break;
#define MR4_LOOP(F)                                                                                               \
    for (int m0 = 0; m0 < mb; m0 += MR4) {                                                                        \
        const int mc = mb - m0 < MR4 ? mb - m0 : MR4;                                                             \
        if (nr == 2) {                                                                                            \
            switch (mc) { MR4_CASES(F, 2) }                                                                       \
        } else {                                                                                                  \
            switch (mc) { MR4_CASES(F, 1) }                                                                       \
        }                                                                                                         \
    }
#endif

/* rows o, o + nr - 1 (nr <= 2) of a matrix: w / s point at row o, ldw bytes and lds scale
 * entries per row; FP8: both rows in one 128-row block (s = its scale row; lg: 5 for 32x32 blocks,
 * whose row blocks hold the pair too, else 7) */
static void fp4_rows(const uint8_t *w, int64_t ldw, const void *s, int64_t lds, int e8m0, int rnd,
                     const float *const *xr, int64_t n, int nr, int mb, float *out) {
#if DZ_AVX512
#define F4(NR, M) fp4_micro(w, ldw, s, lds, e8m0, rnd, xr + m0, n, NR, M, out + m0 * TILE)
    MR4_LOOP(F4)
#undef F4
#else
    for (int r = 0; r < nr; r++) {
        const uint8_t *wr = w + r * ldw;
        const void *sr = (const char *)s + r * lds * (e8m0 ? 1 : 4);
        float *o = out + r;
#define F4(NR, M) fp4_micro(wr, sr, e8m0, rnd, xr, n, M, o)
        switch (mb) { MB_CASES(F4, 1) }
#undef F4
    }
#endif
}

static void fp8_rows(const uint8_t *w, int64_t ldw, const void *s, int e8m0, int rnd, const float *const *xr,
                     int64_t n, int nr, int mb, float *out, int lg) {
#if DZ_AVX512
#define F8(NR, M) fp8_micro(w, ldw, s, e8m0, rnd, xr + m0, n, NR, M, out + m0 * TILE, 7)
#define F8_32(NR, M) fp8_micro(w, ldw, s, e8m0, rnd, xr + m0, n, NR, M, out + m0 * TILE, 5)
    if (lg == 5) {
        MR4_LOOP(F8_32)
    } else {
        MR4_LOOP(F8)
    }
#undef F8_32
#undef F8
#else
    for (int r = 0; r < nr; r++) {
        const uint8_t *wr = w + r * ldw;
        float *o = out + r;
#define F8(NR, M) fp8_micro(wr, s, e8m0, !e8m0, rnd, xr, n, M, o, lg)
        switch (mb) { MB_CASES(F8, 1) }
#undef F8
    }
#endif
}

#if DZ_BF16DOT
/* 5-8 activation rows: one weight row at a time against all of them (2 x 8 accumulators), so each
 * weight is decoded once, not once per block of MR4 rows; the same per-(row, x row) order */
#define ROW8_CASES(F)                                                                                             \
    case 5: F(1, 5); break;                                                                                       \
    case 6: F(1, 6); break;                                                                                       \
    case 7: F(1, 7); break;                                                                                       \
    default: F(1, MB); break;

static void fp4_rows_bf(const uint8_t *w, int64_t ldw, const void *s, int64_t lds, int e8m0,
                        const uint16_t *const *xr, int64_t n, int nr, int mb, float *out) {
    if (mb > MR4 && use_fast_decode) {
        for (int r = 0; r < nr; r++) {
            const uint8_t *wr = w + r * ldw;
            const void *sr = (const char *)s + r * lds * (e8m0 ? 1 : 4);
#define FR(NR, M) fp4_micro_bf(wr, ldw, sr, lds, e8m0, xr, n, NR, M, out + r)
            switch (mb) { ROW8_CASES(FR) }
#undef FR
        }
        return;
    }
#define FB(NR, M) fp4_micro_bf(w, ldw, s, lds, e8m0, xr + m0, n, NR, M, out + m0 * TILE)
    MR4_LOOP(FB)
#undef FB
}

static void fp8_rows_bf(const uint8_t *w, int64_t ldw, const void *s, int e8m0, const uint16_t *const *xr, int64_t n,
                        int nr, int mb, float *out, int lg) {
    if (mb > MR4 && use_fast_decode) { /* both rows in one 128-row block: the same scale row s */
        for (int r = 0; r < nr; r++) {
            const uint8_t *wr = w + r * ldw;
#define FR(NR, M) fp8_micro_bf(wr, ldw, s, e8m0, xr, n, NR, M, out + r, 7)
#define FR_32(NR, M) fp8_micro_bf(wr, ldw, s, e8m0, xr, n, NR, M, out + r, 5)
            if (lg == 5) {
                switch (mb) { ROW8_CASES(FR_32) }
            } else {
                switch (mb) { ROW8_CASES(FR) }
            }
#undef FR_32
#undef FR
        }
        return;
    }
#define FB(NR, M) fp8_micro_bf(w, ldw, s, e8m0, xr + m0, n, NR, M, out + m0 * TILE, 7)
#define FB_32(NR, M) fp8_micro_bf(w, ldw, s, e8m0, xr + m0, n, NR, M, out + m0 * TILE, 5)
    if (lg == 5) {
        MR4_LOOP(FB_32)
    } else {
        MR4_LOOP(FB)
    }
#undef FB_32
#undef FB
}
#endif

/* ---- tiles: res[i * TILE + o - o0] = W[o] . x_i for rows o in [o0, o1) (o1 - o0 <= TILE) ----------
 * K is walked in chunks that keep the mb activation rows' chunk in L1 (16 KiB: k_chunk for fp32 x,
 * k_chunk_bf for bf16 x) while the tile's weight rows are read chunk by chunk; with up to two rows
 * a chunk is the whole row. */

static inline int64_t k_chunk(int mb, int64_t K) {
    (void)mb; /* whole rows: a row's sums are never cut at K-chunks that depend on mb (batch invariance) */
    return K;
}

typedef struct {
    const uint8_t *w; /* row 0 of the matrix */
    const char *s;    /* scales */
    int64_t K, O;
    int e8m0, rnd;
    int b32; /* FP8 scale blocks: 0 = 128x128 (V4; what an initializer without it gives), 1 = 32x32 (V4.1) */
} QMat;

/* log2 of an FP8 matrix's scale block side: scale of (o, k) at s[(o >> lg) * cdiv(K, 1 << lg) + (k >> lg)] */
static inline int fp8_lg(const QMat *q) { return q->b32 ? 5 : 7; }

/* rows o, o + nr - 1 of q over k in [k0, k0 + n) against the mb activation rows xc (at k0) */
typedef void (*pair_fn)(const QMat *q, int64_t o, int64_t k0, int64_t n, const void *const *xc, int nr, int mb,
                        float *out);

/* every tile's walk: SUB rows at a time, K in chunks of kc, x elements esz bytes */
static void tile_walk(const QMat *q, const void *const *xr, int mb, int64_t o0, int64_t o1, float *res, int64_t kc,
                      int64_t esz, pair_fn pair) {
    const int64_t K = q->K;
    memset(res, 0, sizeof(float) * (size_t)(mb * TILE));
    for (int64_t b0 = o0; b0 < o1; b0 += SUB)
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            const int64_t n = min64(kc, K - k0), b1 = min64(o1, b0 + SUB);
            const void *xc[MB];
            for (int i = 0; i < mb; i++) xc[i] = (const char *)xr[i] + k0 * esz;
            for (int64_t o = b0; o < b1; o += 2) /* o is even (tiles start even): an FP8 pair is in one 128-row block */
                pair(q, o, k0, n, xc, o + 1 < b1 ? 2 : 1, mb, res + (o - o0));
        }
}

static void fp4_pair(const QMat *q, int64_t o, int64_t k0, int64_t n, const void *const *xc, int nr, int mb,
                     float *out) {
    const int64_t H = q->K / 2, G = q->K / 32;
    fp4_rows(q->w + o * H + k0 / 2, H, q->s + (o * G + k0 / 32) * (q->e8m0 ? 1 : 4), G, q->e8m0, q->rnd,
             (const float *const *)xc, n, nr, mb, out);
}

static void fp8_pair(const QMat *q, int64_t o, int64_t k0, int64_t n, const void *const *xc, int nr, int mb,
                     float *out) {
    const int64_t K = q->K;
    const int lg = fp8_lg(q);
    fp8_rows(q->w + o * K + k0, K, q->s + ((o >> lg) * cdiv(K, (int64_t)1 << lg) + (k0 >> lg)) * (q->e8m0 ? 1 : 4),
             q->e8m0, q->rnd, (const float *const *)xc, n, nr, mb, out, lg);
}

static void fp4_tile(const QMat *q, const void *const *xr, int mb, int64_t o0, int64_t o1, float *res) {
    tile_walk(q, xr, mb, o0, o1, res, k_chunk(mb, q->K), 4, fp4_pair);
}

static void fp8_tile(const QMat *q, const void *const *xr, int mb, int64_t o0, int64_t o1, float *res) {
    tile_walk(q, xr, mb, o0, o1, res, k_chunk(mb, q->K), 4, fp8_pair);
}

#if DZ_BF16DOT
/* bf16 rows: chunks of whole 128-blocks (FP4: the split64_row layout's 64-blocks; FP8: natural
 * order, zeros past K to a multiple of 32) */
static inline int64_t k_chunk_bf(int mb, int64_t K) {
    (void)mb;
    return K;
}

static void fp4_pair_bf(const QMat *q, int64_t o, int64_t k0, int64_t n, const void *const *xc, int nr, int mb,
                        float *out) {
    const int64_t H = q->K / 2, G = q->K / 32;
    fp4_rows_bf(q->w + o * H + k0 / 2, H, q->s + (o * G + k0 / 32) * (q->e8m0 ? 1 : 4), G, q->e8m0,
                (const uint16_t *const *)xc, n, nr, mb, out);
}

static void fp8_pair_bf(const QMat *q, int64_t o, int64_t k0, int64_t n, const void *const *xc, int nr, int mb,
                        float *out) {
    const int64_t K = q->K;
    const int lg = fp8_lg(q);
    fp8_rows_bf(q->w + o * K + k0, K, q->s + ((o >> lg) * cdiv(K, (int64_t)1 << lg) + (k0 >> lg)) * (q->e8m0 ? 1 : 4),
                q->e8m0, (const uint16_t *const *)xc, n, nr, mb, out, lg);
}

static void fp4_tile_bf(const QMat *q, const void *const *xr, int mb, int64_t o0, int64_t o1, float *res) {
    tile_walk(q, xr, mb, o0, o1, res, k_chunk_bf(mb, q->K), 2, fp4_pair_bf);
}

static void fp8_tile_bf(const QMat *q, const void *const *xr, int mb, int64_t o0, int64_t o1, float *res) {
    tile_walk(q, xr, mb, o0, o1, res, k_chunk_bf(mb, q->K), 2, fp8_pair_bf);
}
#endif

/* threads for a call of `macs` multiply-adds over `items` work items */
static int team(int64_t nthreads, int64_t macs, int64_t items) {
    return macs < PAR_MIN ? 1 : dz_threads(nthreads, items);
}

/* ---- many activation rows (prefill): weights decoded once per call ---------------------------------
 * AVX-512 builds: with ROWS_MIN or more activation rows, a panel of OP weight rows is decoded ONCE,
 * over all of K, into a per-thread buffer (fp32, or bf16 for the vdpbf16ps kernels: exactly the
 * values the decode kernels form in registers, see rows_decode), and every activation row runs
 * against it, read in place in the layout the decode kernels read (FP4: the split layouts; FP8:
 * natural order; zeros past K).
 * Batch invariance: the micro-kernel computes each (weight row, activation row) sum in exactly the
 * decode kernels' order: 16 lanes along K, fp32 32 positions a step (the first 16 into a0, the next
 * 16 into a1), bf16 64 positions a step (32 each, vdpbf16ps), a0 + a1 reduced once at the end. So
 * a row's result is bit-identical whichever path, block of rows or batch computes it: a request's
 * logits do not depend on what else is in the step, on the prefill chunk, or on prefix hits.
 * Micro-kernel: 2 weight rows x 4 activation rows x 2 accumulators; the rows stream from L1/L2.
 * Builds without AVX-512 take the decode path for every row count (its AVX2 / plain C order is
 * per-block: a many-rows kernel in that order is not written), so they are batch-invariant too. */
#if DZ_AVX512
#define MANY_ROWS 1
#ifndef ROWS_MIN
#define ROWS_MIN 16 /* activation rows from which the linears take this path */
#endif
#ifndef MOE_ROWS_MIN /* pairs of one expert from which it takes this path */
#define MOE_ROWS_MIN (ROWS_MIN > 24 ? ROWS_MIN : 24)
#endif
#else
#define MANY_ROWS 0
#endif
#ifndef OP
#define OP 32 /* weight rows decoded per panel (even) */
#endif

/* positions per row in the decoded layouts: FP4 fp32 K (whole groups), FP4 bf16 K
 * rounded up to 64 (split64), FP8 K rounded up to 32 */
static inline int64_t rows_kp(int64_t K, int fp8, int bfd) {
    return fp8 ? (K + 31) & ~(int64_t)31 : bfd ? (K + 63) & ~(int64_t)63 : K;
}

#if MANY_ROWS
/* weight row o of q -> dst (Kp positions, zeros past K): fp32 (rounded to bf16 where q->rnd) or,
 * bfd, bf16 values (E8M0: exact; fp32 scales: fl(v * s) rounded to nearest even, the twin's W) */
static void rows_decode(const QMat *q, int fp8, int bfd, int64_t o, void *dst, int64_t Kp) {
    const int64_t K = q->K;
    const int e8 = q->e8m0;
    if (fp8) {
        const uint8_t *w = q->w + o * K;
        const int lg = fp8_lg(q);
        const int64_t B = (int64_t)1 << lg, srow = (o >> lg) * cdiv(K, B);
        for (int64_t k0 = 0; k0 < K; k0 += B) {
            const float sf = scale_at(q->s, srow + (k0 >> lg), e8);
            const int64_t k1 = min64(K, k0 + B);
            int64_t k = k0;
#if DZ_AVX512
            const __m512 vs = _mm512_set1_ps(sf * 256.0f);
            for (; k < k1; k += 16) {
                const __mmask16 km = (__mmask16)(k1 - k >= 16 ? 0xffff : (1u << (k1 - k)) - 1);
                __m512 v = _mm512_mul_ps(e4m3_x2m8(_mm_maskz_loadu_epi8(km, w + k)), vs);
#if DZ_BF16DOT
                if (bfd) {
                    _mm256_mask_storeu_epi16((uint16_t *)dst + k, km, (__m256i)_mm512_cvtneps_pbh(v));
                    continue;
                }
#endif
                if (q->rnd) v = rnd_bf16_v(v);
                _mm512_mask_storeu_ps((float *)dst + k, km, v);
            }
#endif
            for (; k < k1; k++) {
                const float v = E4M3[w[k]] * sf;
                if (bfd)
                    ((uint16_t *)dst)[k] = dz_f32_to_bf16(v);
                else
                    ((float *)dst)[k] = round_to(v, q->rnd);
            }
        }
    } else {
        const int64_t H = K / 2, G = K / 32;
        const uint8_t *w = q->w + o * H;
        const char *s = q->s + o * G * (e8 ? 1 : 4);
        int64_t g = 0;
#if DZ_BF16DOT
        if (bfd) {
            const __m512 T = _mm512_loadu_ps(E2M1);
            const __m512i m15 = _mm512_set1_epi16(15);
            const __m512i off = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
            for (; g < G; g += 2) { /* split64 block g / 2: groups g, g + 1 (absent past K: zeros) */
                const int full = g + 1 < G;
                const __m512 tl = _mm512_mul_ps(T, _mm512_set1_ps(scale_at(s, g, e8)));
                const __m512 th = full ? _mm512_mul_ps(T, _mm512_set1_ps(scale_at(s, g + 1, e8))) : _mm512_setzero_ps();
                const __m512i tbl = (__m512i)_mm512_cvtne2ps_pbh(th, tl);
                const __m256i bytes = _mm256_maskz_loadu_epi8(full ? 0xffffffffu : 0xffffu, w + 16 * g);
                const __m512i h = _mm512_cvtepu8_epi16(bytes);
                uint16_t *d = (uint16_t *)dst + 32 * g;
                _mm512_storeu_si512(d, _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(h, m15, off, 0xEA), tbl));
                _mm512_storeu_si512(d + 32, _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(h, 4), off), tbl));
                if (!full) { /* the block's upper halves: zeros (the table's upper half is 0 already) */
                    memset(d + 16, 0, 32);
                    memset(d + 48, 0, 32);
                }
            }
            return;
        }
#endif
        if (bfd) { /* plain C bf16 layout (unused: bfd needs DZ_BF16DOT) */
            for (int64_t k = 0; k < Kp; k++) ((uint16_t *)dst)[k] = 0;
            for (int64_t k = 0; k < K; k++) {
                const uint8_t b = w[k >> 1];
                ((uint16_t *)dst)[g64_pos(k)] = dz_f32_to_bf16(E2M1[k & 1 ? b >> 4 : b & 15] * scale_at(s, k >> 5, e8));
            }
            return;
        }
        float *d = (float *)dst;
#if DZ_AVX512
        const __m512 T = _mm512_loadu_ps(E2M1);
        for (; g < G; g++) {
            __m512 tbl = _mm512_mul_ps(T, _mm512_set1_ps(scale_at(s, g, e8)));
            if (q->rnd) tbl = rnd_bf16_v(tbl);
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + 16 * g)));
            _mm512_storeu_ps(d + 32 * g, _mm512_permutexvar_ps(b, tbl));
            _mm512_storeu_ps(d + 32 * g + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl));
        }
#endif
        for (; g < G; g++) {
            const float sc = scale_at(s, g, e8);
            float tbl[16];
            for (int i = 0; i < 16; i++) tbl[i] = round_to(E2M1[i] * sc, q->rnd);
            for (int j = 0; j < 16; j++) {
                const uint8_t b = w[16 * g + j];
                d[32 * g + j] = tbl[b & 15];
                d[32 * g + 16 + j] = tbl[b >> 4];
            }
        }
        return;
    }
    /* FP8: zeros from K to Kp */
    for (int64_t k = K; k < Kp; k++) {
        if (bfd)
            ((uint16_t *)dst)[k] = 0;
        else
            ((float *)dst)[k] = 0.0f;
    }
}

/* c[r * MR4 + i] = W row r . x row i, r < nr (<= 2), i < mr (<= MR4), over Kp positions, in the
 * decode kernels' order (see above); w: decoded rows ldw bytes apart, xr: activation rows */
AI void dot_micro(const char *w, int64_t ldw, const char *const *xr, int64_t Kp, int bfd, const int nr, const int mr,
                  float *c) {
    __m512 a0[2][MR4], a1[2][MR4];
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mr; i++) a0[r][i] = a1[r][i] = _mm512_setzero_ps();
#if DZ_BF16DOT
    if (bfd) {
        int64_t p = 0;
        for (; p + 64 <= Kp; p += 64) {
            __m512i wl[2], wh[2];
            for (int r = 0; r < nr; r++) {
                wl[r] = _mm512_loadu_si512(w + r * ldw + 2 * p);
                wh[r] = _mm512_loadu_si512(w + r * ldw + 2 * p + 64);
            }
            for (int i = 0; i < mr; i++) {
                const __m512bh xl = (__m512bh)_mm512_loadu_si512(xr[i] + 2 * p);
                const __m512bh xh = (__m512bh)_mm512_loadu_si512(xr[i] + 2 * p + 64);
                for (int r = 0; r < nr; r++) {
                    a0[r][i] = _mm512_dpbf16_ps(a0[r][i], (__m512bh)wl[r], xl);
                    a1[r][i] = _mm512_dpbf16_ps(a1[r][i], (__m512bh)wh[r], xh);
                }
            }
        }
        if (p < Kp) /* FP8: Kp a multiple of 32, the last 32 positions into a0 */
            for (int i = 0; i < mr; i++) {
                const __m512bh xl = (__m512bh)_mm512_loadu_si512(xr[i] + 2 * p);
                for (int r = 0; r < nr; r++)
                    a0[r][i] = _mm512_dpbf16_ps(a0[r][i], (__m512bh)_mm512_loadu_si512(w + r * ldw + 2 * p), xl);
            }
    } else
#endif
    {
        (void)bfd;
        for (int64_t p = 0; p < Kp; p += 32) {
            __m512 wa[2], wb[2];
            for (int r = 0; r < nr; r++) {
                wa[r] = _mm512_loadu_ps((const float *)(w + r * ldw) + p);
                wb[r] = _mm512_loadu_ps((const float *)(w + r * ldw) + p + 16);
            }
            for (int i = 0; i < mr; i++) {
                const __m512 xa = _mm512_loadu_ps((const float *)xr[i] + p);
                const __m512 xb = _mm512_loadu_ps((const float *)xr[i] + p + 16);
                for (int r = 0; r < nr; r++) {
                    a0[r][i] = _mm512_fmadd_ps(wa[r], xa, a0[r][i]);
                    a1[r][i] = _mm512_fmadd_ps(wb[r], xb, a1[r][i]);
                }
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mr; i++) c[r * MR4 + i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r][i], a1[r][i]));
}

#define DOT_CASES(NR)                                                                                             \
    switch (mr) {                                                                                                 \
    case 1: dot_micro(w, ldw, xr, Kp, bfd, NR, 1, c); break;                                                      \
    case 2: dot_micro(w, ldw, xr, Kp, bfd, NR, 2, c); break;                                                      \
    case 3: dot_micro(w, ldw, xr, Kp, bfd, NR, 3, c); break;                                                      \
    default: dot_micro(w, ldw, xr, Kp, bfd, NR, MR4, c); break;                                                   \
    }
static void dot_tile(const char *w, int64_t ldw, const char *const *xr, int64_t Kp, int bfd, int nr, int mr, float *c) {
    if (nr == 2) {
        DOT_CASES(2)
    } else {
        DOT_CASES(1)
    }
}
#undef DOT_CASES

/* out[m * ldo + o - obase] (x.dtype obf16, else fp32) = W[o] . x_m for m < M, o in [o0, o1);
 * xr: the M activation rows (>= Kp positions each, zeros past K); wbuf: OP * Kp decoded
 * positions (this thread's) */
static void rows_item(const QMat *q, int fp8, int bfd, const char *const *xr, int64_t M, int64_t o0, int64_t o1,
                      void *wbuf, void *out, int64_t ldo, int64_t obase, int obf16) {
    const int64_t Kp = rows_kp(q->K, fp8, bfd), esz = bfd ? 2 : 4, ldw = Kp * esz;
    float c[2 * MR4];
    for (int64_t b0 = o0; b0 < o1; b0 += OP) {
        const int64_t nb = min64(OP, o1 - b0);
        for (int64_t r = 0; r < nb; r++) rows_decode(q, fp8, bfd, b0 + r, (char *)wbuf + r * ldw, Kp);
        for (int64_t m0 = 0; m0 < M; m0 += MR4) {
            const int mr = (int)min64(MR4, M - m0);
            for (int64_t t = 0; t < nb; t += 2) {
                const int nr = (int)min64(2, nb - t);
                dot_tile((const char *)wbuf + t * ldw, ldw, xr + m0, Kp, bfd, nr, mr, c);
                for (int i = 0; i < mr; i++)
                    for (int r = 0; r < nr; r++) dz_store(out, (m0 + i) * ldo + b0 + t + r - obase, c[r * MR4 + i], obf16);
            }
        }
    }
}

/* the linears' many-rows path: xs = M rows (ldb bytes apart) holding Kp positions each */
static void rows_linear(const QMat *q, int fp8, int bfd, const char *xs, int64_t ldb, int64_t M, void *out, int obf16,
                        int64_t nthreads) {
    const int64_t Kp = rows_kp(q->K, fp8, bfd), esz = bfd ? 2 : 4, items = cdiv(q->O, OP);
    const char **xr = (const char **)dz_alloc(M * (int64_t)sizeof(char *));
    for (int64_t m = 0; m < M; m++) xr[m] = xs + m * ldb;
    const int nt = team(nthreads, M * q->O * q->K, items);
#pragma omp parallel num_threads(nt)
    {
        void *wbuf = dz_alloc(OP * Kp * esz);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++)
            rows_item(q, fp8, bfd, xr, M, it * OP, min64(q->O, it * OP + OP), wbuf, out, q->O, 0, obf16);
        free(wbuf);
    }
    free(xr);
}
#endif

/* ---- linears ------------------------------------------------------------------------------------ */
typedef void (*tile_fn)(const QMat *, const void *const *, int, int64_t, int64_t, float *);

/* rows [o0, o1) of q against its M activation rows (xs: ldb bytes apart, in the layout `tile` reads),
 * stored at out[m * ldo + o], tile by tile: a linear's work item (ldo = O) or one group's (grouped linear) */
static void tile_item(const QMat *q, tile_fn tile, const char *xs, int64_t ldb, int64_t M, void *out, int64_t ldo,
                      int bf16, int64_t o0, int64_t o1) {
    float res[TILE * MB];
    for (int64_t t0 = o0; t0 < o1; t0 += TILE) { /* tiles of the item (o0 even: they start even) */
        const int64_t t1 = min64(o1, t0 + TILE);
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mb = (int)min64(MB, M - m0);
            const void *xr[MB];
            for (int i = 0; i < mb; i++) xr[i] = xs + (m0 + i) * ldb;
            tile(q, xr, mb, t0, t1, res);
            for (int i = 0; i < mb; i++)
                for (int64_t o = t0; o < t1; o++) dz_store(out, (m0 + i) * ldo + o, res[i * TILE + o - t0], bf16);
        }
    }
}

static void linear_item(const QMat *q, tile_fn tile, const char *xs, int64_t ldb, int64_t M, void *out, int bf16,
                        int64_t o0, int64_t o1) {
    tile_item(q, tile, xs, ldb, M, out, q->O, bf16, o0, o1);
}

#ifndef FP8_ITEM_ROWS
#define FP8_ITEM_ROWS 1024 /* FP8 linears: the most rows of a work item (FP4: TILE) */
#endif

/* work items of R (even, <= rmax) output rows, dynamically scheduled (>= 8 per thread where O
 * allows, so a thread that is descheduled or slower holds up the others by little). An item of
 * more than TILE rows is consecutive tiles: a thread streams longer runs of contiguous weight
 * rows (at short K the FP8 decode's 64-row items were 64 KiB, and each jump to the next item
 * restarts the prefetchers; docs/BENCHMARKS.md). Results depend on neither R nor threads. */
static void linear(const QMat *q, tile_fn tile, const char *xs, int64_t ld, int64_t M, void *out, int bf16,
                   int64_t nthreads, int64_t rmax) {
    const int64_t O = q->O;
    const int nt = team(nthreads, M * O * q->K, cdiv(O, 16));
    if (nt <= 1) {
        for (int64_t o0 = 0; o0 < O; o0 += TILE) linear_item(q, tile, xs, ld, M, out, bf16, o0, min64(O, o0 + TILE));
        return;
    }
    int64_t R = (cdiv(O, 8 * nt) + 1) & ~(int64_t)1;
    R = R > rmax ? rmax : (R < 16 ? 16 : R);
    const int64_t items = cdiv(O, R);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) linear_item(q, tile, xs, ld, M, out, bf16, it * R, min64(O, it * R + R));
}

/* out [M, O] (x's dtype) = x [M, K] (row stride ldx) @ W^T, W FP4 packed [O, K/2], s [O, K/32] */
void dz_fp4_linear(const void *x, int64_t ldx, int64_t bf16, const uint8_t *w, const void *s, int64_t e8m0,
                   void *out, int64_t M, int64_t O, int64_t K, int64_t nthreads) {
    const QMat q = {w, (const char *)s, K, O, (int)e8m0, bf16 && !e8m0};
#if DZ_BF16DOT
    if (bf16 && use_bf16dot) {
        const int64_t ld = pad_ld64(K);
        uint16_t *xb = (uint16_t *)dz_alloc(M * ld * 2);
        for (int64_t m = 0; m < M; m++) split64_row((const uint16_t *)x + m * ldx, K, xb + m * ld);
#if MANY_ROWS
        if (M >= ROWS_MIN)
            rows_linear(&q, 0, 1, (const char *)xb, ld * 2, M, out, 1, nthreads);
        else
#endif
            linear(&q, fp4_tile_bf, (const char *)xb, ld * 2, M, out, 1, nthreads, TILE);
        free(xb);
        return;
    }
#endif
    const int64_t ld = pad_ld(K);
    float *xs = (float *)dz_alloc(M * ld * 4);
    for (int64_t m = 0; m < M; m++) split_row((const char *)x + m * ldx * (bf16 ? 2 : 4), (int)bf16, K, xs + m * ld);
#if MANY_ROWS
    if (M >= ROWS_MIN)
        rows_linear(&q, 0, 0, (const char *)xs, ld * 4, M, out, (int)bf16, nthreads);
    else
#endif
        linear(&q, fp4_tile, (const char *)xs, ld * 4, M, out, (int)bf16, nthreads, TILE);
    free(xs);
}

void dz_fp8_linear_b(const void *x, int64_t ldx, int64_t bf16, const uint8_t *w, const void *s, int64_t e8m0,
                     void *out, int64_t M, int64_t O, int64_t K, int64_t act_quant, int64_t nthreads, int64_t block);

/* out [M, O] = x [M, K] @ W^T, W e4m3 [O, K], s [ceil(O/128), ceil(K/128)]; act_quant: x is
 * FP8-simulated per 128 first (ref.fp8_act_sim) */
void dz_fp8_linear(const void *x, int64_t ldx, int64_t bf16, const uint8_t *w, const void *s, int64_t e8m0,
                   void *out, int64_t M, int64_t O, int64_t K, int64_t act_quant, int64_t nthreads) {
    dz_fp8_linear_b(x, ldx, bf16, w, s, e8m0, out, M, O, K, act_quant, nthreads, 128);
}

/* dz_fp8_linear with scale blocks of block x block (128: V4's; 32: V4.1's dense weights), s
 * [ceil(O/block), ceil(K/block)]; the activation simulation stays per 128 (ref.fp8_act_sim) */
void dz_fp8_linear_b(const void *x, int64_t ldx, int64_t bf16, const uint8_t *w, const void *s, int64_t e8m0,
                     void *out, int64_t M, int64_t O, int64_t K, int64_t act_quant, int64_t nthreads, int64_t block) {
    const QMat q = {w, (const char *)s, K, O, (int)e8m0, bf16 && !e8m0, block == 32};
#if DZ_BF16DOT
    if (bf16 && use_bf16dot) { /* bf16 rows (FP8-simulated in bf16), zeros to Kp; every row count (the
                                * fp32 kernels decode 1-2 rows faster, but round differently: a row's
                                * result would depend on how many rows share the call) */
        const int64_t Kp = rows_kp(K, 1, 1);
        uint16_t *xb = (uint16_t *)dz_alloc(M * Kp * 2);
        for (int64_t m = 0; m < M; m++) {
            uint16_t *r = xb + m * Kp;
            memcpy(r, (const uint16_t *)x + m * ldx, (size_t)K * 2);
            memset(r + K, 0, (size_t)(Kp - K) * 2);
            if (act_quant)
                for (int64_t k = 0; k < K; k += 128) fp8_sim_block_bf16(r + k, min64(128, K - k));
        }
#if MANY_ROWS
        if (M >= ROWS_MIN)
            rows_linear(&q, 1, 1, (const char *)xb, Kp * 2, M, out, 1, nthreads);
        else
#endif
            linear(&q, fp8_tile_bf, (const char *)xb, Kp * 2, M, out, 1, nthreads, FP8_ITEM_ROWS);
        free(xb);
        return;
    }
#endif
    if (!bf16 && !act_quant && M <= 2) { /* fp32 rows used in place */
        linear(&q, fp8_tile, (const char *)x, ldx * 4, M, out, 0, nthreads, FP8_ITEM_ROWS);
        return;
    }
    const int64_t ld = pad_ld(K);
    float *xf = (float *)dz_alloc(M * ld * 4);
    for (int64_t m = 0; m < M; m++) {
        dz_load_row((const char *)x + m * ldx * (bf16 ? 2 : 4), K, (int)bf16, xf + m * ld);
        if (act_quant)
            for (int64_t k = 0; k < K; k += 128) fp8_sim_block(xf + m * ld + k, min64(128, K - k));
        memset(xf + m * ld + K, 0, (size_t)(rows_kp(K, 1, 0) - K) * 4); /* the many-rows path reads Kp */
    }
#if MANY_ROWS
    if (M >= ROWS_MIN)
        rows_linear(&q, 1, 0, (const char *)xf, ld * 4, M, out, (int)bf16, nthreads);
    else
#endif
        linear(&q, fp8_tile, (const char *)xf, ld * 4, M, out, (int)bf16, nthreads, FP8_ITEM_ROWS);
    free(xf);
}

/* ---- grouped FP8 linear (the attention's grouped wo_a) ---------------------------------------------
 * out[m, g*R + o] = x[m, g*K : (g+1)*K] . W[g*R + o] for G groups: W e4m3 [G*R, K] with 128x128 block
 * scales s [G*R/128, ceil(K/128)], R % 128 == 0 (each group is whole scale blocks); x [M, G*K] (row
 * stride ldx elements) and out [M, G*R] in x's dtype. One call instead of G dz_fp8_linear calls: one
 * team, started once, over work items that are (group, tile of rows), so every thread has work
 * (G calls of a decode-sized group each started a team for a few items per thread). Each group is
 * the QMat dz_fp8_linear would see for it alone, its activation rows prepared the way dz_fp8_linear
 * prepares them (same path for the same M and dtype), and every output comes from the same tile /
 * panel functions: bit-identical to the G calls (results depend on neither tiling nor threads).
 * No act_quant (the caller's grouped op has none). */

void dz_fp8_linear_grouped(const void *x, int64_t ldx, int64_t bf16, const uint8_t *w, const void *s, int64_t e8m0,
                           void *out, int64_t M, int64_t G, int64_t R, int64_t K, int64_t nthreads) {
    const int64_t ldo = G * R, osz = bf16 ? 2 : 4, xsz = bf16 ? 2 : 4;
    const int64_t gs = (R >> 7) * cdiv(K, 128) * (e8m0 ? 1 : 4); /* scale bytes of one group */
    const char *xs;     /* group g's row m at xs + g * gx + m * ldb */
    int64_t ldb, gx;
    tile_fn tile = fp8_tile;
    int bfd = 0;
    void *buf = NULL;
#if DZ_BF16DOT
    if (bf16 && use_bf16dot) { /* dz_fp8_linear's bf16 rows: zeros from K to Kp */
        const int64_t Kp = rows_kp(K, 1, 1);
        uint16_t *xb = (uint16_t *)(buf = dz_alloc(G * M * Kp * 2));
        for (int64_t g = 0; g < G; g++)
            for (int64_t m = 0; m < M; m++) {
                uint16_t *r = xb + (g * M + m) * Kp;
                memcpy(r, (const uint16_t *)x + m * ldx + g * K, (size_t)K * 2);
                memset(r + K, 0, (size_t)(Kp - K) * 2);
            }
        xs = (const char *)xb, ldb = Kp * 2, gx = M * Kp * 2, tile = fp8_tile_bf, bfd = 1;
    } else
#endif
    if (!bf16 && M <= 2) { /* fp32 rows used in place, as dz_fp8_linear */
        xs = (const char *)x, ldb = ldx * 4, gx = K * 4;
    } else { /* fp32 rows, zeros from K to the many-rows path's Kp */
        const int64_t ld = pad_ld(K);
        float *xf = (float *)(buf = dz_alloc(G * M * ld * 4));
        for (int64_t g = 0; g < G; g++)
            for (int64_t m = 0; m < M; m++) {
                float *r = xf + (g * M + m) * ld;
                dz_load_row((const char *)x + (m * ldx + g * K) * xsz, K, (int)bf16, r);
                memset(r + K, 0, (size_t)(rows_kp(K, 1, 0) - K) * 4);
            }
        xs = (const char *)xf, ldb = ld * 4, gx = M * ld * 4;
    }
#define GROUP_Q(g) {w + (g) * R * K, (const char *)s + (g) * gs, K, R, (int)e8m0, bf16 && !e8m0}
    const int64_t macs = M * G * R * K;
#if MANY_ROWS
    if (M >= ROWS_MIN) { /* rows_linear's panels of OP rows, per group */
        const int64_t Kp = rows_kp(K, 1, bfd), per = cdiv(R, OP), items = G * per;
        const char **xr = (const char **)dz_alloc(G * M * (int64_t)sizeof(char *));
        for (int64_t g = 0; g < G; g++)
            for (int64_t m = 0; m < M; m++) xr[g * M + m] = xs + g * gx + m * ldb;
        const int nt = team(nthreads, macs, items);
#pragma omp parallel num_threads(nt)
        {
            void *wbuf = dz_alloc(OP * Kp * (bfd ? 2 : 4));
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items; it++) {
                const int64_t g = it / per, o0 = it % per * OP;
                const QMat q = GROUP_Q(g);
                rows_item(&q, 1, bfd, xr + g * M, M, o0, min64(R, o0 + OP), wbuf, (char *)out + g * R * osz, ldo, 0,
                          (int)bf16);
            }
            free(wbuf);
        }
        free(xr);
        free(buf);
        return;
    }
#endif
    (void)bfd; /* read by the many-rows path only (AVX-512 builds) */
    /* linear()'s items, sized over all G * R rows (>= 8 items per thread where they allow) */
    const int nt = team(nthreads, macs, G * cdiv(R, 16));
    int64_t Rt = TILE;
    if (nt > 1) {
        Rt = (cdiv(G * R, 8 * nt) + 1) & ~(int64_t)1;
        Rt = Rt > FP8_ITEM_ROWS ? FP8_ITEM_ROWS : (Rt < 16 ? 16 : Rt);
    }
    const int64_t per = cdiv(R, Rt), items = G * per;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        const int64_t g = it / per, o0 = it % per * Rt;
        const QMat q = GROUP_Q(g);
        tile_item(&q, tile, xs + g * gx, ldb, M, (char *)out + g * R * osz, ldo, (int)bf16, o0, min64(R, o0 + Rt));
    }
#undef GROUP_Q
    free(buf);
}

/* ---- routed experts ----------------------------------------------------------------------------- */
/* h = rw * (silu(g') * u') for the n outputs o0.. of one pair, g' = min(g, limit), u' = u clamped
 * to +-limit (limit > 0), g and u first rounded to x's dtype (the twin's fp4_linear outputs); h is
 * stored rounded to x's dtype at its place in the activation layout (g64_pos for the bf16 kernel,
 * g32_pos for the fp32 one). silu(g) = g / (1 + e^-g), e^-g within ~1 ulp (as PyTorch's). */
static void swiglu_store(const float *g, const float *u, int64_t n, int64_t o0, float rw, float limit, int xb, int bfd,
                         char *hrow) {
    float hv[TILE];
    int64_t j = 0;
#if DZ_AVX512
    const __m512 vr = _mm512_set1_ps(rw), lim = _mm512_set1_ps(limit), one = _mm512_set1_ps(1.0f);
    for (; j + 16 <= n; j += 16) {
        __m512 gv = _mm512_loadu_ps(g + j), uv = _mm512_loadu_ps(u + j);
        if (xb) {
            gv = rnd_bf16_v(gv);
            uv = rnd_bf16_v(uv);
        }
        if (limit > 0.0f) {
            gv = _mm512_min_ps(gv, lim);
            uv = _mm512_min_ps(_mm512_max_ps(uv, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
        }
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(hv + j, _mm512_mul_ps(vr, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv)));
    }
#endif
    for (; j < n; j++) {
        float gv = round_to(g[j], xb), uv = round_to(u[j], xb);
        if (limit > 0.0f) {
            gv = gv < limit ? gv : limit;
            uv = uv < -limit ? -limit : (uv > limit ? limit : uv);
        }
        hv[j] = rw * (gv / (1.0f + expf(-gv)) * uv);
    }
    for (j = 0; j < n; j++) {
        if (bfd)
            ((uint16_t *)hrow)[g64_pos(o0 + j)] = dz_f32_to_bf16(hv[j]);
        else
            ((float *)hrow)[g32_pos(o0 + j)] = round_to(hv[j], xb);
    }
}

#if DZ_BF16DOT && DZ_FAST_FP4
/* Decode-sized blocks (mb <= MB pairs of an expert) with bf16 x, E8M0 scales: the two weight rows
 * sharing each activation load are taken from two separate streams (gate row o with up row o; the
 * two halves of a down tile), each stream walking consecutive rows, i.e. sequential memory, so a
 * stream never shares a 4 KiB page with another one (the hardware prefetchers follow it) and its
 * software prefetch runs one row ahead. Every (row, x row) sum is formed as fp4_micro_bf forms it
 * (the same steps, the same two accumulators, reduced once): bit-identical to the tile path.
 * moe_pair_bf: rows wa (scales sa, sums into oa[m * TILE]) and, unless wb is NULL, wb (sb, ob),
 * K columns each, against mb <= MB activation rows (split64_row layout). */
AI void moe_micro_fast(const uint8_t *const *wr, const uint8_t *const *sr, int64_t pf, const uint16_t *const *xr,
                       int64_t G, const int nr, const int mb, float *const *out) {
    __m512 a0[2][MB], a1[2][MB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++) a0[r][m] = a1[r][m] = _mm512_setzero_ps();
    fp4_fast_rows(wr, sr, pf, xr, G, nr, mb, 1, a0, a1);
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mb; m++) out[r][m * TILE] += _mm512_reduce_add_ps(_mm512_add_ps(a0[r][m], a1[r][m]));
}

static void moe_pair_bf(const uint8_t *wa, const uint8_t *sa, float *oa, const uint8_t *wb, const uint8_t *sb,
                        float *ob, int64_t K, const uint16_t *const *xr, int mb) {
    const int64_t G = K / 32, H = K / 2, pf = cdiv(PF, H) * H;
    const int nr = wb ? 2 : 1;
    if (!scales_in(sa, 0, 1, G, FP4_SB_LO, FP4_SB_HI) || (wb && !scales_in(sb, 0, 1, G, FP4_SB_LO, FP4_SB_HI))) {
        fp4_rows_bf(wa, H, sa, G, 1, xr, K, 1, mb, oa); /* the float route (the same words) */
        if (wb) fp4_rows_bf(wb, H, sb, G, 1, xr, K, 1, mb, ob);
        return;
    }
    const uint8_t *wr[2] = {wa, wb}, *sr[2] = {sa, sb};
    if (mb > MR4) { /* one row at a time against all mb x rows (as fp4_rows_bf) */
        for (int r = 0; r < nr; r++) {
            float *o[1] = {r ? ob : oa};
#define FR(NR, M) moe_micro_fast(wr + r, sr + r, pf, xr, G, NR, M, o)
            switch (mb) { ROW8_CASES(FR) }
#undef FR
        }
        return;
    }
    float *o[2] = {oa, ob};
#define FB(NR, M) moe_micro_fast(wr, sr, pf, xr, G, NR, M, o)
    if (nr == 2) {
        switch (mb) { MR4_CASES(FB, 2) }
    } else {
        switch (mb) { MR4_CASES(FB, 1) }
    }
#undef FB
}

/* gate and up rows o0 .. o1 - 1 (r1, r3: res layout) of one block of mb pairs */
static void moe_gate_up_bf(const QMat *q1, const QMat *q3, const uint16_t *const *xr, int mb, int64_t o0, int64_t o1,
                           float *r1, float *r3) {
    const int64_t H = q1->K / 2, G = q1->K / 32;
    memset(r1, 0, sizeof(float) * (size_t)(mb * TILE));
    memset(r3, 0, sizeof(float) * (size_t)(mb * TILE));
    for (int64_t o = o0; o < o1; o++)
        moe_pair_bf(q1->w + o * H, (const uint8_t *)q1->s + o * G, r1 + (o - o0), q3->w + o * H,
                    (const uint8_t *)q3->s + o * G, r3 + (o - o0), q1->K, xr, mb);
}

/* down rows o0 .. o1 - 1 of one block: the tile's two halves as the two streams */
static void moe_down_bf(const QMat *q2, const uint16_t *const *xr, int mb, int64_t o0, int64_t o1, float *res) {
    const int64_t H = q2->K / 2, G = q2->K / 32, h = (o1 - o0 + 1) / 2;
    memset(res, 0, sizeof(float) * (size_t)(mb * TILE));
    for (int64_t i = 0; i < h; i++) {
        const int64_t a = o0 + i, b = o0 + h + i;
        moe_pair_bf(q2->w + a * H, (const uint8_t *)q2->s + a * G, res + (a - o0), b < o1 ? q2->w + b * H : NULL,
                    (const uint8_t *)q2->s + b * G, res + (b - o0), q2->K, xr, mb);
    }
}
#endif

/* y [N, dim] fp32 = sum_j w2_e(h_j), h_j = (rw_j * swiglu(w1_e x, w3_e x)) in x's dtype,
 * e = ids[n, j]: gate / up are rounded to x's dtype first (the twin's fp4_linear outputs), h
 * optionally FP8-simulated per 128 (h_act_sim), each pair's down projection rounded to x's dtype,
 * the k slots summed in fp32 in slot order.
 * w1, s1, w3, s3, w2, s2: the address of each expert's weight / scale (E entries each), so the
 * experts are read where they lie (memory-mapped checkpoint shards: nothing is stacked or copied).
 * Pairs are grouped by expert (counting sort), so each touched expert's weights are streamed once
 * per block of MB of its pairs; work items are (expert, tile of output rows), dynamically scheduled.
 * status: 0 ok, 1 an id outside [0, E) (nothing computed). */
void dz_moe_fp4(const void *x, int64_t bf16, int64_t N, int64_t dim, int64_t inter, int64_t k,
                const int64_t *ids, const float *rw, int64_t E,
                const int64_t *w1, const int64_t *s1, int64_t e1, const int64_t *w3, const int64_t *s3, int64_t e3,
                const int64_t *w2, const int64_t *s2, int64_t e2, float limit, int64_t h_act_sim,
                float *out, int64_t *status, int64_t nthreads) {
    const int64_t P = N * k;
    *status = 0;
    for (int64_t p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) {
            *status = 1;
            return;
        }
    /* counting sort of the pairs by expert (stable: pair order within an expert) */
    int64_t *start = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *fill = (int64_t *)dz_alloc(E * 8);
    int64_t *order = (int64_t *)dz_alloc(P * 8), *touched = (int64_t *)dz_alloc(min64(P, E) * 8);
    for (int64_t p = 0; p < P; p++) start[ids[p] + 1]++;
    int64_t ne = 0;
    for (int64_t e = 0; e < E; e++) {
        if (start[e + 1]) touched[ne++] = e;
        start[e + 1] += start[e];
    }
    memcpy(fill, start, (size_t)E * 8);
    for (int64_t p = 0; p < P; p++) order[fill[ids[p]]++] = p;
    const int xb = (int)bf16;
#if DZ_BF16DOT
    const int bfd = xb && use_bf16dot; /* bf16 activations: vdpbf16ps kernels on bf16 rows (h is bf16-valued) */
#else
    const int bfd = 0;
#endif
    const int64_t esz = bfd ? 2 : 4;
    const int64_t ldx = bfd ? pad_ld64(dim) : pad_ld(dim), ldh = bfd ? pad_ld64(inter) : pad_ld(inter);
    const int64_t hlen = bfd ? (inter + 63) & ~(int64_t)63 : inter; /* h positions incl. zero padding */
    char *xs = (char *)dz_alloc(N * ldx * esz);  /* x rows in the kernels' layout */
    char *hs = (char *)dz_alloc(P * ldh * esz);  /* h per pair (x's dtype values), same layout */
    float *yp = (float *)dz_alloc(P * dim * 4);  /* down projection per pair (x's dtype values) */
    if (bfd && hlen != inter) memset(hs, 0, (size_t)(P * ldh * esz));
    tile_fn tile = fp4_tile;
#if DZ_BF16DOT
    if (bfd) tile = fp4_tile_bf;
#endif
    const int64_t cu = cdiv(inter, TILE), cd = cdiv(dim, TILE), nu = ne * cu, nd = ne * cd;
    const int nt = team(nthreads, P * dim * inter * 3, nu);
    for (int64_t n = 0; n < N; n++) {
        if (bfd)
            split64_row((const uint16_t *)x + n * dim, dim, (uint16_t *)xs + n * ldx);
        else
            split_row((const char *)x + n * dim * (bf16 ? 2 : 4), xb, dim, (float *)xs + n * ldx);
    }
#if MANY_ROWS
    /* experts with >= MOE_ROWS_MIN pairs take the many-rows path: their pairs' x rows and h rows
     * read in place (xr, hr: the row of each pair, in expert order) */
    const int64_t Kx = rows_kp(dim, 0, bfd), Kh = rows_kp(inter, 0, bfd);
    int64_t maxc = 0;
    for (int64_t t = 0; t < ne; t++) {
        const int64_t c = start[touched[t] + 1] - start[touched[t]];
        maxc = c >= MOE_ROWS_MIN && c > maxc ? c : maxc;
    }
    const char **xr = NULL, **hr = NULL;
    if (maxc) {
        xr = (const char **)dz_alloc(P * (int64_t)sizeof(char *));
        hr = (const char **)dz_alloc(P * (int64_t)sizeof(char *));
        for (int64_t q0 = 0; q0 < P; q0++) {
            xr[q0] = xs + (order[q0] / k) * ldx * esz;
            hr[q0] = hs + order[q0] * ldh * esz;
        }
    }
#endif

#pragma omp parallel num_threads(nt)
    {
        float r1[TILE * MB], r3[TILE * MB];
#if MANY_ROWS
        void *wbuf = maxc ? dz_alloc(OP * (Kx > Kh ? Kx : Kh) * esz) : NULL;
        float *gb = maxc ? (float *)dz_alloc(maxc * TILE * 4) : NULL, *ub = maxc ? (float *)dz_alloc(maxc * TILE * 4) : NULL;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nu; it++) {
            const int64_t e = touched[it / cu], o0 = (it % cu) * TILE, o1 = min64(inter, o0 + TILE);
            const QMat q1 = {(const uint8_t *)w1[e], (const char *)s1[e], dim, inter,
                             (int)e1, xb && !e1};
            const QMat q3 = {(const uint8_t *)w3[e], (const char *)s3[e], dim, inter,
                             (int)e3, xb && !e3};
#if MANY_ROWS
            const int64_t cnt = start[e + 1] - start[e];
            if (cnt >= MOE_ROWS_MIN) {
                rows_item(&q1, 0, bfd, xr + start[e], cnt, o0, o1, wbuf, gb, TILE, o0, 0);
                rows_item(&q3, 0, bfd, xr + start[e], cnt, o0, o1, wbuf, ub, TILE, o0, 0);
                for (int64_t i = 0; i < cnt; i++) {
                    const int64_t p = order[start[e] + i];
                    swiglu_store(gb + i * TILE, ub + i * TILE, o1 - o0, o0, rw[p], limit, xb, bfd, hs + p * ldh * esz);
                }
                continue;
            }
#endif
            for (int64_t q0 = start[e]; q0 < start[e + 1]; q0 += MB) {
                const int mb = (int)min64(MB, start[e + 1] - q0);
                const void *xr[MB];
                for (int i = 0; i < mb; i++) xr[i] = xs + (order[q0 + i] / k) * ldx * esz;
#if DZ_BF16DOT && DZ_FAST_FP4
                if (bfd && use_moe_streams && use_fast_decode && e1 && e3)
                    moe_gate_up_bf(&q1, &q3, (const uint16_t *const *)xr, mb, o0, o1, r1, r3);
                else
#endif
                {
                    tile(&q1, xr, mb, o0, o1, r1);
                    tile(&q3, xr, mb, o0, o1, r3);
                }
                for (int i = 0; i < mb; i++) {
                    const int64_t p = order[q0 + i];
                    swiglu_store(r1 + i * TILE, r3 + i * TILE, o1 - o0, o0, rw[p], limit, xb, bfd, hs + p * ldh * esz);
                }
            }
        }

        if (h_act_sim) { /* a natural 128-block is whole groups: contiguous in either layout */
#pragma omp for schedule(static)
            for (int64_t p = 0; p < P; p++)
                for (int64_t c = 0; c < hlen; c += 128) {
                    if (bfd)
                        fp8_sim_block_bf16((uint16_t *)hs + p * ldh + c, min64(128, hlen - c));
                    else
                        fp8_sim_block((float *)hs + p * ldh + c, min64(128, hlen - c));
                }
        }

#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nd; it++) {
            const int64_t e = touched[it / cd], o0 = (it % cd) * TILE, o1 = min64(dim, o0 + TILE);
            const QMat q2 = {(const uint8_t *)w2[e], (const char *)s2[e], inter, dim,
                             (int)e2, xb && !e2};
#if MANY_ROWS
            const int64_t cnt = start[e + 1] - start[e];
            if (cnt >= MOE_ROWS_MIN) {
                rows_item(&q2, 0, bfd, hr + start[e], cnt, o0, o1, wbuf, gb, TILE, o0, 0);
                for (int64_t i = 0; i < cnt; i++)
                    for (int64_t o = o0; o < o1; o++) yp[order[start[e] + i] * dim + o] = round_to(gb[i * TILE + o - o0], xb);
                continue;
            }
#endif
            for (int64_t q0 = start[e]; q0 < start[e + 1]; q0 += MB) {
                const int mb = (int)min64(MB, start[e + 1] - q0);
                const void *hr[MB];
                for (int i = 0; i < mb; i++) hr[i] = hs + order[q0 + i] * ldh * esz;
#if DZ_BF16DOT && DZ_FAST_FP4
                if (bfd && use_moe_streams && use_fast_decode && e2)
                    moe_down_bf(&q2, (const uint16_t *const *)hr, mb, o0, o1, r1);
                else
#endif
                    tile(&q2, hr, mb, o0, o1, r1);
                for (int i = 0; i < mb; i++)
                    for (int64_t o = o0; o < o1; o++) yp[order[q0 + i] * dim + o] = round_to(r1[i * TILE + o - o0], xb);
            }
        }
#if MANY_ROWS
        free(wbuf);
        free(gb);
        free(ub);
#endif
    }
    /* the k slots of each token, in slot order (a team only for prefill-sized batches) */
#pragma omp parallel for num_threads(N * k * dim < PAR_MIN ? 1 : nt) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t d = 0; d < dim; d++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++) acc += yp[(n * k + j) * dim + d];
            out[n * dim + d] = acc;
        }
    free(xs);
    free(hs);
    free(yp);
#if MANY_ROWS
    free(xr);
    free(hr);
#endif
    free(start);
    free(fill);
    free(order);
    free(touched);
}
