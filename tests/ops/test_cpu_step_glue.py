"""The step-glue kernels of ops/cpu/lookup.c beside its lookups: a paged write's row scatter, the
CSA top-k's pick of located rows and the compressor's ape add, each against the PyTorch ops it
replaces (bit for bit), with their fallbacks and range errors."""
import pytest
import torch

from dayzero.ops.cpu import lookup as native


def test_native_row_scatter_and_topk_pick_match_pytorch():
    g = torch.Generator().manual_seed(3)
    for shape, dtype in (((40, 16), torch.bfloat16), ((40, 2, 12), torch.float32), ((40, 9), torch.uint8)):
        pool = torch.zeros(shape, dtype=dtype)
        member = pool[8:]  # a member view, as CachePools.member_rows
        ref = member.clone()
        flat = torch.tensor([5, 0, 31, 5, 17])  # a repeated row keeps the last copy
        values = (torch.randn(5, *shape[1:], generator=g) * 50).to(dtype)
        assert native.scatter_rows(member, flat, values)
        ref.index_put_((flat,), values)
        assert torch.equal(member, ref) and not pool[:8].any()
        with pytest.raises(IndexError):
            native.scatter_rows(member, torch.tensor([1, 32]), values[:2])
    assert not native.scatter_rows(torch.zeros(4, 3), torch.tensor([1]), torch.zeros(1, 3, dtype=torch.float64))
    assert native.pool_rows(torch.zeros(4, 6)[:, ::2]) is None  # a pool whose rows are strided: index_put_
    assert not native.scatter_rows(torch.zeros(4, 6)[:, ::2], torch.tensor([1]), torch.zeros(1, 3))
    assert not native.scatter_rows(torch.zeros(4, 3), torch.tensor([1, 2]), torch.zeros(2, 6)[:, ::2])  # strided values
    rows = torch.randint(0, 1000, (3, 20), generator=g)
    top = torch.randint(-1, 20, (3, 7), generator=g)
    top[1] = -1
    want = torch.gather(rows, 1, top.clamp(min=0)).masked_fill_(top < 0, -1)
    assert torch.equal(native.pick_rows(rows, top), want)
    assert torch.equal(native.pick_rows(rows[:, :10], top.clamp(max=9)), torch.gather(
        rows[:, :10], 1, top.clamp(0, 9)).masked_fill_(top < 0, -1))
    assert native.pick_rows(rows, top[:, :0]).shape == (3, 0)
    with pytest.raises(IndexError):
        native.pick_rows(rows[:, :5], top.clamp(min=5))


def test_native_ape_add_matches_index_select_add():
    g = torch.Generator().manual_seed(5)
    ape = torch.randn(4, 24, generator=g)
    for n in (1, 3, 8):
        rows = torch.randn(n, 48, generator=g) * 1e3
        rows[0, 30] = float("inf")
        phase = torch.randint(0, 4, (n,), generator=g)
        want = rows.clone()
        want[:, 24:].add_(ape.index_select(0, phase))
        assert native.add_rows_at(rows, 24, ape, phase)
        assert torch.equal(rows.view(torch.int32), want.view(torch.int32))
    assert not native.add_rows_at(torch.zeros(2, 48, dtype=torch.bfloat16), 24, ape, torch.tensor([0, 1]))
    assert not native.add_rows_at(torch.zeros(2, 40), 24, ape, torch.tensor([0, 1]))  # too narrow
    with pytest.raises(IndexError):
        native.add_rows_at(torch.zeros(2, 48), 24, ape, torch.tensor([0, 4]))
