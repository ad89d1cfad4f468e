"""Recorded engine steps (engine/graphs.py) compute what eager steps compute.

On the CPU the "trace" backend records each bucket's aten ops once and replays them without
re-running Python, refusing host synchronisations as CUDA graph capture does: if any part of a
step depended on host values of the step it was recorded in, later replays would give other
tokens than the eager engine. On a GPU the same comparison runs with CUDA graphs.
"""
import dataclasses

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.cache.paged import CachePools, DeviceTables, PagedBatchCache, table_rows
from dayzero.cache.spec import cache_groups
from dayzero.engine.graphs import HostSync, OpRecorder, StepGraphs, bucket_size, unsupported
from dayzero.ops import REF, ref
from dayzero.reference.seqcache import Batch, StaticBatch
from dayzero.testing import tiny_args
from tests.engine.helpers import FIXED, OracleDrafter, staggered


def moe_all_experts(x, weights, ids, w1, s1, w3, s3, w2, s2, limit, h_act_sim=False):
    """ref.moe_experts without its host loop over the experts present: every expert runs on
    every token with weight 0 where not routed (recordable; same result up to summation order)."""
    W1, W3, W2 = (ref.fp4_dequant(w, s).to(x.dtype) for w, s in ((w1, s1), (w3, s3), (w2, s2)))
    h = ref.swiglu(torch.einsum("nd,eod->neo", x, W1), torch.einsum("nd,eod->neo", x, W3), limit)
    routed = (weights[..., None] * (ids[..., None] == torch.arange(w1.shape[0], device=x.device))).sum(1)
    h = (routed[..., None] * h).to(x.dtype)
    if h_act_sim:
        h = ref.fp8_act_sim(h, 128)
    return torch.einsum("neo,edo->nd", h.float(), W2.float())


RECORDABLE = dataclasses.replace(REF, name="ref-recordable", moe_experts=moe_all_experts, capturable=True)


def engine(path, graphs: bool, **opts):
    """fp32 without the quantisation simulation (as tests/engine do): a bucket's wider entry
    lookups (masked) change fp32 summation order, which FP8 rounding could amplify into other
    tokens; here any difference beyond rounding is a bug."""
    llm = LLM(path, ops="ref", dtype="float32", numerics="transformers", **opts)
    e = llm.engine
    e.model.set_ops(RECORDABLE)
    e.worker.ops = RECORDABLE
    if graphs:
        e.use_graphs("trace")
    return llm


def prompts(seed=0, lengths=(5, 23, 40, 17, 33)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (n,), generator=g).tolist() for n in lengths]


def run(llm, ps, params, oracle=None):
    """oracle: {request id: the eager engine's tokens}: every decode step verifies a draft, so it
    carries two tokens per request (and some close compression windows on the draft's position)."""
    if oracle is not None:
        llm.engine.drafter = OracleDrafter(oracle, 1)
    return staggered(llm.engine, ps, params)


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("flash", "fp8")


GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("opts", [
    dict(max_num_batched_tokens=7, num_speculative_tokens=0),  # prefill chunks fit buckets too
    dict(max_num_batched_tokens=64, max_num_seqs=3, num_speculative_tokens=1,
         speculative_config=FIXED, speculative_min_acceptance=0.0),
    dict(max_num_batched_tokens=7, num_speculative_tokens=0, kv_cache_dtype="fp8"),  # packed rows written in graphs
], ids=["chunk7", "mtp-verify", "fp8-cache"])
def test_replayed_steps_give_the_eager_tokens(ckpt, opts):
    eager = run(engine(ckpt, False, **opts), prompts(), GREEDY)
    llm = engine(ckpt, True, **opts)
    oracle = {r.rid: r.output_ids for r in eager} if opts["num_speculative_tokens"] else None
    got = run(llm, prompts(), GREEDY, oracle)
    assert [r.output_ids for r in got] == [r.output_ids for r in eager]
    for a, b in zip(got, eager):
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-4 for k in la)
    stats = llm.engine.stats()
    assert stats["graphs"]["replays"] >= stats["graphs"]["recorded"] >= 3
    if oracle is not None:
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 10


