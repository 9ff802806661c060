"""poly_norm: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.poly_norm import poly_norm, poly_norm_reference
from tests.tolerances import DTYPES, assert_close


def _params(dtype, device):
    return (torch.randn(3, device=device) * 0.5 + 0.3).to(dtype), torch.randn(1, device=device).to(dtype)


def _check(x, weight, bias, grad, dtype, eps=1e-6):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = poly_norm(*leaves, eps)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = poly_norm_reference(*leaves64, eps)
    y64.backward(grad.double())

    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y64, dtype, name="poly_norm y")
    assert_close(leaves[0].grad, leaves64[0].grad, dtype, name="poly_norm dx")
    for name, leaf, leaf64 in zip(("dweight", "dbias"), leaves[1:], leaves64[1:]):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad, leaf64.grad, dtype, reduction=True, name=f"poly_norm {name}")


def test_poly_norm_reference_definition(device):
    # The PolyNorm module of the Motif/Liger anchors, written out.
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    weight = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, device=device)
    bias = torch.tensor([0.1], dtype=torch.float64, device=device)

    def norm(u):
        return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6)

    expected = weight[0] * norm(x**3) + weight[1] * norm(x**2) + weight[2] * norm(x) + bias
    torch.testing.assert_close(poly_norm_reference(x, weight, bias), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 1000), (2, 4097)])
def test_poly_norm_matches_float64(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype)
    weight, bias = _params(dtype, device)
    n_rows = x.numel() // shape[-1]
    # Keep the scalar parameter gradients (sums over every element) O(1).
    grad = (torch.randn(shape, device=device) / n_rows**0.5 / shape[-1] ** 0.5).to(dtype)
    _check(x, weight, bias, grad, dtype)


def test_poly_norm_many_rows(device):
    # More row tiles than persistent programs; fp32 parameters with bf16 activations.
    x = torch.randn(40, 300, device=device, dtype=torch.bfloat16)
    weight, bias = _params(torch.float32, device)
    grad = (torch.randn(40, 300, device=device) / 100).to(torch.bfloat16)
    _check(x, weight, bias, grad, torch.bfloat16)


def test_poly_norm_strided(device):
    x = torch.randn(4, 3, 50, device=device)[..., 5:38]
    grad = torch.randn(33, 12, device=device).t().reshape(4, 3, 33) / 20
    weight, bias = _params(torch.float32, device)
    _check(x, weight, bias, grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_poly_norm_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x = torch.randn(4, 33, device=device).to(dtype)
    weight, bias = _params(dtype, device)
    _check(x, weight, bias, (torch.randn(4, 33, device=device) / 12).to(dtype), dtype)


def test_poly_norm_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    weight, bias = _params(torch.float32, device)
    poly_norm(x, weight, bias).sum().backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "x_shape, w_shape, b_shape, error, match",
    [
        ((3, 8), (2,), (1,), ValueError, r"weight must have shape \(3,\)"),
        ((3, 8), (3,), (2,), ValueError, "bias must hold one value"),
        ((), (3,), (1,), ValueError, "at least one dimension"),
        ((1, 65537), (3,), (1,), ValueError, "at most 65536"),
    ],
)
def test_poly_norm_bad_inputs(x_shape, w_shape, b_shape, error, match, device):
    with pytest.raises(error, match=match):
        poly_norm(torch.ones(x_shape, device=device), torch.ones(w_shape, device=device),
                  torch.ones(b_shape, device=device))


def test_poly_norm_bad_dtype(device):
    with pytest.raises(TypeError, match="x has dtype"):
        poly_norm(torch.ones(2, 3, dtype=torch.int32, device=device), torch.ones(3, device=device),
                  torch.ones(1, device=device))


@pytest.mark.gpu
def test_poly_norm_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    x = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    weight, bias = _params(torch.bfloat16, device)
    grad = (torch.randn_like(x, dtype=torch.float32) / 8192 / 64).to(torch.bfloat16)
    _check(x, weight, bias, grad, torch.bfloat16)


def test_poly_norm_module(device):
    from liger_kernels.nn import LigerPolyNorm

    module = LigerPolyNorm(eps=1e-5).to(device)
    x = torch.randn(3, 10, device=device)
    assert torch.equal(module(x), poly_norm(x, module.weight, module.bias, 1e-5))
    assert torch.allclose(module.weight, torch.full((3,), 1 / 3, device=device))
