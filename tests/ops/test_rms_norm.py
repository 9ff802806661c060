"""rms_norm: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.rms_norm import rms_norm, rms_norm_reference
from tests.tolerances import DTYPES, assert_close

MODES = ["llama", "gemma", "none"]
OFFSETS = {"llama": 0.0, "gemma": 1.0, "none": 0.0}  # as the models use them


def _check(x, weight, dy, mode, offset=0.0, eps=1e-6, in_place=False, out_dtype=None):
    """Run rms_norm on leaf copies; compare y, dx, dweight with the float64 reference."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    x_before = x.detach().clone()
    y = rms_norm(x, weight, eps, offset, mode, in_place)
    y.backward(dy.clone())

    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    y64 = rms_norm_reference(x64, w64, eps, offset, mode)
    y64.backward(dy.double().cpu())

    assert y.shape == x.shape and y.dtype == (out_dtype or x.dtype)
    assert x.grad.dtype == x.dtype and weight.grad.dtype == weight.dtype
    assert_close(y, y64, x.dtype, name=f"{mode} y")
    assert_close(x.grad, x64.grad, x.dtype, name=f"{mode} dx")
    dw64 = expected_dweight(x, dy, w64.grad, mode, eps)
    assert_close(weight.grad, dw64, x.dtype, reduction=True, name=f"{mode} dweight")
    assert torch.equal(x.detach(), x_before)  # the saved input is never written


def expected_dweight(x, dy, dw64, mode, eps):
    """float64 dweight of the specification. In "llama" mode the weight multiplies x * rstd rounded to
    x's dtype, so dweight is the float64 sum of dy times that rounded value (over many bf16 rows it
    differs from exact-math dweight by ~sqrt(rows) * 2**-9, which no reduction tolerance absorbs)."""
    if mode != "llama":
        return dw64
    hidden = x.shape[-1]
    ones = torch.ones(hidden, dtype=x.dtype)
    normalized = rms_norm_reference(x.detach().cpu(), ones, eps, 0.0, "llama").double()
    return (dy.detach().double().cpu() * normalized).reshape(-1, hidden).sum(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 1000, 4097])
def test_rms_norm_matches_float64(mode, dtype, hidden, device):
    rows = 2 if hidden == 4097 else 6
    x = (torch.randn(rows, 1, hidden, device=device) * 2).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn(rows, 1, hidden, device=device).to(dtype)
    _check(x, weight, dy, mode, OFFSETS[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_offset_and_eps(mode, dtype, device):
    x = torch.randn(5, 33, device=device).to(dtype)
    weight = torch.randn(33, device=device).to(dtype)
    dy = torch.randn(5, 33, device=device).to(dtype)
    _check(x, weight, dy, mode, offset=0.5, eps=1e-2)


@pytest.mark.parametrize("hidden", [1000, 64])
def test_rms_norm_many_rows(hidden, device):
    # More row tiles than persistent programs: each program loops and sums several tiles into its
    # dweight partial row. hidden=64 packs 64 rows into a tile; 37 rows of 1000 make 10 tiles of 4.
    rows = 37 if hidden == 1000 else 650
    x = torch.randn(rows, hidden, device=device)
    weight = torch.randn(hidden, device=device)
    dy = torch.randn(rows, hidden, device=device)
    _check(x, weight, dy, "llama")


def test_rms_norm_wide_rows(device):
    # Rows wider than 8192 take the backward without load-ahead (weight reloaded per tile); 6 rows on
    # 4 persistent programs so that a program loops.
    x = torch.randn(6, 8193, device=device).to(torch.bfloat16)
    weight = (1 + 0.5 * torch.randn(8193, device=device)).to(torch.bfloat16)
    dy = torch.randn(6, 8193, device=device).to(torch.bfloat16)
    _check(x, weight, dy, "llama")


@pytest.mark.parametrize("mode", MODES)
def test_rms_norm_fp32_weight_bf16_input(mode, device):
    # Mixed precision (fp32 master weights, bf16 activations): llama promotes the output to fp32
    # as `self.weight * hidden_states.to(input_dtype)` does; gemma and none return bf16.
    x = torch.randn(4, 40, device=device, dtype=torch.bfloat16)
    weight = torch.randn(40, device=device)
    out_dtype = torch.float32 if mode == "llama" else torch.bfloat16
    dy = torch.randn(4, 40, device=device, dtype=out_dtype)
    _check(x, weight, dy, mode, OFFSETS[mode], out_dtype=out_dtype)


def test_rms_norm_strided_inputs(device):
    # x a column slice (row stride 2H), dy transposed in memory: read in place or copied, never wrong.
    base = torch.randn(3, 4, 2 * 24, device=device)
    x = base[..., :24]
    dy = torch.randn(24, 4, 3, device=device).permute(2, 1, 0)
    assert not x.is_contiguous() and not dy.is_contiguous()
    _check(x, torch.randn(24, device=device), dy, "llama")


def test_rms_norm_in_place_backward(device):
    x = torch.randn(6, 50, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(6, 50, device=device, dtype=torch.bfloat16)
    expected = torch.autograd.grad(rms_norm(x, weight), (x, weight), dy.clone())

    buffer = dy.clone()
    y = rms_norm(x, weight, in_place=True)
    dx, dw = torch.autograd.grad(y, (x, weight), buffer)
    assert torch.equal(dx, expected[0]) and torch.equal(dw, expected[1])
    assert torch.equal(buffer, dx)  # dx was written into the upstream gradient's buffer

    buffer = dy.clone()
    torch.autograd.grad(rms_norm(x, weight, in_place=False), (x, weight), buffer)
    assert torch.equal(buffer, dy)  # untouched without in_place


def test_rms_norm_in_place_with_broadcast_gradient(device):
    # y.sum() hands back an expanded (stride 0) gradient: it must not be written into.
    x = torch.randn(4, 30, device=device, requires_grad=True)
    weight = torch.randn(30, device=device, requires_grad=True)
    rms_norm(x, weight, in_place=True).sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    rms_norm_reference(x64, w64).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, name="dx")
    assert_close(weight.grad, w64.grad, torch.float32, reduction=True, name="dweight")


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_output_modified_in_place(norm, device):
    # Models scale a norm's output in place (Gemma 4's audio blocks: `h *= scale`): autograd allows it only
    # if the output is not a view made inside the autograd Function.
    from liger_kernels.ops.layer_norm import layer_norm, layer_norm_reference

    fn, ref_fn = (rms_norm, rms_norm_reference) if norm == "rms_norm" else (layer_norm, layer_norm_reference)
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True)
    scale = torch.randn(24, device=device)
    y = fn(x, w)
    y *= scale
    y.square().sum().backward()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    (ref_fn(x64, w64) * scale.double()).square().sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, reduction=True, name="dx")
    assert_close(w.grad, w64.grad, torch.float32, reduction=True, name="dw")


