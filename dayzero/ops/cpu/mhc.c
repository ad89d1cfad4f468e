/* Norms, FP8 activation simulation, compressor pooling and mHC (manifold-constrained
 * hyper-connections) on the CPU. Twins: ops/ref.py rms_norm, fp8_act_sim, compress_pool, hc_pre
 * (= hc_mixes + hc_split_sinkhorn + hc_collapse), hc_post.
 *
 * SIMD: GCC/Clang generic vectors of DZV fp32 lanes (16 with AVX-512, 8 with AVX, else 4), lowered
 * to whatever the -march allows; FMA through intrinsics where the target has it. The build is ISO
 * C11 (-std=c11 implies -ffp-contract=off), so the compiler never contracts a*b+c by itself:
 * elementwise formulas round where the twins round (a product, then a sum); FMA only where the twin
 * has a reduction of its own order (projections, sums of squares, sums over streams or slots).
 *
 * Threads: OpenMP (torch's libgomp), nthreads from torch.get_num_threads(); a kernel forks only
 * when its work is worth a team wake-up (decode calls are 1-2 tokens and stay on the caller).
 * Every result is independent of the thread count (no reduction is split by thread).
 */
#include "common.h"

#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__AVX512F__)
#define DZV 16
#elif defined(__AVX__)
#define DZV 8
#else
#define DZV 4 /* SSE2 (-march=x86-64), NEON and the rest: one 128-bit register */
#endif

typedef float vf __attribute__((vector_size(DZV * 4)));
typedef int32_t vi __attribute__((vector_size(DZV * 4)));
typedef uint32_t vu __attribute__((vector_size(DZV * 4)));
typedef uint16_t vh __attribute__((vector_size(DZV * 2)));

#define AI static inline __attribute__((always_inline))

/* work (elements or multiply-adds) below which a kernel runs on the calling thread */
#define PAR_MIN ((int64_t)1 << 16)

/* ---- vector helpers -------------------------------------------------------------------------- */
AI vf vsplat(float s) { return (vf){0} + s; }

