/* Fused CPU kernels for sequences of small ops the model runs on every decode step, where
 * PyTorch's per-op dispatch costs more than the arithmetic (issue 25, item 2). Each is bit-exact
 * with the composition of twins it replaces (ops/ref.py), which tests/ops/test_cpu_fused.py checks.
 *
 * dz_hadamard_fp4_sim: ref.fp4_act_sim(ref.hadamard(x), block), the indexer's query/key rotation
 * and FP4 simulation under official numerics (v4-architecture.md 3.5).
 * dz_fp8_nope_sim: ref.fp8_nope_sim, FP8 simulation of a K=V row's non-rope dims (3.4), the rope
 * dims copied.
 * dz_act_rms_norm: ref.act_rms_norm, the weightless RMSNorm of each attention head's query under
 * official numerics, normalised in the activation dtype with the rsqrt taken in fp32. */
#include "common.h"

/* Nearest e2m1 magnitude of a >= 0 (NaN -> 0; values above 6 -> 6), ties to the even code, as
 * ref.fp4_round: the grid 0, .5, 1, 1.5, 2, 3, 4, 6 bucketized by the midpoints .25, .75, 1.25,
 * 1.75, 2.5, 3.5, 5 (right=False: a == mid stays below), then a tie at an odd code's upper
 * midpoint (.75, 1.75, 3.5) moves up to the even code: ">=" at those three. Selects, no branches:
 * the codes are data-dependent, and a search loop mispredicted most of a row's time. */
static inline float e2m1(float a) {
    float q = 0.0f;
    q = a > 0.25f ? 0.5f : q;
    q = a >= 0.75f ? 1.0f : q;
    q = a > 1.25f ? 1.5f : q;
    q = a >= 1.75f ? 2.0f : q;
    q = a > 2.5f ? 3.0f : q;
    q = a >= 3.5f ? 4.0f : q;
    q = a > 5.0f ? 6.0f : q;
    return q;
}

/* One row of n (a power of two) values: the Sylvester-Hadamard butterflies in the twin's order
 * (block 2h: first half a + b, second half a - b), times n^-0.5 as an fp32 scalar, rounded to the
 * activation dtype (the twin's .to(x.dtype)); then per `block` FP4 simulation with the smallest
 * power-of-two scale s such that amax / s <= 6 (amax floored at 6 * 2^-126). */
static void row(const void *x, int bf16, int64_t r, int64_t n, int64_t block, float scale, void *out, float *y) {
    dz_load_row((const char *)x + r * n * (bf16 ? 2 : 4), n, bf16, y);
    for (int64_t h = 1; h < n; h *= 2)
        for (int64_t g = 0; g < n; g += 2 * h)
            for (int64_t j = g; j < g + h; j++) {
                const float a = y[j], b = y[j + h];
                y[j] = a + b;
                y[j + h] = a - b;
            }
    for (int64_t k = 0; k < n; k++) {
        const float v = y[k] * scale;
        y[k] = bf16 ? dz_bf16_to_f32(dz_f32_to_bf16(v)) : v;
    }
    for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t len = block < n - b0 ? block : n - b0;
        uint32_t am = 0;
        for (int64_t k = 0; k < len; k++) {
            uint32_t u;
            memcpy(&u, &y[b0 + k], 4);
            u &= 0x7fffffffu;
            am = u > am ? u : am;
        }
        if (am >= 0x7f800000u) { /* inf or NaN: the twin's scale is inf/NaN and every value NaN */
            for (int64_t k = 0; k < len; k++) dz_store(out, r * n + b0 + k, NAN, bf16);
            continue;
        }
        const uint32_t floor_bits = 0x01c00000u; /* 6 * 2^-126 = 1.5 * 2^-124 */
        if (am < floor_bits) am = floor_bits;
        /* smallest 2^k with amax <= 6 * 2^k = 1.5 * 2^(k+2): with amax = 1.f * 2^(E-127),
         * k + 127 = E - 2, plus one when 1.f > 1.5 (f > 0x400000) */
        const int32_t es = (int32_t)(am >> 23) - 2 + ((am & 0x7fffffu) > 0x400000u);
        uint32_t sb = (uint32_t)es << 23, ib = (uint32_t)(254 - es) << 23;
        float s, inv;
        memcpy(&s, &sb, 4);
        memcpy(&inv, &ib, 4); /* 1 / s, exact: s in [2^-125, 2^126] */
        for (int64_t k = 0; k < len; k++) {
            const float v = y[b0 + k] * inv; /* = v / s, one rounding either way */
            const float q = e2m1(fabsf(v));
            /* torch.sign(v) * grid: +0 for v = +-0, -q for v < 0 (-0 where q = 0) */
            const float sq = v < 0.0f ? -q : (v > 0.0f ? q : 0.0f * q);
            dz_store(out, r * n + b0 + k, sq * s, bf16);
        }
    }
}

