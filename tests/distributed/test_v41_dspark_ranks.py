"""DeepSeek-V4.1's DSpark over ranks (gloo, two local ranks; v41/dspark.py, engine/dspark_drafter.py on every
rank): tensor parallel (the stages' heads and output groups split, their wo_b partial sums all-reduced; the
shared expert and routed experts by inner dim), TP + EP (the stages' 4 routed experts whole, 2 per rank) and
DP-attention + EP (each rank its own requests' context rows and blocks, 2 stage experts per rank; a rank
with no block joins their MoE collectives).
The drafts are the one-rank drafts and the tokens those without speculation. The toy is the V4.1 rank toy
(tests/distributed/test_v41_ranks.py: Engram on two layers, FP8 32x32 weights, MXFP4 experts, shares of 32)
with the toy's three DSpark stages (`toy.dspark_text`)."""
from __future__ import annotations

import time

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.distributed.layout import Layout, LayoutError
from dayzero.v41 import toy
from dayzero.v41.dspark import check_layout
from dayzero.v41.loader import load_v41, read_v41_args
from tests.distributed.test_data_parallel import DP2, stopped
from tests.distributed.test_tensor_parallel import tokens
from tests.distributed.test_v41_ranks import GREEDY, SIZES, prompts
from tests.distributed.test_v41_ranks import OPTS as RANK_OPTS
from tests.engine.helpers import FIXED, staggered
from tests.engine.helpers import recorded_drafts as recorded

# 16-token steps: prefill chunks beside verifications of blocks of 5 drafts, and steps where two requests draft
OPTS = {**RANK_OPTS, "max_num_batched_tokens": 16}
SPEC = dict(**OPTS, speculative_min_acceptance=0.0, speculative_config=FIXED)  # every proposed draft verified
SEEDED = SamplingParams(temperature=0.9, top_k=50, seed=3, max_tokens=8, ignore_eos=True)


@pytest.fixture(autouse=True)
def _bounded_collectives(monkeypatch):
    monkeypatch.setenv("DAYZERO_DIST_TIMEOUT", "60")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    text = toy.dspark_text({**toy.TEXT, **SIZES})
    assert text["engram_layer_ids"] and text["dspark_n_routed_experts"] == 4  # Engram on; 2 stage experts per rank
    return toy.write_toy(tmp_path_factory.mktemp("v41-dspark-ranks") / "m", seed=3, text=text)


@pytest.fixture(scope="module")
def one(ckpt):
    """(tokens without speculation, tokens with one-rank DSpark, its drafts) of 3 prompts, staggered, and the
    seeded-sampling tokens without speculation of 2 prompts."""
    off = LLM(ckpt, **OPTS, num_speculative_tokens=0)
    plain = [r.output_ids for r in staggered(off.engine, prompts(3), GREEDY)]
    llm = LLM(ckpt, **SPEC)
    assert llm.engine.spec_method == "dspark" and len(llm.model.mtp) == 3
    drafts = recorded(llm)
    spec = [r.output_ids for r in staggered(llm.engine, prompts(3), GREEDY)]
    return plain, spec, drafts, tokens(off.generate(prompts(2), SEEDED))


