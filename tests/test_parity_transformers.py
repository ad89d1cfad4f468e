"""Parity with Hugging Face transformers' DeepseekV4ForCausalLM (numerics="transformers").

transformers loads the same official-layout directory through its own name mapping; for the
FP8/FP4 layout (which its CPU path cannot dequantise) it loads a dense fp32 copy written by
dayzero's writer from the dequantised tensors. Greedy continuations are compared against
transformers' full recompute (no cache) at every step.
"""
import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.loader.model_io import save_model
from tests.conftest import prompt_ids

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4ForCausalLM  # noqa: E402


def hf_model(path):
    return DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out]), use_cache=False).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


@pytest.mark.parametrize("fmt", ["fp32", "fp8"])
def test_logits_and_greedy_match_transformers(make_ckpt, preset, fmt, tmp_path):
    ckpt = make_ckpt(preset, fmt)
    llm = LLM(ckpt, numerics="transformers")
    if fmt == "fp8":
        dense = tmp_path / "dense"
        save_model(dense, llm.model, llm.args.replace(quant=None, expert_dtype=None, dtype="float32"))
        hf = hf_model(dense)
    else:
        hf = hf_model(ckpt)
    ids = prompt_ids(70, seed=3)
    ours = llm.score(ids[0].tolist())
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits[0]
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-3, f"{preset}/{fmt}: logits rel err {rel:.2e}"

    prompt = ids[0, :37].tolist()
    got = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert got.token_ids == hf_greedy(hf, prompt, 12)


def test_weights_are_non_trivial(make_ckpt):
    """Sinks, router biases, mHC and compressor biases are away from their init values, so the
    parity above exercises them."""
    model = LLM(make_ckpt("flash", "fp32"), numerics="transformers").model
    attn = model.layers[1].attn
    assert attn.attn_sink.abs().min() > 0
    assert attn.compressor.ape.abs().mean() > 0.1
    assert model.layers[3].ffn.gate.bias.std() > 0.01
    assert model.layers[0].hc_attn_base.abs().mean() > 0.1
    tid = model.layers[0].ffn.gate.tid2eid
    assert all(len(set(row.tolist())) == row.numel() for row in tid[:50])
