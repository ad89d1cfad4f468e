"""The engine computes the same model as the reference, whatever the batching, chunking, caching,
preemption or speculation."""
import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.engine.capacity import Sizes
from dayzero.engine.engine import Engine
from dayzero.engine.sampling import filter_logits, sample, verify_block, verify_draft
from tests.engine.helpers import FIXED, FrozenCost, OracleDrafter, chosen_lengths, staggered

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 23, 40, 17, 61, 33, 9, 48][:n]
    return [torch.randint(2, 500, (L,), generator=g).tolist() for L in lengths]


def reference_greedy(model, prompt, n):
    state = model.new_state()
    logits = model(torch.tensor([prompt]), state)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), state)[0, -1]
    return out


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("flash", "fp8", tokenizer=True)


@pytest.fixture(scope="module")
def expected(ckpt):
    model = LLM(ckpt, numerics="transformers", num_speculative_tokens=0).model
    return [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts()]


def run_staggered(engine: Engine, ps, params=GREEDY, every=2):
    return [r.output_ids for r in staggered(engine, ps, params, every)]


@pytest.mark.parametrize("opts", [
    dict(max_num_batched_tokens=7),  # chunks that align with nothing (4, 16, window 16)
    dict(max_num_batched_tokens=37, max_num_seqs=2),  # fewer slots than requests
    dict(max_num_batched_tokens=64, num_speculative_tokens=1,
         speculative_config=FIXED, speculative_min_acceptance=0.0),  # MTP on
    dict(max_num_batched_tokens=37, enable_prefix_caching=False, num_speculative_tokens=0),
], ids=["chunk7", "chunk37-seqs2", "mtp", "no-prefix-cache"])
def test_greedy_matches_reference_under_batching(ckpt, expected, opts):
    llm = LLM(ckpt, numerics="transformers", **opts)
    assert run_staggered(llm.engine, prompts()) == expected


def test_prefix_cache_second_pass_hits_and_agrees(ckpt, expected):
    llm = LLM(ckpt, numerics="transformers", max_num_batched_tokens=37)
    first = [o.token_ids for o in llm.generate(prompts(), GREEDY)]
    hits_before = llm.engine.kv.hits
    shared = [p[:30] + [7, 7, 7] for p in prompts()]  # same first 30 tokens, different tails
    llm.generate(shared, GREEDY)
    second = [o.token_ids for o in llm.generate(prompts(), GREEDY)]
    assert first == second == expected
    assert llm.engine.kv.hits > hits_before  # whole blocks of the earlier prompts were reused


def test_prefix_hit_from_a_single_block(ckpt):
    llm = LLM(ckpt, numerics="transformers", num_speculative_tokens=0)
    bs = llm.engine.block_size
    base = prompts()[4][:bs + 3]
    llm.generate([base], GREEDY)
    hits = llm.engine.kv.hits
    out = llm.generate([base[:bs] + [9, 9, 9, 9]], GREEDY)[0].token_ids
    assert llm.engine.kv.hits - hits == bs
    fresh = LLM(ckpt, numerics="transformers", num_speculative_tokens=0, enable_prefix_caching=False)
    assert out == fresh.generate([base[:bs] + [9, 9, 9, 9]], GREEDY)[0].token_ids


def test_preemption_under_a_tiny_kv_budget(ckpt, expected):
    probe = LLM(ckpt, numerics="transformers", max_num_batched_tokens=64, max_num_seqs=6,
                num_speculative_tokens=0)
    e = probe.engine
    z = Sizes(e.groups, e.args, probe.model.compute_dtype, e.block_size, 64)
    # room for at most 9 blocks of long-range entries (~144 tokens) for six requests of up to 73 tokens
    llm = LLM(ckpt, numerics="transformers", max_num_batched_tokens=64, max_num_seqs=6,
              num_speculative_tokens=0, kv_cache_memory_bytes=z.needed(6) + 7 * z.per_entry_block)
    assert 5 <= llm.engine.max_tokens // llm.engine.block_size <= 9
    assert run_staggered(llm.engine, prompts(), every=1) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_independent_of_batch_composition(ckpt):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=10, ignore_eos=True)
    target = prompts()[2]
    alone = LLM(ckpt, numerics="transformers", num_speculative_tokens=0).generate([target], p)[0].token_ids
    crowd = LLM(ckpt, numerics="transformers", num_speculative_tokens=0, max_num_batched_tokens=19)
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=10) for s in range(5)]
    outs = crowd.generate(prompts()[:2] + [target] + prompts()[3:], others[:2] + [p] + others[2:5])
    assert outs[2].token_ids == alone
    again = LLM(ckpt, numerics="transformers", num_speculative_tokens=0).generate([target], p)[0].token_ids
    assert again == alone


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("right", [True, False])
def test_k_token_verification_accepts_and_rejects_exactly(ckpt, expected, right, k):
    """Oracle drafters through the k-token path: all right -> every draft token accepted and
    1 + k tokens a step; all wrong -> none accepted; tokens identical either way."""
    llm = LLM(ckpt, numerics="transformers", num_speculative_tokens=1,
              speculative_config=FIXED, speculative_min_acceptance=0.0,
              max_num_batched_tokens=64)
    e = llm.engine
    e.drafter = OracleDrafter({f"r{i}": x for i, x in enumerate(expected)}, k, right)
    assert run_staggered(e, prompts()) == expected
    st = e.stats()
    assert st["spec_draft_tokens"] > 0 and st["spec_accepted_tokens"] == (st["spec_draft_tokens"] if right else 0)
    if right:
        assert st["spec_mean_accepted_length"] > (1.5 if k == 3 else 0.9)
        assert e.num_steps < (24 if k == 3 else 30)  # accepted drafts give 1 + k tokens a step


