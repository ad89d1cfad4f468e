"""ops/cpu/fused.gate_route, the MoE gate in fewer ops, is bit-identical to the sequence it replaces
(the CPU table's fp32_linear, then ref.route with sqrtsoftplus scores) for every routing the model
has: biased top-k, hash ids, no bias; k 1..6; one token to past the lanes' single chunk."""
from __future__ import annotations

import pytest
import torch

from dayzero.ops import cpu, ref

if cpu.unavailable().get("fused") or cpu.unavailable().get("dense"):
    pytest.skip(f"fused.c / dense.c do not build here: {cpu.unavailable()}", allow_module_level=True)

from dayzero.ops.cpu import dense, fused  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _twin(x, w, bias, k, scale, hash_idx):
    return ref.route(dense.fp32_linear(x, w), bias, k, scale, "sqrtsoftplus", hash_idx)


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 2), (64, 6), (256, 6), (384, 2), (7, 3)])
@pytest.mark.parametrize("N", [1, 3, 8, 40])
def test_gate_route_is_the_sequence(E, k, N):
    gen = torch.Generator().manual_seed(E * 100 + N * 7 + k)
    x = torch.randn(N, 64, generator=gen)
    x[0, :4] = torch.tensor([40.0, -40.0, 0.0, 7.0])  # logits past softplus' threshold and towards its underflow
    w = (torch.randn(E, 64, generator=gen) * 2).bfloat16()
    bias = torch.randn(E, generator=gen) * 0.1
    hash_idx = torch.randint(0, E, (N, k), generator=gen)
    with torch.no_grad():
        assert fused.gate_route(x, w.clone(), bias, k, 1.5) is None  # a weight fp32_linear has not seen: the sequence
        dense.fp32_linear(x, w)
        for b, h in ((bias, None), (None, None), (None, hash_idx)):
            if N * E + (-N * E % 64) > fused._CHUNK:
                assert fused.gate_route(x, w, b, k, 1.5, h) is None
                continue
            got = fused.gate_route(x, w, b, k, 2.5, h)
            want = _twin(x, w, b, k, 2.5, h)
            assert got is not None and got[1].dtype == want[1].dtype == torch.int64
            assert torch.equal(got[1], want[1]), (b is None, h is None)
            assert torch.equal(_bits(got[0]), _bits(want[0])), (b is None, h is None)


def test_gate_route_edges():
    x = torch.randn(2, 32)
    w = torch.randn(8, 32)
    with torch.no_grad():
        dense.fp32_linear(x, w)
        with pytest.raises(RuntimeError):  # ids outside [0, E), as the twin's gather
            fused.gate_route(x, w, None, 2, 1.0, torch.tensor([[0, 8], [1, 2]]))
        assert fused.gate_route(x, w, torch.zeros(8, dtype=torch.float64), 2, 1.0) is None  # the twin upcasts
        assert fused.gate_route(x[:0], w, None, 2, 1.0) is None
        assert fused.gate_route(torch.randn(600, 32), torch.randn(64, 32), None, 2, 1.0) is None  # past one chunk
    assert fused.gate_route(x, w, None, 2, 1.0) is None  # autograd: the sequence


def test_the_gate_module_takes_it():
    """Gate.forward on the native CPU table returns gate_route's result (the same bits as the
    sequence, which the Gate runs on other tables)."""
    from dayzero.reference.moe import Gate
    from dayzero.testing import tiny_args
    args = tiny_args("flash").replace(dim=64, n_routed_experts=16, n_activated_experts=2, vocab_size=32)
    assert args.is_hash_layer(0) and not args.is_hash_layer(args.n_layers - 1)
    table = cpu.table()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)
    ids = torch.randint(0, 32, (5,), generator=gen)
    for layer in (0, args.n_layers - 1):  # a hash layer, a biased top-k layer
        g = Gate(args, layer, torch.bfloat16)
        with torch.no_grad():
            g.weight.copy_(torch.randn(16, 64, generator=gen))
            if g.hash:
                g.tid2eid.copy_(torch.randint(0, 16, (32, 2), generator=gen))
            else:
                g.bias.copy_(torch.randn(16, generator=gen))
            g.ops = table
            calls = []
            real = fused.gate_route
            fused.gate_route = lambda *a, **kw: calls.append(1) or real(*a, **kw)
            try:
                import dayzero.reference.moe as moe
                moe._ROUTE.clear()
                g(x, ids)  # first call: the weight is checked by fp32_linear
                got = g(x, ids)
            finally:
                fused.gate_route = real
                moe._ROUTE.clear()
            want = ref.route(table.fp32_linear(x, g.weight), None if g.hash else g.bias, 2, args.route_scale,
                             "sqrtsoftplus", g.tid2eid[ids] if g.hash else None)
        assert len(calls) == 2 and torch.equal(got[1], want[1]) and torch.equal(_bits(got[0]), _bits(want[0]))
