"""DeepSeek-V4.1's DSpark (v41/dspark.py) on a random-weight toy with stages (`toy.dspark_text()`). There is
no oracle of the V4.1 DSpark forward, so these are invariants that a wrong build fails: strict loading
under V4.1's names; the capture is the ENTRY stream of the target layers (not their output); the draft
equals a dense rendering of the method (context rows exactly c - window .. c - 1 rotated at their main
positions and FP8-window-quantised, all block rows visible to every row, no per-head q norm, the single-
pass pre chained over the stages, the last FFN pre collapsing); the Markov head's prev chain; and in the
engine, tokens with speculation on == off (Engram on and off), seeded sampling unchanged, and a drafter
built to agree with its target gets its drafts accepted."""
from __future__ import annotations


import pytest
import torch

from dayzero.loader.checkpoint import CheckpointError
from dayzero.ops import ref
from dayzero.reference.attention import rope_table
from dayzero.reference.seqcache import Batch, DenseBatchCache, DenseSeqCache
from dayzero.v41 import dspark, quant, toy
from dayzero.v41.loader import load_v41
from tests.v41.ckpt import one_thread  # noqa: F401 (autouse fixture)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return toy.write_toy(tmp_path_factory.mktemp("v41ds") / "toy", seed=3, text=toy.dspark_text())


@pytest.fixture(scope="module")
def model(ckpt):
    return load_v41(ckpt, drafter=True)


def _batch(start, n, cache):
    return Batch([start], [n], cache, CPU)


def test_stages_load_strictly_under_the_v41_names(ckpt, model, tmp_path):
    names = set(model.state_dict())
    for n in ("mtp.0.main_proj.weight", "mtp.0.main_proj.scale", "mtp.0.main_norm.weight", "mtp.2.norm.weight",
              "mtp.2.markov_head.embed.weight", "mtp.2.markov_head.head.weight", "mtp.2.confidence_head.proj.weight",
              "mtp.1.ffn.gate.bias_vl", "mtp.1.attn.attn_sink", "mtp.0.hc_ffn_fn"):
        assert n in names, n
    assert not [n for n in names if n.startswith("mtp.") and any(
        k in n for k in ("markov_w", "hc_head", "compressor", "indexer", "engram", "tid2eid"))]
    assert len(model.mtp[1].ffn.experts) == model.args.dspark_n_routed_experts
    assert model.mtp[1].ffn.gate.topk == model.args.dspark_n_activated_experts
    assert not hasattr(load_v41(ckpt), "mtp")  # drafter off: mtp.* recognised and not read
    from dayzero.v41.presets import dspark_tensors
    want = {n: (s.shape, s.dtype) for n, s in dspark_tensors(model.args).items()}
    from safetensors import safe_open
    got = {}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            got.update({n: (tuple(h.get_slice(n).get_shape()), h.get_tensor(n).dtype) for n in h.keys()
                        if n.startswith("mtp.")})
    assert got == want  # the census's names and shapes are what the loader reads


def test_drafter_on_names_a_missing_stage_tensor(ckpt, tmp_path):
    from tests.v41.ckpt import rewrite
    import shutil
    d = tmp_path / "c"
    shutil.copytree(ckpt, d)
    rewrite(d, lambda t: t.pop("mtp.2.markov_head.head.weight"))
    with pytest.raises(CheckpointError, match=r"(?s)mtp\.2\.markov_head\.head\.weight.*hint: speculation is on"):
        load_v41(d, drafter=True)
    load_v41(d)  # drafter off: the stages are not read
    plain = toy.write_toy(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="num_nextn_predict_layers` is 0"):
        load_v41(plain, drafter=True)


def _entry_streams(m, ids):
    """The backbone run layer by layer: the hc-mean of the streams entering each layer, and the output."""
    cache = DenseBatchCache([DenseSeqCache()])
    batch, ctx = _batch(0, len(ids), cache), __import__("dayzero.v41.attention", fromlist=["Context"]).Context()
    hash_ids = m.hasher(ids, batch) if m.hasher is not None else None
    X = m.embed_tokens(ids).unsqueeze(1).repeat(1, m.args.hc_mult, 1)
    pre = torch.zeros(X.shape[:2])
    pre[:, 0] = 1.0
    entry = {}
    for layer in m.layers:
        entry[layer.layer_id] = X.mean(1)
        X, pre = layer(X, pre, batch, ctx, ids, hash_ids)
    return entry, ref.hc_collapse(X, pre)


