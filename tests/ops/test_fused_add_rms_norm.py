"""fused_add_rms_norm: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.fused_add_rms_norm import fused_add_rms_norm, rms_norm_with_residual
from liger_kernels.ops.rms_norm import rms_norm_reference
from tests.tolerances import DTYPES, assert_close

MODES = ["llama", "gemma", "none"]
OFFSETS = {"llama": 0.0, "gemma": 1.0, "none": 0.0}


def _expected_dweight(normed, dy, dw64, mode, eps):
    """In "llama" mode the weight multiplies x * rstd rounded to x's dtype: float64 sum over that value
    (see tests/ops/test_rms_norm.py:expected_dweight)."""
    if mode != "llama":
        return dw64
    hidden = normed.shape[-1]
    ones = torch.ones(hidden, dtype=normed.dtype)
    normalized = rms_norm_reference(normed.detach().cpu(), ones, eps, 0.0, "llama").double()
    return (dy.detach().double().cpu() * normalized).reshape(-1, hidden).sum(0)


def _check(x, residual, weight, dy, dres, mode, offset=0.0, eps=1e-6, in_place=False):
    """Run the op on leaf copies with upstream gradients dy (of y) and dres (of new_residual), either
    possibly None; compare both outputs and every gradient with the float64 reference."""
    x = x.detach().requires_grad_()
    residual = residual.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y, new_residual = fused_add_rms_norm(x, residual, weight, eps, offset, mode, in_place)
    torch.autograd.backward(
        [t for t, g in ((y, dy), (new_residual, dres)) if g is not None],
        [g.clone() for g in (dy, dres) if g is not None],
    )

    x64, r64, w64 = (t.detach().double().cpu().requires_grad_() for t in (x, residual, weight))
    s64 = r64 + x64
    # y is rms_norm of new_residual, the sum rounded to its dtype: normalize that value (the gradient
    # through the rounding taken as identity). Normalizing the exact float64 sum instead shifts dweight
    # by ~sqrt(rows) * 2**-9 over many bf16 rows (0.4 at 4096 rows), more than a reduction tolerance
    # absorbs. new_residual itself is checked against the exact sum below.
    normed64 = s64 + (new_residual.detach().double().cpu() - s64.detach())
    y64 = rms_norm_reference(normed64, w64, eps, offset, mode)
    torch.autograd.backward(
        [t for t, g in ((y64, dy), (s64, dres)) if g is not None],
        [g.double().cpu() for g in (dy, dres) if g is not None],
    )

    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    assert new_residual.dtype == s_dtype and new_residual.shape == x.shape
    assert y.dtype == (torch.promote_types(s_dtype, weight.dtype) if mode == "llama" else s_dtype)
    tol_dtype = x.dtype if x.dtype != torch.float32 else residual.dtype
    assert_close(new_residual, s64, tol_dtype, name="new_residual")
    assert_close(y, y64, tol_dtype, name=f"{mode} y")
    assert x.grad.dtype == x.dtype and residual.grad.dtype == residual.dtype
    assert_close(x.grad, x64.grad, tol_dtype, name="dx")
    assert_close(residual.grad, r64.grad, tol_dtype, name="dresidual")
    if dy is None:
        assert weight.grad is None
    else:
        expected = _expected_dweight(new_residual, dy, w64.grad, mode, eps)
        assert_close(weight.grad, expected, tol_dtype, reduction=True, name="dweight")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 1000, 4097])
def test_fused_add_rms_norm_matches_float64(mode, dtype, hidden, device):
    rows = 2 if hidden == 4097 else 6
    x, residual, dy, dres = (torch.randn(rows, 1, hidden, device=device).to(dtype) for _ in range(4))
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    _check(x, residual, weight, dy, dres, mode, OFFSETS[mode])


def test_fused_add_rms_norm_wide_rows(device):
    # Rows wider than 8192: the backward without load-ahead (see rms_norm.backward_config).
    x, residual, dy, dres = (torch.randn(6, 8193, device=device).to(torch.bfloat16) for _ in range(4))
    weight = (1 + 0.5 * torch.randn(8193, device=device)).to(torch.bfloat16)
    _check(x, residual, weight, dy, dres, "gemma", offset=1.0, in_place=True)


@pytest.mark.parametrize("used", ["y_only", "residual_only"])
def test_one_output_unused(used, device):
    # Autograd hands None for the unused output; nothing is materialized as zeros.
    x, residual, dy, dres = (torch.randn(3, 5, 48, device=device) for _ in range(4))
    weight = torch.randn(48, device=device)
    if used == "y_only":
        _check(x, residual, weight, dy, None, "llama")
    else:
        _check(x, residual, weight, None, dres, "llama")


def test_many_rows_and_strided_inputs(device):
    # 37 rows of 1000 = 10 row tiles on 4 persistent programs; x and residual are column slices.
    base = torch.randn(37, 2000, device=device)
    x, residual = base[:, :1000], base[:, 1000:]
    dy = torch.randn(37, 1000, device=device)
    dres = torch.randn(1000, 37, device=device).t()
    _check(x, residual, torch.randn(1000, device=device), dy, dres, "gemma", offset=1.0)


def test_mixed_dtypes(device):
    # bf16 sublayer output added to an fp32 residual stream (autocast with fp32 embeddings): the new
    # residual is fp32 as `residual + hidden_states` gives, and each gradient keeps its input's dtype.
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    residual = torch.randn(4, 64, device=device)
    weight = torch.randn(64, device=device)
    dy, dres = torch.randn(4, 64, device=device), torch.randn(4, 64, device=device)
    _check(x, residual, weight, dy, dres, "llama")


def test_in_place_backward(device):
    x, residual = (torch.randn(6, 40, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(40, device=device, requires_grad=True)
    dy, dres = torch.randn(6, 40, device=device), torch.randn(6, 40, device=device)
    expected = torch.autograd.grad(fused_add_rms_norm(x, residual, weight), (x, residual, weight), (dy, dres))
    buffer = dy.clone()
    grads = torch.autograd.grad(
        fused_add_rms_norm(x, residual, weight, in_place=True), (x, residual, weight), (buffer, dres)
    )
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)
    assert torch.equal(buffer, grads[0])  # dx was written into dy's buffer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, used", [(1, "both"), (1000, "both"), (4097, "both"), (100, "y_only"),
                                          (100, "residual_only")])
def test_rms_norm_with_residual(mode, dtype, hidden, used, device):
    # (rms_norm(x), x): x's gradient is the norm's input gradient plus the residual stream's.
    x = torch.randn(5, 1, hidden, device=device).to(dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(x.shape, device=device).to(dtype) if used != "residual_only" else None
    dres = torch.randn(x.shape, device=device).to(dtype) if used != "y_only" else None
    y, residual = rms_norm_with_residual(x, weight, 1e-6, OFFSETS[mode], mode, in_place=True)
    assert torch.equal(residual, x)
    outs = [(t, g) for t, g in ((y, dy), (residual, dres)) if g is not None]
    torch.autograd.backward([t for t, _ in outs], [g.clone() for _, g in outs])

    x64, w64 = (t.detach().double().cpu().requires_grad_() for t in (x, weight))
    y64 = rms_norm_reference(x64, w64, 1e-6, OFFSETS[mode], mode)
    outs64 = [(t, g) for t, g in ((y64, dy), (x64 * 1, dres)) if g is not None]
    torch.autograd.backward([t for t, _ in outs64], [g.double().cpu() for _, g in outs64])
    assert y.dtype == (torch.promote_types(dtype, weight.dtype) if mode == "llama" else dtype)
    assert_close(y, y64, dtype, name=f"{mode} y")
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, name="dx")
    if dy is None:
        assert weight.grad is None
    else:
        expected = _expected_dweight(x, dy, w64.grad, mode, 1e-6)
        assert_close(weight.grad, expected, dtype, reduction=True, name="dweight")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_reference_path(dtype, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x, residual, dy, dres = (torch.randn(3, 5, 64).to(dtype) for _ in range(4))
    _check(x, residual, torch.randn(64).to(dtype), dy, dres, "llama")


def test_fused_add_rms_norm_errors(device):
    x = torch.randn(2, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(ValueError, match="residual has shape"):
        fused_add_rms_norm(x, torch.randn(2, 1, device=device), w)
    with pytest.raises(TypeError, match="residual"):
        fused_add_rms_norm(x, x.long(), w)
    with pytest.raises(TypeError, match="x"):
        fused_add_rms_norm(x.double(), x, w)
    with pytest.raises(ValueError, match="weight"):
        fused_add_rms_norm(x, x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="casting_mode"):
        fused_add_rms_norm(x, x, w, casting_mode="gemma2")
    with pytest.raises(ValueError, match="one device"):
        fused_add_rms_norm(x, x.to("meta"), w)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_fused_add_rms_norm_large_gpu(mode, device):
    shape = (4096, 4096)
    x, residual, dy, dres = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(4))
    weight = (1 + 0.1 * torch.randn(4096, device=device)).to(torch.bfloat16)
    _check(x, residual, weight, dy, dres, mode, OFFSETS[mode], in_place=True)
