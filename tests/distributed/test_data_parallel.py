"""DP-attention + expert parallel (distributed/dp.py, reference/moe.py `_forward_dp`) over gloo and
local processes computes what one rank computes: each rank runs attention on its own requests,
the routed experts E/N per rank, tokens all-gathered to the experts and reduce-scattered back."""
from __future__ import annotations

import sys
import time

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.distributed.layout import Layout, LayoutError
from dayzero.engine.capacity import Sizes
from dayzero.loader.model_io import load_model
from dayzero.testing import tiny_args
from tests.distributed.test_tensor_parallel import (GREEDY, OPTS, _run, prompts, rel, staggered_outputs,
                                                    tokens)

DP2 = dict(data_parallel_size=2, enable_expert_parallel=True)


@pytest.fixture(autouse=True)
def _bounded_collectives(monkeypatch):
    """A rank that fails to join a collective fails the test within a minute instead of hanging it
    (spawned ranks inherit the environment)."""
    monkeypatch.setenv("DAYZERO_DIST_TIMEOUT", "60")


def owners_seen(llm) -> list[set[int]]:
    """Record, per step, which ranks the engine gave requests to."""
    seen, fwd = [], llm.engine.runner.forward

    def forward(*args):
        seen.append(set(args[-1]))
        return fwd(*args)
    llm.engine.runner.forward = forward
    return seen


def stopped(llm) -> bool:
    """Every rank the LLM started has exited (no process left behind)."""
    return all(p.poll() is not None for p in llm.group.procs)


# ---- the layout ----------------------------------------------------------------------------------
def test_impossible_dp_layouts_name_the_field_and_the_sizes_that_fit():
    args = tiny_args("flash")  # 8 routed experts
    with pytest.raises(LayoutError) as e:
        Layout(1, 0, True, 3).check(args)
    msg = str(e.value)
    assert "data_parallel_size=3" in msg and "`n_routed_experts`=8" in msg
    assert "data_parallel_size values that fit it with enable_expert_parallel: [1, 2, 4, 8]" in msg
    with pytest.raises(LayoutError, match="needs enable_expert_parallel"):
        Layout(1, 0, False, 2).check(args)
    with pytest.raises(LayoutError, match="tensor_parallel_size=2: tensor parallel inside each data-parallel rank "
                                          "is not built; use data_parallel_size=4"):
        Layout(2, 0, True, 2).check(args)
    Layout(1, 7, True, 8).check(args)
    assert list(Layout(1, 1, True, 2).experts(args)) == [4, 5, 6, 7]
    assert Layout(1, 1, True, 2).part(args.vocab_size) == (0, args.vocab_size)  # attention/head whole


def test_an_impossible_dp_layout_fails_before_any_rank_starts(ckpt):
    t = time.monotonic()
    with pytest.raises(LayoutError, match="n_routed_experts"):
        LLM(ckpt, **OPTS, data_parallel_size=3, enable_expert_parallel=True)
    with pytest.raises(LayoutError, match="enable_expert_parallel"):
        LLM(ckpt, **OPTS, data_parallel_size=2)
    assert time.monotonic() - t < 5
    with pytest.raises(ValueError, match="data_parallel_size: must be a positive integer"):
        LLM(ckpt, data_parallel_size=0)


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("flash", "fp32", tokenizer=True)


def test_each_dp_rank_holds_whole_attention_and_its_experts(ckpt):
    whole = load_model(ckpt, numerics="transformers").state_dict()
    ranks = [load_model(ckpt, numerics="transformers", layout=Layout(1, r, True, 2)).state_dict() for r in range(2)]
    routed = {n for n in whole if ".experts." in n and ".shared_experts." not in n}
    for name, t in whole.items():
        parts = [sd.get(name) for sd in ranks]
        if name in routed:
            assert sum(p is not None for p in parts) == 1, name  # each expert on exactly one rank
            assert torch.equal(next(p for p in parts if p is not None), t), name
        else:
            assert all(torch.equal(p, t) for p in parts), name  # attention, shared expert, embed, head whole

    def nbytes(sd):
        return sum(sd[n].numel() * sd[n].element_size() for n in routed if n in sd)
    assert all(2 * nbytes(sd) == nbytes(whole) for sd in ranks)