AI vf vfma(vf a, vf b, vf c) {
#if DZV == 16 && defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif DZV == 8 && defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* DZV elements of an fp32 (bf16 = 0) or bf16 array from element i */
AI vf vload(const void *p, int64_t i, int bf16) {
    if (bf16) {
        vh h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
    vf f;
    memcpy(&f, (const float *)p + i, sizeof f);
    return f;
}

/* cnt < DZV elements, zeros in the other lanes (tails only: the loop kept out of line, small code;
 * through memory, so that no vector crosses a call under any -march) */
static __attribute__((noinline)) void load_part(const void *p, int64_t i, int64_t cnt, int bf16, float *dst) {
    for (int64_t k = 0; k < DZV; k++) dst[k] = k < cnt ? dz_load(p, i + k, bf16) : 0.0f;
}

AI vf vload_part(const void *p, int64_t i, int64_t cnt, int bf16) {
    float b[DZV];
    load_part(p, i, cnt, bf16, b);
    vf f;
    memcpy(&f, b, sizeof f);
    return f;
}

AI vf vload_n(const void *p, int64_t i, int64_t cnt, int bf16) {
    return cnt >= DZV ? vload(p, i, bf16) : vload_part(p, i, cnt, bf16);
}

/* fp32 -> bf16 bits, round to nearest even, NaN kept quiet (as common.h dz_f32_to_bf16) */
AI vh vbf16(vf f) {
    vu u = (vu)f;
    vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu q = (u >> 16) | 0x40u;
    return __builtin_convertvector((q & nan) | (r & ~nan), vh);
}

AI void vstore(void *p, int64_t i, vf v, int bf16) {
    if (bf16) {
        vh h = vbf16(v);
        memcpy((uint16_t *)p + i, &h, sizeof h);
    } else {
        memcpy((float *)p + i, &v, sizeof v);
    }
}

static __attribute__((noinline)) void store_part(void *p, int64_t i, const float *src, int64_t cnt, int bf16) {
    for (int64_t k = 0; k < cnt; k++) dz_store(p, i + k, src[k], bf16);
}

AI void vstore_n(void *p, int64_t i, vf v, int64_t cnt, int bf16) {
    if (cnt >= DZV) {
        vstore(p, i, v, bf16);
    } else {
        float b[DZV];
        memcpy(b, &v, sizeof b);
        store_part(p, i, b, cnt, bf16);
    }
}

/* lanes summed pairwise in a fixed tree */
AI float vhsum(vf v) {
    float s[DZV];
    memcpy(s, &v, sizeof s);
    for (int w = DZV / 2; w > 0; w /= 2)
        for (int k = 0; k < w; k++) s[k] += s[k + w];
    return s[0];
}

/* 16 fp32 lanes whatever DZV: the 4 x 4 mHC mixing matrix as one vector */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#if defined(__clang__) || __GNUC__ >= 12
#define DZ_SHUF(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define DZ_SHUF(v, ...) __builtin_shuffle(v, (v16i){__VA_ARGS__})
#endif

/* max(a, b) lane-wise (a NaN in b is dropped: callers let NaN come back through the exp that
 * follows, as the twins' max propagates it) */
#define DZ_DEFINE_VMAX(name, V, I)                                                               \
    AI V name(V a, V b) {                                                                        \
        I m = a < b;                                                                             \
        return (V)(((I)a & ~m) | ((I)b & m));                                                    \
    }

/* exp(x) lane-wise (Cephes expf: Cody-Waite reduction, degree-5 polynomial; about 1 ulp).
 * exp(-inf) = 0, exp(NaN) = NaN, x < -103.97 -> 0 (subnormal results below that are flushed;
 * softmax weights that small vanish next to the maximum's 1), x > 88.72 -> inf. */
#define DZ_DEFINE_VEXP(name, V, I)                                                               \
    AI V name(V x) {                                                                             \
        const V lo = (V){0} - 103.97f, hi = (V){0} + 88.72284f, zero = {0};                      \
        I under = x < lo, over = x > hi, nanm = x != x;                                          \
        V xc = (V)(((I)x & ~(under | over)) | ((I)lo & under));                                  \
        V fn = xc * 1.44269504088896341f;                                                        \
        fn = (fn + 12582912.0f) - 12582912.0f; /* round to nearest, |fn| < 2^22 */               \
        V r = xc - fn * 0.693359375f;                                                            \
        r = r - fn * -2.12194440e-4f;                                                            \
        V p = zero + 1.9875691500E-4f;                                                           \
        p = p * r + 1.3981999507E-3f;                                                            \
        p = p * r + 8.3334519073E-3f;                                                            \
        p = p * r + 4.1665795894E-2f;                                                            \
        p = p * r + 1.6666665459E-1f;                                                            \
        p = p * r + 5.0000001201E-1f;                                                            \
        p = p * (r * r) + r + 1.0f;                                                              \
        I e = __builtin_convertvector(fn, I);                                                    \
        I e1 = e >> 1, e2 = e - e1; /* 2^e as 2^e1 * 2^e2: e down to -150 stays normal */      \
        V y = (p * (V)((e1 + 127) << 23)) * (V)((e2 + 127) << 23);                              \
        y = (V)(((I)y & ~(under | over)) | ((I)(zero + INFINITY) & over));                       \
        return (V)(((I)y & ~nanm) | ((I)x & nanm));                                              \
    }

DZ_DEFINE_VMAX(vmax, vf, vi)
DZ_DEFINE_VMAX(vmax16, v16, v16i)
DZ_DEFINE_VEXP(vexp, vf, vi)
DZ_DEFINE_VEXP(vexp16, v16, v16i)

/* ======================================================================================== */
/* rms_norm                                                                                 */
/* ======================================================================================== */

/* x [rows, d] -> out [rows, d] (same dtype); w: NULL, fp32 (w_kind 1) or bf16 (w_kind 2).
 * y = (x * rsqrt(sum(x^2) / d + eps)) * w, fp32, one cast back. */
AI void rms_rows(const void *x, int bf16, int64_t r0, int64_t r1, int64_t d, const void *w, int wk,
                 float eps, void *out) {
    for (int64_t r = r0; r < r1; r++) {
        const int64_t o = r * d;
        vf acc = vsplat(0.0f);
        int64_t c = 0;
        for (; c + DZV <= d; c += DZV) {
            vf v = vload(x, o + c, bf16);
            acc = vfma(v, v, acc);
        }
        if (c < d) {
            vf v = vload_part(x, o + c, d - c, bf16);
            acc = vfma(v, v, acc);
        }
        const float rs = 1.0f / sqrtf(vhsum(acc) / (float)d + eps);
        for (c = 0; c < d; c += DZV) {
            const int64_t cnt = d - c;
            vf y = vload_n(x, o + c, cnt, bf16) * rs;
            if (wk) y = y * vload_n(w, c, cnt, wk == 2);
            vstore_n(out, o + c, y, cnt, bf16);
        }
    }
}

static void rms_dispatch(const void *x, int bf16, int64_t r0, int64_t r1, int64_t d, const void *w, int wk,
                         float eps, void *out) {
    switch (bf16 * 3 + wk) {
    case 0: rms_rows(x, 0, r0, r1, d, w, 0, eps, out); break;
    case 1: rms_rows(x, 0, r0, r1, d, w, 1, eps, out); break;
    case 2: rms_rows(x, 0, r0, r1, d, w, 2, eps, out); break;
    case 3: rms_rows(x, 1, r0, r1, d, w, 0, eps, out); break;
    case 4: rms_rows(x, 1, r0, r1, d, w, 1, eps, out); break;
    default: rms_rows(x, 1, r0, r1, d, w, 2, eps, out); break;
    }
}

void dz_rms_norm(const void *x, int64_t bf16, int64_t rows, int64_t d, const void *w, int64_t w_kind, float eps,
                 void *out, int64_t nthreads) {
    if (rows <= 0 || d <= 0) return;
    int nt = rows * d >= PAR_MIN ? dz_threads(nthreads, rows) : 1;
    if (nt <= 1) {
        rms_dispatch(x, (int)bf16, 0, rows, d, w, (int)w_kind, eps, out);
        return;
    }
    const int64_t chunk = (rows + 4 * nt - 1) / (4 * nt);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += chunk)
        rms_dispatch(x, (int)bf16, r0, r0 + chunk < rows ? r0 + chunk : rows, d, w, (int)w_kind, eps, out);
}

/* ======================================================================================== */
/* fp8_act_sim                                                                              */
/* ======================================================================================== */

/* Nearest float8_e4m3fn value of fp32 v (|v| <= 448), ties to even, by integer arithmetic on the
 * bits. The quantum is 2^(e-3) for normal e4m3 (e >= -6) and 2^-9 below, so the 24-bit
 * significand drops drop = clamp(14 - e, 20, 25) bits (25 rounds fp32 zero/subnormals to 0). */
AI vf ve4m3(vf v) {
    vu a = (vu)v;
    vu sign = a & 0x80000000u;
    vu mag = a & 0x7fffffffu;
    vi e = (vi)(mag >> 23) - 127;
    vu sig = (mag & 0x7fffffu) | 0x800000u;
    vi drop = 14 - e;
    vi lo = drop < 20, hi = drop > 25;
    drop = (drop & ~(lo | hi)) | (20 & lo) | (25 & hi);
    vu ud = (vu)drop;
    vu q = sig >> ud;
    vu rem = sig & ((1u << ud) - 1u);
    vu half = 1u << (ud - 1u);
    vu up = (vu)(rem > half) | ((vu)(rem == half) & (vu)((q & 1u) == 1u));
    q -= up; /* up is all-ones (-1) where rounding up */
    vf quantum = (vf)((e - 23 + drop + 127) << 23); /* a normal fp32 power of two */
    vf val = __builtin_convertvector((vi)q, vf) * quantum; /* q <= 16: exact */
    return (vf)((vu)val | sign);
}

AI void fp8_rows(const void *x, int bf16, int64_t r0, int64_t r1, int64_t n, int64_t block, void *out) {
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t b0 = 0; b0 < n; b0 += block) {
            const int64_t o = r * n + b0, len = block < n - b0 ? block : n - b0;
            /* amax on the bits: |x| as uint32 orders like the values, NaN above inf */
            uint32_t am = 0;
            if (bf16) {
                const uint16_t *h = (const uint16_t *)x + o;
                for (int64_t k = 0; k < len; k++) {
                    uint32_t m = ((uint32_t)h[k] << 16) & 0x7fffffffu;
                    am = m > am ? m : am;
                }
            } else {
                const uint32_t *u = (const uint32_t *)x + o;
                for (int64_t k = 0; k < len; k++) {
                    uint32_t m = u[k] & 0x7fffffffu;
                    am = m > am ? m : am;
                }
            }
            if (am >= 0x7f800000u) { /* inf or NaN in the block: the twin's scale is inf/NaN, all NaN */
                for (int64_t k = 0; k < len; k++) dz_store(out, o + k, NAN, bf16);
                continue;
            }
            const uint32_t floor_bits = 0x38d1b717u; /* (float)1e-4 */
            if (am < floor_bits) am = floor_bits;
            /* smallest 2^k with amax <= 448 * 2^k = 1.75 * 2^(k+8): with amax = 1.f * 2^(E-127),
             * k + 127 = E - 8, plus one when 1.f > 1.75 (f > 0x600000); exact */
            const int32_t es = (int32_t)(am >> 23) - 8 + ((am & 0x7fffffu) > 0x600000u);
            uint32_t sb = (uint32_t)es << 23, ib = (uint32_t)(254 - es) << 23;
            float scale, inv;
            memcpy(&scale, &sb, 4);
            memcpy(&inv, &ib, 4); /* 1 / scale, exact (scale in [2^-22, 2^120]) */
            for (int64_t k = 0; k < len; k += DZV) {
                const int64_t cnt = len - k;
                vf y = ve4m3(vload_n(x, o + k, cnt, bf16) * inv) * scale; /* 4 significant bits: exact */
                vstore_n(out, o + k, y, cnt, bf16);
            }
        }
    }
}

