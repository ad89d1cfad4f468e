"""bench/block_tables.py runs, and the device tables it times hold the rows the block lists give."""
import torch

from bench import block_tables
from dayzero.cache.paged import CachePools, DeviceTables, PagedBatchCache
from dayzero.cache.spec import cache_groups
from dayzero.synthetic import flash_slice


def test_measure_times_both_ways():
    r = block_tables.measure(torch.device("cpu"), 2, 1 << 12, reps=2)
    assert r["entries"] == 2 * 32 * 5 and r["lists"] > 0 and r["device tables"] > 0


def test_slot_rows_equal_the_list_built_rows():
    groups = cache_groups(flash_slice(layer_types=("csa", "hca")), 128, with_mtp=False)
    pools = CachePools.__new__(CachePools)
    pools.groups = {g.name: g for g in groups}
    pools.trash = {g.name: 99 for g in groups}
    tables = [{g.name: [None, 3, 4] for g in groups}, {g.name: [7] for g in groups}]
    dev = DeviceTables(pools, 4, 6, torch.device("cpu"))
    dev.update(tables[::-1])  # other slots than the step's order
    got = PagedBatchCache.of_slots(pools, dev, dev.update(tables), [0, 0], torch.device("cpu"))._tables
    want = PagedBatchCache(pools, tables, [0, 0], torch.device("cpu"))._tables
    for name, w in want.items():
        g = got[name]
        assert torch.equal(g[:, :w.shape[1]], w)
        assert (g[:, w.shape[1]:] == pools.first_row(name, None)).all()  # past the table: trash