def test_prefix_hits_and_long_chunks_run_eagerly_over_the_device_tables(ckpt):
    """Steps no recorded graph serves (a prefix-cache hit's first step, with its protected prefix;
    prefill chunks beyond the largest bucket) run eagerly over the same device block tables as
    the replayed ones: the tokens are the eager engine's."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(2, 500, (48,), generator=g).tolist()
    ps = [shared + torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 9, 3)]
    opts = dict(max_num_batched_tokens=40, max_num_seqs=2, num_speculative_tokens=0)
    outs = []
    for graphs in (False, True):
        llm = engine(ckpt, graphs, **opts)
        outs.append([o.token_ids for p in ps for o in llm.generate([p], GREEDY)])  # one after another: hits
        st = llm.engine.stats()
        assert st["prefix_cache_hit_tokens"] >= 2 * 32
    assert outs[0] == outs[1]
    assert st["graphs"]["replays"] > 0


def test_builtin_model_replayed_with_its_own_mtp():
    p = [SamplingParams(temperature=0.8, seed=s, max_tokens=24, ignore_eos=True) for s in range(3)]
    ids = ["KING LEAR:\n", "ROMEO:\nBut soft", "First Citizen:\nBefore we proceed"]
    opts = dict(num_speculative_tokens=1,
                speculative_config=FIXED, speculative_min_acceptance=0.0, max_num_batched_tokens=32)
    eager = engine(None, False, **opts)
    want = [o.token_ids for o in eager.generate(ids, p)]
    llm = engine(None, True, **opts)
    assert [o.token_ids for o in llm.generate(ids, p)] == want
    stats = llm.engine.stats()
    kinds = {kind for kind, _, _ in stats["graphs"]["buckets"]}
    assert stats["graphs"]["replays"] > stats["graphs"]["recorded"]
    assert kinds == {"step", "mtp"}  # the drafts' MTP forwards are replayed too
    # verification makes the tokens exact whatever the drafts are: the drafts themselves must
    # match the eager engine's (same MTP logits, same noise), so must their acceptance
    e = eager.engine.stats()
    assert (stats["spec_draft_tokens"], stats["spec_accepted_tokens"]) == (e["spec_draft_tokens"],
                                                                           e["spec_accepted_tokens"])
    assert e["spec_accepted_tokens"] > 10


def test_dspark_after_replayed_steps(make_ckpt):
    """DSpark reads the target layers' outputs of each step: a replayed step leaves them in its
    buffers, and the drafter's context rows and blocks (eager, over the device block tables) are
    the eager engine's, draft for draft; the tokens are the eager engine's."""
    ckpt = make_ckpt("flash-0731", "fp8", mtp=0)
    opts = dict(max_num_batched_tokens=16, speculative_config=FIXED, speculative_min_acceptance=0.0)
    drafts = []
    for graphs in (False, True):
        llm = engine(ckpt, graphs, **opts)
        assert llm.engine.spec_method == "dspark" and llm.engine.worker.capture
        seen, propose = [], llm.engine.drafter.propose

        def recording(engine, plan, propose=propose, seen=seen):
            propose(engine, plan)
            seen.extend((r.rid, len(r.output_ids), tuple(r.draft)) for r in plan.reqs if r.draft)
        llm.engine.drafter.propose = recording
        drafts.append((seen, [r.output_ids for r in run(llm, prompts(lengths=(5, 23)), GREEDY)]))
    (eager_drafts, eager_tokens), (got_drafts, got_tokens) = drafts
    assert got_tokens == eager_tokens and got_drafts == eager_drafts and len(eager_drafts) > 10
    stats = llm.engine.stats()
    assert stats["graphs"]["replays"] >= 3 and stats["spec_draft_tokens"] > 20


def test_static_batch_closes_what_batch_closes():
    """Every token pools the entry of its own window; only closing tokens write it for their
    sequence (the others for the padding sequence), and those are Batch's closing entries."""
    starts, lengths, r = [3, 14, 0], [2, 3, 1], 4
    b = Batch(starts, lengths, cache=None, device=torch.device("cpu"))
    pad = 7
    s = StaticBatch(b.seq, b.positions, capacity=32, pad_seq=pad, cache=None, end=b.end)
    for overlap in (False, True):
        seq, ids, row_seq, row_pos, missing = s.closing(r, overlap)
        closes = seq != pad
        want = b.closing(r, overlap)
        assert torch.equal(seq[closes], want[0]) and torch.equal(ids[closes], want[1])
        span = 2 * r if overlap else r
        assert torch.equal(row_pos.view(-1, span)[closes].flatten(), want[3])
        assert torch.equal(missing[closes], want[4])
        assert (row_seq.view(-1, span)[~closes] == pad).all()
    assert s.entry_span(r) == 8 and b.entry_span(r) == 4
    for a, c in zip(s.window(4, 1), b.window(4, 1)):
        assert torch.equal(a, c)


