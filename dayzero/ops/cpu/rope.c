/* Rotary embedding on the CPU. Twin: ops/ref.py apply_rope.
 * x [N, H, Dh] (fp32 or bf16), cos/sin [N, rd/2] fp32 shared by the H rows of a token. The last
 * rd dims of each row hold interleaved pairs (re, im); they become (re*c - im*s, re*s + im*c)
 * (s negated for the inverse rotation), computed in fp32 with the twin's roundings (ISO C: no
 * FMA contraction), then cast to x's dtype; the first Dh - rd dims are copied. */
#include "common.h"

void dz_rope(const void *x, int64_t bf16, int64_t N, int64_t H, int64_t Dh, const float *cos_, const float *sin_,
             int64_t half, int64_t inverse, void *out, int64_t nthreads) {
    int64_t rd = 2 * half, nope = Dh - rd;
    int nt = dz_threads(nthreads, N);
    size_t esz = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nt) schedule(static) if (N * H * Dh >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos_ + n * half, *s = sin_ + n * half;
        for (int64_t h = 0; h < H; h++) {
            int64_t row = (n * H + h) * Dh;
            memcpy((char *)out + row * esz, (const char *)x + row * esz, (size_t)nope * esz);
            for (int64_t i = 0; i < half; i++) {
                float re = dz_load(x, row + nope + 2 * i, (int)bf16);
                float im = dz_load(x, row + nope + 2 * i + 1, (int)bf16);
                float si = inverse ? -s[i] : s[i];
                float a = re * c[i], b = im * si, e = re * si, f = im * c[i];
                dz_store(out, row + nope + 2 * i, a - b, (int)bf16);
                dz_store(out, row + nope + 2 * i + 1, e + f, (int)bf16);
            }
        }
    }
}

/* dz_rope's arguments as one int64 block (x, bf16, N, H, Dh, cos, sin, half, inverse, out,
 * nthreads): ops/cpu/rope.py passes them packed, one ctypes argument instead of eleven. */
void dz_rope_packed(const int64_t *a) {
    dz_rope((const void *)a[0], a[1], a[2], a[3], a[4], (const float *)a[5], (const float *)a[6], a[7], a[8],
            (void *)a[9], a[10]);
}