# ---- two ranks against one -------------------------------------------------------------------------
def test_two_dp_ranks_compute_the_one_rank_model(ckpt):
    one = LLM(ckpt, **OPTS, max_num_batched_tokens=7)
    want = staggered_outputs(one, prompts())
    with LLM(ckpt, **OPTS, max_num_batched_tokens=7, **DP2) as two:
        seen = owners_seen(two)
        # staggered arrivals, 7-token prefill chunks beside decodes, MTP drafts on
        assert staggered_outputs(two, prompts()) == want
        assert {0, 1} in seen  # steps with requests on both ranks
        assert not two.engine.dp_owner  # finished requests forgotten
        p = prompts()[4]
        assert rel(two.score(p), one.score(p)) < 1e-5
        a, b = two.generate([p], GREEDY)[0], one.generate([p], GREEDY)[0]  # one request: rank 1 idle
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)
        st = two.engine.stats()
        assert st["data_parallel_size"] == 2 and st["enable_prefix_caching"] is True
        w = [r["weight_bytes"] for r in st["ranks"]]
        assert len(w) == 2 and w[0] == w[1] < one.engine.stats()["ranks"][0]["weight_bytes"]
    assert stopped(two)


def test_prefix_caching_under_two_dp_ranks(ckpt):
    """Each rank's blocks are named in its own partition of the prefix cache: a request whose prompt
    shares a prefix another request left on rank 1 is placed on rank 1 (rank 0 would be the lowest
    rank at equal load) and resumes from the cached blocks there; tokens are one rank's."""
    p, q = prompts(2, seed=7)[:2]
    p, q = (p * 3)[:40], (q * 4)[:40]  # two 40-token prefixes: 2 whole blocks of 16 each
    first = [p + [5, 6], q + [7]]  # concurrently: p on rank 0, q on rank 1
    later = [q + [300, 301, 302]]
    one = LLM(ckpt, **OPTS)
    want = tokens(one.generate(first, GREEDY)) + tokens(one.generate(later, GREEDY))
    with LLM(ckpt, **OPTS, **DP2) as two:
        seen = owners_seen(two)
        got = tokens(two.generate(first, GREEDY))
        assert seen[0] == {0, 1}
        seen.clear()
        hits = two.engine.stats()["prefix_cache_hit_tokens"]
        got += tokens(two.generate(later, GREEDY))
        assert got == want
        assert seen and all(s == {1} for s in seen)  # placed where its prefix is
        assert two.engine.stats()["prefix_cache_hit_tokens"] - hits == 32
    assert stopped(two)


def test_a_dp_moe_layer_costs_one_all_gather_and_one_reduce_scatter(ckpt, monkeypatch):
    """The step call brings every rank's row count (no count gather per layer), and the tokens
    travel with their routing as one row of bytes: per MoE layer and step, rank 0 calls one
    all-gather and one reduce-scatter."""
    import torch.distributed as dist
    with LLM(ckpt, **OPTS, num_speculative_tokens=0, **DP2) as two:
        calls = {"all_gather": 0, "reduce_scatter": 0}
        for name in calls:
            def spy(*a, _real=getattr(dist, name), _name=name, **k):
                calls[_name] += 1
                return _real(*a, **k)
            monkeypatch.setattr(dist, name, spy)
        before = two.engine.num_steps
        want = tokens(two.generate(prompts(3), GREEDY))
        steps = two.engine.num_steps - before
        monkeypatch.undo()
        moe = len(two.model.layers)
        assert steps > 0 and calls == {"all_gather": steps * moe, "reduce_scatter": steps * moe}
    assert want == tokens(LLM(ckpt, **OPTS, num_speculative_tokens=0).generate(prompts(3), GREEDY))


def test_an_idle_rank_does_not_hang(ckpt):
    """Fewer requests than ranks: rank 1 idle while rank 0 works; then rank 0 idle while the
    request it does not hold (on rank 1) goes on alone."""
    ps = prompts(2)
    long, short = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), \
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    one = LLM(ckpt, **OPTS, num_speculative_tokens=0)
    want = tokens(one.generate(ps, [short, long]))
    with LLM(ckpt, **OPTS, num_speculative_tokens=0, **DP2) as two:
        seen = owners_seen(two)
        t = time.monotonic()
        assert tokens(two.generate(ps[:1], long)) == tokens(one.generate(ps[:1], long))
        assert seen and all(s == {0} for s in seen)
        seen.clear()
        assert tokens(two.generate(ps, [short, long])) == want
        assert {1} in seen  # steps where rank 0 has no request
        assert time.monotonic() - t < 60
    assert stopped(two)


