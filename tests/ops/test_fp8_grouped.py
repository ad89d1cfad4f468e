"""The grouped FP8 linear (the attention's grouped wo_a): gemm.c's dz_fp8_linear_grouped computes all
G groups in one call, BIT-IDENTICAL to the CPU table's fp8_linear once per group + cat (the loop it
replaces), on every path of gemm.c (bf16 x on vdpbf16ps, bf16 x on the fp32 kernels, fp32 x in
place for M <= 2 or copied, the many-rows path from ROWS_MIN rows, AVX2 and plain-C builds) and for
1 and 2 threads; within the usual GEMM bound of its twin ref.fp8_linear_grouped (the loop of
ref.fp8_linear); the cases the kernel does not take run the loop; and a model's attention output
is unchanged bit for bit with the grouped op in the table or taken out of it."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from dayzero.ops import REF, cpu, for_device, ref

if cpu.unavailable().get("gemm"):
    pytest.skip(f"gemm.c does not build here: {cpu.unavailable()['gemm']}", allow_module_level=True)

from dayzero.ops.cpu import gemm as G  # noqa: E402

from tests.ops.bounds import (fp8_dequant, fp8_weights, lin_bound, native_build, per_threads,  # noqa: E402
                              rand_x, within)
from tests.ops.test_cpu_gemm_rows import _one_thread  # noqa: E402, F401 (autouse: one thread in this module)

E8M0 = torch.float8_e8m0fnu
DTYPES = [torch.float32, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    diff = _bits(a) != _bits(b)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {a.numel()} outputs differ from the per-group loop"


def _loop(x, w, s, groups):
    """Today's computation on the CPU table: its fp8_linear once per group, then cat."""
    return torch.cat([G.fp8_linear(*part) for part in ref.fp8_groups(x, w, s, groups)], -1)


def _inputs(groups, R, K, M, dt, sdt, seed):
    w, s = fp8_weights(groups * R, K, sdt, seed)
    return rand_x(M, groups * K, dt, seed), w, s


def _calls(monkeypatch) -> list:
    """Record the grouped kernel's calls (the bound kernels otherwise unchanged)."""
    seen, real = [], G.kernels
    spy = types.SimpleNamespace(**vars(real))
    spy.fp8_grouped = lambda *a: (seen.append(a[7:11]), real.fp8_grouped(*a))[1]  # (M, G, R, K)
    monkeypatch.setattr(G, "kernels", spy)
    return seen


# M = 1, 2: fp32 x in place; 3, 8: one 8-row block (and 8 + 3 in 11); 17: the many-rows path (AVX-512)
MS = (1, 2, 3, 8, 17)


@pytest.mark.parametrize("sdt", [E8M0, torch.float32], ids=["e8m0", "f32scale"])
@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups,R,K", [(1, 128, 256), (2, 256, 129), (8, 128, 333)])
def test_bit_identical_to_the_loop_and_near_the_twin(groups, R, K, dt, sdt):
    """Odd K (129, 333: partial 128-blocks, vector tails, rows not 64-byte aligned in x)."""
    for M in MS:
        x, w, s = _inputs(groups, R, K, M, dt, sdt, M + groups)
        got = G.fp8_linear_grouped(x, w, s, groups)
        _same(got, _loop(x, w, s, groups), f"G{groups} K{K} M{M}")
        want = ref.fp8_linear_grouped(x, w, s, groups)
        bound = torch.cat([lin_bound(xg, fp8_dequant(wg, sg, dt), want[:, g * R:(g + 1) * R])
                           for g, (xg, wg, sg) in enumerate(ref.fp8_groups(x, w, s, groups))], -1)
        within(got, want, bound, f"twin G{groups} K{K} M{M}")


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_threads_one_and_two(dt):
    """Sizes where both the grouped call and each per-group call start a team (>= 2^20
    multiply-adds), the Flash shape's 8 groups scaled down: the same bits for 1 and 2 threads,
    equal to the loop run with 2 threads."""
    for M, groups, R, K in ((1, 8, 256, 513), (3, 8, 128, 1025), (8, 2, 128, 2049), (17, 2, 384, 1499),
                            (2, 1, 1024, 1031)):
        x, w, s = _inputs(groups, R, K, M, dt, E8M0, K)
        one, two = per_threads(lambda: G.fp8_linear_grouped(x, w, s, groups))
        loop = per_threads(lambda: _loop(x, w, s, groups), (2,))[0]
        _same(one, two, f"threads M{M} G{groups}")
        _same(two, loop, f"loop M{M} G{groups}")


def test_bf16_on_the_fp32_kernels():
    """bf16 x through the fp32 kernels (CPUs without AVX512-BF16, options(0)), every row count."""
    G.kernels.options(0)
    try:
        for sdt in (E8M0, torch.float32):
            for M in MS:
                x, w, s = _inputs(2, 128, 300, M, torch.bfloat16, sdt, M)
                _same(G.fp8_linear_grouped(x, w, s, 2), _loop(x, w, s, 2), f"options(0) M{M}")
    finally:
        G.kernels.options(1)


