"""The engine on the Triton op table computes the same model as on the twins (on the CPU the
kernels run in the Triton interpreter; on a GPU the same test runs the compiled kernels)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero import LLM, SamplingParams
from dayzero.ops import OP_NAMES, REF, for_device

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
# chunked prefill + MTP drafts exercise the paged path (kernels read the pools through row ids)
ENGINE = dict(device=DEV, max_num_batched_tokens=16, num_speculative_tokens=1,
              speculative_config={"draft_policy": "fixed"}, speculative_min_acceptance=0.0)


def rel(a, b):
    return (a - b).abs().amax(-1) / a.abs().amax(-1)


@pytest.fixture(scope="module")
def tiny_fp32(make_ckpt):
    """FP8/FP4 random tiny checkpoint computed in fp32: kernels and twins differ only by
    summation order, so results must agree to fp32 rounding and tokens exactly."""
    ckpt = make_ckpt("flash", "fp8")
    opts = dict(ENGINE, dtype="float32", numerics="transformers")
    return LLM(ckpt, ops="ref", **opts), LLM(ckpt, ops="triton", **opts)


@pytest.fixture(scope="module")
def builtin_bf16():
    """The built-in (trained) model as users run it on a GPU: bf16, official numerics."""
    opts = dict(ENGINE, dtype="bfloat16", numerics="official")
    return LLM(ops="ref", **opts), LLM(ops="triton", **opts)


def test_triton_table_is_chosen_and_complete(tiny_fp32):
    ref_llm, tri_llm = tiny_fp32
    assert ref_llm.engine.ops is REF
    table = tri_llm.engine.ops
    assert table.name == "triton" and table == for_device(DEV, "triton")
    # a missing kernel module would leave a twin here: every op has a Triton kernel
    assert set(table.kernels) == set(OP_NAMES)
    lin = tri_llm.model.layers[0].attn.wq_a  # kernels keep FP8/FP4 weights quantized
    assert lin.fmt == "fp8" and lin.__dict__.get("_dequantized") is None
    assert "_stacked" in tri_llm.model.layers[0].ffn.__dict__  # FP4 experts stacked for grouped calls


def test_fp32_logits_and_greedy_agree(tiny_fp32):
    ref_llm, tri_llm = tiny_fp32
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 500, (L,), generator=g).tolist() for L in (21, 6)]
    a, b = ref_llm.score(prompts[0]), tri_llm.score(prompts[0])
    assert rel(a, b).max() < 1e-4
    assert [o.token_ids for o in tri_llm.generate(prompts, GREEDY)] == \
        [o.token_ids for o in ref_llm.generate(prompts, GREEDY)]


def test_builtin_bf16_official_agrees(builtin_bf16):
    ref_llm, tri_llm = builtin_bf16
    prompt = "KING LEAR:\nWhat says our second daughter?"
    ids = ref_llm.tokenizer.encode(prompt)
    a, b = ref_llm.score(ids), tri_llm.score(ids)
    # yardstick: how far the same twins move when the model computes in fp32 instead of bf16;
    # the kernels (different summation order, bf16 roundings at other points) must stay within it
    c = LLM(ops="ref", device=DEV, dtype="float32", numerics="official").score(ids)
    noise = rel(a, c).median()
    assert rel(a, b).median() <= 1.5 * noise + 1e-3, (rel(a, b).median(), noise)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    want = ref_llm.generate([prompt], GREEDY)[0].token_ids
    assert tri_llm.generate([prompt], GREEDY)[0].token_ids == want


def test_builtin_bf16_fp8_cache_gives_the_same_tokens():
    """The Triton attention decodes the packed FP8 rows in the key tile; under official numerics
    they hold exactly what the bf16 cache holds, so logprobs and tokens must not move (one prefill
    step past the first CSA and HCA windows, then decode steps over the stored rows)."""
    opts = dict(device=DEV, dtype="bfloat16", numerics="official", max_num_batched_tokens=64,
                num_speculative_tokens=0)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=2)
    prompt = "KING LEAR:\nWhat says our second daughter, our dearest Regan, wife of Cornwall? Speak.\nREGAN:\n"
    want, got = (LLM(ops="triton", kv_cache_dtype=kv, **opts).generate([prompt], params)[0] for kv in ("auto", "fp8"))
    assert len(got.prompt_token_ids) > 32  # r = 32 (HCA) closes an entry
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs


def test_logprobs_bit_identical_alone_batched_chunked(make_ckpt):
    """Batch invariance on the Triton table (issue 20): one request's tokens and logprobs are
    bit-identical alone, beside another request in one batch, and prefilled in 7-token chunks
    beside that request's decode; bf16, official numerics (FP8
    activation and KV rounding: the strictest), FP8/FP4 random tiny checkpoint. Short prompts:
    every step runs the interpreter (tests/ops/test_triton_invariance.py covers the ops' paths)."""
    from tests.engine.helpers import staggered

    ckpt = make_ckpt("flash", "fp8")
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=2)
    g = torch.Generator().manual_seed(5)
    target, other = (torch.randint(2, 500, (n,), generator=g).tolist() for n in (12, 5))
    opts = dict(device=DEV, ops="triton", dtype="bfloat16", numerics="official", num_speculative_tokens=0)
    llm = LLM(ckpt, **opts)
    alone = llm.generate([target], params)[0]
    crowd = llm.generate([other, target], params)[1]
    chunked = LLM(ckpt, max_num_batched_tokens=7, enable_prefix_caching=False, **opts)
    late = staggered(chunked.engine, [other, target], params, every=1)[1]
    want = (alone.token_ids, alone.logprobs)
    assert (crowd.token_ids, crowd.logprobs) == want
    assert (list(late.output_ids), list(late.logprobs)) == want
