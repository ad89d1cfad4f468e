/* Top-k selection of the lightning indexer on the CPU. Twin: ops/ref.py topk_select.
 * scores fp32 [N, T] (rows `stride` floats apart), k -> idx int64 [N, m], m = min(k, T): the
 * columns of each row's m largest scores in the order of torch's stable descending sort, -1 where
 * the selected score is -inf.
 *
 * Keys. Each score maps to a 32-bit key whose unsigned order is the sort's order (-0.0 -> +0.0,
 * every NaN above +inf, as torch sorts them), and the composite 64-bit key
 * key << 32 | (0xFFFFFFFF - column) is unique per column and larger exactly when the column comes
 * first in the stable descending order. Selecting the m largest composites and sorting them
 * (descending) is the twin's result, ties included.
 *
 * Selection: the row's keys are computed once (a vectorized pass into per-thread scratch), then a
 * radix select on them, digits of 11, 11 and 10 bits from the top.
 *   1. Filtered histogram passes: the histogram of the next digit among the columns whose key
 *      starts with the current prefix (4 interleaved copies, so long runs of one digit, e.g. ReLU
 *      zeros, do not serialize on one counter); walking buckets from the top gives the digit of
 *      the m-th largest key, `need` (how many of the columns sharing the longer prefix still go
 *      in) and `eq` (how many share it). Passes stop once eq == need, eq <= CAP, or the key is
 *      fully known.
 *   2. One collecting pass: columns whose key prefix is above the threshold prefix go in; those
 *      equal to it go in too when eq == need, or (key fully known, so all equal) the first `need`
 *      of them in column order (= the larger composites); otherwise (eq <= CAP) they are buffered
 *      in column order and the remaining digits are resolved on the buffer the same way.
 *   3. The m composites are sorted descending (merge sort), decoded, -1 written for -inf.
 * Rows with T <= max(k, SMALL) build and sort every composite instead. A row costs one pass over
 * its scores, 2 to 4 over its keys (in cache) and O(m log m); scratch per thread: 4T + 8(2m + CAP)
 * bytes, grow-only.
 *
 * Threads: OpenMP (torch's libgomp) over rows, only when there are several rows and enough work
 * (a parallel region costs microseconds; decode calls are a few short rows). Plain C. */
#include <stdio.h>
#include <stdlib.h>

#include "common.h"

#define CAP 4096   /* most columns buffered for the last digits */
#define SMALL 256  /* rows this short are sorted whole */
#define RUN 16     /* insertion-sorted runs of the merge sort */
#define KEY_NEG_INF 0x007fffffu

static const int SHIFT[3] = {21, 10, 0};
static const int BITS[3] = {11, 11, 10};

/* fp32 bits -> key with the order of torch's sort: -0.0 equals +0.0, NaN (any sign) above +inf.
 * Branch-free (selects), so the loop over a row vectorizes. */
static inline uint32_t order_key(uint32_t u) {
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    u = u == 0x80000000u ? 0u : u;
    uint32_t key = u ^ ((0u - (u >> 31)) | 0x80000000u); /* negative: ~u; positive: u | sign bit */
    return nan ? 0xffffffffu : key;
}

static void row_keys(const float *s, int64_t T, uint32_t *keys) {
    for (int64_t c = 0; c < T; c++) {
        uint32_t u;
        memcpy(&u, s + c, 4);
        keys[c] = order_key(u);
    }
}

/* histogram of digit (key >> sh) & mask over the keys whose prefix (key >> psh) is `prefix`
 * (psh = 32: every key); HN interleaved copies break the store-to-load chain of runs of equal
 * digits (ties, ReLU zeros) */
#define HN 4
static void histogram(const uint32_t *keys, int64_t T, int psh, uint32_t prefix, int sh, uint32_t mask,
                      uint32_t *hist) {
    uint32_t h[HN][(1 << 11) + 1]; /* the last counter takes the keys outside the prefix */
    memset(h, 0, sizeof(h));
    int64_t c = 0;
    if (psh == 32) {
        for (; c + HN <= T; c += HN)
            for (int j = 0; j < HN; j++) h[j][(keys[c + j] >> sh) & mask]++;
        for (; c < T; c++) h[0][(keys[c] >> sh) & mask]++;
    } else {
        /* branch-free: which keys match is data-dependent, a branch on it mispredicts */
        for (; c + HN <= T; c += HN)
            for (int j = 0; j < HN; j++) {
                uint32_t u = keys[c + j];
                h[j][(u >> psh) == prefix ? (u >> sh) & mask : (1u << 11)]++;
            }
        for (; c < T; c++) h[0][(keys[c] >> psh) == prefix ? (keys[c] >> sh) & mask : (1u << 11)]++;
    }
    for (uint32_t b = 0; b <= mask; b++) {
        uint32_t t = 0;
        for (int j = 0; j < HN; j++) t += h[j][b];
        hist[b] = t;
    }
}

static inline uint64_t composite(uint32_t key, int64_t col) {
    return ((uint64_t)key << 32) | (uint64_t)(0xffffffffu - (uint32_t)col);
}

