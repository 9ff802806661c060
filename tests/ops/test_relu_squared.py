"""relu_squared: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.relu_squared import relu_squared, relu_squared_reference
from tests.tolerances import DTYPES, assert_close


def _check(x, grad, dtype):
    x = x.detach().requires_grad_()
    x_before = x.detach().clone()
    y = relu_squared(x)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    y64 = relu_squared_reference(x64)
    y64.backward(grad.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, dtype, name="relu_squared y")
    assert_close(x.grad, x64.grad, dtype, name="relu_squared dx")
    assert torch.equal(x.detach(), x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1, 1), (3, 7), (2, 3, 1000), (2, 4097)])
def test_relu_squared_matches_float64(shape, dtype, device):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    x.view(-1)[::7] = 0.0  # the kink: gradient 0
    grad = torch.randn(shape, device=device).to(dtype)
    _check(x, grad, dtype)


def test_relu_squared_strided(device):
    x = torch.randn(4, 3, 50, device=device)[..., 5:38]
    grad = torch.randn(33, 12, device=device).t().reshape(4, 3, 33)
    _check(x, grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_squared_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    _check(torch.randn(4, 33, device=device).to(dtype), torch.randn(4, 33, device=device).to(dtype), dtype)


def test_relu_squared_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    relu_squared(x).sum().backward()
    assert x.grad.shape == (0, 8)


def test_relu_squared_bad_dtype(device):
    with pytest.raises(TypeError, match="x has dtype"):
        relu_squared(torch.ones(3, dtype=torch.int32, device=device))


@pytest.mark.gpu
def test_relu_squared_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    x = torch.randn(4096, 14336, device=device, dtype=torch.bfloat16)
    _check(x, torch.randn_like(x), torch.bfloat16)


def test_relu_squared_module(device):
    from liger_kernels.nn import LigerReLUSquared

    x = torch.randn(3, 10, device=device)
    assert torch.equal(LigerReLUSquared()(x), relu_squared(x))