def test_capture_is_the_entry_stream_of_the_target_layers(model):
    ids = torch.randint(2, 300, (11,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        entry, out = _entry_streams(model, ids)
        cap = {}
        h = model.forward_packed(ids, _batch(0, 11, DenseBatchCache([DenseSeqCache()])), capture=cap)
        plain = model.forward_packed(ids, _batch(0, 11, DenseBatchCache([DenseSeqCache()])))
    assert torch.equal(h, plain) and torch.equal(h, out)  # capturing changes nothing
    assert sorted(cap) == [4, 6, 7]
    for i in cap:
        assert torch.equal(cap[i], entry[i])  # the input of layer i ...
        assert not torch.allclose(cap[i], entry[i + 1] if i + 1 in entry else out)  # ... not its output
    hidden = dspark.main_hidden(cap, model.args)
    assert torch.equal(hidden, torch.cat([entry[4], entry[6], entry[7]], -1))
    with pytest.raises(ValueError, match="bounded replay is not built"):
        model.forward_packed(ids, _batch(0, 11, DenseBatchCache([DenseSeqCache()])), [5], capture={})


def _context_and_draft(m, ids, anchor, k, main_x=None):
    cache = DenseBatchCache([DenseSeqCache()])
    L = len(ids)
    cap = {}
    m.forward_packed(ids, _batch(0, L, cache), capture=cap)
    mx = dspark.main_x(m.mtp, dspark.main_hidden(cap, m.args)) if main_x is None else main_x
    for st in m.mtp:
        st.write_context(mx, _batch(0, L, cache))
    h, U = dspark.draft_block(m, m.mtp, torch.tensor([anchor]), _batch(L, k, cache), k)
    return mx, h[0], U[0]


def test_draft_block_matches_a_dense_rendering_of_the_method(model):
    m, args = model, model.args
    L, k, W, anchor = 13, 5, model.args.window_size, 77
    ids = torch.randint(2, 300, (L,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        main_x, h, U = _context_and_draft(m, ids, anchor, k)
        inv = rope_table(args, False, None)
        ctx_pos, blk_pos = torch.arange(L - W, L), torch.arange(L, L + k)  # exactly the W positions before c = L
        x_ids = torch.tensor([anchor] + [args.dspark_noise_token_id] * (k - 1))
        X = m.embed_tokens(x_ids).unsqueeze(1).repeat(1, args.hc_mult, 1)
        pre = torch.zeros(k, args.hc_mult)
        pre[:, 0] = 1

        def rot(t, pos, inverse=False):
            return ref.apply_rope(t, *[c[:, None] if t.dim() == 3 else c for c in ref.rope_cos_sin(pos, inv)],
                                  inverse=inverse)

        for st in m.mtp:
            a = st.attn
            ctx_kv = quant.window_kv(rot(a.kv_norm(a.wkv(main_x)), torch.arange(L)))[ctx_pos]

            def attend(x, a=a, ctx_kv=ctx_kv):
                q = rot(a.wq_b(a.q_norm(a.wq_a(x))).unflatten(-1, (a.n_heads, a.head_dim)), blk_pos)  # no q norm
                keys = torch.cat([ctx_kv, quant.window_kv(rot(a.kv_norm(a.wkv(x)), blk_pos))])  # every block row
                logits = torch.einsum("nhd,kd->nhk", q, keys) * a.head_dim ** -0.5
                full = torch.cat([logits, a.attn_sink.view(1, -1, 1).expand(k, -1, 1)], -1)
                o = torch.einsum("nhk,kd->nhd", full.softmax(-1)[..., :-1], keys)
                o = rot(o, blk_pos, inverse=True).reshape(k, a.o_groups, -1)
                w = a.wo_a.dequant(o.dtype).view(a.o_groups, -1, o.shape[-1])  # group g through its rows of wo_a
                return a.wo_b(torch.einsum("ngd,grd->ngr", o, w).flatten(1))

            X, pre = st._site(X, pre, st.hc_attn_fn, st.hc_attn_scale, st.hc_attn_base,
                              lambda u, st=st, attend=attend: attend(st.attn_norm(u)))
            X, pre = st._site(X, pre, st.hc_ffn_fn, st.hc_ffn_scale, st.hc_ffn_base,
                              lambda u, st=st: st.ffn(st.ffn_norm(u), x_ids))
        h_ref = ref.hc_collapse(X, pre)
        U_ref = ref.fp32_linear(m.mtp[-1].norm(h_ref), m.head.weight)
    assert torch.allclose(h, h_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(U, U_ref, atol=1e-3, rtol=1e-3)


def test_context_is_exactly_the_window_before_the_block_and_the_block_is_not_causal(model):
    m, L, k, W = model, 13, 5, model.args.window_size
    ids = torch.randint(2, 300, (L,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        main_x, h, U = _context_and_draft(m, ids, 77, k)

        def moved(p):  # the draft with main position p's context row changed
            mx = main_x.clone()
            mx[p] += 1.0
            return _context_and_draft(m, ids, 77, k, mx)[1]

        assert torch.equal(moved(L - W - 1), h)  # one before the window: not read
        assert not torch.allclose(moved(L - W), h) and not torch.allclose(moved(L - 1), h)
        # the anchor row (row 0) sees the later noise rows: another noise token changes it
        m.args = m.args.replace(dspark_noise_token_id=m.args.dspark_noise_token_id + 1)
        try:
            h2 = _context_and_draft(m, ids, 77, k)[1]
        finally:
            m.args = m.args.replace(dspark_noise_token_id=m.args.dspark_noise_token_id - 1)
        assert not torch.allclose(h2[0], h[0])


def test_markov_head_chains_each_draft_into_the_next(model):
    from dayzero.engine.dspark_drafter import _markov
    from dayzero.engine.sampling import SamplingParams
    last, k = model.mtp[-1], 5
    g = torch.Generator().manual_seed(5)
    U = torch.randn(1, k, model.args.vocab_size, generator=g)
    h = torch.randn(1, k, model.args.dim, generator=g)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    (drafts, conf), = _markov(last, h, U, torch.tensor([42]), [(0, 0, 42, k, greedy, 0, 0)], k, 0.0)
    prev, want = 42, []
    E, Hd = last.markov_head.embed.weight.float(), last.markov_head.head.weight.float()
    for i in range(k):
        tok = int((U[0, i] + Hd @ E[prev]).argmax())
        want.append(tok)
        prev = tok
    assert drafts == want
    assert not all(int(U[0, i].argmax()) == t for i, t in enumerate(want))  # the bias matters here
    e = E[torch.tensor([42] + want[:-1])]
    c = torch.sigmoid(torch.cat([h[0], e], -1) @ last.confidence_head.proj.weight.float().T).squeeze(-1)
    assert torch.allclose(torch.tensor(conf), c, atol=1e-6)


# ---- the engine -------------------------------------------------------------------------------------

from dayzero import LLM, SamplingParams  # noqa: E402
from tests.engine.helpers import FIXED, drafts_alike_alone_batched_and_after_hits, staggered  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SPEC = dict(speculative_min_acceptance=0.0, speculative_config=FIXED)  # every proposed draft verified


def prompts(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 300, (L,), generator=g).tolist() for L in [5, 23, 12, 17][:n]]


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """The same toy without Engram."""
    return toy.write_toy(tmp_path_factory.mktemp("v41ds") / "plain", seed=3, text=toy.dspark_text(engram_layer_ids=[]))


@pytest.mark.parametrize("engram", [True, False], ids=["engram", "no-engram"])
def test_engine_tokens_with_dspark_on_equal_off(ckpt, plain_ckpt, engram):
    d = ckpt if engram else plain_ckpt
    off = LLM(d, num_speculative_tokens=0)
    assert off.engine.spec_method is None and not off.model.mtp and off.engine.worker.capture is False
    want = [r.output_ids for r in staggered(off.engine, prompts(), GREEDY)]
    on = LLM(d, max_num_batched_tokens=7, max_num_seqs=2, **SPEC)  # chunked prefill, blocks cut by the budget
    e = on.engine
    assert (e.spec_method, e.spec_k) == ("dspark", 5) and len(on.model.mtp) == 3  # the default follows the checkpoint
    assert e.groups[0].layers == tuple(range(8 + 3))  # the stages' context rows in the window group
    row = 64 * 4  # head_dim fp32 values (toy; the compute dtype on the CPU)
    assert e.stats()["fixed_bytes_per_sequence"] - off.engine.stats()["fixed_bytes_per_sequence"] == 3 * 3 * row
    assert [r.output_ids for r in staggered(e, prompts(), GREEDY)] == want
    assert e.stats()["spec_draft_tokens"] > 0
    hits = e.kv.hits
    assert [o.token_ids for o in on.generate(prompts(), GREEDY)] == want and e.kv.hits > hits  # after prefix hits
    k3 = LLM(d, speculative_config={"num_speculative_tokens": 3, **FIXED}, speculative_min_acceptance=0.0,
             kv_cache_dtype="qat")  # the stages' rows packed too (FP8 + UE8M0 per 32, lossless)
    assert k3.engine.groups[0].kinds["kv"].qat == "fp8" and k3.engine.groups[0].layers[-1] == 10
    assert k3.engine.spec_k == 3 and [o.token_ids for o in k3.generate(prompts(), GREEDY)] == want


def test_seeded_sampling_does_not_change(ckpt):
    p = SamplingParams(temperature=0.9, top_k=50, seed=3, max_tokens=10, ignore_eos=True)
    plain = LLM(ckpt, num_speculative_tokens=0).generate(prompts(3), p)
    spec = LLM(ckpt, **SPEC)
    assert [o.token_ids for o in spec.generate(prompts(3), p)] == [o.token_ids for o in plain]
    assert spec.engine.stats()["spec_draft_tokens"] > 0


def test_a_drafter_that_agrees_gets_its_drafts_accepted(ckpt):
    """With the (shared) LM head zeroed, the target's greedy token is always 0 (all logits tie), and so is
    the draft's when the Markov bias is zero too: every draft is accepted, several tokens a step; with the
    Markov head's own weights the drafts disagree and are rejected, the tokens the same."""
    def build(markov_zero):
        llm = LLM(ckpt, **SPEC)
        m = llm.model.model
        m.head.weight.zero_()
        if markov_zero:
            m.mtp[-1].markov_head.head.weight.zero_()
        return llm

    agree, disagree = build(True), build(False)
    want = [[0] * 10] * 3
    assert [o.token_ids for o in agree.generate(prompts(3), GREEDY)] == want
    assert [o.token_ids for o in disagree.generate(prompts(3), GREEDY)] == want
    sa, sd = agree.engine.stats(), disagree.engine.stats()
    assert sa["spec_accepted_tokens"] == sa["spec_draft_tokens"] > 0 and sa["spec_mean_accepted_length"] > 2
    assert sd["spec_draft_tokens"] > 0 and sd["spec_accepted_tokens"] < sd["spec_draft_tokens"]


@pytest.mark.parametrize("opts, msg", [
    (dict(speculative_config={"method": "mtp"}), "no MTP module"),
    (dict(num_speculative_tokens=6), "at most 5"),
    (dict(speculative_config={"model": "x"}), "a separate drafter is not built for V4.1"),
    (dict(num_speculative_tokens=2, tensor_parallel_size=2, v41_bounded_replay=True),
     "with v41_bounded_replay=True is not built"),  # refused before any rank starts
    (dict(num_speculative_tokens=2, v41_bounded_replay=True), "with v41_bounded_replay=True is not built"),
])
def test_option_errors(ckpt, opts, msg):
    with pytest.raises(ValueError, match=msg):
        LLM(ckpt, **opts)


def test_bounded_replay_leaves_dspark_off_and_a_toy_without_stages_refuses_it(ckpt, tmp_path):
    llm = LLM(ckpt, v41_bounded_replay=True)
    assert llm.engine.spec_method is None and not llm.model.mtp
    plain = toy.write_toy(tmp_path / "plain")
    with pytest.raises(ValueError, match="this checkpoint has no DSpark drafter"):
        LLM(plain, speculative_config={"method": "dspark"})
    assert LLM(plain).engine.spec_method is None


def test_drafts_do_not_depend_on_batching_chunking_or_prefix_hits(ckpt):
    """Not only the tokens: the drafts themselves (context rows of every earlier position, written per
    prefill chunk; the block; the Markov head) are the same alone, batched in 7-token chunks, and after
    a prefix-cache hit (context rows restored from cached blocks)."""
    drafts_alike_alone_batched_and_after_hits(ckpt, SPEC, prompts(3), GREEDY, min_drafts=3 * 5)


@pytest.mark.parametrize("engram", [True, False], ids=["engram", "no-engram"])
def test_partly_accepted_drafts_roll_back_the_v41_state(ckpt, plain_ckpt, engram):
    """Rollback after a partly accepted block: the DSpark drafter runs, then each request's draft is replaced
    by the true continuation (speculation off) with one token changed at a cut that moves from step to
    step (0 .. k - 1), so each verification accepts a prefix and rejects the rest. The rejected positions'
    window rows, compressed entries, indexer keys, pooling rows and Engram history were written by the
    verification step; the tokens after them must still be the speculation-free ones."""
    d = ckpt if engram else plain_ckpt
    want = {tuple(p): o.token_ids for p, o in zip(prompts(), LLM(d, num_speculative_tokens=0).generate(
        prompts(), SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)))}
    llm = LLM(d, max_num_batched_tokens=9, **SPEC)
    propose, step = llm.engine.drafter.propose, [0]

    def steered(engine, plan):
        propose(engine, plan)
        for b in plan.seqs:
            r = plan.reqs[b]
            if r.draft:
                n, cut = len(r.output_ids), step[0] % len(r.draft)
                truth = list(want[tuple(r.prompt_ids)][n:n + len(r.draft)])
                truth[cut] = (truth[cut] + 1) % 300  # wrong from here on
                r.draft, r.draft_conf = truth, [1.0] * len(truth)
                step[0] += 1

    llm.engine.drafter.propose = steered
    got = staggered(llm.engine, prompts(), SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [r.output_ids for r in got] == [want[tuple(p)] for p in prompts()]
    st = llm.engine.stats()
    assert 0 < st["spec_accepted_tokens"] < st["spec_draft_tokens"] and st["spec_mean_accepted_length"] > 1
