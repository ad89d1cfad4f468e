"""The native table's fused ops (ops/cpu/fused.c) leave engine steps bit for bit as they were: the
built-in model's decode (official numerics: the indexer's Hadamard + FP4 simulation, the per-head
query RMSNorm, the K=V FP8 simulation, with windows closing) gives the same logits, step by step,
as the same engine with those ops put back to their twins (the decode path before them)."""
import dataclasses

import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.ops import FUSED_NAMES, REF
from dayzero.reference.layers import UsesOps


def _engine(fused: bool) -> tuple[LLM, list]:
    llm = LLM(device="cpu", ops="cpu", num_speculative_tokens=0, kv_cache_memory_bytes=64 << 20)
    eng = llm.engine
    if not fused:
        table = dataclasses.replace(eng.ops, fused=(), **{n: getattr(REF, n) for n in FUSED_NAMES})
        for m in eng.model.modules():
            if isinstance(m, UsesOps) and m.ops is eng.ops:
                m.ops = table
        eng.worker.ops = table
    seen = []
    forward = eng.worker.forward

    def keep(*a, **k):
        out = forward(*a, **k)
        seen.append(out)
        return out

    eng.worker.forward = keep
    return llm, seen


def test_fused_ops_keep_every_step_bit_identical():
    fused_llm, fused_logits = _engine(True)
    if not set(FUSED_NAMES) <= set(fused_llm.engine.ops.fused):
        pytest.skip("native CPU kernels unavailable here: the table runs the twins")
    twin_llm, twin_logits = _engine(False)
    assert twin_llm.engine.ops.fused == ()
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(4, fused_llm.args.vocab_size, (3, 30), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)  # past position 64: HCA closes
    a = [o.token_ids for o in fused_llm.generate(prompts, params)]
    b = [o.token_ids for o in twin_llm.generate(prompts, params)]
    assert a == b
    assert len(fused_logits) == len(twin_logits) >= 40  # the prefill step, then one per decoded token
    for x, y in zip(fused_logits, twin_logits):
        assert x.shape == y.shape and torch.equal(x.view(torch.int32), y.view(torch.int32))