void dz_hadamard_fp4_sim(const void *x, int64_t bf16, int64_t rows, int64_t n, int64_t block, float scale,
                         void *out, int64_t nthreads) {
    if (rows <= 0 || n <= 0 || block <= 0) return;
    int nt = rows * n >= 32768 ? dz_threads(nthreads, rows) : 1;
#pragma omp parallel num_threads(nt)
    {
        float y[n];
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) row(x, (int)bf16, r, n, block, scale, out, y);
    }
}

static inline float act_round(float v, int bf16) { return bf16 ? dz_bf16_to_f32(dz_f32_to_bf16(v)) : v; }

/* x * rsqrt(row_mean(x^2) + eps), each step rounded where the twin's tensors are (x's dtype):
 * the squares in x's dtype; row_mean's fp32 cumsum, which PyTorch's CPU kernel accumulates in
 * double (each partial rounded to fp32: the last one is the double sum rounded), divided by n in
 * fp32 and rounded to x's dtype; + eps in x's dtype (PyTorch rounds the scalar to a bf16 tensor's
 * dtype first); rsqrt in fp32 (1 / sqrt, as PyTorch's vector
 * and scalar paths both compute it) rounded to x's dtype; the product in x's dtype. */
/* rows [r0, r0 + nb), nb <= RB: each row's double sum in its own order (k = 0..n-1), the RB rows'
 * chains side by side (a single chain waits on each double add's latency) */
#define RB 8
static void arms_rows(const void *x, int bf16, int64_t r0, int64_t nb, int64_t n, float eps, void *out) {
    double acc[RB] = {0};
    for (int64_t k = 0; k < n; k++)
        for (int64_t l = 0; l < nb; l++) {
            const float v = dz_load(x, (r0 + l) * n + k, bf16);
            acc[l] += (double)act_round(v * v, bf16);
        }
    for (int64_t l = 0; l < nb; l++) {
        const int64_t r = r0 + l;
        const float mean = act_round((float)acc[l] / (float)n, bf16);
        const float rs = act_round(1.0f / sqrtf(act_round(mean + act_round(eps, bf16), bf16)), bf16);
        for (int64_t k = 0; k < n; k++) dz_store(out, r * n + k, dz_load(x, r * n + k, bf16) * rs, bf16);
    }
}

void dz_act_rms_norm(const void *x, int64_t bf16, int64_t rows, int64_t n, float eps, void *out,
                     int64_t nthreads) {
    if (rows <= 0 || n <= 0) return;
    const int64_t blocks = (rows + RB - 1) / RB;
    /* ~1 ns an element on one thread: a team pays off only for large calls (decode: 64 x 512) */
    int nt = rows * n >= ((int64_t)1 << 18) ? dz_threads(nthreads, blocks) : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r0 = b * RB, nb = rows - r0 < RB ? rows - r0 : RB;
        if (bf16)
            arms_rows(x, 1, r0, nb, n, eps, out);
        else
            arms_rows(x, 0, r0, nb, n, eps, out);
    }
}

/* Nearest float8_e4m3fn value of fp32 v (|v| <= 448), ties to even (mhc.c ve4m3, one lane): the
 * 24-bit significand drops clamp(14 - e, 20, 25) bits (25 rounds zero and subnormals to 0). */
