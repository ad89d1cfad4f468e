"""DSpark (reference/dspark.py, engine/dspark_drafter.py) on a random-weight toy in V4-Flash-0731's
layout (`dayzero toy --preset flash-0731`): strict loading under the official names, and the
engine's tokens identical with DSpark on and off whatever the batching, chunking, prefix hits or
preemption (verification keeps exactly the target's tokens; the random drafter is mostly wrong,
so the rejection and rollback paths are what runs)."""
import json
import shutil

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.cli import main, speculative_config
from dayzero.engine.capacity import Sizes
from dayzero.loader.checkpoint import CheckpointError
from dayzero.reference.dspark import DSparkStage
from tests.engine.helpers import FIXED, FrozenCost, chosen_lengths, drafts_alike_alone_batched_and_after_hits, staggered

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# every proposed draft verified: these tests are about the drafts and their verification
SPEC = dict(numerics="transformers", speculative_min_acceptance=0.0, speculative_config=FIXED)


def prompts(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (L,), generator=g).tolist() for L in [5, 23, 40, 17, 33][:n]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """What `dayzero toy --preset flash-0731` writes (FP8, FP4 experts, a toy tokenizer)."""
    d = tmp_path_factory.mktemp("toy") / "flash-0731"
    assert main(["toy", str(d), "--preset", "flash-0731"]) == 0
    return d


@pytest.fixture(scope="module")
def expected(ckpt):
    llm = LLM(ckpt, numerics="transformers", speculative_config={"num_speculative_tokens": 0})
    assert llm.engine.spec_enabled is False and llm.engine.worker.capture is False
    return [r.output_ids for r in staggered(llm.engine, prompts(), GREEDY)]


