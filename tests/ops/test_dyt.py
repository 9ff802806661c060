"""dyt: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.dyt import dyt, dyt_reference
from tests.tolerances import DTYPES, assert_close


def _params(hidden, dtype, device, bias=True, alpha_shape=(1,)):
    alpha = (torch.rand(alpha_shape, device=device) + 0.5).to(dtype)
    weight = (torch.randn(hidden, device=device) + 1).to(dtype)
    b = torch.randn(hidden, device=device).to(dtype) if bias else None
    return alpha, weight, b


def _check(x, alpha, weight, bias, grad, dtype):
    """Run dyt on leaf copies; compare y and every gradient with float64 reference math."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, alpha, weight, bias)]
    y = dyt(*leaves)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    y64 = dyt_reference(*leaves64)
    y64.backward(grad.double())

    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y64, dtype, name="dyt y")
    assert_close(leaves[0].grad, leaves64[0].grad, dtype, name="dyt dx")
    for name, leaf, leaf64 in zip(("dalpha", "dweight", "dbias"), leaves[1:], leaves64[1:]):
        if leaf is not None:
            assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, leaf64.grad, dtype, reduction=True, name=f"dyt {name}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 3, 1000)])
def test_dyt_matches_float64(shape, dtype, bias, device):
    x = (torch.randn(shape, device=device) * 2).to(dtype)
    alpha, weight, b = _params(shape[-1], dtype, device, bias)
    grad = torch.randn(shape, device=device).to(dtype)
    # Reduction tolerances scale with the summed magnitudes: keep gradients O(1) per row.
    _check(x, alpha, weight, b, grad / shape[0], dtype)


def test_dyt_wide_and_many_rows(device):
    # Several column blocks and more row tiles than persistent programs; 0-d alpha.
    x = torch.randn(9, 4097, device=device)
    alpha, weight, b = _params(4097, torch.float32, device, alpha_shape=())
    grad = torch.randn(9, 4097, device=device) / 9
    _check(x, alpha, weight, b, grad, torch.float32)


def test_dyt_fp32_params_bf16_activations(device):
    x = torch.randn(6, 40, device=device, dtype=torch.bfloat16)
    alpha, weight, b = _params(40, torch.float32, device)
    grad = torch.randn(6, 40, device=device, dtype=torch.bfloat16) / 6
    _check(x, alpha, weight, b, grad, torch.bfloat16)


def test_dyt_strided_inputs(device):
    x = torch.randn(4, 3, 50, device=device)[..., 5:38]
    grad = torch.randn(33, 12, device=device).t().reshape(4, 3, 33)
    weight = torch.randn(66, device=device)[::2]
    alpha = torch.tensor([0.7], device=device)
    _check(x, alpha, weight, torch.randn(33, device=device), grad, torch.float32)


def test_dyt_saturated(device):
    x = torch.linspace(-80, 80, 161, device=device).reshape(7, 23)
    alpha, weight, b = _params(23, torch.float32, device)
    _check(x, alpha, weight, b, torch.randn(7, 23, device=device), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dyt_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x = torch.randn(4, 33, device=device).to(dtype)
    alpha, weight, b = _params(33, dtype, device)
    _check(x, alpha, weight, b, torch.randn(4, 33, device=device).to(dtype) / 4, dtype)


def test_dyt_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    alpha, weight, b = _params(8, torch.float32, device)
    y = dyt(x, alpha, weight, b)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "x_shape, alpha_shape, w_shape, b_shape, error, match",
    [
        ((3, 8), (2,), (8,), (8,), ValueError, "alpha must hold one value"),
        ((3, 8), (1,), (7,), (8,), ValueError, "weight must have shape"),
        ((3, 8), (1,), (8,), (8, 1), ValueError, "bias must have shape"),
        ((), (1,), (8,), None, ValueError, "at least one dimension"),
    ],
)
def test_dyt_bad_inputs(x_shape, alpha_shape, w_shape, b_shape, error, match, device):
    bias = torch.ones(b_shape, device=device) if b_shape is not None else None
    with pytest.raises(error, match=match):
        dyt(torch.ones(x_shape, device=device), torch.ones(alpha_shape, device=device),
            torch.ones(w_shape, device=device), bias)


def test_dyt_bad_dtype(device):
    with pytest.raises(TypeError, match="weight has dtype"):
        dyt(torch.ones(2, 3, device=device), torch.ones(1, device=device),
            torch.ones(3, dtype=torch.int64, device=device))


@pytest.mark.gpu
def test_dyt_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    x = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    alpha, weight, b = _params(4096, torch.bfloat16, device)
    grad = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16) / 8192
    _check(x, alpha, weight, b, grad, torch.bfloat16)


def test_dyt_module(device):
    from liger_kernels.nn import LigerDyT

    module = LigerDyT(10, init_alpha=0.7).to(device)
    x = torch.randn(3, 10, device=device)
    assert torch.equal(module(x), dyt(x, module.alpha, module.weight, module.bias))
    assert module.alpha.item() == pytest.approx(0.7) and LigerDyT(10, bias=False).bias is None
