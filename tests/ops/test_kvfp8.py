"""The FP8 KV cache format (ops/kvfp8.py): packing is exactly the model's FP8 simulation of the
nope dims, lossless on rows already simulated, and every op table reads packed pools to the same
output as the compute-dtype pool of their decoded values; the engine with kv_cache_dtype="fp8"
emits the tokens and logprobs of the compute-dtype cache under official numerics."""
import pytest
import torch

from dayzero import LLM, SamplingParams
from dayzero.cache.paged import CachePools, PagedBatchCache
from dayzero.cache.spec import cache_groups, kv_report
from dayzero.config import flash
from dayzero.ops import ref
from dayzero.ops.kvfp8 import Fp8Layout, Fp8Rows, pack, unpack
from dayzero.synthetic import flash_slice

LAYOUTS = [(512, 64, torch.bfloat16), (512, 64, torch.float32), (128, 64, torch.bfloat16),
           (160, 64, torch.float32), (100, 4, torch.bfloat16)]  # last two: a partial block of nope dims


def _sim(x, rope):
    return torch.cat([ref.fp8_act_sim(x[..., :-rope], 64), x[..., -rope:]], -1)


def _rows(g, P, D, dtype):
    """Rows spanning magnitudes (scales from the 1e-4 floor up), zeros and one huge row."""
    x = torch.randn(P, D, generator=g) * torch.logspace(-7, 4, P)[:, None]
    x[0] = 0
    x[1, :3] = torch.tensor([448.0, -1e30, 2.0 ** -20])
    return x.to(dtype)


def test_flash_row_is_the_deployed_584_bytes():
    lay = Fp8Layout(512, 64, torch.bfloat16)
    assert (lay.nope, lay.rope_off, lay.scale_off, lay.blocks, lay.width) == (448, 448, 576, 7, 584)
    assert Fp8Layout(512, 64, torch.float32).width == 448 + 256 + 7 + 1
    with pytest.raises(ValueError, match="rope < dim"):
        Fp8Layout(64, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="rope_dtype"):
        Fp8Layout(128, 64, torch.int8)


@pytest.mark.parametrize("D,rope,dtype", LAYOUTS)
def test_pack_is_the_simulation_and_lossless_on_simulated_rows(D, rope, dtype):
    lay = Fp8Layout(D, rope, dtype)
    x = _rows(torch.Generator().manual_seed(D + rope), 41, D, dtype)
    sim = _sim(x, rope)
    data = pack(x, lay)
    assert data.dtype == torch.uint8 and data.shape == (41, lay.width)
    assert torch.equal(unpack(data, lay), sim)  # what official numerics writes: bit for bit
    # re-packing a simulated row loses nothing (the bytes may differ: a block whose largest code
    # rounded to 224 re-packs with half the scale and doubled codes)
    assert torch.equal(unpack(pack(sim, lay), lay), sim)
    assert torch.equal(unpack(data[:, None], lay)[:, 0], sim)  # any leading shape
    assert (data[:, lay.scale_off + lay.blocks:] == 0).all()  # padding stays zero
    with pytest.raises(ValueError, match=f"\\[..., {D}\\]"):
        pack(x[:, :-1], lay)
    with pytest.raises(ValueError, match="uint8"):
        unpack(data.float(), lay)
    with pytest.raises(ValueError, match=f"\\[P, {lay.width}\\]"):
        Fp8Rows(data[:, :-8], lay)
    with pytest.raises(ValueError, match="2-d uint8"):
        Fp8Rows(data.float(), lay)


def _sources(g, lay, N, ks, holes=0.2):
    out_f, out_8 = [], []
    for i, K in enumerate(ks):
        P = 2 * K + 5 + i
        data = pack(_rows(g, P, lay.dim, lay.rope_dtype) / 1e3, lay)
        idx = torch.randint(0, P, (N, K), generator=g)
        idx[torch.rand(N, K, generator=g) < holes] = -1
        out_f.append((unpack(data, lay), idx))
        out_8.append((Fp8Rows(data, lay), idx))
    return out_f, out_8


def _tables():
    tables = [("ref", ref.sparse_attn_paged)]
    from dayzero.ops.cpu import NativeUnavailable, build
    try:
        build.lib("attention")
        from dayzero.ops.cpu import attention as C
        tables.append(("cpu", C.sparse_attn_paged))
    except NativeUnavailable:
        pass
    try:
        import triton  # noqa: F401
        from dayzero.ops.triton import attention as T
        tables.append(("triton", T.sparse_attn_paged))
    except ImportError:
        pass
    return tables


@pytest.mark.parametrize("name,fn", _tables(), ids=[t[0] for t in _tables()])
@pytest.mark.parametrize("D,rope,dtype", LAYOUTS[:4])
def test_attention_over_packed_pools_equals_the_decoded_pools(name, fn, D, rope, dtype, monkeypatch):
    if name == "cpu":  # the kernel itself must read the packed rows, not hand them to the twin
        from dayzero.ops.cpu import attention as C
        monkeypatch.setattr(C.ref, "sparse_attn_paged", lambda *a: pytest.fail("fell back to the twin"))
    g = torch.Generator().manual_seed(D * 7 + rope)
    lay = Fp8Layout(D, rope, dtype)
    N, H = 3, 16
    q = torch.randn(N, H, D, generator=g).to(dtype)
    sink = torch.randn(H, generator=g)
    dense, packed = _sources(g, lay, N, (40, 9))
    want = fn(q, dense, sink, D ** -0.5)
    assert torch.equal(fn(q, packed, sink, D ** -0.5), want)
    assert torch.equal(fn(q, [packed[0], dense[1]], sink, D ** -0.5), want)  # a packed and a dense source
    assert torch.equal(fn(q, packed[:1], sink, D ** -0.5), fn(q, dense[:1], sink, D ** -0.5))
    # a member view of a larger pool (rows offset into its storage), as the cache hands them out
    big = torch.cat([torch.zeros(8, lay.width, dtype=torch.uint8), packed[0][0].data])
    view = [(Fp8Rows(big[8:], lay), packed[0][1]), packed[1]]
    assert torch.equal(fn(q, view, sink, D ** -0.5), want)