@pytest.mark.parametrize("right", [True, False])
def test_adaptive_policy_learns_a_drafter_without_confidences(ckpt, expected, right):
    """The adaptive policy (the default) over a drafter with no confidence head (as MTP): each
    request's running acceptance estimate, from every proposal's outcome. Free rows (a flat cost
    table): a drafter that is always right is verified every time; one that is always wrong stops
    being verified once its first outcomes are known. Tokens identical either way."""
    llm = LLM(ckpt, numerics="transformers", num_speculative_tokens=1, speculative_min_acceptance=0.0,
              max_num_batched_tokens=64)
    e = llm.engine
    e.drafter = OracleDrafter({f"r{i}": x for i, x in enumerate(expected)}, 3, right)
    e.policy.cost = FrozenCost(1.0, 0.0)
    lengths = chosen_lengths(e)
    assert run_staggered(e, prompts()) == expected
    st = e.stats()
    assert st["spec_draft_policy"] == "adaptive" and st["spec_proposal_steps"] == len(lengths) > 10
    if right:
        assert st["spec_accepted_tokens"] == st["spec_draft_tokens"] == sum(lengths) > 10
    else:
        assert st["spec_accepted_tokens"] == 0 and st["spec_draft_tokens"] <= 3 * len(prompts())
        assert lengths[-5:] == [0] * 5


def test_adaptive_policy_turns_speculation_off_when_the_drafter_does_not_pay(ckpt, expected):
    """Drafts always right and rows free, but the drafter takes 90% of every step: speculation
    gives 2 tokens per step where no speculation would give 10, so the engine turns it off."""
    llm = LLM(ckpt, numerics="transformers", num_speculative_tokens=1, max_num_batched_tokens=64)
    e = llm.engine
    e.drafter = OracleDrafter({f"r{i}": x for i, x in enumerate(expected)}, 1, True)
    e.policy.cost, e.policy.draft_cost = FrozenCost(1.0, 0.0), FrozenCost(0.9, 0.0)
    e.policy.min_steps = 4
    assert run_staggered(e, prompts()) == expected
    st = e.stats()
    assert st["spec_enabled"] is False and st["spec_acceptance"] == 1.0 and st["spec_payoff"] < 1


def test_k_token_drafts_under_a_small_budget_and_preemption(ckpt, expected):
    """Blocks cut short by the token budget, steps that close compression windows on drafted
    positions, preemption with drafts pending: still the speculation-free tokens."""
    opts = dict(numerics="transformers", max_num_batched_tokens=16, max_num_seqs=6, num_speculative_tokens=1,
                speculative_config=FIXED, speculative_min_acceptance=0.0)
    e = LLM(ckpt, **opts).engine
    z = Sizes(e.groups, e.args, e.model.compute_dtype, e.block_size, 16)
    llm = LLM(ckpt, kv_cache_memory_bytes=z.needed(6) + 4 * z.per_entry_block, **opts)
    llm.engine.drafter = OracleDrafter({f"r{i}": x for i, x in enumerate(expected)}, 4, True)
    assert run_staggered(llm.engine, prompts(), every=1) == expected
    st = llm.engine.stats()
    assert st["spec_accepted_tokens"] > 0 and st["preemptions"] > 0


def test_mtp_turns_itself_off_when_acceptance_does_not_pay(ckpt):
    llm = LLM(ckpt, numerics="transformers", num_speculative_tokens=1,
              speculative_config=FIXED, speculative_min_acceptance=0.9)
    llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats["spec_draft_tokens"] >= 16 and stats["spec_enabled"] is False
    assert stats["spec_acceptance"] < 0.9


def test_sampling_is_the_model_distribution_and_verification_is_exact():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    p = SamplingParams(temperature=1.0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample(logits, p, 7, i) for i in range(n)]), minlength=4)
    assert torch.allclose(counts / n, logits.softmax(0), atol=0.015)  # Gumbel-max draws follow p
    for i in range(50):
        tok = sample(logits, p, 3, i)
        assert verify_draft(logits, tok, p, 3, i) == (True, tok)
        assert verify_draft(logits, (tok + 1) % 4, p, 3, i) == (False, tok)  # the output never moves