def test_device_tables_upload_what_changed_and_look_up_the_same_rows():
    args = tiny_args("flash")
    groups = cache_groups(args, 16, with_mtp=False)
    pools = CachePools(groups, {g.name: 12 for g in groups}, torch.float32, torch.device("cpu"))
    dt = DeviceTables(pools, slots=4, width=6, device=torch.device("cpu"))
    layer = next(g for g in groups if g.keep == "window").layers[0]

    def same_as_lists(tables, slots):
        full = table_rows(pools, tables)
        for name, rows in full.items():
            for b, row in enumerate(rows):  # the list-built row, then trash to the end
                want = row[:-1] + [dt.trash[name]] * (dt.width + 1 - len(row[:-1]))
                assert dt.tensors[name][slots[b]].tolist() == want, (name, b)
        listed = PagedBatchCache(pools, tables, [0] * len(tables), torch.device("cpu"))
        over = PagedBatchCache.over(pools, dt.tensors, dt.live)
        pos = torch.tensor([[0, 15, 20, 40, 47, 63]] * len(tables))
        valid = torch.ones_like(pos, dtype=torch.bool)
        a = listed.locate_rows(layer, "kv", torch.arange(len(tables))[:, None], pos, valid)[1]
        b = over.locate_rows(layer, "kv", torch.tensor(slots)[:, None], pos, valid)[1]
        assert torch.equal(a, b)

    A = {g.name: [None, 3, 5] for g in groups}
    B = {g.name: [1, 6, 8] for g in groups}
    slots = dt.update([A, B])
    same_as_lists([A, B], slots)
    assert dt.live.tolist() == [i in slots for i in range(4)]
    for t in A.values():  # A frees its block 3 and appends 7; B leaves; C arrives, shorter than B
        t[1] = None
        t.append(7)
    C = {g.name: [2] for g in groups}
    again = dt.update([C, A])
    assert again[1] == slots[0] and again[0] == slots[1]  # A keeps its slot, C takes B's
    same_as_lists([C, A], again)  # B's blocks 6 and 8 are gone from C's row
    over = PagedBatchCache.over(pools, dt.tensors, dt.live)
    over.locate_rows(layer, "kv", torch.tensor([[3]]), torch.tensor([[5]]), torch.tensor([[True]]))
    over.check()  # slot 3 is the padding sequence's: never live, never flagged
    over.locate_rows(layer, "kv", torch.tensor([[again[0]]]), torch.tensor([[20]]), torch.tensor([[True]]))
    with pytest.raises(AssertionError, match="does not hold"):  # C holds no block 1
        over.check()
    with pytest.raises(ValueError, match="slots"):
        dt.update([A, B, C, {g.name: [] for g in groups}])
    with pytest.raises(ValueError, match="exceeds"):
        dt.update([{g.name: list(range(7)) for g in groups}])


