"""layer_norm: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.layer_norm import layer_norm, layer_norm_reference
from tests.tolerances import DTYPES, assert_close


def _check(x, weight, bias, dy, eps=1e-5, frozen=False):
    """Run layer_norm on leaf copies; compare y, dx, dweight, dbias with the float64 reference."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_(not frozen)
    bias = bias.detach().requires_grad_(not frozen) if bias is not None else None
    x_before = x.detach().clone()
    y = layer_norm(x, weight, bias, eps)
    y.backward(dy)

    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    b64 = bias.detach().double().cpu().requires_grad_() if bias is not None else None
    layer_norm_reference(x64, w64, b64, eps).backward(dy.double().cpu())

    assert y.shape == x.shape and y.dtype == x.dtype and x.grad.dtype == x.dtype
    assert_close(y, layer_norm_reference(x64, w64, b64, eps), x.dtype, name="y")
    assert_close(x.grad, x64.grad, x.dtype, name="dx")
    if frozen:
        assert weight.grad is None and (bias is None or bias.grad is None)
    else:
        assert weight.grad.dtype == weight.dtype
        assert_close(weight.grad, w64.grad, x.dtype, reduction=True, name="dweight")
        if bias is not None:
            assert bias.grad.dtype == bias.dtype
            assert_close(bias.grad, b64.grad, x.dtype, reduction=True, name="dbias")
    assert torch.equal(x.detach(), x_before)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 1000, 4097])
def test_layer_norm_matches_float64(has_bias, dtype, hidden, device):
    rows = 2 if hidden == 4097 else 6
    # An offset mean: the variance must be computed around it, not from E[x^2] - E[x]^2.
    x = (torch.randn(rows, 1, hidden, device=device) * 2 + 3).to(dtype)
    weight = torch.randn(hidden, device=device).to(dtype)
    bias = torch.randn(hidden, device=device).to(dtype) if has_bias else None
    dy = torch.randn(rows, 1, hidden, device=device).to(dtype)
    _check(x, weight, bias, dy)


@pytest.mark.parametrize("hidden", [1000, 64])
def test_layer_norm_many_rows(hidden, device):
    # More row tiles than persistent programs (see test_rms_norm_many_rows).
    rows = 37 if hidden == 1000 else 650
    x = torch.randn(rows, hidden, device=device)
    dy = torch.randn(rows, hidden, device=device)
    _check(x, torch.randn(hidden, device=device), torch.randn(hidden, device=device), dy)


def test_layer_norm_wide_rows(device):
    # Rows wider than 8192: the backward without load-ahead (see rms_norm.backward_config).
    x = (torch.randn(6, 8193, device=device) + 1).to(torch.bfloat16)
    weight, bias = (torch.randn(8193, device=device).to(torch.bfloat16) for _ in range(2))
    _check(x, weight, bias, torch.randn(6, 8193, device=device).to(torch.bfloat16))


def test_layer_norm_strided_and_mixed_dtypes(device):
    # bf16 activations as a column slice, fp32 affine parameters, a transposed gradient.
    base = torch.randn(5, 3, 2 * 24, device=device, dtype=torch.bfloat16)
    x = base[..., :24]
    dy = torch.randn(24, 3, 5, device=device, dtype=torch.bfloat16).permute(2, 1, 0)
    _check(x, torch.randn(24, device=device), torch.randn(24, device=device), dy, eps=1e-6)


def test_layer_norm_frozen_parameters(device):
    x = torch.randn(4, 30, device=device)
    dy = torch.randn(4, 30, device=device)
    _check(x, torch.randn(30, device=device), torch.randn(30, device=device), dy, frozen=True)


def test_layer_norm_empty_batch(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    y = layer_norm(x, weight)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_reference_path(dtype, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x = torch.randn(3, 5, 64).to(dtype)
    _check(x, torch.randn(64).to(dtype), torch.randn(64).to(dtype), torch.randn(3, 5, 64).to(dtype))


def test_reference_matches_nn_layer_norm():
    # What nn.LayerNorm gives for a bf16 input and bf16 parameters (fp32 math inside, one rounding).
    norm = torch.nn.LayerNorm(96, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(4, 7, 96, dtype=torch.bfloat16)
    expected = norm(x).float()
    actual = layer_norm_reference(x, norm.weight, norm.bias, 1e-5).float()
    assert ((actual - expected).abs() <= expected.abs() * 2.0**-7 + 1e-6).all()


def test_layer_norm_errors(device):
    x = torch.randn(2, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(TypeError, match="x"):
        layer_norm(x.double(), w)
    with pytest.raises(TypeError, match="bias"):
        layer_norm(x, w, w.int())
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.randn(9, device=device))
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, torch.randn(9, device=device))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        layer_norm(x, torch.randn(2, 8, device=device))
    with pytest.raises(ValueError, match="one device"):
        layer_norm(x, w, w.to("meta"))
    wide = liger_kernels._utils.MAX_FUSED_SIZE + 1
    with pytest.raises(ValueError, match="at most"):
        layer_norm(torch.zeros(1, wide, device=device), torch.zeros(wide, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 65536), (16384, 128)])
def test_layer_norm_large_gpu(shape, device):
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(torch.bfloat16)
    bias = (0.1 * torch.randn(shape[-1], device=device)).to(torch.bfloat16)
    dy = torch.randn(shape, device=device, dtype=torch.bfloat16)
    _check(x, weight, bias, dy)
