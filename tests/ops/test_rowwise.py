"""dayzero/ops/rowwise.py: a row's bits from `linear` do not depend on the rows beside it (issue 20's
batch invariance for the twins). On an Intel Xeon with AVX512-BF16, torch's own F.linear failed this
at many row counts, fp32 and bf16 (shapes below), while `linear` in 16-row calls passes."""
import pytest
import torch
import torch.nn.functional as F

from dayzero.ops.rowwise import linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(256, 512), (1024, 1024), (2048, 512), (128, 4096)])
def test_linear_rows_alike_in_any_batch(shape, dtype):
    O, K = shape
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(O, K, generator=g) * K ** -0.5).to(dtype)
    x = torch.randn(70, K, generator=g).to(dtype)
    alone = torch.cat([linear(x[j:j + 1], w) for j in range(x.shape[0])])
    bad = [m for m in (1, 2, 3, 8, 15, 16, 17, 31, 33, 38, 54, 64, 70) if not torch.equal(linear(x[:m], w), alone[:m])]
    assert not bad, f"rows differ from their one-row results in calls of {bad} rows"
    torch.testing.assert_close(alone.float(), F.linear(x.float(), w.float()), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)  # still F.linear's values


def test_linear_keeps_leading_dims():
    w = torch.randn(24, 40)
    x = torch.randn(3, 7, 40)
    y = linear(x, w)
    assert y.shape == (3, 7, 24)
    assert torch.equal(y[1], linear(x[1], w))
