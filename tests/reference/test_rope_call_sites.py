"""RoPE at every call site of a CSA and an HCA layer: which tensor, which table, which positions
(v4-architecture.md 3.3-3.8, 10.3): q and window kv at the token positions, compressed entries and
indexer keys at r*i, indexer queries at the token positions, the output de-rotated (conjugate)."""
import dataclasses

import torch

from dayzero.loader.model_io import load_model
from dayzero.ops import REF, ref
from dayzero.reference.layers import UsesOps
from dayzero.reference.attention import rope_table
from tests.conftest import prompt_ids


def test_rope_call_sites(make_ckpt):
    model = load_model(make_ckpt("flash", "fp32"), numerics="transformers")
    args = model.args
    calls = []
    real = ref.apply_rope

    def spy(x, cos, sin, inverse=False):
        calls.append((tuple(x.shape), cos.squeeze(), inverse))
        return real(x, cos, sin, inverse)

    spied = dataclasses.replace(REF, apply_rope=spy)  # the modules call RoPE through their op table
    for m in model.modules():
        if isinstance(m, UsesOps):
            m.ops = spied
    S = 40
    state = model.new_state()
    model(prompt_ids(S), state)
    per_layer = len(calls) // args.n_layers
    plain, yarn = rope_table(args, False), rope_table(args, True)

    def angles(pos, table):
        return ref.rope_cos_sin(torch.as_tensor(pos), table)[0]

    tokens = torch.arange(S)
    # layer 0 is sliding-only: q, kv, output; base theta, no YaRN
    sl = calls[:3]
    assert [c[0] for c in sl] == [(S, args.n_heads, args.head_dim), (S, args.head_dim),
                                  (S, args.n_heads, args.head_dim)]
    assert [c[2] for c in sl] == [False, False, True]
    for c in sl:
        assert torch.allclose(c[1], angles(tokens, plain))
    # layer 1 is CSA (r = 4): q, kv, entries at 4i, indexer keys at 4i, indexer q, output
    csa = calls[3:9]
    r = args.compress_ratios[1]
    n = S // r
    assert [c[0] for c in csa] == [(S, args.n_heads, args.head_dim), (S, args.head_dim),
                                   (n, args.head_dim), (n, args.index_head_dim),
                                   (S, args.index_n_heads, args.index_head_dim),
                                   (S, args.n_heads, args.head_dim)]
    want = [tokens, tokens, r * torch.arange(n), r * torch.arange(n), tokens, tokens]
    for c, pos in zip(csa, want):
        assert torch.allclose(c[1], angles(pos, yarn))
    assert [c[2] for c in csa] == [False] * 5 + [True]
    # layer 2 is HCA (r = 16): q, kv, entries at 16i, output
    hca = calls[9:13]
    r = args.compress_ratios[2]
    assert hca[2][0] == (S // r, args.head_dim)
    assert torch.allclose(hca[2][1], angles(r * torch.arange(S // r), yarn))
    assert per_layer >= 3 and not torch.allclose(plain, yarn)
