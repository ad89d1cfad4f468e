"""Block pool, cache manager and scheduler with fake requests: plain Python, milliseconds."""
import pytest

from dayzero.cache.block_pool import BlockPool, NoFreeBlocks
from dayzero.cache.manager import KVCacheManager
from dayzero.cache.spec import cache_groups
from dayzero.engine.request import Request, Status
from dayzero.engine.sampling import SamplingParams
from dayzero.engine.scheduler import Scheduler
from dayzero.testing import tiny_args

BS, W = 16, 16


def test_pool_refcounts_free_order_and_hashes():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and sorted(a) == [0, 1, 2]
    pool.cache(a[0], 111)
    pool.take(a[0])  # shared by a second owner
    pool.free([a[0]])
    assert pool.num_free == 1  # still held once
    pool.free([a[0], a[1]])
    assert pool.num_free == 3 and pool.lookup(111) == a[0]  # freed but still findable
    pool.take(a[0])  # revived from the free queue
    assert pool.num_free == 2
    pool.free([a[0]])
    got = pool.allocate(3)  # least recently freed first: 3, a[1], then the cached a[0] (evicted)
    assert got == [3, a[1], a[0]] and pool.lookup(111) is None
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([a[2], a[2]])


def manager(num=64, caching=True, lookahead=0, partitions=1):
    groups = cache_groups(tiny_args("flash"), BS, with_mtp=False)
    return KVCacheManager(groups, {g.name: num for g in groups}, BS, W, caching, lookahead, partitions), groups


def test_groups_of_the_flash_tiny_model():
    _, groups = manager()
    names = [g.name for g in groups]
    assert names == ["window", "rows r4", "entries r4", "rows r16", "entries r16"]
    g = {g.name: g for g in groups}
    assert g["window"].layers == (0, 1, 2, 3, 4) and g["entries r4"].per_block == 4
    assert set(g["entries r4"].kinds) == {"ent:attn", "ent:index"} and g["entries r16"].per_block == 1
    assert g["rows r4"].keep_from(37, W) == 4 * (37 // 4 - 1)  # open window and the overlap half
    assert g["rows r16"].keep_from(37, W) == 32
    assert g["window"].keep_from(37, W) == 22
    with pytest.raises(ValueError, match="multiple of every compression ratio"):
        cache_groups(tiny_args("flash"), 8, with_mtp=False)


def test_sliding_groups_free_old_blocks_entries_stay():
    kv, _ = manager()
    assert kv.allocate("a", 70)
    kv.commit("a", 70, list(range(70)))
    t = kv.table("a")
    assert all(b is not None for b in t["entries r4"]) and len(t["entries r4"]) == 5
    assert t["window"][:3] == [None] * 3 and t["window"][3] is not None  # tokens >= 55 needed
    assert t["rows r16"][:4] == [None] * 4  # open HCA window starts at 64
    kv.free("a")
    assert all(p.num_free == 64 for p in kv.pools.values())


def test_allocation_is_all_or_nothing():
    kv, _ = manager(num=4)
    assert kv.allocate("a", 48)
    free_before = {n: p.num_free for n, p in kv.pools.items()}
    assert not kv.allocate("b", 33)  # needs 3 blocks in every group, 1 left
    assert {n: p.num_free for n, p in kv.pools.items()} == free_before
    assert kv.allocate("b", 16)


def test_prefix_hit_takes_whole_blocks_and_leaves_a_token():
    kv, _ = manager()
    toks = list(range(100, 150))
    kv.allocate("a", 50)
    kv.commit("a", 50, toks)
    kv.free("a")
    assert kv.lookup_prefix("b", toks[:33] + [1, 2, 3]) == 32
    assert kv.lookup_prefix("c", toks[:32]) == 16  # a whole-prompt hit keeps one token to compute
    assert kv.lookup_prefix("d", [9] + toks[1:40]) == 0
    nc, _ = manager(caching=False)
    nc.allocate("a", 50)
    nc.commit("a", 50, toks)
    nc.free("a")
    assert nc.lookup_prefix("b", toks) == 0


def test_prefix_cache_partitions_never_share_blocks():
    """DP-attention: each rank holds its own requests' rows in its own pools, so each partition has
    its own blocks: ids from its own pools, named and found again only there."""
    kv, _ = manager(num=6, partitions=3)
    toks = list(range(100, 150))
    assert kv.lookup_prefix("a", toks, part=1) == 0  # placed in partition 1, nothing cached yet
    assert kv.allocate("a", 50)
    assert all(p.num_free == 6 - 4 for p in kv.parts[1].values())
    assert all(p.num_free == 6 for part in (0, 2) for p in kv.parts[part].values())
    # partition 1 is full for a second request of the size; partition 0 is not
    kv.lookup_prefix("x", [1] * 50, part=1)
    assert not kv.can_allocate("x", 50)
    kv.free("x")
    kv.lookup_prefix("y", [1] * 50, part=0)
    assert kv.can_allocate("y", 50)
    kv.free("y")
    kv.commit("a", 50, toks)
    kv.free("a")
    assert kv.probe_prefix(toks, 0) == 0 and kv.probe_prefix(toks, 2) == 0
    assert kv.probe_prefix(toks, 1) == 48
    free = [{n: p.num_free for n, p in part.items()} for part in kv.parts]
    assert [{n: p.num_free for n, p in part.items()} for part in kv.parts] == free  # probing takes nothing
    assert kv.lookup_prefix("b", toks, part=0) == 0
    assert kv.lookup_prefix("c", toks[:40], part=1) == 32
    # c's own blocks are named in partition 1 too
    kv.allocate("c", 40)
    kv.commit("c", 40, toks[:40])
    kv.free("c")
    assert kv.probe_prefix(toks[:40] + [7], 1) == 32 and kv.probe_prefix(toks[:40] + [7], 0) == 0
    assert kv.usage() == max(p.usage for part in kv.parts for p in part.values())


def test_dp_placement_follows_the_cached_prefix_within_the_balance():
    from dayzero.distributed.dp import assign
    owners = {}
    assert assign(owners, [], "a", 2) == 0  # nothing cached, nothing running: the lowest rank
    assert assign(owners, ["a"], "b", 2) == 1  # the less loaded rank
    assert assign(owners, ["a", "b"], "c", 2, hits=[0, 32]) == 1  # equal load: the rank with the prefix
    # rank 1 now runs b and c, rank 0 runs a: 2 <= 1 + 1, still within the balance
    assert assign(owners, ["a", "b", "c"], "d", 2, hits=[0, 32]) == 1
    # rank 1 runs 3, rank 0 runs 1: beyond the balance, the prefix loses to the load
    assert assign(owners, ["a", "b", "c", "d"], "e", 2, hits=[0, 64]) == 0
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 1, "e": 0}
    # a rank at its max_num_seqs takes no more, whatever it caches
    assert assign({"a": 0, "b": 1, "c": 1}, ["a", "b", "c"], "f", 2, hits=[0, 64], cap=2) == 0