def test_toy_0731_loads_strictly_under_the_official_names(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and len(cfg["compress_ratios"]) == 5 + 3  # as 0731's root config
    llm = LLM(ckpt, **SPEC)
    m = llm.model
    assert m.args.n_mtp_layers == 0 and m.args.dspark_stages == 3
    assert len(m.mtp) == 3 and all(isinstance(s, DSparkStage) for s in m.mtp)
    names = set(m.state_dict())
    for n in ("mtp.0.main_proj.weight", "mtp.0.main_proj.scale", "mtp.0.main_norm.weight", "mtp.2.norm.weight",
              "mtp.2.hc_head_fn", "mtp.2.markov_head.markov_w1.weight", "mtp.2.markov_head.markov_w2.weight",
              "mtp.2.confidence_head.proj.weight", "mtp.1.ffn.experts.0.w1.weight", "mtp.1.attn.wkv.weight"):
        assert n in names, n
    assert not any(k in n for n in names if n.startswith("mtp.") for k in ("e_proj", "h_proj", "enorm", "hnorm",
                                                                           "tid2eid"))
    assert m.state_dict()["mtp.0.main_proj.weight"].shape == (m.args.dim, 3 * m.args.dim)
    assert m.state_dict()["mtp.2.confidence_head.proj.weight"].dtype == torch.float32
    e = llm.engine
    assert (e.spec_method, e.spec_k) == ("dspark", 5)  # the default follows the checkpoint


def test_a_dspark_checkpoint_read_as_mtp_fails_naming_the_tensors(ckpt, tmp_path):
    bad = tmp_path / "no-dspark-keys"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    for k in [k for k in cfg if k.startswith("dspark_")]:
        del cfg[k]
    (bad / "config.json").write_text(json.dumps(cfg))
    hint = r"(?s)mtp\.0\.(e_proj|main_proj).*hint: the checkpoint's mtp\.\* is a DSpark drafter"
    with pytest.raises(CheckpointError, match=hint):
        LLM(bad, numerics="transformers")


def test_speculative_config_flag():
    assert speculative_config('{"method": "dspark", "num_speculative_tokens": 3}') == {
        "method": "dspark", "num_speculative_tokens": 3}
    for text, msg in [("{method: dspark}", "not JSON"), ('{"method": "eagle3"}', "must be one of"),
                      ('{"num_speculative_tokens": -1}', "non-negative")]:
        with pytest.raises(ValueError, match=msg):
            speculative_config(text)


@pytest.mark.parametrize("cfg, msg", [
    ({"method": "mtp"}, "no MTP module"),
    ({"method": "dspark", "num_speculative_tokens": 6}, "at most 5"),
])
def test_dspark_option_errors(ckpt, cfg, msg):
    with pytest.raises(ValueError, match=msg):
        LLM(ckpt, **{**SPEC, "speculative_config": cfg})


@pytest.mark.parametrize("opts", [
    dict(max_num_batched_tokens=7),  # chunked prefill, blocks cut by the budget
    dict(max_num_batched_tokens=37, max_num_seqs=2),
    dict(max_num_batched_tokens=64, speculative_config={"method": "dspark", "num_speculative_tokens": 3, **FIXED}),
], ids=["chunk7", "seqs2", "k3"])
def test_dspark_on_off_same_greedy_tokens(ckpt, expected, opts):
    llm = LLM(ckpt, **{**SPEC, **opts})
    assert [r.output_ids for r in staggered(llm.engine, prompts(), GREEDY)] == expected
    st = llm.engine.stats()
    assert st["spec_method"] == "dspark" and st["spec_draft_tokens"] > 0
    conf = llm.engine.drafter.last_confidence
    assert all(0 <= c <= 1 for cs in conf for c in cs)


def test_confidence_threshold_cuts_blocks_and_changes_no_token(ckpt, expected):
    full = LLM(ckpt, **SPEC)
    assert [r.output_ids for r in staggered(full.engine, prompts(3), GREEDY)] == expected[:3]
    cut = LLM(ckpt, **{**SPEC, "speculative_config": {"confidence_threshold": 0.3, **FIXED}})
    seen = []
    propose = cut.engine.drafter.propose

    def recording(engine, plan):
        propose(engine, plan)
        seen.extend(engine.drafter.last_confidence)

    cut.engine.drafter.propose = recording
    assert [r.output_ids for r in staggered(cut.engine, prompts(3), GREEDY)] == expected[:3]
    assert seen and all(torch.tensor(cs).prod() >= 0.3 for cs in seen if cs)
    assert 0 < cut.engine.stats()["spec_draft_tokens"] < full.engine.stats()["spec_draft_tokens"]
    with pytest.raises(ValueError, match="only DSpark has a confidence head"):
        LLM(ckpt, **{**SPEC, "speculative_config": {"method": "mtp", "confidence_threshold": 0.5}})


def test_dspark_under_official_numerics(ckpt):
    p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    off = LLM(ckpt, num_speculative_tokens=0)
    on = LLM(ckpt, speculative_min_acceptance=0.0, speculative_config=FIXED, max_num_batched_tokens=19)
    assert [o.token_ids for o in on.generate(prompts(2), p)] == [o.token_ids for o in off.generate(prompts(2), p)]
    assert on.engine.stats()["spec_draft_tokens"] > 0


def test_dspark_prefix_hits_and_preemption(ckpt, expected):
    llm = LLM(ckpt, max_num_batched_tokens=37, **SPEC)
    first = [o.token_ids for o in llm.generate(prompts(), GREEDY)]
    hits = llm.engine.kv.hits
    second = [o.token_ids for o in llm.generate(prompts(), GREEDY)]
    assert first == second == expected and llm.engine.kv.hits > hits
    opts = dict(max_num_batched_tokens=16, max_num_seqs=5, **SPEC)
    e = LLM(ckpt, **opts).engine
    z = Sizes(e.groups, e.args, e.model.compute_dtype, e.block_size, 16)
    small = LLM(ckpt, kv_cache_memory_bytes=z.needed(5) + 4 * z.per_entry_block, **opts)
    assert [r.output_ids for r in staggered(small.engine, prompts(), GREEDY, every=1)] == expected
    assert small.engine.scheduler.num_preemptions > 0


def test_dspark_drafts_do_not_depend_on_batching_chunking_or_prefix_hits(ckpt):
    """Not only the tokens: the drafts themselves (context rows of every earlier position, the
    draft block, the Markov head) are the same for a request alone, batched in 7-token chunks, and
    after a prefix-cache hit."""
    drafts_alike_alone_batched_and_after_hits(ckpt, SPEC, prompts(3), GREEDY, min_drafts=3 * 8)


def test_dspark_seeded_sampling_does_not_change(ckpt):
    p = SamplingParams(temperature=0.9, top_k=50, seed=3, max_tokens=10, ignore_eos=True)
    plain = LLM(ckpt, numerics="transformers", num_speculative_tokens=0).generate(prompts(3), p)
    spec = LLM(ckpt, **SPEC)
    assert [o.token_ids for o in spec.generate(prompts(3), p)] == [o.token_ids for o in plain]
    assert spec.engine.stats()["spec_draft_tokens"] > 0


def test_draft_block_matches_a_dense_rendering_of_the_method():
    """reference/dspark.py's draft against a direct rendering of the method (research/v41-and-dspark.md
    2.3) on one sequence longer than the window: context rows of exactly the last `window` main
    positions before the anchor, rotated at their main positions; every block row attending to all
    k block rows (non-causal) and to those context rows, the sink in the denominator only."""
    from dayzero.ops import ref
    from dayzero.reference.dspark import draft_block, main_hidden
    from dayzero.reference.model import Transformer
    from dayzero.reference.seqcache import Batch, DenseBatchCache, DenseSeqCache
    from dayzero.testing import random_state, tiny_args

    args = tiny_args("flash-0731")
    model = Transformer(args, numerics="transformers")
    model.load_state_dict(random_state(model, seed=2), strict=True)
    model.eval()
    L, k, W = 23, 4, args.window_size
    ids = torch.randint(2, 500, (L,), generator=torch.Generator().manual_seed(0))
    anchor = 77
    with torch.no_grad():
        cache = DenseBatchCache([DenseSeqCache()])
        cap: dict = {}
        model.forward_packed(ids, Batch([0], [L], cache, torch.device("cpu")), cap)
        st0, stages = model.mtp[0], model.mtp
        main_x = st0.main_norm(st0.main_proj(main_hidden(cap, args)))
        for st in stages:
            st.write_context(main_x, Batch([0], [L], cache, torch.device("cpu")))
        h, U = draft_block(model, stages, torch.tensor([anchor]), Batch([L], [k], cache, torch.device("cpu")), k)

        # the same draft, written out densely
        inv = stages[0].attn.inv_freq_cpu
        ctx_pos = torch.arange(L - W, L)  # the W main positions before the anchor's position L
        blk_pos = torch.arange(L, L + k)
        x_ids = torch.tensor([anchor] + [args.dspark_noise_token_id] * (k - 1))
        X = model.embed_tokens(x_ids).unsqueeze(1).repeat(1, args.hc_mult, 1)
        for st in stages:
            a = st.attn

            def rot(t, pos, inverse=False):
                return ref.apply_rope(t, *[c[:, None] if t.dim() == 3 else c for c in ref.rope_cos_sin(pos, inv)],
                                      inverse=inverse)

            ctx_kv = rot(a.kv_norm(a.wkv(main_x[ctx_pos])), ctx_pos)

            def attend(x, a=a, ctx_kv=ctx_kv):
                q = a.wq_b(a.q_norm(a.wq_a(x))).unflatten(-1, (a.n_heads, a.head_dim))
                q = rot(ref.rms_norm(q, None, a.eps), blk_pos)
                keys = torch.cat([ctx_kv, rot(a.kv_norm(a.wkv(x)), blk_pos)])  # [W + k, D]
                logits = torch.einsum("nhd,kd->nhk", q, keys) * a.head_dim ** -0.5
                full = torch.cat([logits, a.attn_sink.view(1, -1, 1).expand(k, -1, 1)], -1)
                o = torch.einsum("nhk,kd->nhd", full.softmax(-1)[..., :-1], keys)
                o = rot(o, blk_pos, inverse=True).reshape(k, a.o_groups, -1)
                return a.wo_b(a._grouped_wo_a(o))

            X = st._site(X, st.hc_attn_fn, st.hc_attn_scale, st.hc_attn_base, lambda u: attend(st.attn_norm(u)))
            X = st._site(X, st.hc_ffn_fn, st.hc_ffn_scale, st.hc_ffn_base, lambda u: st.ffn(st.ffn_norm(u), x_ids))
        h_ref, U_ref = stages[-1].head(X, model.head_weight())
    assert torch.allclose(h[0], h_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(U[0], U_ref, atol=1e-3, rtol=1e-3)
    # the Markov head: row i's bias is markov_w2 . markov_w1[previous token]
    mh = stages[-1].markov_head
    bias = mh.bias(mh.embed(torch.tensor([anchor])))[0]
    assert torch.allclose(bias, mh.markov_w2.weight @ mh.markov_w1.weight[anchor], atol=1e-5)


def test_adaptive_draft_lengths_keep_the_tokens(ckpt, expected):
    """The default policy, on the engine's own step timings: the speculation-free tokens, and the
    chosen lengths in the stats. Then fixed cost tables: one under which the lengths differ from
    step to step and request to request (the seeded tokens do not), one under which drafting never
    pays (nothing is verified, the drafter still proposes)."""
    llm = LLM(ckpt, numerics="transformers", speculative_min_acceptance=0.0)
    assert [r.output_ids for r in staggered(llm.engine, prompts(3), GREEDY)] == expected[:3]
    st = llm.engine.stats()
    assert st["spec_draft_policy"] == "adaptive" and st["spec_proposal_steps"] > 0
    assert 0 <= st["spec_mean_draft_length"] <= 5 and st["spec_step_cost_seconds"]
    assert all(t > 0 for t in st["spec_step_cost_seconds"].values())

    e = llm.engine
    e.policy.cost = FrozenCost(1.0, 0.1)  # a step's cost grows by a tenth of a 1-row step per row
    lengths = chosen_lengths(e)
    drafts = st["spec_draft_tokens"]
    seeded = SamplingParams(temperature=0.9, top_k=50, seed=3, max_tokens=10, ignore_eos=True)
    plain = LLM(ckpt, numerics="transformers", num_speculative_tokens=0).generate(prompts(3), seeded)
    assert [o.token_ids for o in llm.generate(prompts(3), seeded)] == [o.token_ids for o in plain]
    assert len(set(lengths)) >= 3  # e.g. 0, 1 and longer blocks
    st = e.stats()
    assert st["spec_draft_tokens"] - drafts == sum(lengths) > 0
    assert st["spec_mean_draft_length"] == st["spec_draft_tokens"] / st["spec_proposal_steps"]

    e.policy.cost = FrozenCost(0.0, 1.0, bucketed=False)  # proportional to rows: drafting never pays
    lengths = chosen_lengths(e)
    drafts = e.stats()["spec_draft_tokens"]
    assert [o.token_ids for o in llm.generate(prompts(3), GREEDY)] == expected[:3]
    assert lengths and set(lengths) == {0} and e.stats()["spec_draft_tokens"] == drafts
