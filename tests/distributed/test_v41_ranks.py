"""DeepSeek-V4.1 over tensor parallel (and expert parallel) ranks (gloo, local processes) computes what one
rank computes: the same greedy tokens under staggered arrivals and chunked prefill, full-forward logits
within fp32 rounding of the summation order (the wo_b and MoE partial sums are added over ranks). The toy
has V4.1-Flash's structure (sliding, pooled and ratio-1 groups, a candidate source, Engram on two layers),
FP8 32x32 dense weights and MXFP4 experts, at sizes whose per-rank shares keep the 32-wide blocks whole."""
from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.distributed.layout import Layout, LayoutError
from dayzero.v41.checkpoint import expected_tensors
from dayzero.v41.loader import load_v41, read_v41_args
from dayzero.v41.toy import TEXT, write_toy
from tests.distributed.test_tensor_parallel import _env, _run
from tests.engine.helpers import staggered

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
OPTS = dict(dtype="float32", max_num_batched_tokens=7)  # fp32: rank differences are summation order only
# the toy, with shares of 32 at two ranks: wo_a rows / wo_b columns (o_lora_rank per group), expert inner dim
SIZES = dict(o_lora_rank=32, moe_intermediate_size=64)


def prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 310, (L,), generator=g).tolist() for L in [5, 23, 40, 17, 33][:n]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    text = copy.deepcopy(TEXT)
    text.update(SIZES)
    assert text["engram_layer_ids"]  # Engram on
    return write_toy(tmp_path_factory.mktemp("v41-ranks") / "m", text=text)


@pytest.fixture(scope="module")
def one(ckpt):
    return LLM(ckpt, **OPTS)


def staggered_outputs(llm, ps, every=2):
    reqs = staggered(llm.engine, ps, GREEDY, every)
    for r in reqs:
        llm.engine.release(r.rid)
    return [r.output_ids for r in reqs]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- the layout ----------------------------------------------------------------------------------
def test_impossible_layouts_name_the_field(ckpt):
    args, _ = read_v41_args(ckpt)
    with pytest.raises(LayoutError) as e:
        Layout(4).check(args)  # o_groups = 2
    assert "`o_groups`=2" in str(e.value) and "values that fit it: [1, 2]" in str(e.value)
    # V4.1's FP8 blocks are 32x32: 16 wo_a rows per rank (o_lora_rank 16 at two ranks) cut one
    small = args.replace(o_lora_rank=16)
    with pytest.raises(LayoutError, match=r"`o_groups`=2 .* multiple of 32 \(FP8 32 blocks"):
        Layout(2).check(small)
    Layout(2).check(small.replace(quant=None, expert_dtype=None))  # dense: no block to keep whole
    # the routed experts' MXFP4 32-wide blocks split under TP; whole experts under EP
    with pytest.raises(LayoutError, match=r"`moe_intermediate_size`=32 .* multiple of 32 \(fp4"):
        Layout(2).check(args.replace(moe_inter_dim=32))
    with pytest.raises(LayoutError, match="`n_routed_experts`=3"):
        Layout(2, 0, ep=True).check(args.replace(n_routed_experts=3))
    from dayzero.v41.presets import v41_flash  # as released: o_groups 8, shares of 32 up to 8 ranks
    for ep in (False, True):
        with pytest.raises(LayoutError, match=r"(?s)`o_groups`=8 .*values that fit it.*: \[1, 2, 4, 8\]"):
            Layout(16, 0, ep).check(v41_flash())
        Layout(8, 7, ep).check(v41_flash())
    t = time.monotonic()
    with pytest.raises(LayoutError, match="o_groups"):
        LLM(ckpt, **OPTS, tensor_parallel_size=4)  # before any rank starts
    assert time.monotonic() - t < 5
    # DP-attention + EP (tests/distributed/test_v41_dp.py): the toy's 4 routed experts do not split 3 ways
    with pytest.raises(LayoutError, match=r"(?s)data_parallel_size=3 .*`n_routed_experts`=4.*: \[1, 2, 4\]"):
        LLM(ckpt, **OPTS, data_parallel_size=3, enable_expert_parallel=True)
    with pytest.raises(LayoutError, match="data_parallel_size=2 needs enable_expert_parallel"):
        LLM(ckpt, **OPTS, data_parallel_size=2)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "tp-ep"])