def test_lookahead_allocates_one_more_row():
    kv, _ = manager(lookahead=1)
    kv.allocate("a", 32)
    assert len(kv.table("a")["window"]) == 3


def req(rid, n, max_tokens=4):
    return Request(rid, list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=max_tokens))


def test_scheduler_catches_up_under_the_token_budget_fcfs():
    kv, _ = manager()
    s = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=10)
    a, b, c = req("a", 7), req("b", 30), req("c", 3)
    for r in (a, b, c):
        s.add(r)
    out = s.schedule()
    assert [(x.request.rid, x.num_new) for x in out] == [("a", 7), ("b", 3)]  # c waits: 2 seqs max
    a.num_computed, b.num_computed = 7, 3
    a.output_ids.append(5)  # a decodes, b continues its prefill
    out = s.schedule()
    assert [(x.request.rid, x.num_new) for x in out] == [("a", 1), ("b", 9)]
    assert c.status is Status.WAITING


def test_scheduler_verifies_a_draft_and_drops_it_when_the_budget_is_short():
    kv, _ = manager()
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=4)
    a = req("a", 5)
    s.add(a)
    s.schedule()
    a.num_computed = 5
    a.output_ids.append(9)
    a.draft = [3, 4, 5, 6]
    out = s.schedule()  # a budget of 4: the last known token and the first 3 drafts
    assert (out[0].num_new, out[0].num_draft, out[0].verify_draft) == (4, 3, True)


def test_scheduler_preempts_the_latest_arrival_when_blocks_run_out():
    kv, _ = manager(num=5)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = req("a", 40), req("b", 30)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [x.request.rid for x in out] == ["a", "b"]
    a.num_computed, b.num_computed = 40, 30
    kv.commit("a", 40, a.all_ids)
    kv.commit("b", 30, b.all_ids)
    a.output_ids += list(range(30))  # a needs blocks up to 70 tokens: b must go
    out = s.schedule()
    assert [x.request.rid for x in out] == ["a"] and s.num_preemptions == 1
    assert b.status is Status.WAITING and b.num_computed == 0 and s.waiting[0] is b


def test_a_request_that_cannot_fit_alone_fails_without_stopping_the_engine():
    kv, _ = manager(num=2)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    big, small = req("big", 60), req("small", 5)
    s.add(big)
    s.add(small)
    out = s.schedule()
    assert big.finish_reason == "abort" and "do not fit" in big.error
    assert [x.request.rid for x in out] == ["small"]


def test_lookups_outside_held_blocks_land_in_the_trash_block_and_are_reported():
    """A row in a block the request does not hold (an engine bug) is written to the trash block,
    never to another request's block, and the step's check() names the group."""
    import pytest
    import torch
    from dayzero.cache.paged import CachePools, PagedBatchCache
    from dayzero.cache.spec import cache_groups
    from dayzero.testing import tiny_args
    args = tiny_args()
    groups = cache_groups(args, 16, with_mtp=False)
    pools = CachePools(groups, {g.name: 4 for g in groups}, torch.float32, torch.device("cpu"))
    layer, kind = 0, "kv"
    name = pools.route[(layer, kind)][0]
    tables = [{g.name: [0, None] for g in groups}, {g.name: [1, 2] for g in groups}]
    before = {k: t.clone() for k, t in pools.tensors.items()}
    ok = PagedBatchCache(pools, tables, [0, 0], torch.device("cpu"))
    ok.write(layer, kind, torch.tensor([0, 1]), torch.tensor([3, 20]), torch.ones(2, args.head_dim))
    ok.check()  # held blocks only: nothing to report
    bad = PagedBatchCache(pools, tables, [0, 0], torch.device("cpu"))
    bad.write(layer, kind, torch.tensor([0]), torch.tensor([17]), torch.full((1, args.head_dim), 7.0))  # block 1: None
    with pytest.raises(AssertionError, match=name):
        bad.check()
    t = pools.tensors[(name, kind)]
    assert (t[:4] == 7).sum() == 0 and (t[4] == 7).any()  # only the trash block (index 4) got the row
    assert all(torch.equal(pools.tensors[k][3], before[k][3]) for k in pools.tensors)  # nobody's block 3