void dz_fp8_act_sim(const void *x, int64_t bf16, int64_t rows, int64_t n, int64_t block, void *out,
                    int64_t nthreads) {
    if (rows <= 0 || n <= 0 || block <= 0) return;
    int nt = rows * n >= PAR_MIN ? dz_threads(nthreads, rows) : 1;
    if (nt <= 1) {
        if (bf16) fp8_rows(x, 1, 0, rows, n, block, out);
        else fp8_rows(x, 0, 0, rows, n, block, out);
        return;
    }
    const int64_t chunk = (rows + 4 * nt - 1) / (4 * nt);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
        if (bf16) fp8_rows(x, 1, r0, r1, n, block, out);
        else fp8_rows(x, 0, r0, r1, n, block, out);
    }
}

/* ======================================================================================== */
/* compress_pool                                                                            */
/* ======================================================================================== */

/* kv, gate [M, S, C] with element strides (row, slot; channels contiguous) -> out [M, C] fp32:
 * per channel the softmax over the slots of gate weighting kv, as
 * sum_s kv_s exp(g_s - max) / sum_s exp(g_s - max) (one exp per element; the twin's
 * sum_s kv_s (e_s / sum) rounds in other places, within fp32 summation-order error). An all -inf
 * channel gives NaN (exp(-inf - -inf)), like the twin. */
