"""The public API (DESIGN.md): LLM(...).generate / .score, SamplingParams."""
import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.engine.sampling import filter_logits


@pytest.fixture(scope="module")
def llm(make_ckpt):
    return LLM(make_ckpt("flash", "fp8", tokenizer=True))


def test_greedy_generation_is_argmax_of_full_recompute(llm):
    prompt = list(range(5, 30))
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(llm.score(seq)[-1].argmax()))
    assert out.token_ids == seq[len(prompt):]
    assert out.finish_reason == "length" and out.prompt_token_ids == prompt


def test_score_shape_and_dtype(llm):
    logits = llm.score([3, 4, 5, 6])
    assert logits.shape == (4, llm.args.vocab_size) and logits.dtype == torch.float32


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    p = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, ignore_eos=True)
    a = llm.generate([[7, 8, 9]], SamplingParams(seed=1, **p))[0].token_ids
    b = llm.generate([[1, 2], [7, 8, 9]], SamplingParams(seed=1, **p))[1].token_ids  # other prompts beside
    c = llm.generate([[7, 8, 9]], SamplingParams(seed=2, **p))[0].token_ids
    assert a == b and a != c


def test_text_prompts_stop_strings_and_logprobs(llm):
    out = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                          ignore_eos=True))[0]
    assert out.prompt_token_ids[0] == 0  # BOS from the tokenizer
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) <= 4 and all(v <= 0 for v in lp.values())
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token
    if len(out.text) > 2:
        stop = out.text[1:3]
        cut = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=6, stop=stop,
                                                             ignore_eos=True))[0]
        assert cut.finish_reason == "stop" and cut.text == out.text[:out.text.index(stop)]


def test_stop_token_ids_and_eos(llm):
    greedy = llm.generate([[11, 12, 13]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    target = greedy.token_ids[3]
    first = greedy.token_ids.index(target)
    out = llm.generate([[11, 12, 13]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[target]))[0]
    assert out.token_ids == greedy.token_ids[:first + 1] and out.finish_reason == "stop"


def test_stream_yields_each_token(llm):
    seen = [tok for tok, _ in llm.stream([4, 5, 6], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))]
    assert seen == llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].token_ids


def test_token_id_prompts_work_without_a_tokenizer(make_ckpt):
    bare = LLM(make_ckpt("mixed", "fp32"), numerics="transformers")
    assert bare.tokenizer is None
    assert len(bare.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    with pytest.raises(ValueError, match="no tokenizer.json"):
        bare.generate("hello")


@pytest.mark.parametrize("prompt, msg", [([], "empty prompt"), ([5, 10**6], "not an id"), ([1, -1], "not an id"),
                                         ([1.5], "not an id")])
def test_bad_prompts_are_rejected(llm, prompt, msg):
    with pytest.raises(ValueError, match=msg):
        llm.generate([prompt])


@pytest.mark.parametrize("kw, field", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                       ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"),
                                       ({"seed": -3}, "seed"), ({"stop": [""]}, "stop"),
                                       ({"logprobs": -1}, "logprobs"), ({"min_p": 2}, "min_p")])
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)


def test_llm_argument_errors(make_ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown built-in model"):
        from dayzero.builtin import builtin_path
        builtin_path("nonesuch")
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) \['max_batch'\]"):
        LLM(make_ckpt("mixed", "fp32"), max_batch=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(make_ckpt("mixed", "fp32"), max_num_seqs=0)
    with pytest.raises(ValueError, match="block_size 12 must be a multiple"):
        LLM(make_ckpt("mixed", "fp32"), block_size=12)
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=1000 leaves no room"):
        LLM(make_ckpt("mixed", "fp32"), kv_cache_memory_bytes=1000)
    with pytest.raises(ValueError, match="dtype"):
        LLM(make_ckpt("mixed", "fp32"), dtype="int3")
    with pytest.raises(ValueError, match="numerics"):
        LLM(make_ckpt("mixed", "fp32"), numerics="fast")
    with pytest.raises(ValueError, match="does not exist"):
        LLM(tmp_path / "nowhere")


def test_no_model_means_the_builtin_model():
    from dayzero.builtin import builtin_path

    llm = LLM()
    assert llm.tokenizer is not None and llm.args.n_mtp_layers == 1
    assert llm.args == LLM("shakespeare").args == LLM(builtin_path()).args


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    p = SamplingParams(temperature=1.0, top_k=2)
    assert torch.isinf(filter_logits(logits, p)[2:]).all()
    probs = logits.softmax(0)
    keep = SamplingParams(temperature=1.0, top_p=float(probs[0] + probs[1]) - 1e-4)
    assert torch.isfinite(filter_logits(logits, keep)).tolist() == [True, True, False, False]
    minp = SamplingParams(temperature=1.0, min_p=0.3)  # keeps tokens with p >= 0.3 * p_max
    assert torch.isfinite(filter_logits(logits, minp)).tolist() == [True, True, False, False]
