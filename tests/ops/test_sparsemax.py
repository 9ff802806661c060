"""sparsemax: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.sparsemax import sparsemax, sparsemax_reference
from tests.tolerances import DTYPES, assert_close


def _check(x, grad, dtype, dim=-1):
    x = x.detach().requires_grad_()
    y = sparsemax(x, dim)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    y64 = sparsemax_reference(x64, dim)
    y64.backward(grad.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, dtype, name="sparsemax y")
    assert_close(x.grad, x64.grad, dtype, name="sparsemax dx")
    # A distribution with the same exact zeros as the float64 projection.
    assert torch.equal(y == 0, y64 == 0)
    torch.testing.assert_close(y.double().sum(dim), torch.ones_like(y64.sum(dim)), atol=2e-2, rtol=0)


def test_sparsemax_reference_properties(device):
    # The reference is the simplex projection: a known value, uniform on ties, one-hot when dominant.
    x = torch.tensor([[0.5, 0.2, -1.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[0.65, 0.35, 0.0], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(sparsemax_reference(x.to(device)), expected.to(device))


@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 1000), (2, 4097)])
def test_sparsemax_matches_float64(shape, dtype, scale, device):
    # Small scale: wide supports; large scale: a few elements.
    x = (torch.randn(shape, device=device) * scale).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    _check(x, grad, dtype)


def test_sparsemax_special_rows(device):
    x = torch.randn(5, 20, device=device)
    x[0] = 2.0  # ties: uniform
    x[1, 3] = 50.0  # one dominant value: one-hot
    x[2] *= 1000.0  # large magnitudes
    x[3] = torch.linspace(-1, 1, 20)  # evenly spaced
    x[4] = -1e4  # all very negative, one slightly larger
    x[4, 7] = -1e4 + 0.5
    _check(x, torch.randn(5, 20, device=device), torch.float32)


@pytest.mark.parametrize("dim", [0, -2])
def test_sparsemax_other_dims(dim, device):
    _check(torch.randn(5, 6, 7, device=device), torch.randn(5, 6, 7, device=device), torch.float32, dim)


def test_sparsemax_strided(device):
    x = torch.randn(4, 3, 50, device=device)[..., 5:38]
    grad = torch.randn(33, 12, device=device).t().reshape(4, 3, 33)
    _check(x, grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsemax_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    _check(torch.randn(4, 33, device=device).to(dtype), torch.randn(4, 33, device=device).to(dtype), dtype)


def test_sparsemax_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    sparsemax(x).sum().backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "x, dim, error, match",
    [
        (torch.ones(3, dtype=torch.int32), -1, TypeError, "x has dtype"),
        (torch.ones(()), -1, ValueError, "at least one dimension"),
        (torch.ones(2, 3), -3, ValueError, "out of range"),
        (torch.ones(1, 65537), -1, ValueError, "at most 65536"),
    ],
)
def test_sparsemax_bad_inputs(x, dim, error, match, device):
    with pytest.raises(error, match=match):
        sparsemax(x.to(device), dim)


@pytest.mark.gpu
def test_sparsemax_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    x = torch.randn(4096, 32000, device=device, dtype=torch.bfloat16)
    _check(x, torch.randn_like(x), torch.bfloat16)


def test_sparsemax_module(device):
    from liger_kernels.nn import LigerSparsemax

    x = torch.randn(3, 10, device=device)
    assert torch.equal(LigerSparsemax()(x), sparsemax(x))
