"""The interpreter probe: passes here, and names the versions when the interpreter cannot loop."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="no Triton wheel for this platform")

from dayzero.ops.triton import probe, table  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the probe is for the CPU interpreter")


class _Broken:
    """Stands in for the probe kernel under triton 3.6 + numpy 2.4: the launch raises."""

    def __getitem__(self, grid):
        def launch(*args):
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return launch


def test_probe_passes_on_this_interpreter():
    probe.interpreter_problem.cache_clear()
    assert probe.interpreter_problem() is None


def test_a_failing_interpreter_is_named_and_stops_the_table(monkeypatch):
    monkeypatch.setattr(probe, "_loop_kernel", _Broken())
    probe.interpreter_problem.cache_clear()
    try:
        problem = probe.interpreter_problem()
        assert problem is not None
        assert "triton " in problem and "numpy " in problem and "0-dimensional" in problem
        with pytest.raises(RuntimeError, match="numpy < 2.4"):
            table(torch.device("cpu"))
    finally:
        probe.interpreter_problem.cache_clear()


def test_the_probe_is_off_when_kernels_are_compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    probe.interpreter_problem.cache_clear()
    try:
        assert probe.interpreter_problem() is None
    finally:
        probe.interpreter_problem.cache_clear()
