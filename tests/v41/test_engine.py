"""DeepSeek-V4.1 through the engine (v41/served.py, v41/cache.py): greedy tokens equal the reference
forward's (V41Transformer with a ModelState, checked against transformers' deepseek_v41 in
test_model_oracle.py / test_loader_oracle.py), and batching, chunked prefill, prefix-cache hits and
preemption change no token, Engram layers included; what is not built is refused by name."""
from __future__ import annotations

import copy

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.engine.capacity import Sizes
from dayzero.engine.engine import Engine, EngineArgs
from dayzero.v41.cache import bytes_per_token, fixed_bytes_per_sequence, v41_cache_groups
from dayzero.v41.served import load_served
from dayzero.v41.toy import TEXT, write_toy
from tests.engine.helpers import staggered
from tests.v41.ckpt import one_thread  # noqa: F401  (autouse: small forwards on one thread)

# the toy's schedule (sliding, a pooled group, a ratio-1 candidate group, Engram on layers 1 and 3), and
# four pooled groups + a ratio-1 candidate group without Engram
SCHEDULES = {
    "engram": {},
    "no-engram": dict(compress_ratios=[2, 2, 2, 2, 2, 2, 1, 1], kv_source_layer_ids=[0, 2, 4, 6],
                      index_source_layer_ids=[0, 2, 4, 6, 7], candidate_source_layer_id=6, engram_layer_ids=[]),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def prompts(seed=0, lengths=(5, 23, 40, 17, 37, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 310, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=list(SCHEDULES))
def ckpt(request, tmp_path_factory):
    text = copy.deepcopy(TEXT)
    text.update(SCHEDULES[request.param])
    return write_toy(tmp_path_factory.mktemp(f"v41-{request.param}") / "m", text=text)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_served(ckpt, torch.float32, torch.device("cpu"))


def engine(model, **opts) -> Engine:
    return Engine(model, EngineArgs(ops="ref", **opts), torch.device("cpu"))


@torch.no_grad()
def reference_greedy(model, prompt, n, bounded_replay: bool = False):
    """The reference forward: the prompt in one call (opt-in bounded replay), then one token per call."""
    v41 = model.model
    state = v41.new_state()
    logits = v41(torch.tensor([prompt]), state, bounded_replay=bounded_replay)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = v41(torch.tensor([[out[-1]]]), state)[0, -1]
    return out


@pytest.fixture(scope="module")
def want(model):
    return [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts()]


def test_cache_groups_page_one_pool_per_source(model):
    args = model.v41
    groups = {g.name: g for g in v41_cache_groups(args, 16)}
    sources = [layer for layer in args.layers if layer.is_kv_source]
    assert groups["window"].layers == tuple(range(args.n_layers)) and groups["window"].keep == "window"
    for layer in sources:
        ent = groups[f"entries L{layer.layer_id}"]
        assert ent.layers == (layer.layer_id,) and ent.keep == "all" and ent.ratio == layer.compress_ratio
        assert set(ent.kinds) == {"c:ent", "c:key"} and ent.per_block == 16 // layer.compress_ratio
        assert (f"rows L{layer.layer_id}" in groups) == layer.pooled
    assert ("engram" in groups) == bool(args.engram_layer_ids)
    with pytest.raises(ValueError, match=r"block_size 15 must be a multiple of every compression ratio \(\[1, 2\]\)"):
        v41_cache_groups(args, 15)
    # bytes per token: (head_dim + index_head_dim) x 4 B (fp32) per source over its ratio
    assert bytes_per_token(args, torch.float32) == sum((64 + 32) * 4 / s.compress_ratio for s in sources)
    assert fixed_bytes_per_sequence(args, torch.float32) > args.n_layers * 3 * 64 * 4


def test_llm_generates_the_reference_greedy_tokens(ckpt, model, want):
    llm = LLM(ckpt, ops="ref", max_num_batched_tokens=256)
    outs = llm.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == want
    st = llm.engine.stats()
    assert st["spec_method"] is None and st["graphs"] == {"off": "not a CUDA device"}
    assert st["fixed_bytes_per_sequence"] == fixed_bytes_per_sequence(model.v41, torch.float32)
    # LLM.score: one full forward of the same weights; its argmax at the prompt's end is the first token
    p = prompts()[1]
    assert int(llm.score(p)[-1].argmax()) == want[1][0]


@pytest.mark.parametrize("ckpt", ["engram"], indirect=True)
def test_the_engram_history_round_trips_exactly(model):
    e = engine(model)
    pool = e.pools.tensors[("engram", "engram:tok")]
    assert pool.dtype == torch.int64
    big = 2**24 + 1  # not representable in fp32 or bf16
    from dayzero.cache.paged import PagedBatchCache
    assert e.kv.allocate("x", 4)
    cache = PagedBatchCache(e.pools, [e.kv.table("x")], [0], torch.device("cpu"))
    seq, pos = torch.zeros(2, dtype=torch.long), torch.tensor([0, 3])
    cache.write(-1, "engram:tok", seq, pos, torch.tensor([big, 7]))
    assert cache.read(-1, "engram:tok", seq, pos).tolist() == [big, 7]


def test_batching_and_chunked_prefill_change_no_token(model, want):
    for opts in (dict(max_num_batched_tokens=7), dict(max_num_batched_tokens=37, max_num_seqs=2),
                 dict(max_num_batched_tokens=19, block_size=4)):
        assert [r.output_ids for r in staggered(engine(model, **opts), prompts(), GREEDY)] == want, opts


def run(e: Engine, rid: str, prompt, params=GREEDY) -> list[int]:
    r = e.add_request(rid, prompt, params)
    while not r.finished:
        e.step()
    return r.output_ids


def test_prefix_cache_hits_change_no_token(model, want):
    e = engine(model, max_num_batched_tokens=64)
    first = prompts()[2]  # 40 tokens
    assert run(e, "a", first) == want[2]
    shared = first[:35] + prompts(seed=1, lengths=(9,))[0]
    hits = e.kv.hits
    got = run(e, "b", shared)
    assert e.kv.hits - hits == 32  # two blocks of 16 tokens taken from the first request
    assert got == reference_greedy(model, shared, GREEDY.max_tokens)


def test_preemption_changes_no_token(model, want):
    probe = engine(model, max_num_batched_tokens=64, max_num_seqs=6)
    z = Sizes(probe.groups, probe.args, model.compute_dtype, probe.block_size, 64)
    tight = engine(model, max_num_batched_tokens=64, max_num_seqs=6,
                   kv_cache_memory_bytes=z.needed(6) + 4 * z.per_entry_block)
    assert [r.output_ids for r in staggered(tight, prompts(), GREEDY, every=1)] == want
    assert tight.scheduler.num_preemptions > 0


def test_seeded_sampling_is_batch_invariant(model):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, seed=7, ignore_eos=True)
    e = engine(model)
    alone = [run(e, f"alone{i}", p, params) for i, p in enumerate(prompts()[:3])]
    crowd = [r.output_ids for r in staggered(engine(model, max_num_batched_tokens=11), prompts()[:3], params)]
    assert crowd == alone


@pytest.mark.parametrize("opts, match", [
    # speculation on a checkpoint without DSpark stages (with them: tests/v41/test_dspark.py)
    (dict(num_speculative_tokens=1), "this checkpoint has neither an MTP module nor a DSpark drafter"),
    (dict(speculative_config={"method": "dspark"}), "this checkpoint has no DSpark drafter"),
    # ranks (TP, TP + EP, DP-attention + EP) and cpu_experts: tests/distributed/test_v41_{ranks,dp}.py
    (dict(kv_cache_dtype="fp8"), r"kv_cache_dtype='fp8': DeepSeek-V4.1's cache has no packed FP8 rows"),
    (dict(numerics="official"), r"numerics='official': DeepSeek-V4.1 runs with numerics='transformers' only"),
])
def test_what_is_not_built_is_refused_by_name(ckpt, opts, match):
    with pytest.raises(ValueError, match=match):
        LLM(ckpt, **opts)


def test_recorded_steps_are_refused_by_name(model):
    e = engine(model)
    with pytest.raises(ValueError, match=r"recorded steps \(trace\): DeepSeek-V4.1: .* not built"):
        e.use_graphs("trace")
    with pytest.raises(ValueError, match="this checkpoint has neither an MTP module nor a DSpark drafter"):
        engine(model, num_speculative_tokens=1)


@pytest.mark.parametrize("ckpt", ["engram"], indirect=True)
def test_cli_generate_runs_v41(ckpt, capsys):
    from dayzero.cli import main
    assert main(["generate", "--model", str(ckpt), "--token-ids", "6,7,8", "--max-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("ckpt", ["engram"], indirect=True)
def test_bf16_compute_matches_the_bf16_reference(ckpt):
    """bf16 pools (window, entries, keys) beside fp32 pooling rows and int64 token ids."""
    bf16 = load_served(ckpt, torch.bfloat16, torch.device("cpu"))
    e = engine(bf16, max_num_batched_tokens=7)
    assert e.pools.tensors[("window", "kv")].dtype == torch.bfloat16
    assert e.pools.tensors[("rows L2", "c:rows")].dtype == torch.float32
    want = [reference_greedy(bf16, p, 6) for p in prompts()[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert [r.output_ids for r in staggered(e, prompts()[:4], params)] == want
