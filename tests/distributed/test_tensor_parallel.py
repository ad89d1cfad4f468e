"""Tensor and expert parallel ranks over torch.distributed (gloo, local processes) compute what one
rank computes: the same greedy tokens, logits within fp32 rounding of the summation order."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.distributed.layout import Layout, LayoutError
from dayzero.engine.capacity import Sizes
from dayzero.distributed.runtime import RankFailed
from dayzero.loader.model_io import load_model
from dayzero.testing import tiny_args
from tests.engine.helpers import staggered

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
OPTS = dict(numerics="transformers", dtype="float32")  # fp32, no FP8 simulation: differences are rounding only


def prompts(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (L,), generator=g).tolist() for L in [5, 23, 40, 17, 61, 33][:n]]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("flash", "fp32", tokenizer=True)


@pytest.fixture(scope="module")
def one(ckpt):
    return LLM(ckpt, **OPTS, max_num_batched_tokens=7)


def tokens(outs):
    return [o.token_ids for o in outs]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- the layout ----------------------------------------------------------------------------------
def test_impossible_layouts_name_the_field_and_the_sizes_that_fit():
    with pytest.raises(LayoutError) as e:
        Layout(4).check(tiny_args("flash"))  # o_groups = 2
    assert "`o_groups`=2" in str(e.value) and "values that fit it: [1, 2]" in str(e.value)
    from dayzero.config import pro
    with pytest.raises(LayoutError, match=r"`moe_intermediate_size`=3072 .* multiple of 128"):
        Layout(16, 0, ep=True).check(pro())  # V4-Pro's shared expert at 16 ranks cuts an FP8 block
    Layout(8, 3, ep=True).check(pro())
    with pytest.raises(LayoutError, match="`n_routed_experts`=8"):
        Layout(3, 0, ep=True).check(tiny_args("flash", n_heads=6, o_groups=3, vocab_size=513, moe_inter_dim=129))


def test_an_impossible_layout_fails_before_any_rank_starts(ckpt):
    t = time.monotonic()
    with pytest.raises(LayoutError, match="o_groups"):
        LLM(ckpt, **OPTS, tensor_parallel_size=4)
    assert time.monotonic() - t < 5
    with pytest.raises(ValueError, match="tensor_parallel_size: must be a positive integer"):
        LLM(ckpt, tensor_parallel_size=0)


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "tp-ep"])
def test_each_rank_reads_only_its_slices(ckpt, ep):
    whole = load_model(ckpt, **{"numerics": "transformers"}).state_dict()
    ranks = [load_model(ckpt, numerics="transformers", layout=Layout(2, r, ep)) for r in range(2)]
    plan = ranks[0].shard_plan()
    assert "layers.1.attn.wq_b.weight" in plan and "layers.1.attn.wq_a.weight" not in plan
    for name, t in whole.items():
        parts = [m.state_dict().get(name) for m in ranks]
        if name in plan:
            assert torch.equal(torch.cat(parts, plan[name]), t), name
        elif ep and ".experts." in name and ".shared_experts." not in name:
            held = [p is not None for p in parts]
            assert sum(held) == 1, name  # whole experts, each on exactly one rank
        else:
            assert all(torch.equal(p, t) for p in parts), name  # replicated
    sizes = [sum(t.numel() for t in m.state_dict().values()) for m in ranks]
    assert sizes[0] == sizes[1] < sum(t.numel() for t in whole.values())

    # each rank holds exactly 1/N of the split part: the sliced tensors and the routed experts
    def nbytes(sd, names):
        return sum(sd[n].numel() * sd[n].element_size() for n in names if n in sd)
    split = set(plan) | {n for n in whole if ".experts." in n and ".shared_experts." not in n}
    for m in ranks:
        assert 2 * nbytes(m.state_dict(), split) == nbytes(whole, split)


# ---- two and four ranks against one ----------------------------------------------------------------
@pytest.mark.parametrize("ep", [False, True], ids=["tp", "tp-ep"])
def test_two_ranks_compute_the_one_rank_model(ckpt, one, ep):
    one_out = staggered_outputs(one, prompts())
    with LLM(ckpt, **OPTS, max_num_batched_tokens=7, tensor_parallel_size=2, enable_expert_parallel=ep) as two:
        # staggered arrivals, 7-token prefill chunks beside decodes, MTP drafts on
        assert staggered_outputs(two, prompts()) == one_out
        p = prompts()[4]
        assert rel(two.score(p), one.score(p)) < 1e-5
        # logprobs of the same tokens, within fp32 rounding
        a, b = two.generate([p], GREEDY)[0], one.generate([p], GREEDY)[0]
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)
        # prefix-cache hits: whole blocks of the earlier prompts are reused, same tokens
        hits = two.engine.kv.hits
        assert tokens(two.generate(prompts(), GREEDY)) == tokens(one.generate(prompts(), GREEDY))
        assert two.engine.kv.hits > hits
        st = two.engine.stats()
        assert st["tensor_parallel_size"] == 2 and st["enable_expert_parallel"] is ep
        w = [r["weight_bytes"] for r in st["ranks"]]
        assert len(w) == 2 and w[0] == w[1] < one.engine.stats()["ranks"][0]["weight_bytes"]


def staggered_outputs(llm, ps, every=2):
    """Token ids of requests arriving two every `every` steps (tests/engine/helpers.py)."""
    reqs = staggered(llm.engine, ps, GREEDY, every)
    for r in reqs:
        llm.engine.release(r.rid)
    return [r.output_ids for r in reqs]


def test_preemption_under_two_ranks(ckpt):
    opts = dict(OPTS, max_num_batched_tokens=64, max_num_seqs=6, num_speculative_tokens=0)
    probe = LLM(ckpt, **opts)
    e, dt = probe.engine, probe.model.compute_dtype
    z = Sizes(e.groups, e.args, dt, e.block_size, 64)
    want = staggered_outputs(probe, prompts(6))
    small = dict(opts, kv_cache_memory_bytes=z.needed(6) + 5 * z.per_entry_block)  # <= 112 tokens of entries
    with LLM(ckpt, **small, tensor_parallel_size=2) as two:
        assert staggered_outputs(two, prompts(6), every=1) == want
        assert two.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("ep,hybrid", [(False, False), (True, False), (True, True)],
                         ids=["tp", "tp-ep", "tp-ep-cpu-experts"])
def test_two_ranks_with_fp8_weights_and_fp4_experts(make_ckpt, ep, hybrid):
    """The native CPU table's grouped FP4 MoE over each rank's experts (whole experts read where
    they lie under EP; the rank's slice of every expert otherwise), FP8 linears split on 128 blocks.
    hybrid: every rank keeps its experts in host memory on the native kernels (`cpu_experts`), the
    rest on the twins' table."""
    ckpt = make_ckpt("flash", "fp8", moe_inter_dim=256)
    ps = prompts(3)
    opts = dict(OPTS, ops="ref", cpu_experts=True) if hybrid else OPTS
    one = LLM(ckpt, **opts)
    table = "ref" if hybrid else "cpu"
    assert one.engine.ops.name == table and one.engine.stats()["expert_ops"] == "cpu"
    want = tokens(one.generate(ps, GREEDY))
    with LLM(ckpt, **opts, tensor_parallel_size=2, enable_expert_parallel=ep) as two:
        assert tokens(two.generate(ps, GREEDY)) == want
        assert rel(two.score(ps[1]), one.score(ps[1])) < 1e-5
        if hybrid:  # each rank holds half the routed experts, in host memory
            per_rank = [r["host_expert_bytes"] for r in two.engine.stats()["ranks"]]
            assert per_rank[0] == per_rank[1] == one.engine.stats()["host_expert_bytes"] // 2 > 0


def test_four_ranks(make_ckpt):
    ckpt = make_ckpt("flash", "fp32", o_groups=4)
    ps = prompts(3)
    want = tokens(LLM(ckpt, **OPTS).generate(ps, GREEDY))
    with LLM(ckpt, **OPTS, tensor_parallel_size=4, enable_expert_parallel=True) as four:
        assert tokens(four.generate(ps, GREEDY)) == want
        assert [r["rank"] for r in four.engine.stats()["ranks"]] == [0, 1, 2, 3]


# ---- failures -------------------------------------------------------------------------------------
def test_a_dead_rank_fails_the_next_step_at_once(ckpt):
    llm = LLM(ckpt, **OPTS, tensor_parallel_size=2)
    try:
        assert llm.generate([prompts()[0]], GREEDY)[0].token_ids
        llm.group.procs[0].kill()
        llm.group.procs[0].wait(10)
        t = time.monotonic()
        with pytest.raises(RankFailed, match="rank 1 of 2 exited with code -9"):
            llm.generate([prompts()[1]], GREEDY)
        assert time.monotonic() - t < 10
    finally:
        llm.close()


# ---- launchers: torchrun, and the server -------------------------------------------------------------
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher and everything it starts in a session of their own; on a timeout the whole
    session is killed (no rank left behind), then the test fails."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {timeout} s")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.parametrize("ranks", [1, 2])
