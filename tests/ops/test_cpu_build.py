"""Building, caching and choosing the native CPU kernels (dayzero/ops/cpu/build.py, for_device)."""
from __future__ import annotations

import pytest
import torch

from dayzero.ops import REF, for_device
from dayzero.ops import cpu
from dayzero.ops.cpu import build


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private build cache and no libraries loaded or failures remembered yet."""
    monkeypatch.setenv("DAYZERO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_libs", {})
    monkeypatch.setattr(build, "_errors", {})
    monkeypatch.setattr(build, "_functions", {})
    return tmp_path


def test_library_is_keyed_by_flags_and_cached(fresh, monkeypatch):
    native = build.library_path("mhc")
    assert native.parent == fresh / "cpu"
    monkeypatch.setenv("DAYZERO_CPU_MARCH", "x86-64")
    generic = build.library_path("mhc")
    assert generic != native  # a different -march is a different library
    path = build.build("mhc")
    assert path == generic and path.exists()
    stamp = path.stat().st_mtime_ns
    assert build.build("mhc") == path and path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in (fresh / "cpu").iterdir()] == [path.name]  # no temporary files left behind


def test_no_compiler_is_a_clear_error_and_auto_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    with pytest.raises(build.NativeUnavailable, match="no-such-cc"):
        build.lib("mhc")
    with pytest.raises(build.NativeUnavailable):  # the failure is remembered, not retried per call
        build.function("mhc", "dz_rms_norm", "p")
    assert for_device("cpu") is REF  # auto: the twins, same results
    with pytest.raises(build.NativeUnavailable):
        for_device("cpu", "cpu")  # asked for explicitly: the reason, not a silent fallback


def test_compile_error_names_the_module(fresh, monkeypatch, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in build.HEADERS:
        (src / name).write_text((build.HERE / name).read_text())
    (src / "broken.c").write_text("void dz_x(void) { this is not C; }\n")
    monkeypatch.setattr(build, "HERE", src)
    with pytest.raises(build.NativeUnavailable, match=r"broken\.c failed"):
        build.lib("broken")


def test_table_on_this_machine():
    if cpu.unavailable():
        pytest.fail(f"native CPU kernels do not build on this machine: {cpu.unavailable()}")
    t = for_device("cpu")
    assert t.name == "cpu" and t is not REF
    from dayzero.ops import OP_NAMES
    assert set(t.kernels) == set(OP_NAMES)  # every op of the seam has a native kernel
    assert for_device("cpu", "ref") is REF
    with pytest.raises(ValueError, match="CPU tensors only"):
        for_device("meta", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        for_device("cpu", "native")
    for op in t.kernels:  # every op the table claims runs a kernel of this package, not a twin
        assert getattr(t, op).__module__.startswith("dayzero.ops.cpu."), op
        assert getattr(t, op) is not getattr(REF, op)
    assert torch.get_num_threads() >= 1
