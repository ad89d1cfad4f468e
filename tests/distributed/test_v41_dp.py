"""DeepSeek-V4.1 under DP-attention + expert parallel (gloo, two local ranks) and with hybrid expert
placement (`cpu_experts`) computes what one rank computes with its experts on the device: the same
greedy tokens under staggered arrivals with chunked prefill beside decodes, steps where one rank has no
request (it joins every MoE layer's all-gather and reduce-scatter with no tokens), a lone request on a
rank. DP-attention: each rank runs attention, Engram, the shared expert and the head on its own requests;
the routed experts are E/N per rank (V4's `MoE._forward_dp`, reference/moe.py). The toy V4.1 has Engram
on two layers, FP8 32x32 dense weights and MXFP4 experts (4 routed experts: 2 per rank)."""
from __future__ import annotations

import copy

import pytest
import torch

from dayzero import LLM
from dayzero.distributed.comm import Comm
from dayzero.distributed.layout import Layout
from dayzero.loader.checkpoint import list_tensors
from dayzero.loader.model_io import is_routed_expert
from dayzero.v41.loader import load_v41
from dayzero.v41.moe import V41MoE
from dayzero.v41.replay import decoder_layers
from dayzero.v41.toy import TEXT, write_toy
from tests.distributed.test_data_parallel import owners_seen, stopped
from tests.distributed.test_tensor_parallel import tokens
from tests.distributed.test_v41_ranks import GREEDY, OPTS, SIZES, prompts, rel, staggered_outputs

DP2 = dict(data_parallel_size=2, enable_expert_parallel=True)


@pytest.fixture(autouse=True)
def _bounded_collectives(monkeypatch):
    """A rank that fails to join a collective fails the test within a minute instead of hanging it."""
    monkeypatch.setenv("DAYZERO_DIST_TIMEOUT", "60")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    text = copy.deepcopy(TEXT)
    text.update(SIZES)
    assert text["engram_layer_ids"] and text["n_routed_experts"] == 4  # Engram on; 2 experts per rank
    return write_toy(tmp_path_factory.mktemp("v41-dp") / "m", text=text)


@pytest.fixture(scope="module")
def one(ckpt):
    return LLM(ckpt, **OPTS)


def expert_bytes(ckpt) -> int:
    """The routed experts' bytes in the checkpoint (MXFP4 weights and their scales)."""
    return sum(i.dtype.itemsize * int(torch.Size(i.shape).numel())
               for n, i in list_tensors(ckpt).items() if is_routed_expert(n))


def test_two_dp_ranks_compute_the_one_rank_model(ckpt, one):
    want = staggered_outputs(one, prompts())
    with LLM(ckpt, **OPTS, **DP2) as two:
        seen = owners_seen(two)
        assert staggered_outputs(two, prompts()) == want  # 7-token chunks beside decodes, batched
        assert {0, 1} in seen  # steps with requests on both ranks
        assert {0} in seen or {1} in seen  # and steps where one rank has none (it joins the MoE collectives)
        assert not two.engine.dp_owner  # finished requests forgotten
        p = prompts(5)[4]
        seen.clear()
        a, b = two.generate([p], GREEDY)[0], one.generate([p], GREEDY)[0]  # one request: the other rank idle
        assert seen and all(len(s) == 1 for s in seen)
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)
        assert rel(two.score(p), one.score(p)) < 1e-5
        st = two.engine.stats()
        assert st["data_parallel_size"] == 2
        w = [r["weight_bytes"] for r in st["ranks"]]
        # each rank: everything but the routed experts whole, and half of the experts
        whole = one.engine.stats()["ranks"][0]["weight_bytes"]
        assert w[0] == w[1] == whole - expert_bytes(ckpt) // 2
    assert stopped(two)