def test_each_rank_reads_only_its_slices(ckpt, ep):
    whole = load_v41(ckpt)
    ranks = [load_v41(ckpt, layout=Layout(2, r, ep)) for r in range(2)]
    plan = ranks[0].shard_plan()
    for name in ("layers.2.attn.wq_b.weight", "layers.2.attn.wq_b.scale", "layers.2.attn.wo_a.scale",
                 "layers.2.attn.wo_b.weight", "layers.2.attn.attn_sink", "layers.2.ffn.shared_experts.w2.scale",
                 "embed.weight", "head.weight"):
        assert name in plan, name
    for name in ("layers.2.attn.wq_a.weight", "layers.2.attn.indexer.wq_b.weight", "layers.1.engram.embed.weight",
                 "layers.2.attn.compressor.wkv.weight", "layers.2.ffn.gate.weight"):
        assert name not in plan, name  # replicated
    assert ("layers.0.ffn.experts.0.w2.weight" in plan) is not ep
    full = whole.state_dict()
    for name, t in full.items():
        parts = [m.state_dict().get(name) for m in ranks]
        if name in plan:
            assert torch.equal(torch.cat(parts, plan[name]).view(torch.uint8), t.view(torch.uint8)), name
        elif ep and ".experts." in name:
            assert sum(p is not None for p in parts) == 1, name  # whole experts, each on exactly one rank
        else:
            assert all(torch.equal(p.view(torch.uint8), t.view(torch.uint8)) for p in parts), name
    assert set(expected_tensors(whole.args, torch.bfloat16)) == set(full)
    split = set(plan) | {n for n in full if ".experts." in n}

    def nbytes(sd):
        return sum(sd[n].numel() * sd[n].element_size() for n in split if n in sd)
    for m in ranks:
        assert 2 * nbytes(m.state_dict()) == nbytes(full)


# ---- two ranks against one -------------------------------------------------------------------------
@pytest.mark.parametrize("ep", [False, True], ids=["tp", "tp-ep"])
def test_two_ranks_compute_the_one_rank_model(ckpt, one, ep):
    ps = prompts()
    want = staggered_outputs(one, ps)
    with LLM(ckpt, **OPTS, tensor_parallel_size=2, enable_expert_parallel=ep) as two:
        # staggered arrivals: 7-token prefill chunks beside decodes, batches of several sequences
        assert staggered_outputs(two, ps) == want
        p = ps[2]
        assert rel(two.score(p), one.score(p)) < 1e-5
        a, b = two.generate([p], GREEDY)[0], one.generate([p], GREEDY)[0]
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)
        # prefix-cache hits: whole blocks of the earlier prompts are reused, same tokens
        hits = two.engine.kv.hits
        assert [o.token_ids for o in two.generate(ps, GREEDY)] == [o.token_ids for o in one.generate(ps, GREEDY)]
        assert two.engine.kv.hits > hits
        st = two.engine.stats()
        assert st["tensor_parallel_size"] == 2 and st["enable_expert_parallel"] is ep
        w = [r["weight_bytes"] for r in st["ranks"]]
        assert len(w) == 2 and w[0] == w[1] < one.engine.stats()["ranks"][0]["weight_bytes"]


def test_the_model_checks_its_layout(ckpt):
    """V41Transformer refuses a layout it cannot be split into (as V4's Transformer), naming the field."""
    from dayzero.v41.model import V41Transformer
    args, _ = read_v41_args(ckpt)
    with torch.device("meta"), pytest.raises(LayoutError, match="`vocab_size`=321"):
        V41Transformer(args.replace(vocab_size=321), layout=Layout(2))


def test_torchrun_gives_the_one_rank_tokens(ckpt):
    """`dayzero generate` under torchrun: 2 ranks (the ranks torchrun started join; rank 1 prints nothing)."""
    args = ["generate", "--model", str(ckpt), "--token-ids", "6,17,42,99,30,8", "--max-tokens", "8", "--ignore-eos",
            "--dtype", "float32"]
    one = subprocess.run([sys.executable, "-m", "dayzero", *args], capture_output=True, text=True, timeout=120,
                         env=_env())
    assert one.returncode == 0, one.stderr
    from tests.server.conftest import free_port
    run = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "dayzero", *args, "--tensor-parallel-size", "2"], timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == one.stdout and "[8 tokens" in one.stderr and "[8 tokens" in run.stderr


def test_bounded_replay_over_tensor_parallel_ranks(ckpt, one):
    """The opt-in bounded replay (docs/V41.md) passes each request's floor to every rank: TP 2 gives the
    one-rank bounded tokens (the toy's window is 4, so every prompt has a floor); under DP-attention it is
    refused by name before any rank starts."""
    ps = prompts()
    with LLM(ckpt, **OPTS, v41_bounded_replay=True) as bounded:
        want = staggered_outputs(bounded, ps)
    assert want != staggered_outputs(one, ps)  # the approximation is in play on these prompts
    with LLM(ckpt, **OPTS, tensor_parallel_size=2, v41_bounded_replay=True) as two:
        assert staggered_outputs(two, ps) == want
    with pytest.raises(ValueError, match="bounded replay under DP-attention is not built"):
        LLM(ckpt, **OPTS, data_parallel_size=2, enable_expert_parallel=True, v41_bounded_replay=True)
