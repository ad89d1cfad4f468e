"""The prime bucket layout of DeepSeek-V4.1's Engram tables (v41/engram.py): plain Python, so that
the config can check `engram_num_embeddings` against it (the released sizes, 384006168 and
384016682 rows, are exactly these sums)."""
from __future__ import annotations


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (these bases suffice)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def bucket_primes(n_layers: int, max_ngram: int, n_heads: int, vocab_size: int) -> list[list[list[int]]]:
    """[layer][n-gram size - 2][head] prime bucket sizes: for each (layer, n-gram size) the search
    restarts above `vocab_size - 1`, and a prime taken once is skipped afterwards."""
    taken: set[int] = set()
    out = []
    for _ in range(n_layers):
        per_layer = []
        for _ in range(max_ngram - 1):
            sizes, p = [], vocab_size - 1
            for _ in range(n_heads):
                p += 1
                while p in taken or not _is_prime(p):
                    p += 1
                taken.add(p)
                sizes.append(p)
            per_layer.append(sizes)
        out.append(per_layer)
    return out


def table_rows(args) -> tuple[int, ...]:
    """Rows of each Engram layer's table under the prime layout (`engram_num_embeddings` must equal it)."""
    primes = bucket_primes(len(args.engram_layer_ids), args.engram_max_ngram_size, args.engram_n_heads,
                           args.engram_vocab_size)
    return tuple(sum(sum(per) for per in layer) for layer in primes)
