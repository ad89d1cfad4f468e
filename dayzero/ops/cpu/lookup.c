/* Paged-cache row lookups of one engine step on the CPU (cache/paged.py PagedBatchCache): the block
 * table gather, trash flagging and row arithmetic of a lookup in one native call instead of ~10
 * PyTorch ops (issue 25, item 2). Integer arithmetic only: the same row ids as the PyTorch path
 * (cache/paged.py `_torch_lookup`, `_torch_locate`), which tests/cache/test_paged_lookup.py checks.
 *
 * tab: [B, W] int64 first flat rows of each block (W = table width + 1; trash where not held);
 * with a slot map (not NULL), sequence s reads row slot[s] of tab (the engine's device tables,
 * cache/paged.py DeviceTables, without gathering a step's rows first).
 * Floor division and modulo as PyTorch's // and % on int64 (the sign of the divisor, pb > 0).
 * Also the step's other integer/copy glue around them: a write's row scatter (instead of
 * index_put_) and the CSA top-k's pick of located rows (instead of clamp, gather, lt, masked_fill). */
#include <stdint.h>
#include <string.h>

static inline int64_t fdiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static inline int64_t fmod64(int64_t a, int64_t b) {
    int64_t r = a % b;
    return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}

static inline int64_t entry(const int64_t *tab, int64_t w, int64_t s, int64_t index, int64_t pb) {
    int64_t c = fdiv(index, pb);
    c = c < 0 ? 0 : (c > w - 1 ? w - 1 : c);
    return tab[s * w + c];
}

/* n rows index[i] of sequences seq[i] (strides ss, si): out[j] = first row + index % pb of the
 * rows kept (index >= protect[seq] // ratio; all when protect is NULL), in order; keep[i] (when
 * not NULL) whether row i was kept; a negative index reads the trash block's first row. Returns
 * the number of rows kept (-1 - i when seq[i] is not in [0, nseq): nothing counted); *bad counts rows landing in the trash block (of live sequences when
 * live is not NULL). */
int64_t dz_lookup(const int64_t *tab, const int64_t *slot, int64_t nseq, int64_t w, const int64_t *seq, int64_t ss,
                  const int64_t *index,
                  int64_t si, int64_t n, int64_t pb, int64_t trash, const int64_t *protect, int64_t ratio,
                  const uint8_t *live, int64_t *out, uint8_t *keep, int64_t *bad) {
    int64_t m = 0, nbad = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = seq[i * ss], x = index[i * si];
        if (s < 0 || s >= nseq) return -1 - i;
        const int64_t first = x < 0 ? trash : entry(tab, w, slot ? slot[s] : s, x, pb);
        if (first == trash && (!live || live[s])) nbad++;
        const int k = !protect || x >= fdiv(protect[s], ratio);
        if (keep) keep[i] = (uint8_t)k;
        if (k) out[m++] = first + fmod64(x, pb);
    }
    *bad += nbad;
    return m;
}

/* rows index[r, c] of sequences seq[r, c] (seq broadcast: its strides may be 0) for valid[r, c],
 * else -1, into out [rows, cols] (contiguous); *bad counts valid rows landing in the trash block
 * (of live sequences when live is not NULL). Returns 0, or -1 when a seq is not in [0, nseq). */
int64_t dz_locate(const int64_t *tab, const int64_t *slot, int64_t nseq, int64_t w, const int64_t *seq, int64_t ss0, int64_t ss1, const int64_t *index,
               int64_t si0, int64_t si1, const uint8_t *valid, int64_t sv0, int64_t sv1, int64_t rows, int64_t cols,
               int64_t pb, int64_t trash, const uint8_t *live, int64_t *out, int64_t *bad) {
    int64_t nbad = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            if (!valid[r * sv0 + c * sv1]) {
                out[r * cols + c] = -1;
                continue;
            }
            const int64_t s = seq[r * ss0 + c * ss1], x = index[r * si0 + c * si1];
            if (s < 0 || s >= nseq) return -1;
            const int64_t first = entry(tab, w, slot ? slot[s] : s, x, pb);
            if (first == trash && (!live || live[s])) nbad++;
            out[r * cols + c] = first + fmod64(x, pb);
        }
    *bad += nbad;
    return 0;
}

/* Row scatter of a paged-cache write (cache/paged.py PagedBatchCache.write): row i of src (rows
 * src_stride bytes apart, row_bytes each) is copied to row flat[i] of pool (pool_stride bytes
 * apart, prows rows), in order (a repeated row keeps the last copy, as the serial index_put_).
 * Returns 0, or -1 - i when flat[i] is not in [0, prows) (nothing from row i on is written). */
int64_t dz_scatter_rows(char *pool, int64_t prows, int64_t pool_stride, const int64_t *flat, int64_t n,
                        const char *src, int64_t src_stride, int64_t row_bytes) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = flat[i];
        if (r < 0 || r >= prows) return -1 - i;
        memcpy(pool + r * pool_stride, src + i * src_stride, (size_t)row_bytes);
    }
    return 0;
}

/* The rows a top-k picks (reference/attention.py, CSA): out[n, j] = rows[n, top[n, j]], -1 where
 * top[n, j] < 0 (no pick); rows [N, K] (row stride rs), top [N, k] (row stride ts), out [N, k]
 * contiguous. Returns 0, or -1 when a pick is >= K (nothing meaningful written). */
int64_t dz_pick_rows(const int64_t *rows, int64_t rs, int64_t K, const int64_t *top, int64_t ts, int64_t N,
                     int64_t k, int64_t *out) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < k; j++) {
            const int64_t t = top[n * ts + j];
            if (t >= K) return -1;
            out[n * k + j] = t < 0 ? -1 : rows[n * rs + t];
        }
    return 0;
}

/* dst[n, off + j] += table[idx[n], j] for j < width, n < N (fp32; dst rows dst_stride floats
 * apart, table rows tstride floats apart): the compressor's ape rows added to its gate
 * projections in place, one IEEE fp32 add per element as PyTorch's add_. Returns 0, or -1 when
 * an idx is not in [0, trows) (rows before it are added). */
int64_t dz_add_rows_at(float *dst, int64_t N, int64_t dst_stride, int64_t off, const float *table, int64_t trows,
                       int64_t tstride, const int64_t *idx, int64_t width) {
    for (int64_t n = 0; n < N; n++) {
        const int64_t r = idx[n];
        if (r < 0 || r >= trows) return -1;
        float *d = dst + n * dst_stride + off;
        const float *t = table + r * tstride;
        for (int64_t j = 0; j < width; j++) d[j] = d[j] + t[j];
    }
    return 0;
}

/* ---- packed entry points (ops/cpu/lookup.py: one ctypes argument, an int64 block) ---------- */
int64_t dz_scatter_rows_packed(const int64_t *a) {
    return dz_scatter_rows((char *)a[0], a[1], a[2], (const int64_t *)a[3], a[4], (const char *)a[5], a[6], a[7]);
}

int64_t dz_pick_rows_packed(const int64_t *a) {
    return dz_pick_rows((const int64_t *)a[0], a[1], a[2], (const int64_t *)a[3], a[4], a[5], a[6], (int64_t *)a[7]);
}

int64_t dz_add_rows_at_packed(const int64_t *a) {
    return dz_add_rows_at((float *)a[0], a[1], a[2], a[3], (const float *)a[4], a[5], a[6], (const int64_t *)a[7], a[8]);
}
