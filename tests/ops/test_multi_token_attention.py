"""multi_token_attention: the Triton causal softmax / sparsemax (interpreter on CPU) with the convolution,
and the torch reference, vs float64 math; the output and every gradient."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.nn import LigerMultiTokenAttention
from liger_kernels.ops.multi_token_attention import multi_token_attention, multi_token_attention_reference
from liger_kernels.ops.sparsemax import sparsemax_reference
from tests.tolerances import DTYPES, assert_as_accurate_as_torch, assert_close


def _check(
    batch, c_in, c_out, seq_len, kernel, dtype, device, padding=None, dilation=1, groups=1, bias=True, sparse=False
):
    if padding is None:
        padding = dilation * (kernel - 1) // 2
    scores = (torch.randn(batch, c_in, seq_len, seq_len, device=device) * 2).to(dtype)
    weight = (torch.randn(c_out, c_in // groups, kernel, kernel, device=device) / kernel).to(dtype)
    b = torch.randn(c_out, device=device).to(dtype) if bias else None
    grad = torch.randn(batch, c_out, seq_len, seq_len, device=device).to(dtype)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (scores, weight, b)]
    out = multi_token_attention(*leaves, 1, padding, dilation, groups, sparse=sparse)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (scores, weight, b)]
    ref = multi_token_attention_reference(*ref_leaves, 1, padding, dilation, groups, sparse=sparse)
    ref.backward(grad.double())

    assert out.dtype == dtype and out.shape == (batch, c_out, seq_len, seq_len)
    assert_close(out, ref, dtype, reduction=True, name="out")
    assert torch.equal(out.detach().triu(1), torch.zeros_like(out.detach()))
    for name, t, r in zip(("scores", "weight", "bias"), leaves, ref_leaves):
        if t is not None:
            assert_close(t.grad, r.grad, dtype, reduction=True, name=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, c_in, c_out, seq_len, kernel",
    [(2, 3, 3, 7, 3), (1, 2, 4, 1, 3), (1, 4, 2, 13, 5)],
)
def test_mta_matches_float64(batch, c_in, c_out, seq_len, kernel, dtype, device):
    _check(batch, c_in, c_out, seq_len, kernel, dtype, device)


def test_mta_groups_dilation_no_bias(device):
    _check(2, 4, 4, 9, 3, torch.float32, device, dilation=2, groups=2, bias=False)


def test_mta_long_rows(device):
    # A row wider than one power-of-two block boundary.
    _check(1, 1, 1, 130, 3, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mta_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    _check(2, 3, 3, 7, 3, dtype, device)


def test_mta_module(device):
    module = LigerMultiTokenAttention(4, 4, kernel_size=3, padding=1).to(device)
    scores = torch.randn(2, 4, 6, 6, device=device)
    out = module(scores)
    ref = multi_token_attention_reference(
        scores.double(), module.weight.double(), module.bias.double(), 1, 1, 1, 1
    )
    assert_close(out, ref, torch.float32, name="module out")
    assert torch.equal(module.bias.detach(), torch.zeros(4, device=device))


# ---- sparse=True: sparsemax of the masked map ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, c_in, c_out, seq_len, kernel",
    [(2, 3, 3, 7, 3), (1, 2, 4, 1, 3), (1, 4, 2, 13, 5)],
)
def test_mta_sparse_matches_float64(batch, c_in, c_out, seq_len, kernel, dtype, device):
    _check(batch, c_in, c_out, seq_len, kernel, dtype, device, sparse=True)


def test_mta_sparse_groups_dilation_no_bias(device):
    _check(2, 4, 4, 9, 3, torch.float32, device, dilation=2, groups=2, bias=False, sparse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mta_sparse_long_rows(dtype, device):
    # 131 rows of 131 keys: several rows per program, a partial last tile, a 256-wide block.
    _check(1, 1, 1, 131, 3, dtype, device, sparse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mta_sparse_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    _check(2, 3, 3, 7, 3, dtype, device, sparse=True)


@pytest.mark.parametrize("triton_path", [True, False])
def test_mta_sparse_map_is_sparse(triton_path, device, monkeypatch):
    # A 1 x 1 identity convolution returns the normalized map itself: sparsemax of the masked scores,
    # rows summing to 1, exact zeros above the diagonal and (unlike softmax) in the kept half too.
    if not triton_path:
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    seq_len = 37
    scores = torch.randn(2, 3, seq_len, seq_len, device=device) * 3
    weight = torch.eye(3, device=device)[:, :, None, None]
    p = multi_token_attention(scores, weight, sparse=True)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    expected = sparsemax_reference(scores.double().masked_fill(future, float("-inf")))
    assert_close(p, expected, torch.float32, name="sparse map")
    assert torch.equal(p == 0, expected == 0)
    torch.testing.assert_close(p.double().sum(-1), torch.ones_like(expected.sum(-1)), atol=1e-5, rtol=0)
    kept_zeros = ((p == 0) & ~future).sum().item()
    assert kept_zeros > 0.25 * (~future).sum().item() * 6, kept_zeros  # most kept entries of long rows are 0
    softmax = multi_token_attention(scores, weight)
    assert not ((softmax == 0) & ~future).any()


def test_mta_sparse_module(device):
    module = LigerMultiTokenAttention(4, 4, kernel_size=3, padding=1, sparse=True).to(device)
    scores = (torch.randn(2, 4, 6, 6, device=device) * 3).requires_grad_()
    out = module(scores)
    out.sum().backward()
    s64 = scores.detach().double().requires_grad_()
    ref = multi_token_attention_reference(s64, module.weight.double(), module.bias.double(), 1, 1, 1, 1, sparse=True)
    ref.sum().backward()
    assert_close(out, ref, torch.float32, name="module out")
    assert_close(scores.grad, s64.grad, torch.float32, name="module dscores")
    softmax = multi_token_attention_reference(scores.double(), module.weight.double(), module.bias.double(), 1, 1)
    assert not torch.allclose(out.double(), softmax, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"scores": torch.randn(1, 2, 5, 4)}, ValueError, "scores must be"),
        ({"scores": torch.randn(1, 2, 5, 5, dtype=torch.float64)}, TypeError, "scores has dtype"),
        ({"weight": torch.randn(2, 2, 3, 3, dtype=torch.bfloat16)}, TypeError, "same dtype"),
        ({"weight": torch.randn(2, 3, 3, 3)}, ValueError, "does not fit"),
        ({"bias": torch.randn(3)}, ValueError, "bias must be"),
        ({"padding": 0}, ValueError, "must keep"),
        ({"stride": 2}, ValueError, "must keep"),
    ],
)
def test_mta_bad_inputs(kwargs, error, match, device):
    args = dict(scores=torch.randn(1, 2, 5, 5), weight=torch.randn(2, 2, 3, 3), bias=torch.randn(2), padding=1)
    args.update(kwargs)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        multi_token_attention(**args)


@pytest.mark.gpu
def test_mta_gpu_size(device):
    # 16 heads over a 2048-token map in bf16, against the fp32 reference (float64 is slow on GPU).
    scores = torch.randn(1, 16, 2048, 2048, device=device, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(16, 16, 3, 3, device=device) / 12).to(torch.bfloat16).requires_grad_()
    out = multi_token_attention(scores, weight, None, 1, 1)
    grad = torch.randn_like(out)
    out.backward(grad)
    s32, w32 = scores.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = multi_token_attention_reference(s32, w32, None, 1, 1)
    ref.backward(grad.float())
    assert_close(out, ref, torch.bfloat16, reduction=True, name="out")
    assert_close(scores.grad, s32.grad, torch.bfloat16, reduction=True, name="dscores")
    assert_close(weight.grad, w32.grad, torch.bfloat16, reduction=True, name="dweight")


def _check_sparse_against_float64(batch, heads, seq_len, device):
    scores = (torch.randn(batch, heads, seq_len, seq_len, device=device) * 2).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(heads, heads, 3, 3, device=device) / 12).to(torch.bfloat16).requires_grad_()
    out = multi_token_attention(scores, weight, None, 1, 1, sparse=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    # float64 reference: an fp32 sort + cumsum over 2048 keys misplaces the threshold by ~1e-4
    s64, w64 = scores.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = multi_token_attention_reference(s64, w64, None, 1, 1, sparse=True)
    ref.backward(grad.double())
    assert_close(out, ref, torch.bfloat16, reduction=True, name="out")
    # dweight sums seq_len^2 bf16 products: held to plain bf16 torch's own error (p rounded to bf16,
    # cuDNN's bf16 convolution), as fixed tolerances stop fitting at 2048^2 terms.
    wb = weight.detach().clone().requires_grad_()
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    p_bf16 = sparsemax_reference(scores.detach().float().masked_fill(future, float("-inf"))).to(torch.bfloat16)
    torch.nn.functional.conv2d(p_bf16, wb, None, 1, 1).masked_fill(future, 0.0).backward(grad)
    assert_as_accurate_as_torch(weight.grad, wb.grad, w64.grad, name="dweight")
    # dscores: bf16 scores repeat values, so a key often sits exactly on a row's threshold; our fp32
    # search then leaves it at +-1 ulp of zero (p ~ 1e-7 or 0) while the float64 sort says 0, and the
    # support, hence that row's gradient, differs by O(dp). Such tie rows are left out; every other row's
    # support must agree and its gradient match.
    eye = torch.eye(heads, device=device, dtype=torch.bfloat16)[:, :, None, None]
    with torch.no_grad():
        p = multi_token_attention(scores, eye, sparse=True).double()
        p_ref = multi_token_attention_reference(s64, eye.double(), sparse=True)
    tie = (((p > 0) & (p < 1e-5)) | ((p_ref > 0) & (p_ref < 1e-5))).any(-1, keepdim=True)
    same = ((p == 0) == (p_ref == 0)).all(-1, keepdim=True)
    assert (same | tie).all(), f"{(~(same | tie)).sum().item()} rows have other supports without a tie"
    assert tie.float().mean().item() < 0.05
    keep = same & ~tie
    assert_close(scores.grad * keep, s64.grad * keep, torch.bfloat16, reduction=True, name="dscores")


def test_mta_sparse_against_float64_small(device):
    _check_sparse_against_float64(1, 2, 40, device)


@pytest.mark.gpu
def test_mta_sparse_gpu_size(device):
    _check_sparse_against_float64(1, 16, 2048, device)
