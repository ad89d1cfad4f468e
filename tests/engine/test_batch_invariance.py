"""Batch invariance: a request's tokens and logprobs are bit-identical alone, in any batch, with any
prefill chunk, with a prefix-cache hit or after preemption, in both numerics modes, on the native
CPU table (the default on CPUs) and the PyTorch twins (issue 20).

Op level: every op of both tables computes a row with the same bits whichever rows share the call (so the engine level holds by construction; the engine tests below check the whole path,
torch's own elementwise ops and reductions included)."""
import pytest
import torch

from dayzero import LLM, SamplingParams, invariance
from dayzero.engine.capacity import Sizes
from dayzero.ops import OP_NAMES, cases, for_device
from dayzero.ops import cpu as native
from tests.engine.helpers import staggered
from tests.engine.test_engine import prompts, reference_greedy

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ops", ["cpu", "ref"])
def test_ops_compute_a_row_alike_in_any_batch(ops, dtype):
    if ops == "cpu" and not native.available("gemm"):
        pytest.skip("no C compiler: the native table is the twins (tested as 'ref')")
    table = for_device("cpu", ops)
    recs = invariance.op_rows(table, torch.device("cpu"), dtypes=(dtype,))
    assert {r["case"] for r in recs} == set(OP_NAMES) | set(cases.VARIANTS)
    bad = [(r["case"], r["size"], r["differing_blocks"]) for r in recs if not r["invariant"]]
    assert not bad, bad


def _run(llm, reqs, params=PARAMS):
    outs = llm.generate(reqs, params)
    return [(o.token_ids, o.logprobs) for o in outs]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("flash", "fp8", tokenizer=True)


@pytest.mark.parametrize("numerics,dtype,ops", [("official", None, None), ("transformers", None, None),
                                               ("official", "bf16", None), ("official", None, "ref"),
                                               ("transformers", None, "ref")],
                         ids=["official-fp32", "transformers-fp32", "official-bf16", "twins-official",
                              "twins-transformers"])
def test_logprobs_bit_identical_alone_batched_chunked_cached(ckpt, numerics, dtype, ops):
    target, others = prompts()[4], prompts()[:4] + prompts()[5:]
    opts = dict(numerics=numerics, dtype=dtype, num_speculative_tokens=0, ops=ops)
    llm = LLM(ckpt, **opts)
    alone = _run(llm, [target])[0]
    assert llm.engine.ops.name == (ops or ("cpu" if native.available("gemm") else "ref"))
    crowd = _run(llm, others[:2] + [target] + others[2:])[2]  # a prefix-cache hit on the target too
    chunked = LLM(ckpt, max_num_batched_tokens=7, enable_prefix_caching=False, **opts)
    staggered_outs = staggered(chunked.engine, others[:3] + [target] + others[3:], PARAMS)
    late = staggered_outs[3]
    assert crowd == alone
    assert (late.output_ids, late.logprobs) == alone


def test_engine_matches_the_model_in_official_numerics_under_batching_and_preemption(ckpt):
    """The token-equality tests of test_engine.py in official numerics (FP8 activation and KV
    rounding amplify any difference in summation order into different tokens)."""
    model = LLM(ckpt, numerics="official", num_speculative_tokens=0).model
    want = [reference_greedy(model, p, 12) for p in prompts()]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for opts in (dict(max_num_batched_tokens=7), dict(max_num_batched_tokens=37, max_num_seqs=2)):
        llm = LLM(ckpt, numerics="official", num_speculative_tokens=0, **opts)
        assert [r.output_ids for r in staggered(llm.engine, prompts(), greedy)] == want, opts
    probe = LLM(ckpt, numerics="official", max_num_batched_tokens=64, max_num_seqs=6, num_speculative_tokens=0)
    e = probe.engine
    z = Sizes(e.groups, e.args, probe.model.compute_dtype, e.block_size, 64)
    tight = LLM(ckpt, numerics="official", max_num_batched_tokens=64, max_num_seqs=6, num_speculative_tokens=0,
                kv_cache_memory_bytes=z.needed(6) + 7 * z.per_entry_block)
    assert [r.output_ids for r in staggered(tight.engine, prompts(), greedy, every=1)] == want
    assert tight.engine.scheduler.num_preemptions > 0