def test_each_rank_reads_only_its_slices_of_the_stages(ckpt):
    """TP: the stages' wq_b / wo_a / wo_b / sinks / shared and routed experts sliced as the backbone's layers;
    main_proj, main_norm, norm, the Markov and confidence heads whole on every rank. EP (TP + EP, DP + EP):
    whole stage experts, 2 of the 4 on each rank; DP: nothing else sliced."""
    whole = load_v41(ckpt, drafter=True).state_dict()
    for tp, ep, dp in ((2, False, 1), (2, True, 1), (1, True, 2)):
        ranks = [load_v41(ckpt, layout=Layout(tp, r, ep, dp), drafter=True) for r in range(2)]
        plan = ranks[0].shard_plan()
        for name in ("mtp.0.attn.wq_b.weight", "mtp.1.attn.wo_a.scale", "mtp.2.attn.wo_b.weight",
                     "mtp.2.attn.attn_sink", "mtp.1.ffn.shared_experts.w2.weight"):
            assert (name in plan) is (tp == 2), name
        assert ("mtp.1.ffn.experts.0.w1.weight" in plan) is not ep
        for name, t in whole.items():
            if not name.startswith("mtp."):
                continue
            parts = [m.state_dict().get(name) for m in ranks]
            if name in plan:
                assert torch.equal(torch.cat(parts, plan[name]).view(torch.uint8), t.view(torch.uint8)), name
            elif ep and ".experts." in name:
                assert sum(p is not None for p in parts) == 1, name
            else:
                assert all(torch.equal(p.view(torch.uint8), t.view(torch.uint8)) for p in parts), name
        assert not [n for n in plan if n.startswith("mtp.") and any(
            k in n for k in ("main_", "markov", "confidence", ".norm.", "wkv", "wq_a", "gate."))]


def test_a_layout_the_stages_experts_do_not_split_is_named(ckpt, tmp_path):
    two = toy.write_toy(tmp_path / "two", text=toy.dspark_text({**toy.TEXT, **SIZES}, dspark_n_routed_experts=2))
    t = time.monotonic()
    with pytest.raises(LayoutError, match=r"data_parallel_size=4 .*the DSpark stages.*`dspark_n_routed_experts`=2"):
        LLM(two, **SPEC, data_parallel_size=4, enable_expert_parallel=True)  # the backbone's 4 experts split
    assert time.monotonic() - t < 5  # before any rank starts
    args, _ = read_v41_args(ckpt)
    six = args.replace(dspark_n_routed_experts=6)
    with pytest.raises(LayoutError, match=r"data_parallel_size=4 .*`dspark_n_routed_experts`=6.*\[1, 2, 3, 6\]"):
        check_layout(six, Layout(1, 0, True, 4))
    with pytest.raises(LayoutError, match="`dspark_n_routed_experts`=6"):
        with torch.device("meta"):
            from dayzero.v41.model import V41Transformer
            V41Transformer(six.replace(n_routed_experts=8), layout=Layout(1, 0, True, 4), drafter=True)
    check_layout(six, Layout(4, 0, False))  # TP: the stage experts are split by inner dim, not by count
    check_layout(six, Layout(1, 0, True, 2))


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2),
                                    dict(tensor_parallel_size=2, enable_expert_parallel=True), DP2],
                         ids=["tp2", "tp2-ep", "dp2-ep"])
def test_dspark_over_two_ranks_drafts_what_one_rank_drafts(ckpt, one, layout):
    plain, spec, want, seeded = one
    assert spec == plain and sum(len(v) for v in want.values()) >= 3 * 5
    with LLM(ckpt, **SPEC, **layout) as two:
        assert two.engine.spec_method == "dspark" and two.engine.worker.capture
        got = recorded(two)
        drafting = drafting_ranks(two) if two.engine.dp > 1 else None
        assert [r.output_ids for r in staggered(two.engine, prompts(3), GREEDY)] == plain
        assert got == want
        assert two.engine.stats()["spec_draft_tokens"] == sum(len(d) for v in want.values() for _, d in v)
        if drafting is not None:  # DP: draft steps with blocks on both ranks, and with one rank idle in the stages
            assert {0, 1} in drafting and ({0} in drafting or {1} in drafting), drafting
        drafted = two.engine.stats()["spec_draft_tokens"]
        assert tokens(two.generate(prompts(2), SEEDED)) == seeded  # drafts sampled with each request's own noise
        assert two.engine.stats()["spec_draft_tokens"] > drafted
    assert stopped(two)


def drafting_ranks(llm) -> list[set[int]]:
    """Record, per DSpark step under DP-attention, the ranks that draft a block."""
    seen, dspark = [], llm.engine.runner.dspark

    def recording(*args):
        blocks, owners = args[5], args[-1]
        seen.append({owners[blk[0]] for blk in blocks})
        return dspark(*args)
    llm.engine.runner.dspark = recording
    return seen