def test_torchrun_gives_the_one_rank_tokens(ckpt, ranks):
    """2 ranks, and a group of one (how a single GPU checks the engine on NCCL)."""
    args = ["generate", "--model", str(ckpt), "--token-ids", "5,17,42,99,3,8", "--max-tokens", "8", "--ignore-eos",
            "--numerics", "transformers", "--dtype", "float32"]
    one = subprocess.run([sys.executable, "-m", "dayzero", *args], capture_output=True, text=True, timeout=120,
                         env=_env())
    assert one.returncode == 0, one.stderr
    from tests.server.conftest import free_port
    run = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--master-port", str(free_port()), "-m", "dayzero", *args, "--tensor-parallel-size", str(ranks)],
               timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == one.stdout and "[8 tokens" in one.stderr and "[8 tokens" in run.stderr  # rank 1 prints nothing


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_close_leaves_no_collective_thread_running_into_exit(ckpt):
    """After close() the process group is gone with its gloo threads, so none of them can run into
    interpreter exit and abort the process there (CI saw rank 0 under torchrun die with SIGABRT,
    "terminate called without an active exception", after printing its tokens). The group is made by
    a fresh interpreter, as a user's process makes it; the threads are read from /proc."""
    code = ("import os, sys\n"
            "from dayzero import LLM, SamplingParams\n"
            f"llm = LLM({str(ckpt)!r}, numerics='transformers', dtype='float32', tensor_parallel_size=2)\n"
            "llm.generate([[5, 17, 42]], SamplingParams(max_tokens=2, ignore_eos=True))\n"
            "llm.close()\n"
            "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
            "print(sorted(n for n in names if 'gloo' in n))\n")
    run = _run([sys.executable, "-c", code], timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", run.stdout

def test_server_with_two_ranks_answers_then_exits_when_a_rank_dies(ckpt):
    from tests.server.conftest import ServerProcess
    body = {"model": "toy", "prompt": [5, 17, 42, 99], "max_tokens": 6, "temperature": 0}
    flags = ("--numerics", "transformers", "--dtype", "float32")
    single = ServerProcess(ckpt, *flags)
    try:
        want = httpx.post(single.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        single.stop()
    # SIGTERM stops every rank the server started
    s = ServerProcess(ckpt, *flags, "--tensor-parallel-size", "2")
    try:
        (worker,) = _children(s.proc.pid)
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        s.terminate()
        assert s.proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{worker}")
    finally:
        s.stop()
    # a rank that dies: the step fails, the server stops taking requests (503), drains, exits non-zero
    s = ServerProcess(ckpt, *flags, "--tensor-parallel-size", "2")
    try:
        chat = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "toy", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert chat.status_code == 200
        (worker,) = _children(s.proc.pid)
        os.kill(worker, signal.SIGKILL)
        t = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code in (500, 503) or "error" in r.text  # the step that found the rank gone fails
        assert s.proc.wait(30) != 0
        assert time.monotonic() - t < 30
        assert "rank 1 of 2 exited" in s.proc.stdout.read()
    finally:
        s.stop()