def test_triton_rejects_mixed_layouts():
    pytest.importorskip("triton")
    from dayzero.ops.triton import attention as T
    g = torch.Generator().manual_seed(0)
    a, b = Fp8Layout(128, 64, torch.float32), Fp8Layout(128, 32, torch.float32)
    _, pa = _sources(g, a, 2, (5,))
    _, pb = _sources(g, b, 2, (5,))
    with pytest.raises(ValueError, match="one row layout"):
        T.sparse_attn_paged(torch.randn(2, 4, 128), pa + pb, torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="must have 64 values.*dim=128"):
        T.sparse_attn_paged(torch.randn(2, 4, 64), pa, torch.zeros(4), 0.1)


def test_cache_pools_store_packed_rows_and_read_them_decoded():
    args = flash_slice(("sliding", "csa", "hca"), n_routed_experts=8)
    groups = {kv: cache_groups(args, 128, with_mtp=False, kv_cache_dtype=kv) for kv in ("auto", "fp8")}
    sizes = {kv: {g.name: g.block_bytes(torch.bfloat16) for g in gs} for kv, gs in groups.items()}
    assert sizes["fp8"]["window"] * 1024 == sizes["auto"]["window"] * 584
    assert sizes["fp8"]["rows r4"] == sizes["auto"]["rows r4"]  # compressor rows stay fp32
    assert sizes["fp8"]["entries r128"] * 1024 == sizes["auto"]["entries r128"] * 584
    counts = {g.name: 3 for g in groups["fp8"]}
    pools = CachePools(groups["fp8"], counts, torch.bfloat16, torch.device("cpu"))
    assert pools.tensors[("window", "kv")].dtype == torch.uint8
    assert pools.tensors[("entries r4", "ent:index")].dtype == torch.bfloat16  # indexer keys: not packed
    table = {g.name: [0, 1] for g in groups["fp8"]}
    cache = PagedBatchCache(pools, [table], [0], torch.device("cpu"))
    seq, pos = torch.zeros(5, dtype=torch.long), torch.tensor([0, 3, 127, 128, 200])
    x = _sim(torch.randn(5, 512), 64).to(torch.bfloat16)
    cache.write(1, "kv", seq, pos, x)
    assert torch.equal(cache.read(1, "kv", seq, pos), x)
    pool, ids = cache.locate_rows(1, "kv", seq[:, None], pos[:, None], torch.ones(5, 1, dtype=torch.bool))
    assert isinstance(pool, Fp8Rows) and torch.equal(pool[ids[:, 0]], x)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        cache_groups(args, 128, with_mtp=False, kv_cache_dtype="fp4")


def test_kv_report_counts_the_packed_rows():
    auto, fp8 = (kv_report(flash(), torch.bfloat16, kv_cache_dtype=kv) for kv in ("auto", "fp8"))
    assert auto["bytes_per_token_per_layer"]["csa"] == (1024 + 256) / 4
    assert fp8["bytes_per_token_per_layer"]["csa"] == (584 + 256) / 4  # the indexer keys stay bf16
    assert fp8["bytes_per_token_per_layer"]["hca r128"] == 584 / 128
    assert fp8["per_sequence_bytes"]["1048576"] < 0.66 * auto["per_sequence_bytes"]["1048576"]


@pytest.mark.parametrize("ops,dtype", [("cpu", "float32"), ("cpu", "bfloat16"), ("ref", "bfloat16")])
def test_engine_fp8_cache_gives_the_same_tokens_and_logprobs(ops, dtype):
    """The built-in model under official numerics: its window rows and compressed entries are
    FP8-simulated before they are stored, so the packed cache holds them exactly."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)
    prompts = ["KING LEAR:\nAttend the lords of France and Burgundy, Gloucester.\n" * 3, "ROMEO:\n"]
    outs, stats = {}, {}
    for kv in ("auto", "fp8"):
        llm = LLM(device="cpu", ops=ops, dtype=dtype, numerics="official", max_num_batched_tokens=32,
                  kv_cache_memory_bytes=64 * 2**20, kv_cache_dtype=kv)
        outs[kv] = llm.generate(prompts, params)
        stats[kv] = llm.engine.stats()
    for a, b in zip(outs["auto"], outs["fp8"]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert stats["fp8"]["kv_cache_dtype"] == "fp8"
    # the same budget holds more tokens (measured 1.20x in bf16: the window and compressor rows,
    # finished requests' reserve included, are bounded by the budget), and the window costs less per sequence
    assert stats["fp8"]["max_tokens_in_cache"] > 1.15 * stats["auto"]["max_tokens_in_cache"]
    assert stats["fp8"]["fixed_bytes_per_sequence"] < stats["auto"]["fixed_bytes_per_sequence"]


def test_engine_rejects_an_unknown_kv_cache_dtype():
    with pytest.raises(ValueError, match="kv_cache_dtype: must be one of auto, fp8, qat, got 'int4'"):
        LLM(device="cpu", kv_cache_dtype="int4")
