"""Hybrid placement (`cpu_experts`, docs/SCALING.md): the routed experts stay in host memory, as
loading mapped them, and run on the CPU's op table; attention, dense layers and the shared expert
run on the device's table. On this CPU-only machine the "device" table is the PyTorch twins
(`ops="ref"`), so the split is visible: the hybrid model must compute exactly what one op table
made of the twins with the native kernel's `moe_experts` computes, bit for bit, and its engine must
give that table's tokens and logprobs. (Transfers between a GPU and the host are what a lent GPU's
session checks: scripts/gpu_session.sh.)"""
import dataclasses

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.engine import worker as worker_mod
from dayzero.engine.graphs import unsupported
from dayzero.loader.checkpoint import list_tensors
from dayzero.loader.model_io import is_routed_expert, load_model
from dayzero.ops import REF
from dayzero.ops.experts import PerExpert
from dayzero.reference.model import Transformer
from dayzero.testing import tiny_args

from dayzero.ops import cpu

pytestmark = pytest.mark.skipif(not cpu.available("gemm"), reason="gemm.c does not build here (no C compiler)")

OPTIONS = dict(max_num_batched_tokens=16, kv_cache_memory_bytes=64 << 20)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)


def mixed_table():
    """The twins, with the native kernel's grouped MoE: what hybrid placement must compute."""
    host = cpu.table()
    return dataclasses.replace(REF, name="ref+cpu moe", moe_experts=host.moe_experts, moe_per_expert=True,
                               kernels=("moe_experts",))


@pytest.mark.parametrize("numerics", ["official", "transformers"])
def test_hybrid_model_computes_the_twins_with_the_native_experts(make_ckpt, numerics):
    ckpt = make_ckpt("flash", "fp8")
    hybrid = load_model(ckpt, numerics=numerics, cpu_experts=True)
    loaded = {n: t.data_ptr() for n, t in hybrid.state_dict().items() if is_routed_expert(n)}
    placed = hybrid.host_experts(cpu.table())
    hybrid.set_ops(REF)
    assert placed == len(hybrid.layers) + len(hybrid.mtp)
    for layer in hybrid.layers:
        moe = layer.ffn
        assert moe.ops is REF and moe.expert_ops.name == "cpu"
        assert all(isinstance(g, PerExpert) for g in moe.__dict__["_stacked"])  # read in place
    # nothing copied: the kernel reads the tensors loading returned
    assert {n: t.data_ptr() for n, t in hybrid.state_dict().items() if is_routed_expert(n)} == loaded
    assert unsupported(hybrid).startswith("routed experts in host memory")

    mixed = load_model(ckpt, numerics=numerics)
    mixed.set_ops(mixed_table())
    plain = load_model(ckpt, numerics=numerics)  # the twins everywhere
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 7, 31, 400, 12, 64]])
    with torch.no_grad():
        got, want, twins = hybrid(ids), mixed(ids), plain(ids)
    assert torch.equal(got, want)
    # and the native experts are not the twins' (the test could tell them apart), though close
    torch.testing.assert_close(got, twins, rtol=2e-2, atol=2e-2)


def test_hybrid_engine_tokens_logprobs_and_bytes(make_ckpt, monkeypatch):
    ckpt = make_ckpt("flash", "fp8")
    prompts = [[5, 17, 42, 99, 3], list(range(2, 30)), [7] * 11]
    with LLM(str(ckpt), ops="ref", cpu_experts=True, **OPTIONS) as llm:
        outs = llm.generate(prompts, GREEDY)
        stats = llm.engine.stats()
    assert stats["cpu_experts"] and stats["ops"] == "ref" and stats["expert_ops"] == "cpu"
    assert stats["graphs"]["off"]  # a CPU engine runs eagerly anyway
    # the routed experts' bytes are counted apart from the device's weights: exactly the checkpoint's
    infos = list_tensors(ckpt)
    expert_bytes = sum(i.dtype.itemsize * int(torch.Size(i.shape).numel())
                       for n, i in infos.items() if is_routed_expert(n))
    assert stats["host_expert_bytes"] == expert_bytes > 0

    # the same engine over one table that is the twins with the native MoE kernel
    monkeypatch.setattr(worker_mod, "for_device", lambda device, choice=None: mixed_table())
    with LLM(str(ckpt), **OPTIONS) as llm:
        want = llm.generate(prompts, GREEDY)
        plain_stats = llm.engine.stats()
    assert plain_stats["host_expert_bytes"] == 0 and not plain_stats["cpu_experts"]
    assert [(o.token_ids, o.logprobs) for o in outs] == [(o.token_ids, o.logprobs) for o in want]
    assert all(o.logprobs for o in outs)


def test_cpu_experts_needs_the_experts_in_host_memory():
    with torch.device("meta"):
        model = Transformer(tiny_args("flash", n_mtp_layers=0))
    with pytest.raises(ValueError, match=r"cpu_experts: routed expert tensor 'layers\.0\.ffn\.experts\.0\.w1\.weight' "
                                         r"is on meta, not in host memory; load the model with load_model"):
        worker_mod.host_table(model)


def test_cpu_experts_option_is_checked():
    from dayzero.engine.engine import EngineArgs
    with pytest.raises(ValueError, match="cpu_experts: must be True or False, got 'yes'"):
        EngineArgs(cpu_experts="yes")
