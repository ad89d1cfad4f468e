"""Host cost per engine step of handing the block tables to the model: built from the block lists
(`PagedBatchCache(pools, tables, ...)`, what every step did before) against the device tables
the engine keeps (`DeviceTables.update` + `PagedBatchCache.of_slots`: only the changes uploaded),
measured in the same run on the V4-Flash slice's cache groups (block size 128).

    python -m bench.block_tables [--device cpu|cuda]

Each step appends one block to every request's table in every group (the most a decode step
changes; a real step appends one every 128 tokens), then takes it back. No pool tensors are
allocated: the tables' cost does not depend on them. A host-side cost, so no roofline applies.
"""
from __future__ import annotations

import argparse

import torch

from dayzero.cache.paged import CachePools, DeviceTables, PagedBatchCache
from dayzero.cache.spec import cache_groups
from dayzero.scenarios import timeit
from dayzero.synthetic import flash_slice

CASES = ((1, 1 << 20), (64, 1 << 17), (64, 1 << 13))


def measure(device: torch.device, batch: int, context: int, block: int = 128, reps: int = 20) -> dict:
    groups = cache_groups(flash_slice(layer_types=("csa", "hca", "csa", "hca")), block, with_mtp=False)
    n = context // block
    pools = CachePools.__new__(CachePools)  # the groups and trash blocks only: tables need no pool tensors
    pools.groups = {g.name: g for g in groups}
    pools.trash = {g.name: batch * n + 1 for g in groups}
    tables = [{g.name: list(range(b * n, (b + 1) * n)) for g in groups} for b in range(batch)]
    dev = DeviceTables(pools, batch + 1, n + 2, device)
    dev.update(tables)
    protect = [0] * batch

    def grow(k: int) -> None:
        for t in tables:
            for col in t.values():
                if k > 0:
                    col.append(col[-1] + 1)
                else:
                    col.pop()

    def lists():
        grow(1)
        c = PagedBatchCache(pools, tables, protect, device)
        grow(-1)
        return c

    def device_tables():
        grow(1)
        c = PagedBatchCache.of_slots(pools, dev, dev.update(tables), protect, device)
        grow(-1)
        return c

    out = {name: timeit(fn, device, warmup=1, reps=reps) for name, fn in (("lists", lists),
                                                                          ("device tables", device_tables))}
    return dict(batch=batch, context=context, entries=batch * n * len(groups), **out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(ap.parse_args().device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of 20 steps")
    for batch, context in CASES:
        r = measure(device, batch, context)
        print(f"B={batch:3d} context={context:8d} ({r['entries']:7d} entries): lists {r['lists'] * 1e3:8.2f} ms, "
              f"device tables {r['device tables'] * 1e3:7.3f} ms ({r['lists'] / r['device tables']:.0f}x)")


if __name__ == "__main__":
    main()
