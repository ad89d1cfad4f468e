"""The engine's memory (engine/capacity.py): the derived budget and max_num_seqs, the bounded
reserve, the errors that name the setting, the rows' dtype, no unread weight copies."""
import re

import pytest
import torch
from safetensors.torch import save_file

from dayzero import LLM, SamplingParams
from dayzero.cache.spec import cache_groups, fixed_bytes_per_sequence
from dayzero.engine import capacity
from dayzero.engine.capacity import DEFAULT_MAX_NUM_SEQS, Memory, Sizes, derived_budget, plan
from dayzero.engine.engine import Engine, EngineArgs
from dayzero.reference.attention import Compressor
from dayzero.reference.layers import Linear
from dayzero.synthetic import random_model
from dayzero.testing import tiny_args

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BS, TOKENS = 16, 64


def sizes(args=None, dtype=torch.float32, fp32_rows=True):
    args = args or tiny_args("flash")
    groups = cache_groups(args, BS, with_mtp=False, fp32_rows=fp32_rows)
    return args, groups, Sizes(groups, args, dtype, BS, TOKENS)


def run_plan(budget, seqs=None, given=True, args=None, source="test"):
    args, groups, _ = sizes(args)
    return plan(groups, args, torch.float32, BS, budget, source, seqs, TOKENS, budget_given=given)


# ---- the split -------------------------------------------------------------------------------------
def test_derived_max_num_seqs_is_what_half_the_budget_holds():
    _, _, z = sizes()
    big = run_plan(100 * z.needed(DEFAULT_MAX_NUM_SEQS))
    assert big.max_num_seqs == DEFAULT_MAX_NUM_SEQS and not big.lowered
    budget = 2 * 5 * z.per_seq + z.per_seq // 2  # half of it holds the rows of 5 sequences
    small = run_plan(budget)
    assert small.max_num_seqs == 5 and small.lowered
    assert small.rows_bytes + small.entries_bytes <= budget
    assert small.max_tokens >= 2 * BS


def test_given_max_num_seqs_is_kept_when_it_fits():
    _, _, z = sizes()
    cap = run_plan(z.needed(40), seqs=40)
    assert cap.max_num_seqs == 40 and not cap.lowered


def test_reserve_is_bounded_by_the_budget_not_doubled():
    args, groups, z = sizes()
    roomy = run_plan(100 * z.needed(DEFAULT_MAX_NUM_SEQS))
    assert roomy.reserve_seqs == DEFAULT_MAX_NUM_SEQS  # at most max_num_seqs sequences' worth
    tight = run_plan(z.needed(8) + 3 * z.per_seq, seqs=8)
    assert tight.reserve_seqs * z.per_seq <= tight.budget // 8
    running = capacity.bounded_blocks(groups, args, BS, 8, TOKENS)
    for name, n in running.items():  # the running sequences' blocks always; the reserve on top
        assert tight.num_blocks[name] >= n
    assert tight.rows_bytes + tight.entries_bytes <= tight.budget