def test_layouts_the_kernel_reads(monkeypatch):
    """Strided x rows (a wider tensor's columns), non-contiguous weights, uint8 scale bytes, fp32
    scales, empty batches: the kernel's results, equal to the loop's."""
    seen = _calls(monkeypatch)
    w, s = fp8_weights(4 * 128, 160, E8M0, 3)
    for dt in DTYPES:
        for M in (1, 3, 17):
            x = rand_x(M, 4 * 160 + 40, dt, M)[:, 20:20 + 4 * 160]  # row stride 680, offset 20
            _same(G.fp8_linear_grouped(x, w, s.view(torch.uint8), 4), _loop(x, w, s, 4), f"strided {dt} M{M}")
            wt = w.view(torch.uint8).T.contiguous().T.view(torch.float8_e4m3fn)  # column-major copy
            assert not wt.is_contiguous()
            _same(G.fp8_linear_grouped(x, wt, s, 4), _loop(x, w, s, 4), f"non-contiguous W {dt} M{M}")
    assert len(seen) == 12 and {c[1:] for c in seen} == {(4, 128, 160)}
    assert G.fp8_linear_grouped(torch.zeros(0, 640), w, s, 4).shape == (0, 512)
    assert len(seen) == 12  # nothing to compute: no call


def test_fallbacks_run_the_loop_or_raise_the_twins_error(monkeypatch):
    """fp16 x, 3-D x and the like: the loop (fp8_linear, which runs the twin for them); shapes that
    are no grouped linear: ref.fp8_groups' ValueError, from the twin and the kernel alike."""
    seen = _calls(monkeypatch)
    x, w, s = _inputs(2, 128, 256, 3, torch.float32, E8M0, 0)
    for xa in (x.half(), x.view(3, 1, 512)):
        got = G.fp8_linear_grouped(xa, w, s, 2)
        _same(got, ref.fp8_linear_grouped(xa, w, s, 2), f"fallback {xa.dtype} {xa.dim()}-D")
    assert G.fp8_linear_grouped(x, w, s.float() * 1.5, 2).dtype == torch.float32  # fp32 scales: the kernel
    assert len(seen) == 1
    bad = [(x, w, s, 3),                        # 256 rows in 3 groups
           (x[:, :384], w[:192], s[:2], 2),    # groups of 96 rows: not whole scale blocks
           (x[:, :500], w, s, 2),              # x is not G * K wide
           (x, w, s[:1], 2),                   # scale rows
           (x, w, s, 0), (x, w, s, 2.0)]       # groups
    for args in bad:
        for fn in (ref.fp8_linear_grouped, G.fp8_linear_grouped):
            with pytest.raises(ValueError, match="fp8_linear_grouped"):
                fn(*args)
    assert len(seen) == 1


@pytest.mark.parametrize("march,flag", [("x86-64", None), ("haswell", "avx2")], ids=["scalar", "avx2"])
def test_fallback_builds(march, flag, monkeypatch, tmp_path):
    """gemm.c built for plain x86-64 (the C fallbacks) and AVX2: the grouped kernel stays
    bit-identical to the loop on that build's fp8_linear."""
    monkeypatch.setattr(G, "kernels", G.bind(native_build("gemm", march, flag, monkeypatch, tmp_path)))
    for dt in DTYPES:
        for M in (1, 3, 17):
            x, w, s = _inputs(2, 128, 333, M, dt, E8M0, M)
            _same(G.fp8_linear_grouped(x, w, s, 2), _loop(x, w, s, 2), f"{march} {dt} M{M}")


def test_tables():
    """REF carries the twin and lists no fused op; the CPU table the kernel, listed in `fused`."""
    assert REF.fp8_linear_grouped is ref.fp8_linear_grouped and "fp8_linear_grouped" not in REF.fused
    t = for_device("cpu", "cpu")
    assert t.fp8_linear_grouped is G.fp8_linear_grouped and "fp8_linear_grouped" in t.fused


def test_attention_output_unchanged_with_the_grouped_op(monkeypatch):
    """A tiny FP8 model (bf16, official numerics) on the CPU table: its attention layers call the
    grouped op (one call per layer and step, no per-group fp8_linear for wo_a), and the logits
    are bit for bit those of the same model with the op taken out of the table (the per-group
    loop of the table's fp8_linear: the decode path before it)."""
    from dayzero.reference.attention import Attention
    from dayzero.synthetic import random_model
    from dayzero.testing import tiny_args
    args = tiny_args("flash", quant="fp8", expert_dtype="fp4", dtype="bfloat16")
    model = random_model(args, device=torch.device("cpu"))
    table = for_device("cpu", "cpu")
    calls = []
    def grouped(*a):
        calls.append(a[3])
        return table.fp8_linear_grouped(*a)
    spy = dataclasses.replace(table, fp8_linear_grouped=grouped)
    without = dataclasses.replace(table, fused=tuple(n for n in table.fused if n != "fp8_linear_grouped"))
    outs = []
    for t in (spy, without):
        model.set_ops(t)
        o = torch.randn(5, args.n_heads, args.head_dim, generator=torch.Generator().manual_seed(0)).bfloat16()
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert layers
        with torch.no_grad():
            outs.append([m.output(o) for m in layers])
    assert calls == [args.o_groups] * len(layers)
    for a, b in zip(*outs):
        _same(a, b, "attention output")