AI void pool_rows(const void *kv, int kb, int64_t kr, int64_t ks, const void *g, int gb, int64_t gr, int64_t gs,
                  int64_t m0, int64_t m1, int64_t S, int64_t C, float *out) {
    for (int64_t m = m0; m < m1; m++) {
        for (int64_t c = 0; c < C; c += DZV) {
            const int64_t cnt = C - c;
            const int64_t go = m * gr + c, ko = m * kr + c;
            vf mx = vload_n(g, go, cnt, gb);
            for (int64_t s = 1; s < S; s++) mx = vmax(mx, vload_n(g, go + s * gs, cnt, gb));
            vf sum = vsplat(0.0f), acc = vsplat(0.0f);
            for (int64_t s = 0; s < S; s++) {
                vf e = vexp(vload_n(g, go + s * gs, cnt, gb) - mx);
                sum += e;
                acc = vfma(vload_n(kv, ko + s * ks, cnt, kb), e, acc);
            }
            vstore_n(out, m * C + c, acc / sum, cnt, 0);
        }
    }
}

static void pool_dispatch(const void *kv, int kb, int64_t kr, int64_t ks, const void *g, int gb, int64_t gr,
                          int64_t gs, int64_t m0, int64_t m1, int64_t S, int64_t C, float *out) {
    switch (kb * 2 + gb) {
    case 0: pool_rows(kv, 0, kr, ks, g, 0, gr, gs, m0, m1, S, C, out); break;
    case 1: pool_rows(kv, 0, kr, ks, g, 1, gr, gs, m0, m1, S, C, out); break;
    case 2: pool_rows(kv, 1, kr, ks, g, 0, gr, gs, m0, m1, S, C, out); break;
    default: pool_rows(kv, 1, kr, ks, g, 1, gr, gs, m0, m1, S, C, out); break;
    }
}

void dz_compress_pool(const void *kv, int64_t kv_bf16, int64_t kv_rs, int64_t kv_ss, const void *gate,
                      int64_t gate_bf16, int64_t gate_rs, int64_t gate_ss, int64_t M, int64_t S, int64_t C,
                      float *out, int64_t nthreads) {
    if (M <= 0 || S <= 0 || C <= 0) return;
    int nt = M * S * C >= PAR_MIN / 4 ? dz_threads(nthreads, M) : 1;
    if (nt <= 1) {
        pool_dispatch(kv, (int)kv_bf16, kv_rs, kv_ss, gate, (int)gate_bf16, gate_rs, gate_ss, 0, M, S, C, out);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t m = 0; m < M; m++)
        pool_dispatch(kv, (int)kv_bf16, kv_rs, kv_ss, gate, (int)gate_bf16, gate_rs, gate_ss, m, m + 1, S, C, out);
}

/* ======================================================================================== */
/* hc_pre                                                                                   */
/* ======================================================================================== */

#define HC_MAX 16                     /* streams n */
#define R_MAX ((2 + HC_MAX) * HC_MAX) /* rows of fn */
#define SLAB 1024                     /* K values one partial dot product covers */
#define TB_MAX 4                      /* tokens a register tile holds */

/* Partial projection of TB tokens (fp32 rows xs[t], len values of a K-slab) onto RG fn rows
 * fr[r] (the same slab of each row; rows >= rg repeat a valid row and their sums are dropped):
 * tot[t][rbase + r] += partial. The partial of one (token, row) is one DZV-lane FMA chain over the
 * slab plus a fixed-tree lane sum, whatever TB and RG: results never depend on how tokens were
 * tiled or work was split between threads. */
