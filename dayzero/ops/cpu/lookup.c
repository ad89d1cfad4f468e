/* Paged-cache row lookups of one engine step on the CPU (cache/paged.py PagedBatchCache): the block
 * table gather, trash flagging and row arithmetic of a lookup in one native call instead of ~10
 * PyTorch ops (issue 25, item 2). Integer arithmetic only: the same row ids as the PyTorch path
 * (cache/paged.py `_torch_lookup`, `_torch_locate`), which tests/cache/test_paged_lookup.py checks.
 *
 * tab: [B, W] int64 first flat rows of each block (W = table width + 1; trash where not held).
 * Floor division and modulo as PyTorch's // and % on int64 (the sign of the divisor, pb > 0). */
#include <stdint.h>

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
int64_t dz_lookup(const int64_t *tab, int64_t nseq, int64_t w, const int64_t *seq, int64_t ss, const int64_t *index,
                  int64_t si, int64_t n, int64_t pb, int64_t trash, const int64_t *protect, int64_t ratio,
                  const uint8_t *live, int64_t *out, uint8_t *keep, int64_t *bad) {
    int64_t m = 0, nbad = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = seq[i * ss], x = index[i * si];
        if (s < 0 || s >= nseq) return -1 - i;
        const int64_t first = x < 0 ? trash : entry(tab, w, s, x, pb);
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
int64_t dz_locate(const int64_t *tab, int64_t nseq, int64_t w, const int64_t *seq, int64_t ss0, int64_t ss1, const int64_t *index,
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
            const int64_t first = entry(tab, w, s, x, pb);
            if (first == trash && (!live || live[s])) nbad++;
            out[r * cols + c] = first + fmod64(x, pb);
        }
    *bad += nbad;
    return 0;
}
