"""softmax: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
import liger_kernels.ops.softmax as softmax_module
from liger_kernels.ops.softmax import softmax, softmax_reference
from tests.tolerances import DTYPES, assert_close


def _check(x, grad, dtype, dim=-1):
    x = x.detach().requires_grad_()
    y = softmax(x, dim)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    y64 = softmax_reference(x64, dim)
    y64.backward(grad.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, dtype, name="softmax y")
    assert_close(x.grad, x64.grad, dtype, name="softmax dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 1000), (2, 4097)])
def test_softmax_matches_float64(shape, dtype, device):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    _check(x, grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_cols", [1000, 1024, 2500])
def test_softmax_looping_path(n_cols, dtype, device, monkeypatch):
    # Rows wider than the block: the two-pass looping kernels (a last partial block, an exact fit).
    monkeypatch.setattr(softmax_module, "_MAX_BLOCK", 256)
    x = (torch.randn(3, n_cols, device=device) * 3).to(dtype)
    grad = torch.randn(3, n_cols, device=device).to(dtype)
    _check(x, grad, dtype)


@pytest.mark.parametrize("max_block", [256, softmax_module._MAX_BLOCK])
def test_softmax_minus_inf(max_block, device, monkeypatch):
    # Masked (-inf) entries, including whole leading blocks of the looping path, get probability 0.
    monkeypatch.setattr(softmax_module, "_MAX_BLOCK", max_block)
    x = torch.randn(3, 700, device=device)
    x[:, :600] = float("-inf")
    x[1, 650:] = float("-inf")
    _check(x, torch.randn(3, 700, device=device), torch.float32)


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_softmax_other_dims(dim, device):
    x = torch.randn(5, 6, 7, device=device)
    _check(x, torch.randn(5, 6, 7, device=device), torch.float32, dim)


def test_softmax_strided(device):
    x = torch.randn(4, 3, 50, device=device)[..., 5:38]
    grad = torch.randn(33, 12, device=device).t().reshape(4, 3, 33)
    _check(x, grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    _check(torch.randn(4, 33, device=device).to(dtype), torch.randn(4, 33, device=device).to(dtype), dtype)


def test_softmax_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    softmax(x).sum().backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "x, dim, error, match",
    [
        (torch.ones(3, dtype=torch.int32), -1, TypeError, "x has dtype"),
        (torch.ones(()), -1, ValueError, "at least one dimension"),
        (torch.ones(2, 3), 2, ValueError, "out of range"),
    ],
)
def test_softmax_bad_inputs(x, dim, error, match, device):
    with pytest.raises(error, match=match):
        softmax(x.to(device), dim)


@pytest.mark.gpu
def test_softmax_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    for n_cols in (4096, 128256):
        x = torch.randn(1024, n_cols, device=device, dtype=torch.bfloat16)
        _check(x, torch.randn_like(x), torch.bfloat16)


def test_softmax_module(device):
    from liger_kernels.nn import LigerSoftmax

    x = torch.randn(3, 10, device=device)
    assert torch.equal(LigerSoftmax(dim=0)(x), softmax(x, 0))
