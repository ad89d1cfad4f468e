"""DeepSeek-V4.1's opt-in bounded replay through the engine (EngineArgs.v41_bounded_replay): the engine's
tokens are the reference's `forward(..., bounded_replay=True)` then token-by-token decode; batching,
chunked prefill and preemption change no token; a prompt inside the window is the exact prefill; the
decoder layers really skip rows; prefix hits follow docs/V41.md's rule (a bounded request's hit capped at
its own floor, bounded blocks named apart from exact ones); the option is refused for DeepSeek-V4."""
from __future__ import annotations

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.engine.capacity import Sizes
from dayzero.engine.engine import Engine, EngineArgs
from dayzero.v41.replay import decoder_layers, replay_start
from dayzero.v41.served import load_served
from dayzero.v41.toy import write_toy
from tests.engine.helpers import staggered
from tests.v41.ckpt import one_thread  # noqa: F401  (autouse: small forwards on one thread)
from tests.v41.test_engine import GREEDY, prompts, reference_greedy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("v41-replay") / "m")  # window 4, decoder layers 6-7, Engram on 1, 3


@pytest.fixture(scope="module")
def model(ckpt):
    return load_served(ckpt, torch.float32, torch.device("cpu"))


def engine(model, **opts) -> Engine:
    return Engine(model, EngineArgs(ops="ref", v41_bounded_replay=True, **opts), torch.device("cpu"))


def reference_bounded(model, prompt, n):
    """The reference: the prompt in one bounded-replay call, then one token per call (the same state)."""
    return reference_greedy(model, prompt, n, bounded_replay=True)


@pytest.fixture(scope="module")
def want(model):
    return [reference_bounded(model, p, GREEDY.max_tokens) for p in prompts()]


def run(e: Engine, rid: str, prompt, params=GREEDY) -> list[int]:
    r = e.add_request(rid, prompt, params)
    while not r.finished:
        e.step()
    return r.output_ids


def test_llm_generates_the_bounded_reference_tokens_and_scores_exactly(ckpt, model, want):
    assert model.v41.window_size == 4 and min(len(p) for p in prompts()) > 4  # every prompt has a floor > 0
    llm = LLM(ckpt, ops="ref", max_num_batched_tokens=256, v41_bounded_replay=True)
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY)] == want
    # LLM.score stays the exact full forward (no NaN rows): the dropped rows have no logits under replay
    p = prompts()[2]
    with torch.no_grad():
        exact = model.model(torch.tensor([p]))[0]
    got = llm.score(p)
    assert not got.isnan().any() and torch.equal(got, exact)


def test_batching_chunked_prefill_and_preemption_change_no_token(model, want):
    for opts in (dict(max_num_batched_tokens=7), dict(max_num_batched_tokens=37, max_num_seqs=2),
                 dict(max_num_batched_tokens=19, block_size=4)):
        assert [r.output_ids for r in staggered(engine(model, **opts), prompts(), GREEDY)] == want, opts
    probe = engine(model, max_num_batched_tokens=64, max_num_seqs=6)
    z = Sizes(probe.groups, probe.args, model.compute_dtype, probe.block_size, 64)
    tight = engine(model, max_num_batched_tokens=64, max_num_seqs=6,
                   kv_cache_memory_bytes=z.needed(6) + 4 * z.per_entry_block)
    assert [r.output_ids for r in staggered(tight, prompts(), GREEDY, every=1)] == want
    assert tight.scheduler.num_preemptions > 0  # recomputed with the floor of the original prompt


def test_a_prompt_inside_the_window_is_the_exact_prefill(model):
    short = [p[:n] for p, n in zip(prompts(seed=3), (1, 2, 3, 4))]
    got = [r.output_ids for r in staggered(engine(model, max_num_batched_tokens=3), short, GREEDY)]
    assert got == [reference_greedy(model, p, GREEDY.max_tokens) for p in short]