def test_block_verifier_keeps_the_target_distribution():
    """Two tokens drawn through verify_block with a drafter that proposes from another
    distribution (same noise, as MTP and DSpark draft) follow the target's joint distribution
    p(x0) p(x1 | x0), and every seed gives the speculation-free tokens."""
    V = 4
    t0 = torch.tensor([1.5, 0.2, -0.5, 0.9])
    t1 = torch.tensor([[0.0, 1.0, -1.0, 0.5], [2.0, -1.0, 0.0, 0.0], [-0.5, -0.5, 1.5, 0.0], [0.3, 0.3, 0.3, -2.0]])
    q0, q1 = torch.tensor([0.0, 1.5, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])  # the drafter's (wrong) logits
    p = SamplingParams(temperature=1.0, top_k=3)
    n, counts, accepted = 12000, torch.zeros(V, V), 0
    for seed in range(n):
        d0 = sample(q0, p, seed, 0)
        d1 = sample(q1 + t1[d0] * 0.5, p, seed, 1)  # a drafter conditioned on its own previous draft
        a, toks = verify_block([t0, t1[d0], t1[d1]], [d0, d1], p, seed, 0)
        toks = toks[:2]
        assert toks[0] == sample(t0, p, seed, 0)  # speculation-free token, whatever the draft
        if a == 0:  # the next step samples after the corrected token
            toks.append(sample(t1[toks[0]], p, seed, 1))
        accepted += a
        counts[toks[0], toks[1]] += 1
        assert toks[1] == sample(t1[toks[0]], p, seed, 1)
    want = filter_logits(t0, p).softmax(0)[:, None] * torch.stack([filter_logits(t, p).softmax(0) for t in t1])
    assert torch.allclose(counts / n, want, atol=0.015)
    assert counts[2].sum() == 0  # top_k = 3 drops token 2 at the first position
    assert 0 < accepted < n  # the drafts were sometimes right, sometimes not


def test_seeded_sampling_does_not_depend_on_speculation(ckpt):
    p = SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    plain = LLM(ckpt, numerics="transformers", num_speculative_tokens=0).generate(prompts()[:3], p)
    spec = LLM(ckpt, numerics="transformers", num_speculative_tokens=1,
               speculative_config=FIXED, speculative_min_acceptance=0.0)
    assert [o.token_ids for o in spec.generate(prompts()[:3], p)] == [o.token_ids for o in plain]
    assert spec.engine.drafts > 0


def test_kv_accounting_is_reported(ckpt):
    stats = LLM(ckpt, numerics="transformers").engine.stats()
    assert stats["max_tokens_in_cache"] > 0 and stats["kv_cache_bytes"] > 0 and stats["block_size"] == 16


def test_abort_frees_blocks(ckpt):
    llm = LLM(ckpt, numerics="transformers", enable_prefix_caching=False)
    e = llm.engine
    r = e.add_request("x", prompts()[4], GREEDY)
    e.step()
    assert e.kv.usage() > 0
    e.abort("x")
    assert r.finish_reason == "abort" and e.kv.usage() == 0 and not e.has_unfinished()


def test_speculative_config_spellings_and_errors(ckpt):
    off = LLM(ckpt, numerics="transformers", speculative_config={"num_speculative_tokens": 0}).engine
    assert (off.spec_method, off.spec_enabled, off.stats()["spec_num_speculative_tokens"]) == (None, False, 0)
    on = LLM(ckpt, numerics="transformers", speculative_config={"method": "mtp"}).engine
    assert (on.spec_method, on.spec_k, on.spec_enabled) == ("mtp", 1, True)  # the default: the checkpoint's MTP
    assert on.stats()["spec_draft_policy"] == "adaptive"
    fixed = LLM(ckpt, numerics="transformers", speculative_config={"draft_policy": "fixed"}).engine
    assert fixed.stats()["spec_draft_policy"] == "fixed"
    for cfg, kw, msg in [
        ({"method": "eagle"}, {}, "speculative_config.method: must be one of"),
        ({"method": "dspark"}, {}, "this checkpoint has no DSpark drafter"),
        ({"method": "mtp", "num_speculative_tokens": 2}, {}, "at most 1"),
        ({"num_speculative_tokens": 1}, {"num_speculative_tokens": 0}, "disagrees"),
        ({"k": 1}, {}, "unknown key"),
        ({"draft_policy": "greedy"}, {}, r"speculative_config.draft_policy: must be one of \['adaptive', 'fixed'\]"),
        ("dspark", {}, "must be a dict"),
    ]:
        with pytest.raises(ValueError, match=msg):
            LLM(ckpt, numerics="transformers", speculative_config=cfg, **kw)


def test_k_token_verification_reports_each_tokens_own_logprobs(ckpt, expected):
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    plain = LLM(ckpt, numerics="transformers", num_speculative_tokens=0).generate(prompts()[:3], p)
    llm = LLM(ckpt, numerics="transformers", num_speculative_tokens=1,
              speculative_config=FIXED, speculative_min_acceptance=0.0)
    llm.engine.drafter = OracleDrafter({f"gen-{i}": x for i, x in enumerate(expected[:3])}, 3, True)
    spec = llm.generate(prompts()[:3], p)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain] == expected[:3]
    assert llm.engine.stats()["spec_accepted_tokens"] > 10
    for a, b in zip(spec, plain):
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-5 for k in la)