def test_cpu_experts_places_the_experts_and_keeps_the_tokens(ckpt, one):
    ps = prompts(3, seed=3)
    want = [(o.token_ids, o.logprobs) for o in one.generate(ps, GREEDY)]
    with LLM(ckpt, **OPTS, cpu_experts=True) as hybrid:
        got = [(o.token_ids, o.logprobs) for o in hybrid.generate(ps, GREEDY)]
        st = hybrid.engine.stats()
        moes = [m for m in hybrid.model.modules() if isinstance(m, V41MoE)]
        host = hybrid.engine.worker.host_ops
    assert got == want
    assert st["cpu_experts"] and st["expert_ops"] == "cpu"
    # every MoE layer's routed experts run on the host's table, over tensors in host memory
    assert len(moes) == hybrid.model.v41.n_layers > 0 and host is not None
    for m in moes:
        assert m.expert_ops is host
        assert all(t.device.type == "cpu" for t in m.experts.parameters())
        assert all(s.ops is not host for s in m.shared_experts.modules() if hasattr(s, "ops"))
    # the memory accounting: the experts' bytes counted apart from the device's weights, exactly
    plain = one.engine.stats()
    assert st["host_expert_bytes"] == expert_bytes(ckpt) > 0 and plain["host_expert_bytes"] == 0
    assert st["ranks"][0]["weight_bytes"] + st["host_expert_bytes"] == plain["ranks"][0]["weight_bytes"]


def test_dp_ranks_with_cpu_experts(ckpt, one):
    """DP-attention + EP with each rank's E/N experts in its host memory: one rank's tokens, and each
    rank counts half of the experts' bytes as host memory."""
    ps = prompts(3, seed=5)
    want = [o.token_ids for o in one.generate(ps, GREEDY)]
    with LLM(ckpt, **OPTS, **DP2, cpu_experts=True) as two:
        assert [o.token_ids for o in two.generate(ps, GREEDY)] == want
        host = [r["host_expert_bytes"] for r in two.engine.stats()["ranks"]]
    assert host[0] == host[1] == expert_bytes(ckpt) // 2 > 0


def test_prefix_caching_under_two_dp_ranks(ckpt, one):
    """A request whose prompt shares a prefix that another request left on rank 1 is placed on rank 1
    and resumes from the cached blocks there (rank 0 would win at equal load); one rank's tokens."""
    p, q = prompts(2, seed=7)[:2]
    p, q = (p * 3)[:40], (q * 4)[:40]  # two 40-token prefixes: 2 whole blocks of 16 each
    first, later = [p + [5, 6], q + [7]], [q + [300, 301, 302]]
    want = tokens(one.generate(first, GREEDY)) + tokens(one.generate(later, GREEDY))
    with LLM(ckpt, **OPTS, **DP2) as two:
        seen = owners_seen(two)
        got = tokens(two.generate(first, GREEDY))
        assert {0, 1} in seen  # p on rank 0, q on rank 1
        seen.clear()
        hits = two.engine.stats()["prefix_cache_hit_tokens"]
        got += tokens(two.generate(later, GREEDY))
        assert got == want
        assert seen and all(s == {1} for s in seen)
        assert two.engine.stats()["prefix_cache_hit_tokens"] - hits == 32
    assert stopped(two)


class Recorded(Comm):
    """Rank 0 of two, alone: records the rows each MoE layer dispatches (its own only)."""
    world, rank = 2, 0

    def __init__(self):
        self.rows = []

    def dispatch(self, x, weights, ids):
        self.rows.append(x.shape[0])
        return x, weights, ids, [x.shape[0]]


def test_a_rank_whose_rows_a_bounded_replay_cuts_still_joins_every_moe_layer(ckpt):
    """Bounded replay (opt-in, v41/replay.py) stops a forward whose rows are all below their floor
    before the decoder layers; under DP-attention that rank still joins those layers' collectives
    (with no tokens), or the other ranks would wait on it."""
    model = load_v41(ckpt, layout=Layout(1, 0, True, 2))
    comm = Recorded()
    model.set_comm(comm)
    skipped = decoder_layers(model.args)
    assert len(skipped) and skipped.stop == model.args.n_layers
    with torch.no_grad():
        out = model(torch.arange(6, 11)[None], model.new_state(), replay_from=30)  # every row below the floor
    assert out.isnan().all()
    assert comm.rows == [5] * skipped.start + [0] * len(skipped)