def test_each_dp_rank_has_its_own_cache_and_preemption(ckpt):
    """Every rank's cache is its own (the block manager's partitions): under the same per-rank
    budget two ranks preempt less than one rank does, still preempt when their own cache is full
    (only a request of the same rank is preempted for another), and give the one-rank tokens."""
    opts = dict(OPTS, max_num_batched_tokens=64, max_num_seqs=6, num_speculative_tokens=0)
    probe = LLM(ckpt, **opts, enable_prefix_caching=False)
    e, dt = probe.engine, probe.model.compute_dtype
    z = Sizes(e.groups, e.args, dt, e.block_size, 64)
    ps = prompts(6) + prompts(6, seed=1)
    want = staggered_outputs(probe, ps)
    small = dict(opts, kv_cache_memory_bytes=z.needed(6) + 5 * z.per_entry_block)  # <= 112 tokens of entries
    one = LLM(ckpt, **small)
    assert staggered_outputs(one, ps, every=1) == want
    with LLM(ckpt, **small, **DP2) as two:
        per_rank = []
        fwd = two.engine.runner.forward
        two.engine.runner.forward = lambda *a: per_rank.append(max(a[-1].count(r) for r in (0, 1))) or fwd(*a)
        assert staggered_outputs(two, ps, every=1) == want
        assert 0 < two.engine.scheduler.num_preemptions < one.engine.scheduler.num_preemptions
        assert max(per_rank) <= 6  # max_num_seqs per rank
        assert len(two.engine.kv.parts) == 2 and two.engine.stats()["max_num_seqs"] == 6
    assert stopped(two)


@pytest.mark.parametrize("preset", ["pro", "mixed"])
def test_other_tiny_configs(make_ckpt, preset):
    ckpt = make_ckpt(preset, "fp32")
    ps = prompts(3)
    one = LLM(ckpt, **OPTS, max_num_batched_tokens=16)
    with LLM(ckpt, **OPTS, max_num_batched_tokens=16, **DP2) as two:
        assert staggered_outputs(two, ps) == staggered_outputs(one, ps)
        assert rel(two.score(ps[1]), one.score(ps[1])) < 1e-5


def test_two_dp_ranks_with_fp8_weights_and_fp4_experts(make_ckpt):
    """The native CPU table's grouped FP4 MoE over each rank's whole experts, on every rank's tokens."""
    ckpt = make_ckpt("flash", "fp8", moe_inter_dim=256)
    ps = prompts(3)
    one = LLM(ckpt, **OPTS)
    assert one.engine.ops.name == "cpu" and "moe_experts" in one.engine.ops.kernels
    want = tokens(one.generate(ps, GREEDY))
    with LLM(ckpt, **OPTS, **DP2) as two:
        assert tokens(two.generate(ps, GREEDY)) == want
        assert rel(two.score(ps[1]), one.score(ps[1])) < 1e-5
    assert stopped(two)


def test_four_dp_ranks_one_idle(ckpt):
    ps = prompts(3)  # three requests over four ranks: one rank idle in every step
    want = tokens(LLM(ckpt, **OPTS).generate(ps, GREEDY))
    with LLM(ckpt, **OPTS, data_parallel_size=4, enable_expert_parallel=True) as four:
        seen = owners_seen(four)
        assert tokens(four.generate(ps, GREEDY)) == want
        assert seen[0] == {0, 1, 2}
        assert [r["rank"] for r in four.engine.stats()["ranks"]] == [0, 1, 2, 3]
    assert stopped(four)


def test_torchrun_dp_gives_the_one_rank_tokens(ckpt):
    args = ["generate", "--model", str(ckpt), "--token-ids", "5,17,42,99,3,8", "--max-tokens", "8", "--ignore-eos",
            "--numerics", "transformers", "--dtype", "float32"]
    one = _run([sys.executable, "-m", "dayzero", *args], timeout=120)
    assert one.returncode == 0, one.stderr
    from tests.server.conftest import free_port
    run = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m", "dayzero", *args, "-dp", "2", "--enable-expert-parallel"],
               timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == one.stdout and "[8 tokens" in run.stderr


def test_a_dead_dp_rank_fails_the_next_step_at_once(ckpt):
    from dayzero.distributed.runtime import RankFailed
    llm = LLM(ckpt, **OPTS, **DP2)
    try:
        assert tokens(llm.generate(prompts(2), GREEDY))[1]
        llm.group.procs[0].kill()
        llm.group.procs[0].wait(10)
        t = time.monotonic()
        with pytest.raises(RankFailed, match="rank 1 of 2 exited with code -9"):
            llm.generate(prompts(2), GREEDY)
        assert time.monotonic() - t < 10
    finally:
        llm.close()
    assert stopped(llm)
