"""Native paged-cache lookups (ops/cpu/lookup.c) against the cache's PyTorch path: the same row ids,
keep masks and flagged groups for random block tables, including blocks not held, indices past
the table, negative indices, protected prefixes, live masks and strided operands."""
import pytest
import torch

from dayzero.cache.paged import CachePools, PagedBatchCache
from dayzero.cache.spec import cache_groups
from dayzero.ops.cpu import lookup as native
from dayzero.testing import tiny_args

CPU = torch.device("cpu")


def _setup(seed: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    groups = cache_groups(tiny_args(), 16, with_mtp=False)
    pools = CachePools(groups, {x.name: 6 for x in groups}, torch.float32, CPU)
    tables = []
    for _ in range(batch):
        t = {}
        for x in groups:
            n = int(torch.randint(0, 5, (), generator=g))
            t[x.name] = [None if torch.rand((), generator=g) < 0.3 else int(b)
                         for b in torch.randint(0, 6, (n,), generator=g)]
        tables.append(t)
    protect = [int(v) for v in torch.randint(0, 40, (batch,), generator=g)] if seed % 2 else [0] * batch
    return g, pools, tables, protect


def _pair(pools, tables, protect):
    fast = PagedBatchCache(pools, tables, protect, CPU)
    slow = PagedBatchCache(pools, tables, protect, CPU)
    slow._native = False
    assert fast._native, "lookup.c should build on this machine"
    return fast, slow


def _flagged(cache) -> set[str]:
    return {name for name, b in cache.flags() if bool(b)}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("batch", [1, 3])
def test_native_lookups_match_the_pytorch_path(seed, batch):
    g, pools, tables, protect = _setup(seed, batch)
    fast, slow = _pair(pools, tables, protect)
    for name, spec in pools.groups.items():
        top = 6 * spec.per_block
        seq = torch.randint(0, batch, (11,), generator=g)
        index = torch.randint(-3, top, (11,), generator=g)
        for ratio in (None, spec.ratio if any(protect) else None):
            (f, fk), (s, sk) = fast._lookup(name, seq, index, ratio), slow._lookup(name, seq, index, ratio)
            assert torch.equal(f, s)
            assert (fk is None) == (sk is None) and (fk is None or torch.equal(fk, sk))
        for shape in ((7, 1), (7, 5)):
            sq = torch.randint(0, batch, shape, generator=g)
            ix = torch.randint(0, top, (5, 7), generator=g).t()  # strided
            valid = torch.rand(7, 5, generator=g) < 0.7
            layer = spec.layers[0]
            kind = next(iter(spec.kinds))
            assert torch.equal(fast.locate_rows(layer, kind, sq, ix, valid)[1],
                               slow.locate_rows(layer, kind, sq, ix, valid)[1])
        assert _flagged(fast) == _flagged(slow)
    if _flagged(slow):
        with pytest.raises(AssertionError, match=sorted(_flagged(slow))[0]):
            fast.check()
    else:
        fast.check()


def test_some_seeds_flag_and_some_protect():
    """The parity test above covers both outcomes: flagged lookups and a protected prefix that
    drops rows (keep mask), not only the quiet case."""
    flagged = dropped = 0
    for seed in range(8):
        g, pools, tables, protect = _setup(seed, 3)
        fast, _ = _pair(pools, tables, protect)
        for name, spec in pools.groups.items():
            seq = torch.randint(0, 3, (11,), generator=g)
            index = torch.randint(-3, 6 * spec.per_block, (11,), generator=g)
            dropped += fast._lookup(name, seq, index, spec.ratio if any(protect) else None)[1] is not None
        flagged += bool(_flagged(fast))
    assert flagged and dropped


def test_live_mask_matches_a_recorded_cache():
    g, pools, tables, _ = _setup(3, 4)
    dev = {name: torch.tensor(flat) for name, flat in
           __import__("dayzero.cache.paged", fromlist=["table_rows"]).table_rows(pools, tables).items()}
    live = torch.tensor([True, False, True, False])
    ref = PagedBatchCache.over(pools, dev, live)
    assert not ref._native
    for name, spec in pools.groups.items():
        seq = torch.randint(0, 4, (9,), generator=g)
        index = torch.randint(-2, 6 * spec.per_block, (9,), generator=g)
        valid = torch.ones(9, dtype=torch.bool)
        bad = native.ctypes.c_int64(0)
        flat, keep = native.lookup(dev[name], seq, index, spec.per_block, ref._trash[name], None, None, live, bad)
        assert keep is None and torch.equal(flat, ref._lookup(name, seq, index, None)[0])
        assert (bad.value > 0) == bool(ref._bad[-1][1])
        bad2 = native.ctypes.c_int64(0)
        ids = native.locate(dev[name], seq[:, None], index[:, None], valid[:, None], spec.per_block,
                            ref._trash[name], live, bad2)
        layer, kind = spec.layers[0], next(iter(spec.kinds))
        assert torch.equal(ids, ref.locate_rows(layer, kind, seq[:, None], index[:, None], valid[:, None])[1])
        assert (bad2.value > 0) == bool(ref._bad[-1][1])


def test_a_sequence_outside_the_batch_is_an_index_error():
    _, pools, tables, protect = _setup(0, 2)
    fast, _ = _pair(pools, tables, protect)
    name = next(iter(pools.groups))
    with pytest.raises(IndexError, match="sequence 5 is out of range for a batch of 2"):
        fast._lookup(name, torch.tensor([0, 5]), torch.tensor([0, 1]), None)
    spec = pools.groups[name]
    with pytest.raises(IndexError, match="out of range for a batch of 2"):
        fast.locate_rows(spec.layers[0], next(iter(spec.kinds)), torch.tensor([[2]]), torch.tensor([[0]]),
                         torch.tensor([[True]]))



@pytest.mark.parametrize("seed", range(4))
def test_slot_mapped_lookups_match_gathered_tables(seed):
    """of_slots on CPUs: native lookups read the device tables' rows through the slot map (no gather
    of the step's rows), the same ids and flags as a cache over the step's own tables; the PyTorch
    path of the same cache gathers them on first use."""
    from dayzero.cache.paged import DeviceTables
    g, pools, tables, protect = _setup(seed, 3)
    dev = DeviceTables(pools, 6, 8, CPU)
    dev.update(tables[::-1] + [{n: [] for n in pools.groups}])  # other slots than the step's order
    slots = dev.update(tables)
    assert slots != [0, 1, 2]
    mapped = PagedBatchCache.of_slots(pools, dev, slots, protect, CPU)
    assert mapped._native and mapped._gathered is None
    fast, slow = _pair(pools, tables, protect)
    gathered = PagedBatchCache.of_slots(pools, dev, slots, protect, CPU)
    gathered._native = False
    for name, spec in pools.groups.items():
        seq = torch.randint(0, 3, (11,), generator=g)
        index = torch.randint(-3, 6 * spec.per_block, (11,), generator=g)
        ratio = spec.ratio if any(protect) else None
        (m, mk), (f, fk) = mapped._lookup(name, seq, index, ratio), fast._lookup(name, seq, index, ratio)
        assert torch.equal(m, f) and (mk is None) == (fk is None) and (mk is None or torch.equal(mk, fk))
        assert torch.equal(gathered._lookup(name, seq, index, ratio)[0], f)
        sq, ix = torch.randint(0, 3, (7, 1), generator=g), torch.randint(0, 6 * spec.per_block, (7, 5), generator=g)
        valid = torch.rand(7, 5, generator=g) < 0.7
        layer, kind = spec.layers[0], next(iter(spec.kinds))
        assert torch.equal(mapped.locate_rows(layer, kind, sq, ix, valid)[1], slow.locate_rows(layer, kind, sq, ix, valid)[1])
    assert mapped._gathered is None and gathered._gathered is not None
    assert _flagged(mapped) == _flagged(fast)
    with pytest.raises(IndexError, match="sequence 3 is out of range for a batch of 3"):
        mapped._lookup(next(iter(pools.groups)), torch.tensor([0, 3]), torch.tensor([0, 1]), None)


def test_device_tables_live_follows_the_step_requests():
    """DeviceTables uploads `live` only when the step's slots change: the same requests again keep
    it, one leaving or arriving rewrites it."""
    from dayzero.cache.paged import DeviceTables
    _, pools, tables, _ = _setup(1, 3)
    dev = DeviceTables(pools, 5, 8, CPU)
    slots = dev.update(tables)
    assert dev.live.tolist() == [i in slots for i in range(5)]
    assert dev.update(tables) == slots and dev.live.tolist() == [i in slots for i in range(5)]
    rest = dev.update(tables[1:])
    assert dev.live.tolist() == [i in rest for i in range(5)] and dev.live.sum() == 2
    back = dev.update(tables)
    assert dev.live.tolist() == [i in back for i in range(5)] and dev.live.sum() == 3
