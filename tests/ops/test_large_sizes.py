"""Sizes whose element offsets pass 2^31 (int32 overflow), and the widest rows: GPU only (tens of GB).

Each reference is torch in fp32, computed a block of rows at a time so that it fits next to the inputs;
the blocks at the end of the tensor (offsets past 2^31) are where a 32-bit offset would go wrong.
"""

import pytest
import torch
import torch.nn.functional as F

from liger_kernels import _utils
from liger_kernels.ops.cross_entropy import cross_entropy
from liger_kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_kernels.ops.layer_norm import layer_norm
from liger_kernels.ops.rms_norm import rms_norm

pytestmark = pytest.mark.gpu
BLOCK_ROWS = 2048


@pytest.fixture(autouse=True)
def _cuda_only(device):
    if device != "cuda":
        pytest.skip("needs tens of GB of GPU memory; run with LIGER_TEST_DEVICE=cuda")
    yield
    torch.cuda.empty_cache()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rows, vocab", [(16384, 151936), (32768, 128256)])
def test_cross_entropy_past_2_31(rows, vocab):
    assert rows * vocab > 2**31
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    target[::7] = -100
    target[-1] = vocab - 1  # the very last element of the tensor
    n_valid = (target != -100).sum()
    # reference loss and gradient, block by block, before the in-place kernel overwrites the logits
    ref_loss = torch.zeros((), device="cuda", dtype=torch.float64)
    ref_tail_grad = None
    for r0 in range(0, rows, BLOCK_ROWS):
        z = logits[r0:r0 + BLOCK_ROWS].float().requires_grad_()
        loss = F.cross_entropy(z, target[r0:r0 + BLOCK_ROWS], ignore_index=-100, reduction="sum") / n_valid
        ref_loss += loss.double()
        if r0 + BLOCK_ROWS >= rows:
            (ref_tail_grad,) = torch.autograd.grad(loss, z)
    x = logits.requires_grad_()
    out = cross_entropy(x, target, in_place=True)
    out.backward()
    # the loss comes back in the logits' dtype (bf16: 8 significant bits, steps of 1/16 near 12)
    assert abs(out.item() - ref_loss.item()) <= 2**-8 * abs(ref_loss.item())
    tail = x.grad[-BLOCK_ROWS:]
    assert _rel(tail, ref_tail_grad) < 1e-2
    assert torch.isfinite(x.grad[:BLOCK_ROWS]).all()


@pytest.mark.parametrize("rows, hidden, vocab", [(16384, 1024, 151936), (32768, 512, 128256)])
def test_fused_linear_cross_entropy_past_2_31(rows, hidden, vocab):
    assert rows * vocab > 2**31
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(vocab, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    target[::5] = -100
    n_valid = (target != -100).sum()
    ref_loss = torch.zeros((), device="cuda", dtype=torch.float64)
    ref_dx = torch.empty(rows, hidden, device="cuda", dtype=torch.float32)
    ref_dw = torch.zeros(vocab, hidden, device="cuda", dtype=torch.float32)
    wf = w.float()
    for r0 in range(0, rows, BLOCK_ROWS):
        xb = x[r0:r0 + BLOCK_ROWS].float()
        z = (xb @ wf.t()).requires_grad_()
        loss = F.cross_entropy(z, target[r0:r0 + BLOCK_ROWS], ignore_index=-100, reduction="sum") / n_valid
        ref_loss += loss.double()
        (g,) = torch.autograd.grad(loss, z)
        ref_dx[r0:r0 + BLOCK_ROWS] = g @ wf
        ref_dw += g.t() @ xb
    xl, wl = x.requires_grad_(), w.requires_grad_()
    out = fused_linear_cross_entropy(xl, wl, target)
    out.backward()
    assert abs(out.item() - ref_loss.item()) <= 2e-3 * abs(ref_loss.item())
    assert _rel(xl.grad, ref_dx) < 2e-2
    assert _rel(xl.grad[-BLOCK_ROWS:], ref_dx[-BLOCK_ROWS:]) < 2e-2
    assert _rel(wl.grad, ref_dw) < 2e-2


def _norm_ref(x, w, b, kind):
    xf = x.float()
    if kind == "rms":
        return (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype).float())
    return F.layer_norm(xf, (x.shape[-1],), w.float(), b.float(), 1e-5)


@pytest.mark.parametrize("rows, hidden", [(524288 + 3, 4096)])
def test_rms_norm_past_2_31(rows, hidden):
    assert rows * hidden > 2**31
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    y = rms_norm(x, w, 1e-6)
    y.backward(dy)
    for r0 in (0, rows // 2, rows - BLOCK_ROWS):  # head, middle, and past the 2^31st element
        xb = x.detach()[r0:r0 + BLOCK_ROWS].float().requires_grad_()
        wb = w.detach().float().requires_grad_()
        yb = _norm_ref(xb, wb, None, "rms")
        yb.backward(dy[r0:r0 + BLOCK_ROWS].float())
        assert _rel(y[r0:r0 + BLOCK_ROWS], yb) < 1e-2
        assert _rel(x.grad[r0:r0 + BLOCK_ROWS], xb.grad) < 1e-2
    assert torch.isfinite(w.grad.float()).all()


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("hidden", [16384, 65536])
def test_wide_rows(kind, hidden):
    rows = 1024 if hidden == 16384 else 64
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    b = (0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    y = rms_norm(x, w, 1e-6) if kind == "rms" else layer_norm(x, w, b, 1e-5)
    y.backward(dy)
    leaves = [x.detach().float().requires_grad_(), w.detach().float().requires_grad_(),
              b.detach().float().requires_grad_()]
    ref = _norm_ref(*leaves, kind)
    ref.backward(dy.float())
    assert _rel(y, ref) < 1e-2
    assert _rel(x.grad, leaves[0].grad) < 1e-2
    assert _rel(w.grad, leaves[1].grad) < 2e-2
    if kind == "layer":
        assert _rel(b.grad, leaves[2].grad) < 2e-2


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_rows_wider_than_supported_raise(kind):
    hidden = _utils.MAX_FUSED_SIZE * 2
    x = torch.randn(2, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x"):
        rms_norm(x, w, 1e-6) if kind == "rms" else layer_norm(x, w, None, 1e-5)