def test_rms_norm_frozen_weight(device):
    # LoRA-style frozen norm: no dweight is computed or returned.
    x = torch.randn(5, 20, device=device, requires_grad=True)
    weight = torch.randn(20, device=device)
    dy = torch.randn(5, 20, device=device)
    rms_norm(x, weight).backward(dy)
    x64 = x.detach().double().cpu().requires_grad_()
    rms_norm_reference(x64, weight.double().cpu()).backward(dy.double().cpu())
    assert weight.grad is None
    assert_close(x.grad, x64.grad, torch.float32, name="dx")


def test_rms_norm_empty_batch(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    y = rms_norm(x, weight)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_path(mode, dtype, monkeypatch):
    # CPU tensors without the interpreter run the torch reference, which also matches float64 math.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x = torch.randn(3, 5, 64).to(dtype)
    weight = torch.randn(64).to(dtype)
    dy = torch.randn(3, 5, 64).to(dtype)
    _check(x, weight, dy, mode, OFFSETS[mode])


def test_reference_is_bit_exact_with_hugging_face():
    pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    x = torch.randn(4, 7, 96, dtype=torch.bfloat16)
    for cls, offset, mode, w_dtype in [
        (LlamaRMSNorm, 0.0, "llama", torch.bfloat16),
        (LlamaRMSNorm, 0.0, "llama", torch.float32),
        (GemmaRMSNorm, 1.0, "gemma", torch.bfloat16),
        (Olmo2RMSNorm, 0.0, "gemma", torch.bfloat16),
    ]:
        norm = cls(96, eps=1e-6).to(w_dtype)
        with torch.no_grad():
            norm.weight.normal_()
        expected = norm(x)
        actual = rms_norm_reference(x, norm.weight, 1e-6, offset, mode)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), cls.__name__


def test_kernel_agrees_with_hugging_face_rounding(device):
    # Same dtype, same roundings as LlamaRMSNorm: on the GPU the kernel differs only where fp32 rsqrt
    # and summation order flip a rounding of x * rstd, rarely and by about one ulp of y. (The Triton
    # interpreter truncates fp32 -> bf16 instead of rounding to nearest, hence the 2-ulp bound and the
    # frequency check on CUDA only.)
    x = torch.randn(8, 512, device=device, dtype=torch.bfloat16)
    weight = torch.randn(512, device=device, dtype=torch.bfloat16)
    actual = rms_norm(x, weight).float().cpu()
    expected = rms_norm_reference(x.cpu(), weight.cpu()).float()
    assert ((actual - expected).abs() <= expected.abs() * 2.0**-6).all()
    if device == "cuda":
        assert (actual != expected).float().mean() < 0.01


def test_rms_norm_errors(device):
    x = torch.randn(2, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.double(), w)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.int(), w)
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, w.int())
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(9, device=device))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(x, torch.randn(1, 8, device=device))
    with pytest.raises(ValueError, match="casting_mode"):
        rms_norm(x, w, casting_mode="llama3")
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, w.to("meta"))
    wide = liger_kernels._utils.MAX_FUSED_SIZE + 1
    with pytest.raises(ValueError, match="at most"):
        rms_norm(torch.zeros(1, wide, device=device), torch.zeros(wide, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 65536), (16384, 128)])
def test_rms_norm_large_gpu(mode, shape, device):
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(torch.bfloat16)
    dy = torch.randn(shape, device=device, dtype=torch.bfloat16)
    _check(x, weight, dy, mode, OFFSETS[mode], in_place=True)
