/* Shared helpers of the native CPU kernels (dayzero/ops/cpu). C11 + OpenMP, built with
 * -O3 -march=native by build.py. Activations arrive as fp32 or bf16 (flag `bf16`), are computed
 * in fp32 and written back in their own dtype with round-to-nearest-even, as PyTorch casts. */
#ifndef DAYZERO_CPU_COMMON_H
#define DAYZERO_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float dz_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t dz_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

/* element i of an fp32 (bf16 = 0) or bf16 (bf16 = 1) array */
static inline float dz_load(const void *p, int64_t i, int bf16) {
    return bf16 ? dz_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void dz_store(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = dz_f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* n consecutive elements to fp32 */
static inline void dz_load_row(const void *p, int64_t n, int bf16, float *out) {
    if (bf16) {
        const uint16_t *h = (const uint16_t *)p;
        for (int64_t i = 0; i < n; i++) out[i] = dz_bf16_to_f32(h[i]);
    } else {
        memcpy(out, p, (size_t)n * sizeof(float));
    }
}

static inline void dz_store_row(void *p, int64_t n, int bf16, const float *in) {
    if (bf16) {
        uint16_t *h = (uint16_t *)p;
        for (int64_t i = 0; i < n; i++) h[i] = dz_f32_to_bf16(in[i]);
    } else {
        memcpy(p, in, (size_t)n * sizeof(float));
    }
}

/* E8M0 scale byte -> 2^(b - 127) (b = 255 is NaN in the format; never produced by writers) */
static inline float dz_e8m0(uint8_t b) {
    if (b == 0) return ldexpf(1.0f, -127);
    uint32_t u = (uint32_t)b << 23;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float8_e4m3fn byte -> fp32 (exact; 0x7f / 0xff are NaN) */
static inline float dz_e4m3(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7)
        v = NAN;
    else if (e == 0)
        v = ldexpf((float)m, -9); /* subnormal: m/8 * 2^-6 */
    else
        v = ldexpf(1.0f + m / 8.0f, e - 7);
    return s ? -v : v;
}

static inline int dz_threads(int64_t want, int64_t work_items) {
    if (want < 1) want = 1;
    if (work_items < want) want = work_items < 1 ? 1 : work_items;
    return (int)want;
}

#endif