def test_derived_budget_never_exceeds_what_the_sequences_can_use():
    args = tiny_args("flash", max_seq_len=4096)
    cap = run_plan(10**12, given=False, args=args)
    per_seq_blocks = -(-(args.max_seq_len + 1) // BS)
    assert cap.max_tokens == cap.max_num_seqs * per_seq_blocks * BS
    assert cap.entries_bytes < 10**9
    given = run_plan(10**10, given=True, args=args)  # a budget the user gives is used whole
    assert given.max_tokens > 2 * cap.max_tokens


# ---- errors name the setting, what it needs, values that work ----------------------------------------
def test_max_num_seqs_that_does_not_fit_names_what_would():
    _, _, z = sizes()
    budget = z.needed(6) + z.per_seq // 2
    with pytest.raises(ValueError) as e:
        run_plan(budget, seqs=10)
    msg = str(e.value)
    assert f"kv_cache_memory_bytes={budget} leaves no room for max_num_seqs=10" in msg
    assert f"needs at least {z.needed(10)} bytes" in msg
    assert "max_num_seqs <= 6 fits it" in msg and f"kv_cache_memory_bytes >= {z.needed(10)}" in msg
    assert run_plan(budget, seqs=6).max_num_seqs == 6  # the values it names work
    assert run_plan(z.needed(10), seqs=10).max_num_seqs == 10


def test_no_room_for_one_sequence_names_the_budget_that_would_fit():
    _, _, z = sizes()
    with pytest.raises(ValueError, match=rf"kv_cache_memory_bytes=1000 leaves no room for one sequence.*"
                                         rf"kv_cache_memory_bytes >= {z.needed(1)}"):
        run_plan(1000)
    mem = Memory("MemAvailable", 2 * 2**30, 16 * 2**30, to_page_in=2 * 2**30)
    budget, source = derived_budget([mem])
    with pytest.raises(ValueError, match=r"the memory free for the cache \(0.00 GB: MemAvailable.*mapped weights.*"
                                         r"kv_cache_memory_bytes >= \d+"):
        run_plan(budget, given=False, source=source)
    assert budget == 0 and "margin" in source


def test_step_chunk_is_named_when_it_is_what_does_not_fit():
    args, groups, z = sizes()
    huge = Sizes(groups, args, torch.float32, BS, 4096)
    with pytest.raises(ValueError, match="max_num_batched_tokens=4096 alone takes"):
        plan(groups, args, torch.float32, BS, huge.needed(1) - 1, "test", None, 4096, budget_given=True)


def test_engine_error_names_max_num_seqs(make_ckpt):
    ckpt = make_ckpt("flash", "fp32")
    probe = LLM(ckpt, num_speculative_tokens=0, max_num_seqs=2)
    e = probe.engine
    z = Sizes(e.groups, e.args, probe.model.compute_dtype, e.block_size, e.eargs.max_num_batched_tokens)
    with pytest.raises(ValueError, match=rf"max_num_seqs=12: it needs at least {z.needed(12)} bytes.*"
                                         rf"max_num_seqs <= 3 fits it"):
        LLM(ckpt, num_speculative_tokens=0, max_num_seqs=12, kv_cache_memory_bytes=z.needed(3))


# ---- the machine --------------------------------------------------------------------------------------
def test_memory_budget_arithmetic():
    G = 2**30
    one = Memory("MemAvailable", 20 * G, 24 * G, to_page_in=4 * G)
    assert one.margin == 24 * G // 10 and one.budget == 20 * G - 4 * G - 24 * G // 10
    two = Memory("MemAvailable", 20 * G, 24 * G, to_page_in=2 * G, share=2)  # two local ranks, each half
    assert two.budget == (20 * G - 4 * G - two.margin) // 2
    short = Memory("MemAvailable", 3 * G, 24 * G)  # short of memory: the margin takes at most half
    assert short.budget == 3 * G // 2
    assert derived_budget([one, two])[0] == two.budget  # every rank gets the smallest rank's pools
    assert derived_budget([one, None])[0] == capacity.FALLBACK_BUDGET


def test_a_checkpoint_larger_than_memory_leaves_half_to_the_streamed_experts():
    """Routed experts read in place stream from disk when the checkpoint does not fit: the other
    weights count in full, the memory they leave is split between the experts' page cache and the
    cache; a checkpoint that fits counts all its mapped bytes, streamed or not."""
    G = 2**30
    fits = Memory("MemAvailable", 20 * G, 24 * G, to_page_in=8 * G, streamed=7 * G)
    assert fits.page_in == 8 * G and fits.budget == Memory("MemAvailable", 20 * G, 24 * G, to_page_in=8 * G).budget
    big = Memory("MemAvailable", 20 * G, 24 * G, to_page_in=36 * G, streamed=34 * G)
    room = 20 * G - 2 * G - capacity.margin(24 * G, 18 * G)
    assert big.page_in == 2 * G + room // 2 and big.budget > 7 * G
    assert Memory("MemAvailable", 20 * G, 24 * G, to_page_in=36 * G).budget == 0  # experts not streamed: no room
    assert "experts stream from disk" in big.describe()


def test_meminfo_and_file_backed_bytes(tmp_path):
    info = capacity.meminfo()
    assert 0 < info["MemAvailable"] <= info["MemTotal"]
    save_file({"w": torch.randn(1 << 18)}, str(tmp_path / "w.safetensors"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt", device="cpu") as f:
        mapped = f.get_tensor("w")
    anon = torch.randn(1 << 18)
    assert capacity.file_backed(capacity.tensor_spans([mapped])) == mapped.numel() * 4
    assert capacity.file_backed(capacity.tensor_spans([anon])) == 0
    assert capacity.tensor_spans([anon, anon[10:20]]) == capacity.tensor_spans([anon])  # views count once


# ---- the engine ---------------------------------------------------------------------------------------
def test_engine_defaults_and_stats(make_ckpt, capsys):
    llm = LLM(make_ckpt("flash", "fp32"), num_speculative_tokens=0)
    line = capsys.readouterr().err
    assert re.search(r"dayzero: memory: weights [\d.]+ GB, cache [\d.]+ GB = window and compressor rows .* "
                     r"\+ compressed entries [\d.]+ GB \(\d+ tokens\); budget [\d.]+ GB from MemAvailable", line)
    s = llm.engine.stats()
    assert s["max_num_seqs"] == DEFAULT_MAX_NUM_SEQS and llm.engine.eargs.max_num_seqs is None
    assert s["cache_rows_bytes"] + s["cache_entries_bytes"] == s["kv_cache_bytes"] > 0
    assert s["weight_bytes"] > 0 and "MemAvailable" in s["kv_cache_budget_source"]
    assert s["kv_cache_bytes"] <= s["kv_cache_budget"]
    assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids


def test_lowered_max_num_seqs_says_so(make_ckpt, capsys):
    ckpt = make_ckpt("flash", "fp32")
    probe = LLM(ckpt, num_speculative_tokens=0, max_num_seqs=1)
    e = probe.engine
    z = Sizes(e.groups, e.args, probe.model.compute_dtype, e.block_size, e.eargs.max_num_batched_tokens)
    capsys.readouterr()
    llm = LLM(ckpt, num_speculative_tokens=0, kv_cache_memory_bytes=z.needed(1) + 8 * z.per_seq)
    err = capsys.readouterr().err
    n = llm.engine.max_num_seqs
    assert 1 <= n < DEFAULT_MAX_NUM_SEQS and n * z.per_seq <= llm.engine.capacity.budget // 2
    assert f"dayzero: max_num_seqs={n} (not {DEFAULT_MAX_NUM_SEQS})" in err
    outs = llm.generate([[5, 6, 7], [8, 9], [1, 2, 3, 4]], GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in probe.generate([[5, 6, 7], [8, 9], [1, 2, 3, 4]],
                                                                               GREEDY)]


# ---- compressor rows in the compute dtype where the numerics allow it ------------------------------------
@pytest.mark.parametrize("numerics, dtype, want", [
    ("official", torch.bfloat16, torch.float32),  # DeepSeek's reference keeps fp32 compressor state
    ("transformers", torch.bfloat16, torch.bfloat16),  # transformers keeps it in the model dtype
    ("transformers", torch.float32, torch.float32),
])
def test_compressor_rows_dtype(numerics, dtype, want):
    args = tiny_args("flash", n_mtp_layers=0)
    model = random_model(args, numerics=numerics, compute_dtype=dtype)
    eng = Engine(model, EngineArgs(max_num_seqs=2, max_num_batched_tokens=64, kv_cache_memory_bytes=8 * 2**20, ops="ref"), torch.device("cpu"))
    rows = [t for (g, kind), t in eng.pools.tensors.items() if kind.startswith("rows:")]
    assert rows and all(t.dtype == want for t in rows)
    assert eng.stats()["fixed_bytes_per_sequence"] == fixed_bytes_per_sequence(
        args, dtype, fp32_rows=want == torch.float32)
    # the engine over paged rows gives the reference's logits (which keeps rows in the same dtype)
    ids = [3, 9, 27, 81, 243 % args.vocab_size, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]
    eng.add_request("a", ids, SamplingParams(temperature=0.0, max_tokens=1, logprobs=0))
    while eng.has_unfinished():
        eng.step()
    tok = eng.requests["a"].output_ids[0]
    ref = model(torch.tensor([ids]))[0, -1].float()
    assert tok == int(ref.argmax())


def test_fp32_rows_cost_twice_bf16_rows():
    args = tiny_args("flash")
    f32 = fixed_bytes_per_sequence(args, torch.bfloat16, fp32_rows=True)
    b16 = fixed_bytes_per_sequence(args, torch.bfloat16, fp32_rows=False)
    window = args.n_layers * (args.window_size - 1) * args.head_dim * 2
    assert f32 - window == 2 * (b16 - window)


# ---- no weight copy the op table does not read --------------------------------------------------------
def test_no_fp32_copies_of_bf16_linears_the_kernel_reads(make_ckpt):
    from dayzero.ops import cpu
    if cpu.unavailable():
        pytest.skip(f"native CPU kernels unavailable: {cpu.unavailable()}")
    ckpt = make_ckpt("flash", "fp8")  # bf16 head, compressor and indexer projections beside FP8/FP4 linears
    llm = LLM(ckpt, ops="cpu", num_speculative_tokens=0)  # fp32 compute: fp32_linear reads the bf16 weights
    model = llm.model
    dense = [m for m in model.modules() if isinstance(m, Linear) and m.fmt == "dense"]
    assert dense and all(m.weight.dtype == torch.bfloat16 for m in dense)
    assert all(m.__dict__.get("_dequantized") is None for m in dense)
    assert model.__dict__.get("_head_f32") is None
    assert all(m._wkv_wgate.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, Compressor))
    ps = [[5, 6, 7, 8], [9, 10]]
    want = [o.token_ids for o in llm.generate(ps, GREEDY)]
    before = llm.engine.worker.nbytes()["weight_bytes"]
    for m in dense:  # what was kept before: fp32 copies the forward never reads
        m.keep_dequantized(torch.float32)
    assert llm.engine.worker.nbytes()["weight_bytes"] - before == sum(m.weight.numel() * 4 for m in dense)
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == want