@pytest.mark.parametrize("fn", [
    lambda x: x.sum().item(), lambda x: bool(x[0] > 0), lambda x: x.tolist(), lambda x: x.numpy(),
    lambda x: torch.nonzero(x), lambda x: x[x > 0], lambda x: x + torch.tensor([1.0, 2.0, 3.0]),
    lambda x: x.unique(), lambda x: int(x.argmax()),
], ids=["item", "bool", "tolist", "numpy", "nonzero", "mask", "upload", "unique", "int"])
def test_recorder_refuses_host_syncs(fn):
    with pytest.raises(HostSync):
        with OpRecorder():
            fn(torch.tensor([1.0, -2.0, 3.0]))
    assert torch.tensor([1]).tolist() == [1]  # Tensor.tolist restored on the way out


def test_replay_runs_ops_not_python():
    pool = torch.zeros(6)
    x = torch.tensor([1.0, 2.0])
    idx = torch.tensor([0, 1])
    rec = OpRecorder()
    with rec:
        n = 10  # a host value: baked into the recording, as a graph would bake it
        y = x * n + torch.arange(2)
        pool[idx] = y  # writes a tensor the recording did not make: replays write it again
    x.copy_(torch.tensor([5.0, 6.0]))
    idx.copy_(torch.tensor([4, 5]))
    out = rec.replay(y)
    assert out.tolist() == [50.0, 61.0] and y.tolist() == [10.0, 21.0]
    assert pool.tolist() == [10.0, 21.0, 0.0, 0.0, 50.0, 61.0]


def test_what_cannot_be_recorded_says_why(make_ckpt, ckpt):
    assert "not capturable" in unsupported(LLM(ckpt, ops="ref", dtype="float32").model)
    dense = engine(make_ckpt("flash", "fp32"), False).engine  # dense experts: no grouped kernel
    assert "not FP4" in unsupported(dense.model)
    with pytest.raises(ValueError, match="not FP4"):
        dense.use_graphs("trace")
    plain = LLM(ckpt, dtype="float32").engine
    assert plain.graphs is None and plain.stats()["graphs"] == {"off": "not a CUDA device"}
    with pytest.raises(ValueError, match="enforce_eager"):
        LLM(ckpt, enforce_eager="yes")


