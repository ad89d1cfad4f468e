"""Reference twins and the layout conventions they encode (hand-built expectations)."""
import math

import pytest
import torch

from dayzero.ops import ref


def test_rope_rotates_trailing_dims_as_interleaved_pairs():
    x = torch.arange(1.0, 9.0)  # head of 8, rope on the last 4 = pairs (5,6) and (7,8)
    inv_freq = torch.tensor([1.0, 0.5])
    cos, sin = ref.rope_cos_sin(torch.tensor(2), inv_freq)
    y = ref.apply_rope(x, cos, sin)
    assert torch.equal(y[:4], x[:4])  # nope dims untouched
    for pair, f in ((4, 1.0), (6, 0.5)):
        c = complex(x[pair], x[pair + 1]) * complex(math.cos(2 * f), math.sin(2 * f))
        assert y[pair].item() == pytest.approx(c.real, abs=1e-6)
        assert y[pair + 1].item() == pytest.approx(c.imag, abs=1e-6)
    back = ref.apply_rope(y, cos, sin, inverse=True)
    assert torch.allclose(back, x, atol=1e-6)


def test_yarn_table_matches_deepseek_correction_range():
    """base 160000, factor 16, original 65536: pairs 0-15 unchanged, 25-31 divided by 16 (v4-arch 3.8)."""
    plain = ref.rope_inv_freq(64, 160000.0)
    yarn = ref.rope_inv_freq(64, 160000.0, 16.0, 65536, 32.0, 1.0)
    assert torch.allclose(yarn[:16], plain[:16])
    assert torch.allclose(yarn[25:], plain[25:] / 16)
    assert ((yarn[16:25] < plain[16:25]) & (yarn[16:25] > plain[16:25] / 16)).all()
    assert torch.equal(ref.rope_inv_freq(64, 10000.0, 1.0, 65536), ref.rope_inv_freq(64, 10000.0))


def test_fp8_activation_rule():
    """scale = 2^ceil(log2(amax/448)) per block, values rounded to e4m3 and scaled back."""
    x = torch.zeros(2, 128)
    x[0, 0], x[0, 1] = 300.0, 1.3  # amax 300 -> scale 1 (300/448 < 1 = 2^0)
    x[1, 0], x[1, 1] = 1000.0, 3.3  # amax 1000 -> scale 4
    y = ref.fp8_act_sim(x, 128)
    assert y[0, 0] == 288.0  # e4m3 spacing at 256..512 is 32: 300 -> 288
    assert y[0, 1] == 1.25  # spacing 0.125 in [1, 2): 1.3 -> 1.25
    assert y[1, 0] == 1024.0  # 1000/4 = 250 -> 256 (spacing 16 in [128, 256))
    assert y[1, 1] == 3.25  # 3.3/4 = 0.825 -> 0.8125 (spacing 1/16 in [0.5, 1)), * 4
    tiny = ref.fp8_act_sim(torch.full((1, 128), 1e-9), 128)  # amax floor 1e-4 -> scale 2^-22
    assert torch.all(tiny == 2 * 2.0 ** -9 * 2.0 ** -22)  # 1e-9 * 2^22 = 0.0042 -> 2 e4m3 subnormal steps
    parts = ref.fp8_act_sim(torch.randn(3, 448), 64)  # blocks of 64 (KV nope dims)
    assert parts.shape == (3, 448)


def test_fp4_simulation_rounds_to_e2m1_with_ties_to_even():
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.2] + [0.0] * 22])
    y = ref.fp4_act_sim(x, 32)  # amax 6 -> scale 1
    assert y[0, :10].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -0.0]
    z = ref.fp4_act_sim(x * 4, 32)  # amax 24 -> scale 4, same codes
    assert torch.equal(z, y * 4)


def test_hadamard_is_orthonormal_sylvester():
    n = 8
    eye = torch.eye(n)
    h = ref.hadamard(eye)
    assert torch.allclose(h @ h.T, eye, atol=1e-6)
    assert torch.allclose(h[1], torch.tensor([1, -1, 1, -1, 1, -1, 1, -1.0]) / math.sqrt(8))


def test_sparse_attention_with_sink_against_dense_softmax():
    g = torch.Generator().manual_seed(0)
    B, S, H, D, N = 2, 3, 4, 8, 6
    q, kv = torch.randn(B, S, H, D, generator=g), torch.randn(B, N, D, generator=g)
    sink = torch.randn(H, generator=g)
    idx = torch.tensor([[0, 2, 5, -1], [1, -1, -1, -1], [-1, -1, -1, -1]]).expand(B, S, 4)
    out = ref.sparse_attn(q, kv, sink, idx, 0.5)
    for b in range(B):
        for s in range(S):
            keys = [i for i in idx[b, s].tolist() if i >= 0]
            for h in range(H):
                logits = torch.tensor([0.5 * float(q[b, s, h] @ kv[b, k]) for k in keys] + [float(sink[h])])
                p = logits.softmax(0)[:-1]  # the sink takes probability mass but has no value
                want = sum((p[i] * kv[b, k] for i, k in enumerate(keys)), torch.zeros(D))
                assert torch.allclose(out[b, s, h], want, atol=1e-5)
    assert torch.all(out[:, 2] == 0)  # no keys at all: output 0


def test_sinkhorn_gives_doubly_stochastic_comb_and_ranges():
    g = torch.Generator().manual_seed(0)
    n = 4
    mixes = torch.randn(5, (2 + n) * n, generator=g) * 3
    pre, post, comb = ref.hc_split_sinkhorn(mixes, torch.tensor([1.0, 1.0, 1.0]), torch.zeros(24), n, 20, 1e-6)
    assert torch.allclose(comb.sum(-2), torch.ones(5, n), atol=1e-5)  # ends with a column normalisation
    assert torch.allclose(comb.sum(-1), torch.ones(5, n), atol=0.05)  # 20 iterations: approximately
    assert (pre > 0).all() and (pre < 1 + 1e-5).all() and (post > 0).all() and (post < 2).all()


def test_hc_post_uses_transposed_comb():
    x = torch.tensor([[1.0], [10.0]])  # two streams, d = 1
    comb = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # comb[j=0, k=1]: stream 0 feeds output 1
    y = ref.hc_post(torch.tensor([0.0]), x, torch.zeros(2), comb)
    assert y.flatten().tolist() == [0.0, 1.0]


def test_route_bias_selects_but_does_not_weight():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    w, idx = ref.route(logits, torch.tensor([10.0, 0.0, 0.0]), 2, 1.5)
    s = torch.nn.functional.softplus(logits).sqrt()[0]
    assert sorted(idx[0].tolist()) == [0, 2]
    want = torch.stack([s[i] for i in idx[0].tolist()])
    assert torch.allclose(w[0], want / want.sum() * 1.5)
    w2, idx2 = ref.route(logits, None, 2, 1.0, hash_idx=torch.tensor([[1, 0]]))
    assert idx2.tolist() == [[1, 0]] and torch.allclose(w2.sum(), torch.tensor(1.0))


def test_swiglu_clamp_is_asymmetric():
    g, u = torch.tensor([20.0, -20.0]), torch.tensor([20.0, -20.0])
    out = ref.swiglu(g, u, 10.0)
    assert out[0] == pytest.approx(torch.nn.functional.silu(torch.tensor(10.0)).item() * 10)
    assert out[1] == pytest.approx(torch.nn.functional.silu(torch.tensor(-20.0)).item() * -10)
