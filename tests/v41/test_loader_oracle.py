"""A quantised V4.1 checkpoint (FP8 32x32 dense, MXFP4 experts, FP8 1x32 Engram rows) loaded by dayzero's
V4.1 loader computes what transformers' deepseek_v41 (the oracle) computes from the same files.

The oracle cannot read the official quantised layout itself on transformers 5.23, so this test reads the
shards with `safetensors` and dequantises them with its own few lines written from the format
definitions (e4m3 value x 2^(byte - 127) of its block; e2m1 code table), independent of dayzero's
loader/formats code, and gives the oracle those fp32 weights. Then: every weight dayzero holds,
dequantised, equals the oracle's bit for bit; logits agree within 1e-5 relative and greedy tokens are
equal. Tolerance: the widths (head_dim 40, indexer head_dim 24) are ones the fake-quant blocks do not
divide, so neither side rounds activations and no FP8/FP4 rounding flip can occur (the oracle README's
trap); what is left is fp32 summation order (test_model_oracle.py measures < 1e-5 on these schedules).
At widths where the points do round, the comparison counts rounding flips as test_model_oracle.py does.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from dayzero.v41.loader import load_v41
from tests.v41.ckpt import UNQUANTISED, cached, one_thread, read_all, v41_config  # noqa: F401 (one_thread: autouse)
from tests.v41.oracle import oracle, oracle_text_config
from tests.v41.pair import engram_text, oracle_logits, oracle_name, rel, schedule_text, tokenizer_file, tokenizers
from tests.v41.test_model_oracle import QUANTISED, _flips
from tests.v41.tiny import SCHEDULES

_S = {s[0]: s[1:] for s in SCHEDULES}
CASES = {"readme-6": ("readme-6", [1, 4]), "three-pooled-groups": ("three-pooled-groups", [0, 6])}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])



def _pow2(scale: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scale.view(torch.uint8).double() - 127)


def _independent_dequant(files: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> fp32 by name (no `.scale`), from the format definitions alone."""
    out = {}
    for name, t in files.items():
        if name.endswith(".scale"):
            continue
        s = files.get(name[:-len("weight")] + "scale") if name.endswith(".weight") else None
        if s is None:
            out[name] = t.double()
        elif t.dtype == torch.int8:  # MXFP4: low nibble = even input, one scale per 32 inputs
            b = t.view(torch.uint8).long()
            vals = E2M1.double()[torch.stack((b & 15, b >> 4), -1).flatten(-2)]
            out[name] = vals * _pow2(s).repeat_interleave(32, 1)
        elif name.endswith("engram.embed.weight"):  # FP8 rows, one scale per 32 values of a row
            out[name] = t.double() * _pow2(s).repeat_interleave(32, 1)
        else:  # FP8, one scale per 32x32 block, partial edge blocks
            r, c = t.shape
            out[name] = t.double() * _pow2(s).repeat_interleave(32, 0)[:r].repeat_interleave(32, 1)[:, :c]
    return {n: v.float() for n, v in out.items()}


def _text(case: str, shapes: dict) -> dict:
    schedule, engram = CASES[case]
    return engram_text(schedule_text(*_S[schedule], **shapes), engram)


@functools.lru_cache(maxsize=None)
def _pair(case: str, live_points: bool = False):
    """(ours loaded by load_v41, the oracle given the independently dequantised files, those weights);
    live_points: widths 64 / 32, where the fake-quant points round (QUANTISED of test_model_oracle)."""
    o = oracle()
    text = _text(case, QUANTISED if live_points else UNQUANTISED)
    path = cached(f"{case}-{live_points}", json.dumps(v41_config(text)), str(tokenizer_file()))
    ours = load_v41(path)
    theirs = o.DeepseekV41ForCausalLM(o.DeepseekV41Config(text_config=oracle_text_config(text))).eval()
    weights = _independent_dequant(read_all(path))
    mapped = {oracle_name(n): t for n, t in weights.items()}
    sd = theirs.state_dict()
    for name in sd:  # a float Engram table: the oracle reads no scales (its rows are the dequantised values)
        if name.endswith("engram.embed.scale"):
            mapped[name] = torch.ones_like(sd[name])
    assert set(mapped) == set(sd), (sorted(set(mapped) - set(sd))[:5], sorted(set(sd) - set(mapped))[:5])
    theirs.load_state_dict(mapped, strict=True)
    theirs.model.bind_tokenizer(tokenizers()[1])
    return ours, theirs, weights


def _ours_dense(model) -> dict[str, torch.Tensor]:
    """Every weight dayzero's loaded model holds, dequantised its own way, by checkpoint name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "dequant") and hasattr(module, "fmt"):
            out[f"{name}.weight"] = module.dequant(torch.float32)
        elif type(module).__name__ == "EngramTable":
            out[f"{name}.weight"] = module(torch.arange(module.weight.shape[0]))
    for name, t in model.state_dict().items():
        if name not in out and not name.endswith(".scale"):
            out[name] = t.float()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_dequantised_weights_equal_the_oracles(case):
    ours, theirs, weights = _pair(case)
    mine, sd = _ours_dense(ours), theirs.state_dict()
    assert set(mine) == set(weights)
    kinds = {(type(m).__name__, getattr(m, "fmt", None)) for m in ours.modules() if hasattr(m, "scale")}
    assert kinds == {("Fp8Linear32", "fp8_32"), ("Linear", "fp4"), ("EngramTable", None)}  # all three formats
    for name, t in mine.items():
        assert torch.equal(t, sd[oracle_name(name)]), name


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_equal_the_oracles(case):
    ours, theirs, _ = _pair(case)
    for seed in (0, 1):
        ids = torch.randint(0, ours.args.vocab_size, (1, 29), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            got = ours(ids)
        want = oracle_logits(theirs, ids)
        assert rel(got, want) < 1e-5, (case, seed, rel(got, want))
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    # greedy continuation: dayzero decoding one token per call vs the oracle's generate (its cache path)
    prompt = torch.randint(0, ours.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = theirs.generate(prompt, max_new_tokens=8, do_sample=False)[0, 9:].tolist()
        state, tok, got = ours.new_state(), prompt, []
        for _ in range(8):
            tok = ours(tok, state)[:, -1:].argmax(-1)
            got.append(int(tok))
    assert got == want


def test_through_the_fake_quantisation_points_every_deviation_is_a_counted_flip(monkeypatch):
    """Widths where the QAT points round (window FP8, compressed-KV and indexer FP4): over 4 inputs, where
    no value rounds apart between the two (counted at every point, test_model_oracle._flips) logits agree
    within 1e-5 and the greedy tokens are equal; a deviation above 1e-5 only ever comes with a flip."""
    ours, theirs, _ = _pair("readme-6", live_points=True)
    clean = 0
    for seed in range(4):
        ids = torch.randint(0, ours.args.vocab_size, (1, 29), generator=torch.Generator().manual_seed(seed))
        flips, got, want = _flips(monkeypatch, ours, theirs, ids)
        assert flips > 0 or rel(got, want) < 1e-5, (seed, rel(got, want))
        if flips == 0:
            clean += 1
            assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert clean >= 1
