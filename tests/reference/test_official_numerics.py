"""`official` numerics: DeepSeek's quantisation simulation is applied where the reference applies it
(and only there), and the model stays close to the unsimulated `transformers` numerics."""
import torch

from dayzero.loader.model_io import load_model
from dayzero.ops import ref
from dayzero.reference.layers import Linear
from tests.conftest import prompt_ids


def run(model, n=70):
    state = model.new_state()
    logits = model(prompt_ids(n), state)
    return logits, state


def on_fp8_grid(x, block=64):
    return torch.equal(ref.fp8_act_sim(x, block), x)


def test_caches_hold_fp8_kv_and_fp4_hadamard_indexer_keys(make_ckpt):
    official = load_model(make_ckpt("flash", "fp8"), numerics="official")
    plain = load_model(make_ckpt("flash", "fp8"), numerics="transformers")
    _, so = run(official)
    _, sp = run(plain)
    rd = official.args.rope_head_dim
    n = 70
    so, sp = so.caches[0].store, sp.caches[0].store
    csa, hca = 1, 2  # flash tiny: layer 1 is CSA, layer 2 is HCA
    for layer in (csa, hca):
        assert on_fp8_grid(so[(layer, "kv")][:n, :-rd])
        assert on_fp8_grid(so[(layer, "ent:attn")][:n // official.layers[layer].attn.ratio, :-rd])
    keys = so[(csa, "ent:index")][:n // 4]
    assert torch.equal(ref.fp4_act_sim(keys, 32), keys)
    assert not on_fp8_grid(sp[(csa, "kv")][:n, :-rd])
    plain_keys = sp[(csa, "ent:index")][:n // 4]
    assert not torch.equal(ref.fp4_act_sim(plain_keys, 32), plain_keys)


def test_fp8_linears_quantise_their_input_and_wo_a_does_not(make_ckpt):
    model = load_model(make_ckpt("flash", "fp8"), numerics="official")
    attn = model.layers[0].attn
    assert attn.wq_a.quant_input and attn.wkv.quant_input and attn.wo_b.quant_input
    assert not attn.wo_a.quant_input and not model.layers[1].attn.compressor.wkv.quant_input
    assert model.layers[0].ffn.experts[0].w1.quant_input and model.head.fmt == "dense"
    g = torch.Generator().manual_seed(0)
    lin = Linear(256, 8, "dense", torch.float32)
    lin.weight.copy_(torch.randn(8, 256, generator=g))
    lin8 = Linear(256, 8, "fp8", torch.float32, official=True)
    from dayzero.loader.formats import quant_fp8_block
    w8, s8 = quant_fp8_block(lin.weight)
    lin8.weight.copy_(w8), lin8.scale.copy_(s8)
    x = torch.randn(3, 256, generator=g)
    # the same GEMM the layer runs (ref.linear: each row alike in any batch), on the FP8-simulated input
    want = ref.linear(ref.fp8_act_sim(x, 128), lin8.dequant(torch.float32))
    assert torch.equal(lin8(x), want)


def test_dense_checkpoints_get_no_activation_quantisation(make_ckpt):
    model = load_model(make_ckpt("flash", "fp32"), numerics="official")
    assert not model.layers[0].attn.wq_a.quant_input


def test_official_stays_close_to_transformers_numerics(make_ckpt):
    """Random tiny models amplify FP8 noise and can flip a near-tied expert choice at a few
    positions, so this compares the typical error, and the first position, where only FP8 noise acts."""
    a, _ = run(load_model(make_ckpt("pro", "fp8"), numerics="official"))
    b, _ = run(load_model(make_ckpt("pro", "fp8"), numerics="transformers"))
    rel = (a - b).abs().amax(-1) / b.abs().amax(-1)
    assert rel[0, 0] < 0.1
    assert rel.median() < 0.15
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.6
