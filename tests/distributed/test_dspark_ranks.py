"""DSpark over several ranks (engine/dspark_drafter.py `dspark_step`, run by every rank): tensor
parallel (the stages' heads split, partial sums all-reduced, the head's vocabulary slices
gathered), TP + EP, and DP-attention + EP (each rank its own requests' context rows and blocks; a
rank with none joins the stages' MoE collectives). The drafts themselves are the one-rank drafts,
and the tokens are the tokens without speculation."""
from __future__ import annotations

import pytest

from dayzero import LLM, SamplingParams
from tests.distributed.test_data_parallel import DP2, stopped
from tests.distributed.test_tensor_parallel import GREEDY, OPTS, prompts, tokens
from tests.engine.helpers import FIXED, staggered
from tests.engine.helpers import recorded_drafts as recorded

SPEC = dict(**OPTS, speculative_min_acceptance=0.0, speculative_config=FIXED)  # every proposed draft verified


@pytest.fixture(autouse=True)
def _bounded_collectives(monkeypatch):
    monkeypatch.setenv("DAYZERO_DIST_TIMEOUT", "60")


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("flash-0731", "fp32", mtp=0)


@pytest.fixture(scope="module")
def one(ckpt):
    """(tokens without speculation, tokens with one-rank DSpark, its drafts) of prompts(3), staggered."""
    plain = [r.output_ids for r in staggered(LLM(ckpt, **OPTS, num_speculative_tokens=0).engine, prompts(3), GREEDY)]
    llm = LLM(ckpt, **SPEC)
    drafts = recorded(llm)
    spec = [r.output_ids for r in staggered(llm.engine, prompts(3), GREEDY)]
    return plain, spec, drafts


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(tensor_parallel_size=2,
                                                                        enable_expert_parallel=True), DP2],
                         ids=["tp2", "tp2-ep", "dp2-ep"])
def test_dspark_over_two_ranks_drafts_what_one_rank_drafts(ckpt, one, layout):
    plain, spec, want = one
    assert spec == plain and sum(len(v) for v in want.values()) >= 3 * 5
    with LLM(ckpt, **SPEC, **layout) as two:
        assert two.engine.spec_method == "dspark" and two.engine.worker.capture
        got = recorded(two)
        assert [r.output_ids for r in staggered(two.engine, prompts(3), GREEDY)] == plain
        assert got == want
        assert two.engine.stats()["spec_draft_tokens"] == sum(len(d) for v in want.values() for _, d in v)
    assert stopped(two)


def test_dspark_on_four_dp_ranks_some_idle_and_seeded_sampling(ckpt):
    """Two requests over four ranks: two ranks have no block in every draft step (they join the
    stages' MoE collectives empty); seeded sampling gives the tokens it gives without speculation."""
    p = SamplingParams(temperature=0.9, top_k=50, seed=3, max_tokens=10, ignore_eos=True)
    want = tokens(LLM(ckpt, **OPTS, num_speculative_tokens=0).generate(prompts(2), p))
    with LLM(ckpt, **SPEC, data_parallel_size=4, enable_expert_parallel=True) as four:
        assert tokens(four.generate(prompts(2), p)) == want
        assert four.engine.stats()["spec_draft_tokens"] > 0
    assert stopped(four)


def test_speculation_switched_off_stops_every_rank_capturing(ckpt):
    def capture(llm):  # every rank's worker.capture, read on its own rank
        return llm.group.gather(llm.engine.worker, "__getattribute__", "capture")

    with LLM(ckpt, **SPEC, tensor_parallel_size=2) as two:
        assert capture(two) == [True, True]
        two.engine._disable_speculation()
        assert capture(two) == [False, False]
        assert tokens(two.generate(prompts(1), GREEDY)) == tokens(LLM(ckpt, **OPTS).generate(prompts(1), GREEDY))
    assert stopped(two)


def test_a_drafter_directory_over_two_ranks(ckpt):
    """The built-in DSpark drafter, a directory of its own, loaded onto the built-in model by every
    rank under its layout (each rank its slices of the stages): the one-rank drafts and tokens."""
    spec = {"method": "dspark", "model": "shakespeare-dspark", "draft_policy": "fixed"}
    opts = dict(device="cpu", speculative_config=spec, speculative_min_acceptance=0.0, numerics="transformers",
                dtype="float32")
    ps = ["KING LEAR:\nWhat shall Cordelia speak?", "ROMEO:\nBut soft, what light"]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    one = LLM(**opts)
    want_drafts = recorded(one)
    want = tokens(one.generate(ps, p))
    assert want_drafts and one.engine.stats()["spec_accepted_tokens"] > 0
    with LLM(**opts, tensor_parallel_size=2) as two:
        got = recorded(two)
        assert tokens(two.generate(ps, p)) == want and got == want_drafts
        assert two.model.args.dspark_stages == 3
    assert stopped(two)
