"""DeepSeek-V4.1's cache in its QAT storage formats (v41/kvpack.py, kv_cache_dtype="qat"): packing a
quantiser's output is lossless (every code, scale edges, signed zeros), a row that is not one is not
(so only the kinds the model quantises are packed), the pools hold the hand-counted bytes per token, and
the engine over packed pools gives the logits and tokens of the compute-dtype pools bit for bit, with
Engram on and off, under batching, chunked prefill and a prefix-cache hit."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dayzero import SamplingParams
from dayzero.cache.spec import KV_CACHE_DTYPES, cache_groups
from dayzero.config import flash
from dayzero.engine.engine import Engine, EngineArgs
from dayzero.v41 import quant
from dayzero.v41.cache import bytes_per_token, fixed_bytes_per_sequence, v41_cache_groups
from dayzero.v41.kvpack import FORMATS, QatLayout, QatRows, exact, pack, unpack
from dayzero.v41.presets import kv_plan, v41_flash
from dayzero.v41.served import load_served
from dayzero.v41.toy import TEXT, write_toy
from tests.engine.helpers import staggered
from tests.v41.ckpt import one_thread  # noqa: F401  (autouse: small forwards on one thread)

QUANTISER = {"fp8": quant.window_kv, "fp4_e4m3": quant.compressed_kv, "fp4_ue8m0": quant.index_qk}
DTYPES = (torch.float32, torch.bfloat16)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantiser_outputs_round_trip_bit_for_bit(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    D = 64
    x = torch.randn(300, D, generator=g) * torch.logspace(-30, 30, 300)[:, None]
    x *= torch.rand(300, 1, generator=g) ** 3
    x[0] = 0
    x[1] = -0.0
    x[2, :16] = -1e-38  # a block that quantises to signed zeros beside a live one
    x[3, :32] = torch.tensor([448.0, -1e-20, 2.0 ** -20, 6.0] * 8)
    x[4] = torch.randn(D, generator=g).sign() * 2.0 ** -130  # below every scale floor
    y = QUANTISER[fmt](x.to(dtype))
    assert not torch.equal(y.float(), x.to(dtype).float())  # the quantiser did change the rows
    L = QatLayout(D, fmt, dtype)
    data = pack(y, L)
    assert data.dtype == torch.uint8 and data.shape == (300, L.width)
    back = unpack(data, L)
    assert back.dtype == dtype and torch.equal(bits(back), bits(y))  # -0.0 kept
    assert exact(y, L)  # signed zeros as the quantiser left them (bits compared)
    assert torch.equal(bits(QatRows(data, L)[torch.tensor([5, 1])]), bits(y[[5, 1]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_fp8_code_and_pow2_scale_edge(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # the two NaN codes
    vals = codes.view(torch.float8_e4m3fn).float()
    rows = torch.cat([vals, torch.zeros(-len(vals) % 31)]).view(-1, 31)
    rows = torch.cat([torch.full((rows.shape[0], 1), 448.0), rows], 1)  # 448 in each block
    for e in (-22, -9, 0, 7, 100):  # scales 2^e: the 1e-4/448 floor up to far above
        x = (rows * 2.0 ** e).to(dtype)
        L = QatLayout(32, "fp8", dtype)
        data = pack(x, L)
        assert torch.equal(bits(unpack(data, L)), bits(x))
        assert torch.equal(data[:, :32].view(torch.float8_e4m3fn).float() * 2.0 ** e, x.float())  # every code as is
        assert (data[:, 32:] == 127 + e).all()


@pytest.mark.parametrize("fmt", ["fp4_e4m3", "fp4_ue8m0"])
def test_every_fp4_code_and_scale_edge(fmt):
    L = QatLayout(32, fmt, torch.bfloat16)
    vals = torch.tensor(E2M1 + [-v for v in E2M1])  # 16 codes, -0.0 included
    row = torch.cat([vals, vals.flip(0)])  # a 6 in each block of 16
    scales = [2.0 ** -9, 7 * 2.0 ** -9, 1.875 * 2.0 ** -6, 0.8125, 448.0] if fmt == "fp4_e4m3" else [2.0 ** -126, 2.0 ** -9, 1.0, 2.0 ** 100]
    for s in scales:
        x = (row * s).to(torch.bfloat16)
        data = pack(x, L)
        assert torch.equal(bits(unpack(data, L)), bits(x)), s
        lo, hi = data[:16] & 15, data[:16] >> 4  # element 2j low nibble, 2j+1 high; bit 3 the sign
        codes = torch.stack([lo, hi], -1).flatten()
        assert codes.tolist() == [*range(16), *range(15, -1, -1)]
    # an e4m3-scaled block whose largest code is 4 (not 6): the scale is amax / 4, found all the same
    x = (torch.tensor([4.0, 3.0, -0.5] + [0.0] * 29) * 0.8125).to(torch.bfloat16)
    assert exact(x, QatLayout(32, "fp4_e4m3", torch.bfloat16))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_rows_that_are_not_quantiser_outputs_do_not_round_trip(fmt):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    assert not exact(x, QatLayout(64, fmt, torch.float32))
    with pytest.raises(ValueError, match=r"QAT KV rows \(fp8\): dim must be a positive multiple of 32, got 48"):
        QatLayout(48, "fp8", torch.float32)
    with pytest.raises(ValueError, match="kv_cache_dtype 'qat': the compute dtype must be one of"):
        QatLayout(64, fmt, torch.float16)


def test_only_the_quantised_kinds_are_packed():
    args = v41_flash()
    auto, qat = ({g.name: g for g in v41_cache_groups(args, 16, d)} for d in ("auto", "qat"))
    src = next(la for la in args.layers if la.is_kv_source and la.pooled).layer_id
    assert (qat["window"].kinds["kv"].qat, qat[f"entries L{src}"].kinds["c:ent"].qat,
            qat[f"entries L{src}"].kinds["c:key"].qat) == ("fp8", "fp4_e4m3", "fp4_ue8m0")
    assert qat[f"rows L{src}"] == auto[f"rows L{src}"]  # the compressor's pre-quantisation fp32 rows
    if "engram" in qat:
        assert qat["engram"] == auto["engram"]
    # widths the quantisers do not block (tiny shapes) are cached unquantised: not packed
    odd = dataclasses.replace(args, head_dim=48, rope_head_dim=16, index_head_dim=48)
    groups = {g.name: g for g in v41_cache_groups(odd, 16, "qat")}
    assert groups["window"].kinds["kv"].qat == "" and groups[f"entries L{src}"].kinds["c:key"].qat == ""
    assert groups[f"entries L{src}"].kinds["c:ent"].qat == "fp4_e4m3"  # 48 = 3 blocks of 16
    assert "qat" in KV_CACHE_DTYPES
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8': DeepSeek-V4.1's cache has no packed FP8 rows of V4's"):
        v41_cache_groups(args, 16, "fp8")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='qat' is DeepSeek-V4.1's"):
        cache_groups(flash(), 128, False, "qat")


def test_bytes_per_token_equal_a_hand_count():
    args = v41_flash()
    inv = sum(1 / la.compress_ratio for la in args.layers if la.is_kv_source)
    assert (args.head_dim, args.index_head_dim, inv) == (512, 128, 2.5)
    # entry: 512 FP4 codes = 256 B + 32 e4m3 scales; key: 128 FP4 = 64 B + 4 UE8M0 scales
    assert bytes_per_token(args, torch.bfloat16, "qat") == 2.5 * ((256 + 32) + (64 + 4)) == 890
    assert kv_plan(args, "qat")["bytes_per_token_all_layers"] == 890  # the plan, to the byte
    assert bytes_per_token(args, torch.bfloat16) == 2.5 * (512 + 128) * 2 == 3200
    # the window: 512 FP8 codes + 16 UE8M0 scales a row, last window - 1 tokens of every layer
    rows = fixed_bytes_per_sequence(args, torch.bfloat16, "qat") - fixed_bytes_per_sequence(args, torch.bfloat16)
    assert rows == args.n_layers * (args.window_size - 1) * (528 - 1024)


SCHEDULES = {
    "engram": {},
    "no-engram": dict(compress_ratios=[2, 2, 2, 2, 2, 2, 1, 1], kv_source_layer_ids=[0, 2, 4, 6],
                      index_source_layer_ids=[0, 2, 4, 6, 7], candidate_source_layer_id=6, engram_layer_ids=[]),
}


@pytest.fixture(scope="module", params=list(SCHEDULES))
def ckpt(request, tmp_path_factory):
    text = copy.deepcopy(TEXT)
    text.update(SCHEDULES[request.param])
    return write_toy(tmp_path_factory.mktemp(f"v41-{request.param}") / "m", text=text)


def recorded(model):
    """The model with every fp32 logits tensor the engine asks of it kept in `model.seen`."""
    model.seen = []
    plain = type(model).logits

    def logits(X, head):
        out = plain(model, X, head)
        model.seen.append(out.clone())
        return out
    model.logits = logits
    return model


def drive(model, ops, kv_cache_dtype):
    """Mixed arrival with chunked prefill, then a request sharing 2 blocks with an earlier one."""
    e = Engine(model, EngineArgs(ops=ops, max_num_batched_tokens=7, max_num_seqs=3, kv_cache_dtype=kv_cache_dtype),
               torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(6, 310, (n,), generator=g).tolist() for n in (5, 23, 40, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = [r.output_ids for r in staggered(e, ps, params)]
    hits = e.kv.hits
    r = e.add_request("hit", ps[2][:35] + [7, 8, 9], params)
    while not r.finished:
        e.step()
    assert e.kv.hits - hits == 32
    return e, out + [r.output_ids]


@pytest.mark.parametrize("ops, dtype", [("ref", torch.float32), ("cpu", torch.bfloat16)])
def test_engine_over_packed_pools_is_bit_identical(ckpt, ops, dtype):
    model = recorded(load_served(ckpt, dtype, torch.device("cpu")))
    e0, want = drive(model, ops, "auto")
    seen0, model.seen = model.seen, []
    e1, got = drive(model, ops, "qat")
    assert got == want
    assert len(model.seen) == len(seen0) > 20
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(seen0, model.seen))
    # the pools: uint8 rows of the hand-counted widths (head_dim 64, index_head_dim 32)
    args = model.v41
    assert e1.pools.tensors[("window", "kv")].dtype == torch.uint8
    assert e1.pools.tensors[("window", "kv")].shape[-1] == 64 + 2
    for la in args.layers:
        if la.is_kv_source:
            assert e1.pools.tensors[(f"entries L{la.layer_id}", "c:ent")].shape[-1] == 32 + 4
            assert e1.pools.tensors[(f"entries L{la.layer_id}", "c:key")].shape[-1] == 16 + 1
    per_tok = sum((36 + 17) / la.compress_ratio for la in args.layers if la.is_kv_source)
    assert bytes_per_token(args, dtype, "qat") == per_tok
    assert e1.stats()["fixed_bytes_per_sequence"] == fixed_bytes_per_sequence(args, dtype, "qat")
    assert e1.stats()["kv_cache_dtype"] == "qat"
