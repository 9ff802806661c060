"""glu_matmul: (f(a) * b) @ W.T (+ residual) with the activation computed in the product's operand
load, vs float64 math and vs the glu kernel + torch matmul it replaces; gated_mlp / gated_down_proj
with it switched on (GLU_MATMUL) give the same values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from liger_kernels.ops import glu_matmul
from liger_kernels.ops.gated_down_proj import ACTIVATIONS, gated_down_proj, gated_down_proj_reference
from liger_kernels.ops.gated_mlp import gated_mlp, gated_mlp_reference
from liger_kernels.ops.glu import _glu_forward
from tests.tolerances import DTYPES, assert_close


def _rows(m, k, n, dtype, device, residual):
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    r = torch.randn(m, n, device=device).to(dtype) if residual else None
    return a, b, w, r


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n, residual", [(1, 1, 1, False), (5, 37, 9, True), (33, 70, 18, False),
                                               (17, 16, 40, True)])
def test_matches_float64_and_the_two_pass_forward(activation, dtype, m, k, n, residual, device):
    a, b, w, r = _rows(m, k, n, dtype, device, residual)
    y = glu_matmul.glu_matmul_rows(a, b, w, ACTIVATIONS[activation], r)
    y64 = gated_down_proj_reference(a.double(), b.double(), w.double(), None, activation)
    if residual:
        y64 = y64 + r.double()
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, y64, dtype, reduction=True, name="y")
    # the same c as the glu kernel stores, so only the product's summation order differs from torch's
    c = _glu_forward(a, b, ACTIVATIONS[activation])
    two_pass = F.linear(c, w) if r is None else torch.addmm(r, c, w.t())
    torch.testing.assert_close(y.float(), two_pass.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_reads_strided_halves(device):
    """a and b as the two halves of one fused gate_up tensor (row stride 2K)."""
    gate_up = torch.randn(7, 2 * 19, device=device)
    a, b = gate_up.chunk(2, dim=-1)
    w = torch.randn(5, 19, device=device)
    y = glu_matmul.glu_matmul_rows(a, b, w, ACTIVATIONS["silu"])
    torch.testing.assert_close(y, F.linear(F.silu(a) * b, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_mlp_and_down_proj_with_it_on(dtype, device, monkeypatch):
    """Switched on, the MLP ops run it in their forward; values and every gradient match float64."""
    calls = []
    original = glu_matmul.glu_matmul_rows
    monkeypatch.setattr(glu_matmul, "GLU_MATMUL", True)
    monkeypatch.setattr(glu_matmul, "glu_matmul_rows", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(2, 5, 24, device=device).to(dtype).requires_grad_()
    wg, wu = [(torch.randn(37, 24, device=device) / 24**0.5).to(dtype).requires_grad_() for _ in range(2)]
    wd = (torch.randn(24, 37, device=device) / 37**0.5).to(dtype).requires_grad_()
    r = torch.randn(2, 5, 24, device=device).to(dtype).requires_grad_()
    leaves = [x, wg, wu, wd, r]
    y = gated_mlp(x, wg, wu, wd, "silu", r)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = gated_mlp_reference(*leaves64[:4], "silu", leaves64[4])
    y64.backward(grad.double())
    assert_close(y, y64, dtype, reduction=True, name="y")
    for i, (t, t64) in enumerate(zip(leaves, leaves64)):
        assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {i}")
    a, b = torch.randn(6, 37, device=device).to(dtype), torch.randn(6, 37, device=device).to(dtype)
    out = gated_down_proj(a, b, wd.detach())
    assert_close(out, gated_down_proj_reference(a.double(), b.double(), wd.detach().double(), None, "silu"),
                 dtype, reduction=True, name="gated_down_proj")
    assert calls == [1, 1]
