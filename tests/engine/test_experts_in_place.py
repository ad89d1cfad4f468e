"""On the native CPU table the routed experts stay where loading left them (the memory-mapped
checkpoint shards): no stacked copy, and the same tokens as the stacked grouped call."""
import torch

from dayzero import SamplingParams
from dayzero.engine.engine import Engine, EngineArgs
from dayzero.loader.model_io import load_model
from dayzero.ops.experts import PerExpert

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _generate(model, prompts):
    e = Engine(model, EngineArgs(ops="cpu", max_num_batched_tokens=16), torch.device("cpu"))
    reqs = [e.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    while e.has_unfinished():
        e.step()
    return e, [r.output_ids for r in reqs]


def test_cpu_table_reads_the_experts_where_they_were_loaded(make_ckpt):
    ckpt = make_ckpt("flash", "fp8")
    prompts = [[5, 17, 42, 99, 3], list(range(2, 30))]
    model = load_model(ckpt, numerics="transformers")
    loaded = {n: t.data_ptr() for n, t in model.state_dict().items() if ".ffn.experts." in n}
    engine, tokens = _generate(model, prompts)
    assert engine.ops.name == "cpu" and engine.ops.moe_per_expert
    for layer in model.layers:
        groups = layer.ffn.__dict__["_stacked"]
        assert all(isinstance(g, PerExpert) for g in groups)
    # every expert tensor the kernel reads is the one loading returned: nothing was copied
    assert {n: t.data_ptr() for n, t in model.state_dict().items() if ".ffn.experts." in n} == loaded
    assert [int(a) for a in model.layers[1].ffn.__dict__["_stacked"][0].addresses] == \
        [loaded[f"layers.1.ffn.experts.{e}.w1.weight"] for e in range(model.args.n_routed_experts)]
    # the stacked grouped call (what accelerator tables get) gives the same tokens
    stacked = load_model(ckpt, numerics="transformers")
    for layer in list(stacked.layers) + list(stacked.mtp):
        layer.ffn.stack_experts(in_place=False)
    assert _generate(stacked, prompts)[1] == tokens