static inline float e4m3(float v) {
    uint32_t a;
    memcpy(&a, &v, 4);
    const uint32_t sign = a & 0x80000000u, mag = a & 0x7fffffffu;
    const int32_t e = (int32_t)(mag >> 23) - 127;
    const uint32_t sig = (mag & 0x7fffffu) | 0x800000u;
    int32_t drop = 14 - e;
    drop = drop < 20 ? 20 : (drop > 25 ? 25 : drop);
    uint32_t q = sig >> drop;
    const uint32_t rem = sig & ((1u << drop) - 1u), half = 1u << (drop - 1);
    q += (rem > half) || (rem == half && (q & 1u));
    const uint32_t qb = (uint32_t)(e - 23 + drop + 127) << 23;
    float quantum;
    memcpy(&quantum, &qb, 4);
    float val = (float)q * quantum; /* q <= 16: exact */
    uint32_t vb;
    memcpy(&vb, &val, 4);
    vb |= sign;
    memcpy(&val, &vb, 4);
    return val;
}

/* rows of n: dims [0, n - rope) FP8-simulated per `block` (mhc.c fp8_rows' scale: the smallest
 * 2^k with amax <= 448 * 2^k, amax floored at 1e-4; inf/NaN in a block: all NaN), the last `rope`
 * dims copied as they are. */
void dz_fp8_nope_sim(const void *x, int64_t bf16, int64_t rows, int64_t n, int64_t rope, int64_t block,
                     void *out, int64_t nthreads) {
    if (rows <= 0 || n <= 0 || block <= 0) return;
    const int64_t nope = n - rope;
    int nt = rows * n >= 32768 ? dz_threads(nthreads, rows) : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t o = r * n;
        for (int64_t b0 = 0; b0 < nope; b0 += block) {
            const int64_t len = block < nope - b0 ? block : nope - b0;
            uint32_t am = 0;
            for (int64_t k = 0; k < len; k++) {
                const float v = dz_load(x, o + b0 + k, (int)bf16);
                uint32_t u;
                memcpy(&u, &v, 4);
                u &= 0x7fffffffu;
                am = u > am ? u : am;
            }
            if (am >= 0x7f800000u) {
                for (int64_t k = 0; k < len; k++) dz_store(out, o + b0 + k, NAN, (int)bf16);
                continue;
            }
            const uint32_t floor_bits = 0x38d1b717u; /* (float)1e-4 */
            if (am < floor_bits) am = floor_bits;
            const int32_t es = (int32_t)(am >> 23) - 8 + ((am & 0x7fffffu) > 0x600000u);
            uint32_t sb = (uint32_t)es << 23, ib = (uint32_t)(254 - es) << 23;
            float sc, inv;
            memcpy(&sc, &sb, 4);
            memcpy(&inv, &ib, 4);
            for (int64_t k = 0; k < len; k++)
                dz_store(out, o + b0 + k, e4m3(dz_load(x, o + b0 + k, (int)bf16) * inv) * sc, (int)bf16);
        }
        if (rope > 0) memcpy((char *)out + (o + nope) * (bf16 ? 2 : 4), (const char *)x + (o + nope) * (bf16 ? 2 : 4),
                             (size_t)rope * (bf16 ? 2 : 4));
    }
}

/* dz_route_weights: the router's weights from its scores (ref.route after torch's topk, or the hash
 * ids): w[n, j] = (s_j / sum_j s_j) * scale, s_j = scores[n, idx[n, j]], k <= 2. One thread
 * (decode-sized), and only operations IEEE 754 rounds exactly once (+, /, *) in the twin's order:
 * the sum of at most two terms is the same in any order, and scores are >= +0, so 0 + s = s.
 * An id outside [0, E) sets *bad and writes nothing more (the caller raises, as the twin's gather). */
void dz_route_weights(const float *scores, int64_t N, int64_t E, const int64_t *idx, int64_t k, float scale,
                      float *w, int64_t *bad) {
    for (int64_t n = 0; n < N; n++) {
        float s[2];
        for (int64_t j = 0; j < k; j++) {
            const int64_t e = idx[n * k + j];
            if (e < 0 || e >= E) {
                *bad = 1;
                return;
            }
            s[j] = scores[n * E + e];
        }
        const float sum = k == 1 ? s[0] : s[0] + s[1];
        for (int64_t j = 0; j < k; j++) w[n * k + j] = (s[j] / sum) * scale;
    }
}