AI void mix_tile(const float *const *xs, int TB, int RG, const float *const *fr, int rg, int64_t len,
                 float (*tot)[R_MAX], int rbase) {
    vf acc[TB_MAX][8];
    for (int t = 0; t < TB; t++)
        for (int r = 0; r < RG; r++) acc[t][r] = vsplat(0.0f);
    int64_t k = 0;
    for (; k + DZV <= len; k += DZV) {
        vf xv[TB_MAX];
        for (int t = 0; t < TB; t++) xv[t] = vload(xs[t], k, 0);
        for (int r = 0; r < RG; r++) {
            vf f = vload(fr[r], k, 0);
            for (int t = 0; t < TB; t++) acc[t][r] = vfma(xv[t], f, acc[t][r]);
        }
    }
    if (k < len) {
        vf xv[TB_MAX];
        for (int t = 0; t < TB; t++) xv[t] = vload_part(xs[t], k, len - k, 0);
        for (int r = 0; r < RG; r++) {
            vf f = vload_part(fr[r], k, len - k, 0);
            for (int t = 0; t < TB; t++) acc[t][r] = vfma(xv[t], f, acc[t][r]);
        }
    }
    for (int t = 0; t < TB; t++)
        for (int r = 0; r < RG; r++)
            if (r < rg) tot[t][rbase + r] += vhsum(acc[t][r]);
}

/* sum of squares of x[0, len) (fp32) */
static float sumsq(const float *x, int64_t len) {
    vf acc = vsplat(0.0f);
    int64_t k = 0;
    for (; k + DZV <= len; k += DZV) {
        vf v = vload(x, k, 0);
        acc = vfma(v, v, acc);
    }
    if (k < len) {
        vf v = vload_part(x, k, len - k, 0);
        acc = vfma(v, v, acc);
    }
    return vhsum(acc);
}

/* one K-slab [k0, k0 + len) of TB tokens (fp32 slab rows xs[t]): every fn row and the sums of
 * squares */
AI void mix_slab(const float *const *xs, int TB, const float *fn, int64_t K, int R, int64_t k0, int64_t len,
                 float (*tot)[R_MAX], float *ss) {
    /* register tile TB x RG accumulators: 8 or 16 of AVX-512's 32 registers, 8 otherwise */
#if DZV == 16
    const int RG = TB >= 4 ? 4 : 8;
#else
    const int RG = TB >= 2 ? 4 : 8;
#endif
    for (int r0 = 0; r0 < R; r0 += RG) {
        const int rg = R - r0 < RG ? R - r0 : RG;
        const float *fr[8];
        for (int r = 0; r < RG; r++) fr[r] = fn + (int64_t)(r0 + (r < rg ? r : 0)) * K + k0;
        mix_tile(xs, TB, RG, fr, rg, len, tot, r0);
    }
    for (int t = 0; t < TB; t++) ss[t] += sumsq(xs[t], len);
}

/* x[0, len) of an fp32 or bf16 row as fp32: bf16 converted into buf, fp32 used in place */
static const float *as_f32(const void *x, int bf16, int64_t len, float *buf) {
    if (!bf16) return (const float *)x;
    int64_t k = 0;
    for (; k + DZV <= len; k += DZV) vstore(buf, k, vload(x, k, 1), 0);
    for (; k < len; k++) buf[k] = dz_bf16_to_f32(((const uint16_t *)x)[k]);
    return buf;
}

static float sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }

/* Sinkhorn on the n x n comb (rows j, cols k), any n <= HC_MAX: row softmax + eps, column
 * normalisation, then (iters - 1) x (row, column) normalisation, each sum + eps as a divisor. */
static void sinkhorn_n(const float *mix, float rs, float s2, const float *base, int n, int64_t iters, float eps,
                       float *c) {
    float cs[HC_MAX];
    for (int j = 0; j < n; j++) {
        float *row = c + j * n;
        float m = -INFINITY;
        for (int k = 0; k < n; k++) {
            row[k] = (mix[j * n + k] * rs) * s2 + base[j * n + k];
            m = row[k] > m ? row[k] : m;
        }
        float sum = 0.0f;
        for (int k = 0; k < n; k++) {
            row[k] = expf(row[k] - m);
            sum += row[k];
        }
        for (int k = 0; k < n; k++) row[k] = row[k] / sum + eps;
    }
    for (int64_t it = 0; it < (iters > 1 ? iters : 1); it++) {
        if (it > 0) {
            for (int j = 0; j < n; j++) {
                float rsum = 0.0f;
                for (int k = 0; k < n; k++) rsum += c[j * n + k];
                rsum += eps;
                for (int k = 0; k < n; k++) c[j * n + k] = c[j * n + k] / rsum;
            }
        }
        for (int k = 0; k < n; k++) cs[k] = c[k];
        for (int j = 1; j < n; j++)
            for (int k = 0; k < n; k++) cs[k] += c[j * n + k];
        for (int k = 0; k < n; k++) cs[k] += eps;
        for (int j = 0; j < n; j++)
            for (int k = 0; k < n; k++) c[j * n + k] = c[j * n + k] / cs[k];
    }
}

/* each lane: the sum of its row / of its column of a 4 x 4 matrix (the same value in every lane
 * of the row / column: fp32 addition commutes) */