def test_a_failed_capture_leaves_the_engine_eager(ckpt, capsys):
    """On a GPU a capture that fails turns graphs off for the engine and runs the step eagerly."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in engine(ckpt, False).generate(prompts()[:2], params)]
    llm = engine(ckpt, True)
    g = llm.engine.graphs
    g.backend = "cuda"  # as a CUDA device would report it

    def fail(*_):
        raise RuntimeError("operation not permitted when stream is capturing")
    g._record = fail
    assert [o.token_ids for o in llm.generate(prompts()[:2], params)] == want
    off = llm.engine.stats()["graphs"]["off"]
    assert off.startswith("recording failed") and "not permitted" in off and llm.engine.graphs is None
    assert "CUDA graphs off" in capsys.readouterr().err


def test_buckets_pad_by_at_most_a_quarter_and_stop_at_the_context(ckpt):
    assert [bucket_size(n) for n in range(1, 18)] == [1, 2, 4, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16, 20]
    for n in range(5, 5000):
        assert n <= bucket_size(n) <= 1.25 * n
    assert len({bucket_size(n) for n in range(1, 2 ** 13 + 1)}) == 3 + 4 * 11  # four per octave
    e = engine(ckpt, True, max_num_seqs=5, num_speculative_tokens=1).engine
    g = e.graphs
    assert g.max_tokens == 10 and g.slots == 6  # 5 sequences x 2 tokens
    assert g.bucket(1, 1) == (1, 16) and g.bucket(3, 17) == (4, 32) and g.bucket(9, 100) == (10, 112)
    assert g.bucket(11, 10) is None
    top = g.max_capacity
    assert top == 16 * -(-(e.args.max_seq_len + 2) // 16)
    assert g.bucket(1, top) == (1, top) and g.bucket(1, 2 ** 20 + 1) == (1, top) and g.bucket(1, top + 1) is None
    assert g.bucket(1, 2 ** 20) == (1, 2 ** 20) and g.bucket(1, 2 ** 19 + 1) == (1, 5 * 2 ** 17)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_give_the_eager_tokens(ckpt):
    pytest.importorskip("triton")
    opts = dict(device="cuda", ops="triton", dtype="float32", max_num_batched_tokens=16,
                num_speculative_tokens=1, speculative_config=FIXED, speculative_min_acceptance=0.0)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in LLM(ckpt, enforce_eager=True, **opts).generate(prompts(), params)]
    llm = LLM(ckpt, **opts)
    assert isinstance(llm.engine.graphs, StepGraphs) and llm.engine.graphs.backend == "cuda"
    assert [o.token_ids for o in llm.generate(prompts(), params)] == want
    stats = llm.engine.stats()["graphs"]
    assert stats["recorded"] > 0 and stats["replays"] > stats["recorded"]


def test_bench_decode_step_replays_over_a_filled_cache():
    """S4's graphed decode step (scenarios.decode_step(graphs=...)) over the bench's synthetic
    cache: replays with new token ids give the eager step's logits."""
    from dayzero import bench, scenarios
    from dayzero.synthetic import flash_slice, random_model
    cpu = torch.device("cpu")
    args = flash_slice(layer_types=("csa", "hca"), n_routed_experts=8).replace(**bench.SIZES["tiny"]["slice"])
    model = random_model(args, compute_dtype=torch.float32, numerics="transformers")
    model.set_ops(RECORDABLE)
    filled = scenarios.FilledCache(model, 2, 300, cpu)
    g = StepGraphs(model, filled.pools, 2, 2, filled.block_size, args.max_seq_len, cpu, "trace")
    for ids in ([5, 7], [9, 3], [5, 7]):
        got = g.run(ids, [0, 1], [300, 300], filled.tables, filled.end).logits.clone()
        with torch.no_grad():
            X = model.forward_packed(torch.tensor(ids), Batch([300, 300], [1, 1], filled.cache, cpu))
            want = model.logits(X, model.head_weight())
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert g.stats()["recorded"] == 1 and g.stats()["replays"] == 2
    t, nbytes = scenarios.decode_step(model, 2, 300, cpu, graphs="trace")
    assert t > 0 and nbytes > 0


def test_a_step_that_makes_host_tensors_is_not_recordable():
    """A factory call that names no device makes a host tensor; on a GPU the captured step would
    upload it (refused in capture, or replayed from a stale host buffer). The trace backend
    records with meta as the default device, so such a tensor fails against the step's own."""
    from dayzero import bench, scenarios
    from dayzero.synthetic import flash_slice, random_model
    cpu = torch.device("cpu")
    args = flash_slice(layer_types=("csa", "hca"), n_routed_experts=8).replace(**bench.SIZES["tiny"]["slice"])
    model = random_model(args, compute_dtype=torch.float32, numerics="transformers")
    model.set_ops(RECORDABLE)
    filled = scenarios.FilledCache(model, 1, 40, cpu)
    logits = model.logits
    model.logits = lambda X, head: logits(X, head) + torch.zeros(X.shape[0], 1)  # no device: the bug
    with torch.no_grad():  # eagerly it runs (on a CPU the host is the device)
        model.logits(model.forward_packed(torch.tensor([5]), Batch([40], [1], filled.cache, cpu)), model.head_weight())
    g = StepGraphs(model, filled.pools, 1, 1, filled.block_size, args.max_seq_len, cpu, "trace")
    with pytest.raises(RuntimeError, match="meta"):
        g.run([5], [0], [40], filled.tables, filled.end)
    model.logits = logits
    assert g.run([5], [0], [40], filled.tables, filled.end) is not None