/* a[0..n) descending (keys are distinct); tmp holds n */
static void sort_desc(uint64_t *a, int64_t n, uint64_t *tmp) {
    for (int64_t lo = 0; lo < n; lo += RUN) {
        int64_t hi = lo + RUN < n ? lo + RUN : n;
        for (int64_t i = lo + 1; i < hi; i++) {
            uint64_t v = a[i];
            int64_t j = i;
            for (; j > lo && a[j - 1] < v; j--) a[j] = a[j - 1];
            a[j] = v;
        }
    }
    uint64_t *src = a, *dst = tmp;
    for (int64_t w = RUN; w < n; w *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * w) {
            int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            int64_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi) dst[o++] = src[i] > src[j] ? src[i++] : src[j++];
            while (i < mid) dst[o++] = src[i++];
            while (j < hi) dst[o++] = src[j++];
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) memcpy(a, src, (size_t)n * sizeof(uint64_t));
}

/* the bucket holding the need-th largest of hist[0..nb): its index; *need becomes the count still
 * to take from it (the buckets above it are all taken) */
static inline int threshold(const uint32_t *hist, int nb, int64_t *need) {
    int b = nb - 1;
    int64_t above = 0;
    while (b > 0 && above + hist[b] < *need) above += hist[b--];
    *need -= above;
    return b;
}

/* the m = min(k, T) largest composites of one row into out, sorted descending (keys: T scratch) */
static void select_row(const float *s, int64_t T, int64_t k, uint32_t *keys, uint64_t *out, uint64_t *tmp,
                       uint64_t *cand) {
    row_keys(s, T, keys);
    if (T <= k || T <= SMALL) {
        for (int64_t c = 0; c < T; c++) out[c] = composite(keys[c], c);
        sort_desc(out, T, tmp);
        return;
    }
    uint32_t hist[1 << 11];
    uint32_t prefix = 0;
    int level = 0;
    int64_t need = k, eq = T;
    while (level < 3) {
        uint32_t nb = 1u << BITS[level];
        histogram(keys, T, level ? SHIFT[level - 1] : 32, prefix, SHIFT[level], nb - 1, hist);
        int b = threshold(hist, (int)nb, &need);
        eq = hist[b];
        prefix = (prefix << BITS[level]) | (uint32_t)b;
        level++;
        if (eq == need || eq <= CAP) break;
    }
    int psh = SHIFT[level - 1];
    int buffered = eq != need && eq <= CAP;
    int64_t n = 0, nc = 0, taken = 0;
    for (int64_t c = 0; c < T; c++) {
        uint32_t u = keys[c];
        uint32_t p = u >> psh;
        if (p > prefix) {
            out[n++] = composite(u, c);
        } else if (p == prefix) {
            if (buffered)
                cand[nc++] = composite(u, c);
            else if (taken < need) /* eq == need, or the key is fully known: lowest columns first */
                out[n++] = composite(u, c), taken++;
        }
    }
    if (buffered) {
        while (level < 3 && nc > need) { /* the remaining digits, on the buffer (column order kept) */
            int sh = SHIFT[level], nb = 1 << BITS[level];
            memset(hist, 0, (size_t)nb * sizeof(uint32_t));
            for (int64_t i = 0; i < nc; i++) hist[((uint32_t)(cand[i] >> 32) >> sh) & (uint32_t)(nb - 1)]++;
            uint32_t b = (uint32_t)threshold(hist, nb, &need);
            int64_t j = 0;
            for (int64_t i = 0; i < nc; i++) {
                uint32_t d = ((uint32_t)(cand[i] >> 32) >> sh) & (uint32_t)(nb - 1);
                if (d > b)
                    out[n++] = cand[i];
                else if (d == b)
                    cand[j++] = cand[i];
            }
            nc = j;
            level++;
        }
        for (int64_t i = 0; i < need; i++) out[n++] = cand[i]; /* all of them, or equal keys: lowest columns */
    }
    sort_desc(out, k, tmp);
}

/* grow-only scratch, one per thread (libgomp keeps its workers) */
static _Thread_local uint64_t *tls_buf;
static _Thread_local size_t tls_n;

static uint64_t *scratch(size_t n) {
    if (tls_n < n) {
        free(tls_buf);
        tls_buf = (uint64_t *)malloc(n * sizeof(uint64_t));
        tls_n = tls_buf ? n : 0;
    }
    return tls_buf;
}

/* status: 0 ok, 1 out of memory (the output is incomplete) */
void dz_topk_select(const float *scores, int64_t N, int64_t T, int64_t stride, int64_t k, int64_t *idx,
                    int64_t *status, int64_t nthreads) {
    int64_t m = k < T ? k : T;
    int64_t cap = m > (T < SMALL ? T : SMALL) ? m : (T < SMALL ? T : SMALL);
    int64_t words = 2 * cap + CAP + (T + 1) / 2; /* out, tmp, cand (uint64) + keys (uint32) */
    int nt = dz_threads(nthreads, N);
    int fail = 0;
    *status = 0;
#pragma omp parallel num_threads(nt) if (nt > 1 && N * T >= (1 << 15)) reduction(| : fail)
    {
        uint64_t *buf = scratch((size_t)words);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            if (!buf) {
                fail = 1;
                continue;
            }
            uint64_t *out = buf, *tmp = buf + cap, *cand = buf + 2 * cap;
            select_row(scores + r * stride, T, k, (uint32_t *)(cand + CAP), out, tmp, cand);
            int64_t *dst = idx + r * m;
            for (int64_t i = 0; i < m; i++) {
                uint32_t key = (uint32_t)(out[i] >> 32);
                dst[i] = key == KEY_NEG_INF ? -1 : (int64_t)(0xffffffffu - (uint32_t)out[i]);
            }
        }
    }
    if (fail) {
        fprintf(stderr, "dayzero topk kernel: out of memory (%lld bytes of scratch)\n",
                (long long)(words * (int64_t)sizeof(uint64_t)));
        *status = 1;
    }
}