AI v16 rowsum4(v16 c) {
    c = c + DZ_SHUF(c, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return c + DZ_SHUF(c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
}
AI v16 colsum4(v16 c) {
    c = c + DZ_SHUF(c, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    return c + DZ_SHUF(c, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
}
AI v16 rowmax4(v16 c) {
    c = vmax16(c, DZ_SHUF(c, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return vmax16(c, DZ_SHUF(c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
}

/* Sinkhorn of TB tokens' 4 x 4 combs at once (independent chains interleaved) */
AI void sinkhorn4(const float *const *mix, const float *rs, float s2, const float *base, int TB, int64_t iters,
                  float eps, float *const *comb) {
    v16 c[TB_MAX], b;
    memcpy(&b, base, sizeof b);
#pragma GCC unroll 4
    for (int t = 0; t < TB; t++) {
        v16 z;
        memcpy(&z, mix[t], sizeof z);
        z = (z * rs[t]) * s2 + b;
        v16 e = vexp16(z - rowmax4(z));
        c[t] = e / rowsum4(e) + eps;
        c[t] = c[t] / (colsum4(c[t]) + eps);
    }
    for (int64_t it = 1; it < iters; it++) {
#pragma GCC unroll 4
        for (int t = 0; t < TB; t++) {
            c[t] = c[t] / (rowsum4(c[t]) + eps);
            c[t] = c[t] / (colsum4(c[t]) + eps);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < TB; t++) memcpy(comb[t], &c[t], sizeof c[t]);
}

typedef struct {
    const void *x;
    int bf16, n, R;
    int64_t N, d, K, iters;
    const float *fn, *scale, *base;
    float norm_eps, hc_eps;
    void *u;
    float *post, *comb;
} hc_args;

/* The finish of TB tokens from their raw projections mix[t][R] and sums of squares: RMS factor,
 * pre / post sigmoids, Sinkhorn, then the collapse u = sum_j pre_j x_j. Every step in the twin's
 * order of fp32 operations (the mixes: (proj * rsqrt) * scale + base). */
AI void hc_finish(const hc_args *a, int n, int TB, int64_t t0, float (*mix)[R_MAX], const float *ss) {
    const float s0 = a->scale[0], s1 = a->scale[1], s2 = a->scale[2], eps = a->hc_eps;
    const int64_t d = a->d;
    const int bf16 = a->bf16;
    const size_t esz = bf16 ? 2 : 4;
    float rs[TB_MAX], pre[TB_MAX][HC_MAX];
    for (int t = 0; t < TB; t++) {
        const int64_t tok = t0 + t;
        rs[t] = 1.0f / sqrtf(ss[t] / (float)a->K + a->norm_eps);
        float *post = a->post + tok * n;
        if (n == 4) { /* pre and post as one 8-lane group through the vector exp */
            v16 z = {0}, bb = {0};
            memcpy(&z, mix[t], 8 * sizeof(float));
            memcpy(&bb, a->base, 8 * sizeof(float));
            const v16 sc = {s0, s0, s0, s0, s1, s1, s1, s1};
            z = (z * rs[t]) * sc + bb;
            v16 sg = 1.0f / (1.0f + vexp16(-z));
            for (int i = 0; i < 4; i++) {
                pre[t][i] = sg[i] + eps;
                post[i] = 2.0f * sg[4 + i];
            }
        } else {
            for (int i = 0; i < n; i++) pre[t][i] = sigmoidf((mix[t][i] * rs[t]) * s0 + a->base[i]) + eps;
            for (int i = 0; i < n; i++) post[i] = 2.0f * sigmoidf((mix[t][n + i] * rs[t]) * s1 + a->base[n + i]);
        }
    }
    if (n == 4) {
        const float *mp[TB_MAX];
        float *cp[TB_MAX];
        for (int t = 0; t < TB; t++) {
            mp[t] = mix[t] + 8;
            cp[t] = a->comb + (t0 + t) * 16;
        }
        sinkhorn4(mp, rs, s2, a->base + 8, TB, a->iters, eps, cp);
    } else {
        for (int t = 0; t < TB; t++)
            sinkhorn_n(mix[t] + 2 * n, rs[t], s2, a->base + 2 * n, n, a->iters, eps, a->comb + (t0 + t) * n * n);
    }
    /* collapse: streams added in order j = 0..n-1, each product rounded, as the twin's sum */
    for (int t = 0; t < TB; t++) {
        const void *x = (const char *)a->x + (size_t)(t0 + t) * (size_t)a->K * esz;
        void *u = (char *)a->u + (size_t)(t0 + t) * (size_t)d * esz;
        const float *p = pre[t];
        for (int64_t o = 0; o < d; o += DZV) {
            const int64_t cnt = d - o;
            vf acc = vload_n(x, o, cnt, bf16) * p[0];
            for (int j = 1; j < n; j++) acc = acc + vload_n(x, j * d + o, cnt, bf16) * p[j];
            vstore_n(u, o, acc, cnt, bf16);
        }
    }
}

/* TB consecutive tokens from t0: the projection slab by slab (bf16 slabs converted to fp32 once),
 * then the finish */
AI void hc_tokens_tb(const hc_args *a, int n, int TB, int64_t t0) {
    const size_t esz = a->bf16 ? 2 : 4;
    float tot[TB_MAX][R_MAX], ss[TB_MAX];
    float buf[TB_MAX][SLAB] __attribute__((aligned(64)));
    for (int t = 0; t < TB; t++) {
        ss[t] = 0.0f;
        for (int r = 0; r < a->R; r++) tot[t][r] = 0.0f;
    }
    for (int64_t k0 = 0; k0 < a->K; k0 += SLAB) {
        const int64_t len = a->K - k0 < SLAB ? a->K - k0 : SLAB;
        const float *xs[TB_MAX];
        for (int t = 0; t < TB; t++)
            xs[t] = as_f32((const char *)a->x + ((size_t)(t0 + t) * (size_t)a->K + (size_t)k0) * esz, a->bf16, len,
                           buf[t]);
        mix_slab(xs, TB, a->fn, a->K, a->R, k0, len, tot, ss);
    }
    hc_finish(a, n, TB, t0, tot, ss);
}

/* tokens [t0, t1): n = 4 in register tiles of 4, 2, 1 tokens (fn read once per tile); other n one
 * token at a time */
static void hc_tokens(const hc_args *a, int64_t t0, int64_t t1) {
    while (t0 < t1) {
        const int64_t left = t1 - t0;
        (void)left;
        int tb = 1;
        if (a->n != 4) hc_tokens_tb(a, a->n, 1, t0);
#if DZV >= 8 || !defined(__x86_64__) /* x86-64 without AVX is a test build in practice: half the compile */
        else if (left >= 4) hc_tokens_tb(a, 4, tb = 4, t0);
        else if (left >= 2) hc_tokens_tb(a, 4, tb = 2, t0);
#endif
        else hc_tokens_tb(a, 4, 1, t0);
        t0 += tb;
    }
}

/* one token's finish from summed partials (the split path) */
static void hc_finish1(const hc_args *a, int64_t t, float (*mix)[R_MAX], const float *ss) {
    if (a->n == 4) hc_finish(a, 4, 1, t, mix, ss);
    else hc_finish(a, a->n, 1, t, mix, ss);
}

/* few tokens, much work (long K): (token, slab) items in parallel into partials, then the finish */
static void hc_split(const hc_args *a, int nt) {
    const int64_t nslab = (a->K + SLAB - 1) / SLAB, items = a->N * nslab, stride = a->R + 1;
    float *part = malloc(sizeof(float) * (size_t)(items * stride));
    if (!part) {
        hc_tokens(a, 0, a->N);
        return;
    }
    const size_t esz = a->bf16 ? 2 : 4;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t t = it / nslab, s = it % nslab;
            float tot[1][R_MAX], ss[1] = {0.0f};
            float buf[SLAB] __attribute__((aligned(64)));
            for (int r = 0; r < a->R; r++) tot[0][r] = 0.0f;
            const int64_t k0 = s * SLAB, len = a->K - k0 < SLAB ? a->K - k0 : SLAB;
            const float *xs[1] = {as_f32((const char *)a->x + ((size_t)t * (size_t)a->K + (size_t)k0) * esz, a->bf16,
                                         len, buf)};
            mix_slab(xs, 1, a->fn, a->K, a->R, k0, len, tot, ss);
            float *p = part + it * stride;
            memcpy(p, tot[0], sizeof(float) * (size_t)a->R);
            p[a->R] = ss[0];
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < a->N; t++) {
            float mix[1][R_MAX], ss[1] = {0.0f};
            for (int r = 0; r < a->R; r++) mix[0][r] = 0.0f;
            for (int64_t s = 0; s < nslab; s++) { /* slab order, from 0: as hc_tokens sums them */
                const float *p = part + (t * nslab + s) * stride;
                for (int r = 0; r < a->R; r++) mix[0][r] += p[r];
                ss[0] += p[a->R];
            }
            hc_finish1(a, t, mix, ss);
        }
    }
    free(part);
}

/* x [N, n, d] (bf16 flag), fn [(2+n)n, n*d] fp32, scale [3], base [(2+n)n] fp32 ->
 * u [N, d] (x's dtype), post [N, n], comb [N, n, n] fp32. n <= HC_MAX (the wrapper checks). */
void dz_hc_pre(const void *x, int64_t bf16, int64_t N, int64_t n, int64_t d, const float *fn, const float *scale,
               const float *base, int64_t iters, float norm_eps, float hc_eps, void *u, float *post, float *comb,
               int64_t nthreads) {
    if (N <= 0 || n <= 0 || n > HC_MAX || d <= 0) return;
    hc_args a = {x, (int)bf16, (int)n, (int)((2 + n) * n), N, d, n * d, iters, fn, scale, base, norm_eps, hc_eps,
                 u, post, comb};
    /* one thread runs ~15 G multiply-adds a second (fn in cache; ~3 from DRAM): a decode call (N = 1,
     * n = 4, d = 4096: 0.4 M) takes 30-140 us there, and a team (fork, a split's partials, two
     * barriers) saves less than it risks where the other cores are busy: teams from 1 M */
    const int64_t work = N * a.R * a.K;
    int nt = work >= 16 * PAR_MIN ? dz_threads(nthreads, work / PAR_MIN) : 1;
    if (nt <= 1) {
        hc_tokens(&a, 0, N);
        return;
    }
    if (N < 8 * (int64_t)nt && a.K > SLAB) {
        hc_split(&a, nt);
        return;
    }
    const int64_t tiles = (N + 3) / 4;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t tl = 0; tl < tiles; tl++) hc_tokens(&a, tl * 4, tl * 4 + 4 < N ? tl * 4 + 4 : N);
}

/* ======================================================================================== */
/* hc_post                                                                                  */
/* ======================================================================================== */

/* out[k] = post_k y + sum_j comb[j, k] x_j for tokens [t0, t1): the mix one FMA chain over j in
 * order, then the twin's product-then-sum with post_k y; cast to y's dtype. n = 4 with the streams
 * in registers; any n (<= HC_MAX) reloading them. */
AI void post4(const void *y, int yb, const void *x, int xb, int64_t d, const float *post, const float *comb,
              void *out, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        const float *cm = comb + t * 16, *pk = post + t * 4;
        const int64_t xo = t * 4 * d;
        for (int64_t o = 0; o < d; o += DZV) {
            const int64_t cnt = d - o;
            const vf yv = vload_n(y, t * d + o, cnt, yb);
            const vf x0 = vload_n(x, xo + o, cnt, xb), x1 = vload_n(x, xo + d + o, cnt, xb);
            const vf x2 = vload_n(x, xo + 2 * d + o, cnt, xb), x3 = vload_n(x, xo + 3 * d + o, cnt, xb);
            for (int k = 0; k < 4; k++) {
                vf m = x0 * cm[k];
                m = vfma(x1, vsplat(cm[4 + k]), m);
                m = vfma(x2, vsplat(cm[8 + k]), m);
                m = vfma(x3, vsplat(cm[12 + k]), m);
                vstore_n(out, xo + k * d + o, yv * pk[k] + m, cnt, yb);
            }
        }
    }
}

static void post_any(const void *y, int yb, const void *x, int xb, int n, int64_t d, const float *post,
                     const float *comb, void *out, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        const float *cm = comb + t * n * n, *pk = post + t * n;
        const int64_t xo = t * n * d;
        for (int64_t o = 0; o < d; o += DZV) {
            const int64_t cnt = d - o;
            const vf yv = vload_n(y, t * d + o, cnt, yb);
            for (int k = 0; k < n; k++) {
                vf m = vload_n(x, xo + o, cnt, xb) * cm[k];
                for (int j = 1; j < n; j++) m = vfma(vload_n(x, xo + j * d + o, cnt, xb), vsplat(cm[j * n + k]), m);
                vstore_n(out, xo + k * d + o, yv * pk[k] + m, cnt, yb);
            }
        }
    }
}

static void post_dispatch(const void *y, int yb, const void *x, int xb, int n, int64_t d, const float *post,
                          const float *comb, void *out, int64_t t0, int64_t t1) {
    if (n != 4) {
        post_any(y, yb, x, xb, n, d, post, comb, out, t0, t1);
        return;
    }
    switch (yb * 2 + xb) {
    case 0: post4(y, 0, x, 0, d, post, comb, out, t0, t1); return;
    case 1: post4(y, 0, x, 1, d, post, comb, out, t0, t1); return;
    case 2: post4(y, 1, x, 0, d, post, comb, out, t0, t1); return;
    default: post4(y, 1, x, 1, d, post, comb, out, t0, t1); return;
    }
}

/* y [N, d] (y_bf16), x [N, n, d] (x_bf16), post [N, n], comb [N, n, n] fp32 -> out [N, n, d] in
 * y's dtype */
void dz_hc_post(const void *y, int64_t y_bf16, const void *x, int64_t x_bf16, int64_t N, int64_t n, int64_t d,
                const float *post, const float *comb, void *out, int64_t nthreads) {
    if (N <= 0 || n <= 0 || n > HC_MAX || d <= 0) return;
    int nt = N * n * d >= PAR_MIN ? dz_threads(nthreads, N) : 1;
    if (nt <= 1) {
        post_dispatch(y, (int)y_bf16, x, (int)x_bf16, (int)n, d, post, comb, out, 0, N);
        return;
    }
    const int64_t chunk = (N + 4 * nt - 1) / (4 * nt);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t t0 = 0; t0 < N; t0 += chunk)
        post_dispatch(y, (int)y_bf16, x, (int)x_bf16, (int)n, d, post, comb, out, t0, t0 + chunk < N ? t0 + chunk : N);
}
