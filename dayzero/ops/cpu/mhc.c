/* Norms and mHC (manifold-constrained hyper-connections) on the CPU. Twins: ops/ref.py
 * rms_norm, hc_pre, hc_post. */
#include "common.h"

/* rms_norm: x [rows, d] (bf16 flag) -> out [rows, d] same dtype; w: NULL, fp32 (w_kind 1) or
 * bf16 (w_kind 2). y = x * rsqrt(mean(x^2) + eps) * w in fp32, one cast back. */
void dz_rms_norm(const void *x, int64_t bf16, int64_t rows, const void *w, int64_t w_kind, float eps,
                 void *out, int64_t nthreads) {
    int nt = dz_threads(nthreads, rows);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        (void)r;
    }
    (void)x; (void)bf16; (void)w; (void)w_kind; (void)eps; (void)out;
}