def test_decoder_layers_skip_the_rows_below_the_floor_and_the_tokens_differ(model, want):
    seen: dict[int, int] = {}

    def hook(block, inputs, _):
        seen[block.layer_id] = seen.get(block.layer_id, 0) + inputs[0].shape[0]
    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        run(engine(model, max_num_batched_tokens=64), "a", prompts()[2], SamplingParams(temperature=0.0, max_tokens=1))
    finally:
        for h in handles:
            h.remove()
    skipped = list(decoder_layers(model.v41))
    assert skipped == [6, 7]
    # a 40-token prompt in one step: every layer up to the last KV source on 40 rows, the decoder layers on 4
    assert seen == {i: (4 if i in skipped else 40) for i in range(model.v41.n_layers)}
    exact = [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts()]
    assert exact != want  # the approximation changes some greedy continuation of these random weights


def test_a_sampled_row_below_a_floor_is_refused(model):
    e = engine(model)
    n = 12
    assert e.kv.allocate("x", n)
    ids = list(range(6, 6 + n))
    with pytest.raises(RuntimeError, match="bounded replay: a sampled row is below its sequence's replay floor"):
        e.worker.forward(ids, [0], [n], [e.kv.table("x")], [0], [3], floors=[replay_start(n, 4)])
    got = e.worker.forward(ids, [0], [n], [e.kv.table("x")], [0], [n - 1], floors=[8])
    assert got.shape == (1, model.v41.vocab_size) and not got.isnan().any()


def test_prefix_hits_are_capped_at_the_floor_and_named_apart(model, want):
    e = engine(model, max_num_batched_tokens=64)
    first = prompts()[2]  # 40 tokens, floor 36
    assert run(e, "a", first) == want[2]  # 50 tokens computed: blocks 0..2 (48 tokens) named
    # an exact chain finds none of them: a request without a floor never takes a bounded prefill's blocks
    assert e.kv.probe_prefix(first + [7, 8, 9]) == 0
    shared = first + prompts(seed=1, lengths=(9,))[0]  # 49 tokens, floor 45: 3 blocks cached, the cap takes 2
    hits = e.kv.hits
    assert run(e, "b", shared) == reference_bounded(model, shared, GREEDY.max_tokens)
    assert e.kv.hits - hits == 32 == (replay_start(len(shared), 4) // 16) * 16
    short = first[:33] + [9]  # 34 tokens, floor 30: one block (16) of "a"'s
    hits = e.kv.hits
    assert run(e, "c", short) == reference_bounded(model, short, GREEDY.max_tokens)
    assert e.kv.hits - hits == 16


def test_the_option_is_refused_for_deepseek_v4_by_name(make_ckpt):
    v4 = make_ckpt("flash", mtp=0)
    with pytest.raises(ValueError, match=r"v41_bounded_replay=True: .* this is a DeepSeek-V4 model"):
        LLM(v4, ops="ref", v41_bounded_replay=True)
    from dayzero.loader.model_io import load_model
    with pytest.raises(ValueError, match=r"v41_bounded_replay=True: .* this is a DeepSeek-V4 model"):
        Engine(load_model(v4, device=torch.device("cpu")), EngineArgs(ops="ref", v41_bounded_replay=True),
               torch.device("cpu"))
    with pytest.raises(ValueError, match="v41_bounded_replay: must be True or False, got 'yes'"):
        EngineArgs(v41_bounded_replay="yes")


def test_the_cli_flag_reaches_the_engine(make_ckpt, capsys):
    from dayzero.cli import build_parser, main
    v4 = make_ckpt("flash", mtp=0)
    # generate: the flag becomes the engine option (a V4 checkpoint refuses it by name), off by default
    assert main(["generate", "--model", str(v4), "--token-ids", "6,7", "--max-tokens", "1", "--v41-bounded-replay"]) == 2
    assert "v41_bounded_replay=True: " in capsys.readouterr().err
    assert not build_parser().parse_args(["generate", "--token-ids", "6"]).v41_bounded_replay
    # serve: the same flag, off by default
    assert build_parser().parse_args(["serve", "--v41-bounded-replay"]).v41_bounded_replay
    assert not build_parser().parse_args(["serve"]).v41_bounded_replay
