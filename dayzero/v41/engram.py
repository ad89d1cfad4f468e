"""Engram: DeepSeek-V4.1's n-gram memory (research/v41-and-dspark.md 1.3; the semantics are those of
transformers' `deepseek_v41`, which the tests compare against).

At an Engram layer, before its first mHC site, every position p looks up `n_heads` rows for each
n-gram (2 .. max_ngram tokens) ending at p, in one table per layer:

1. token map: every token id maps to a compressed id; tokens whose decoded text normalises alike
   (NFKC, NFD, accents stripped, lower case, whitespace runs -> one space, stripped) share one
   (" The", "the", "THE"). It is derived from the checkpoint's tokenizer and its size must equal
   `engram_compressed_vocab_size` (every hash multiplier depends on it).
2. hash: with the compressed ids t_0 (at p), t_1 (at p - 1), ... (`engram_pad_id`'s compressed id
   before the start of the sequence), h_n = XOR_{s < n} t_s * m[layer, s] is the n-gram's hash;
   m are odd int64 multipliers drawn per layer from numpy's default_rng(10007 * layer id).
3. layout: each (n-gram size, head) owns a bucket range of prime size, primes drawn in order above
   `engram_vocab_size - 1` and never reused over all layers; the row is h_n mod prime plus the
   range's offset inside the layer's table ((n-gram, head) order). `engram_num_embeddings` of a
   layer is the sum of its primes.
4. gate: `wkv` maps the gathered rows to one key per mHC stream and one value; the stream k gets
   h_k + sigmoid(signed_sqrt(dot)) * value, dot = <h_k, w * key_k> / (rms(h_k) rms(key_k) sqrt(dim)),
   w = q_weight * k_weight (only their product is used).

The tables are gathered by row (`EngramTable`), never read whole: the released ones hold 384M rows
of 256 FP8 values with a UE8M0 scale per 32 (research 1.5). The n-gram history is the sequence's
compressed ids by position in the batch's cache (`HISTORY`), so it is right under any split of a
sequence into calls.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dayzero.ops import ref
from dayzero.reference.layers import UsesOps
from dayzero.reference.seqcache import Batch
from dayzero.v41.buckets import bucket_primes
from dayzero.v41.formats import v41_linear

HISTORY = (-1, "engram:tok")  # (layer, kind) of the compressed token ids in a sequence's cache
_SEED_STRIDE = 10007
_GATE_FLOOR = 1e-6  # |dot| floor under the signed square root


def hash_multipliers(layer_ids, max_ngram: int, compressed_vocab: int) -> torch.Tensor:
    """int64 [layers, max_ngram]: odd, and small enough that id * multiplier fits in int64."""
    bound = max(1, (np.iinfo(np.int64).max // compressed_vocab) // 2)
    rows = [np.random.default_rng(_SEED_STRIDE * layer).integers(0, bound, size=(max_ngram,), dtype=np.int64)
            for layer in layer_ids]
    return torch.from_numpy(np.stack(rows) * 2 + 1)


def compressed_token_map(tokenizer) -> tuple[list[int], int]:
    """(compressed id of every token id, compressed vocabulary size) from a `tokenizers.Tokenizer`
    (the checkpoint's tokenizer.json, added tokens included). A token decoding to a partial UTF-8
    sequence is keyed by its raw token string; compressed ids are given in token-id order."""
    from tokenizers import Regex, normalizers

    keep = "\ue000"  # a private-use char: a one-space token must not strip to "" and merge
    norm = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), keep),
        normalizers.Strip(), normalizers.Replace(keep, " ")])
    ids: dict[str, int] = {}
    out = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        key = tokenizer.id_to_token(token_id) if "\ufffd" in text else (norm.normalize_str(text) or text)
        out.append(ids.setdefault(key, len(ids)))
    return out, len(ids)


class NgramHasher:
    """Hash ids [N, engram layers, (max_ngram - 1) * heads] of a batch's tokens, from a token map."""

    def __init__(self, args, token_map: list[int], compressed_vocab: int):
        if compressed_vocab != args.engram_compressed_vocab_size:
            raise ValueError(f"the tokenizer's compressed Engram vocabulary has {compressed_vocab} ids but the "
                             f"config's `engram_compressed_vocab_size` is {args.engram_compressed_vocab_size}: "
                             f"every hash would address the wrong rows")
        if len(token_map) < args.vocab_size:
            raise ValueError(f"the tokenizer has {len(token_map)} tokens, fewer than `vocab_size` = "
                             f"{args.vocab_size}: the Engram token map must cover every token id")
        primes = bucket_primes(len(args.engram_layer_ids), args.engram_max_ngram_size, args.engram_n_heads,
                               args.engram_vocab_size)
        rows = tuple(sum(sum(per) for per in layer) for layer in primes)
        if rows != tuple(args.engram_num_embeddings):
            raise ValueError(f"`engram_num_embeddings` {list(args.engram_num_embeddings)} differ from the prime "
                             f"bucket layout's table sizes {list(rows)}")
        self.max_ngram, self.n_heads = args.engram_max_ngram_size, args.engram_n_heads
        self.primes = torch.tensor(primes, dtype=torch.long)  # [L, max_ngram - 1, heads]
        flat = self.primes.flatten(1)
        self.offsets = torch.cumsum(flat, 1) - flat  # [L, cols]: each range's start in its layer's table
        self.multipliers = hash_multipliers(args.engram_layer_ids, self.max_ngram, compressed_vocab)
        self.token_map = torch.tensor(token_map, dtype=torch.long)
        self.pad = token_map[args.engram_pad_id]

    def __call__(self, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        dev = input_ids.device
        if self.token_map.device != dev:
            for name in ("primes", "offsets", "multipliers", "token_map"):
                setattr(self, name, getattr(self, name).to(dev))
        batch.cache.write(*HISTORY, batch.seq, batch.positions, self.token_map[input_ids])
        pos = batch.positions[:, None] - torch.arange(self.max_ngram, device=dev)  # [N, n]: p, p - 1, ...
        seq = batch.seq[:, None].expand_as(pos)
        before = pos < 0
        toks = batch.cache.read(*HISTORY, seq.flatten(), pos.clamp(min=0).flatten()).view(pos.shape)
        toks = toks.masked_fill(before, self.pad)
        prod = toks[:, None, :] * self.multipliers  # [N, L, n]
        rolling, cols = prod[..., 0], []
        for n in range(1, self.max_ngram):
            rolling = torch.bitwise_xor(rolling, prod[..., n])
            cols.append(rolling[..., None] % self.primes[:, n - 1])  # [N, L, heads]
        return torch.cat(cols, -1) + self.offsets


class EngramTable(nn.Module):
    """One layer's n-gram table, gathered by row: `weight` [rows, head_dim] and `scale`
    [rows, head_dim / 32]: FP8 e4m3 with UE8M0 scales per 32 values of a row in a quantised checkpoint
    (`quantized`, the released format), else `dtype` with fp32 scales that are not used.

    The loader leaves both as the checkpoint's memory map (on the host whatever the compute device):
    only the rows a batch addresses are read and dequantised, on the ids' device."""

    def __init__(self, rows: int, head_dim: int, dtype: torch.dtype, quantized: bool = False):
        super().__init__()
        if quantized:
            self.weight = nn.Parameter(torch.zeros(rows, head_dim, dtype=torch.float8_e4m3fn), requires_grad=False)
            self.scale = nn.Parameter(torch.zeros(rows, math.ceil(head_dim / 32), dtype=torch.float8_e8m0fnu),
                                      requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.zeros(rows, head_dim, dtype=dtype), requires_grad=False)
            self.scale = nn.Parameter(torch.ones(rows, math.ceil(head_dim / 32)), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        at = ids.to(self.weight.device)
        rows = self.weight[at]
        if self.weight.dtype != torch.float8_e4m3fn:
            return rows.to(ids.device).float()
        rows, s = rows.to(ids.device), self.scale[at].to(ids.device)
        return (rows.float().unflatten(-1, (-1, 32)) * ref.e8m0_float(s)[..., None]).flatten(-2)


class Engram(UsesOps, nn.Module):
    def __init__(self, args, slot: int, dtype: torch.dtype):
        super().__init__()
        self.slot, self.hc, self.dim, self.eps = slot, args.hc_mult, args.dim, args.norm_eps
        cols = args.engram_hash_columns
        self.compute_dtype = dtype
        self.embed = EngramTable(args.engram_num_embeddings[slot], args.engram_head_dim, dtype, args.quant == "fp8")
        self.wkv = v41_linear(args, cols * args.engram_head_dim, args.dim * (args.hc_mult + 1), dtype)
        self.q_weight = nn.Parameter(torch.zeros(args.hc_mult, args.dim, dtype=dtype), requires_grad=False)
        self.k_weight = nn.Parameter(torch.zeros(args.hc_mult, args.dim, dtype=dtype), requires_grad=False)

    def forward(self, X: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        """X [N, hc, dim] streams, hash_ids [N, engram layers, cols] -> streams with the lookup added."""
        rows = self.embed(hash_ids[:, self.slot]).flatten(-2)  # [N, cols * head_dim]
        kv = self.wkv(rows.to(self.compute_dtype))  # FP8 rows are exact in any float dtype
        key = kv[:, :self.hc * self.dim].float().unflatten(-1, (self.hc, self.dim))
        value = kv[:, self.hc * self.dim:].float()
        h = X.float()
        rstd = torch.rsqrt(h.square().mean(-1) + self.eps) * torch.rsqrt(key.square().mean(-1) + self.eps)
        dot = (h * (self.q_weight.float() * self.k_weight.float()) * key).sum(-1) * rstd * self.dim ** -0.5
        gate = ref.lanewise(torch.sigmoid, torch.copysign(dot.abs().clamp(min=_GATE_FLOOR).sqrt(), dot))
        return (h + gate[..., None] * value[:, None, :]).to(X.dtype)
