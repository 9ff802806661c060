"""modulated_rms_norm: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import math

import pytest
import torch

import liger_kernels._utils
from liger_kernels.nn import LigerModulatedRMSNorm
from liger_kernels.ops.modulated_rms_norm import modulated_rms_norm, modulated_rms_norm_reference
from liger_kernels.ops.rms_norm import rms_norm_reference
from tests.tolerances import DTYPES, REDUCTION_TOLERANCES, assert_close

MODES = ["llama", "gemma", "none"]
OFFSETS = {"llama": 0.0, "gemma": 1.0, "none": 0.0}  # as the models use them


def scale_shape(kind, x_shape):
    """scale/shift shape of each kind for x (B, T, H)."""
    b, hidden = x_shape[0], x_shape[-1]
    return {"shared": (hidden,), "batch": (b, hidden), "unsqueezed": (b, 1, hidden), "row": tuple(x_shape)}[kind]


def _leaf(t):
    return None if t is None else t.detach().requires_grad_()


def _f64(t):
    return None if t is None else t.detach().double().cpu().requires_grad_()


def _check(x, weight, scale, shift, dy, mode, offset=0.0, eps=1e-6, out_dtype=None):
    """Run modulated_rms_norm on leaf copies; compare y and every gradient with float64 math."""
    x, weight, scale, shift = (_leaf(t) for t in (x, weight, scale, shift))
    x_before = x.detach().clone()
    y = modulated_rms_norm(x, weight, scale, shift, eps, offset, mode)
    y.backward(dy.clone())

    x64, w64, s64, b64 = (_f64(t) for t in (x, weight, scale, shift))
    y64 = modulated_rms_norm_reference(x64, w64, s64, b64, eps, offset, mode)
    y64.backward(dy.double().cpu())

    dtype = x.dtype
    assert y.shape == x.shape and y.dtype == (out_dtype or dtype)
    assert x.grad.dtype == dtype and scale.grad.dtype == scale.dtype and scale.grad.shape == scale.shape
    assert_close(y, y64, dtype, name=f"{mode} y")
    assert_close(x.grad, x64.grad, dtype, name=f"{mode} dx")
    terms = dy.double().cpu() * norm_output(x, weight, mode, offset, eps)
    assert_sum_close(scale.grad, group_sum(terms, scale), group_sum(terms.abs(), scale), dtype, f"{mode} dscale")
    if shift is not None:
        assert shift.grad.dtype == shift.dtype and shift.grad.shape == shift.shape
        assert_close(shift.grad, b64.grad, dtype, reduction=True, name=f"{mode} dshift")
    if weight is not None:
        assert weight.grad.dtype == weight.dtype
        dw64 = w64.grad
        if mode == "llama":  # the weight multiplied x * rstd rounded to x's dtype (see test_rms_norm)
            hidden = x.shape[-1]
            xhat = rms_norm_reference(x.detach().cpu(), torch.ones(hidden, dtype=dtype), eps, 0.0, "llama")
            g = dy.double().cpu() * (1 + broadcast(scale.detach().double().cpu(), x.shape))
            dw64 = (g * xhat.double()).reshape(-1, hidden).sum(0)
        assert_close(weight.grad, dw64, dtype, reduction=True, name=f"{mode} dweight")
    assert torch.equal(x.detach(), x_before)  # the saved input is never written


def assert_sum_close(actual, expected, magnitude, dtype, name):
    """A sum against float64: error at most atol + rtol * (sum of its terms' magnitudes). The terms
    dy * n carry the rounding of the norm's output n (a few ulps of n's dtype, and which ulp differs
    between the kernel and torch), so a sum that cancels is bounded by its terms, not its value."""
    atol, rtol = REDUCTION_TOLERANCES[dtype]
    actual = actual.detach().double().cpu()
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    excess = (actual - expected).abs() - (atol + rtol * magnitude)
    assert (excess <= 0).all(), f"{name}: error above the bound by up to {excess.max().item():.3g}"


def broadcast(t, x_shape):
    """scale/shift (any accepted shape) expanded to x's shape (rows grouped contiguously)."""
    hidden = x_shape[-1]
    rows = math.prod(x_shape[:-1])
    groups = t.numel() // hidden
    return t.reshape(groups, 1, hidden).expand(groups, rows // groups, hidden).reshape(x_shape)


def group_sum(v, like):
    """Sum of v (x's shape) over the rows that share a row of `like` (scale/shift), in like's shape."""
    hidden = v.shape[-1]
    groups = like.numel() // hidden
    return v.reshape(groups, -1, hidden).sum(1).reshape(like.shape)


def norm_output(x, weight, mode, offset, eps):
    """The norm's output in its dtype, as the kernel computes it (what scale multiplies), in float64."""
    x = x.detach().cpu()
    w = torch.ones(x.shape[-1], dtype=x.dtype) if weight is None else weight.detach().cpu()
    return rms_norm_reference(x, w, eps, 0.0 if weight is None else offset, mode).double()


def make(x_shape, kind, dtype, device, weight=True, shift=True, w_dtype=None):
    hidden = x_shape[-1]
    x = (torch.randn(x_shape, device=device) * 2).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden, device=device)).to(w_dtype or dtype) if weight else None
    s_shape = scale_shape(kind, x_shape)
    scale = (0.5 * torch.randn(s_shape, device=device)).to(dtype)
    b = (0.5 * torch.randn(s_shape, device=device)).to(dtype) if shift else None
    return x, w, scale, b


@pytest.mark.parametrize("kind", ["shared", "batch", "row"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 1000])
def test_matches_float64(kind, mode, dtype, hidden, device):
    x, w, scale, shift = make((2, 3, hidden), kind, dtype, device)
    dy = torch.randn(2, 3, hidden, device=device).to(dtype)
    _check(x, w, scale, shift, dy, mode, OFFSETS[mode])


@pytest.mark.parametrize("kind", ["shared", "batch", "unsqueezed", "row"])
@pytest.mark.parametrize("weight,shift", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("mode", MODES)
def test_no_weight_no_shift(kind, weight, shift, mode, device):
    dtype = torch.bfloat16
    x, w, scale, b = make((3, 2, 40), kind, dtype, device, weight=weight, shift=shift)
    dy = torch.randn(3, 2, 40, device=device).to(dtype)
    _check(x, w, scale, b, dy, mode, OFFSETS[mode] if weight else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row(dtype, device):
    for kind_shape in [(33,), (1, 33)]:
        x = torch.randn(1, 33, device=device).to(dtype)
        scale = (0.5 * torch.randn(kind_shape, device=device)).to(dtype)
        shift = torch.randn(kind_shape, device=device).to(dtype)
        w = torch.randn(33, device=device).to(dtype)
        _check(x, w, scale, shift, torch.randn(1, 33, device=device).to(dtype), "llama")


@pytest.mark.parametrize(
    "x_shape,kind",
    [
        ((2, 13, 600), "batch"),  # 2 groups of 13 rows, tiles of 4: 2 programs per group, partials summed
        ((37, 1000), "shared"),  # 10 tiles over 4 persistent programs
        ((5, 9, 64), "batch"),  # narrow rows packed: tiles of 16 rows cut to the group's 9
        ((4, 37, 64), "row"),
    ],
)
def test_many_rows(x_shape, kind, device):
    x, w, scale, shift = make(x_shape, kind, torch.float32, device)
    _check(x, w, scale, shift, torch.randn(x_shape, device=device), "llama")


def test_batch_scale_on_flat_rows(device):
    # x (B*T, H) with scale (B, H): rows grouped contiguously, T per batch item
    x = torch.randn(12, 24, device=device)
    scale, shift = torch.randn(3, 24, device=device), torch.randn(3, 24, device=device)
    _check(x, torch.randn(24, device=device), scale, shift, torch.randn(12, 24, device=device), "gemma", 1.0)


@pytest.mark.parametrize("mode", MODES)
def test_fp32_weight_bf16_input(mode, device):
    # llama promotes the norm (and so y) to fp32, as rms_norm does; gemma and none keep bf16
    x, w, scale, shift = make((2, 3, 40), "batch", torch.bfloat16, device, w_dtype=torch.float32)
    out_dtype = torch.float32 if mode == "llama" else torch.bfloat16
    dy = torch.randn(2, 3, 40, device=device, dtype=out_dtype)
    _check(x, w, scale, shift, dy, mode, OFFSETS[mode], out_dtype=out_dtype)


def test_strided_inputs(device):
    # x a column slice (row stride 2H), scale/shift column slices, dy transposed in memory
    x = torch.randn(3, 4, 2 * 24, device=device)[..., :24]
    scale = torch.randn(3, 48, device=device)[:, 24:]
    shift = torch.randn(3, 48, device=device)[:, ::2]
    dy = torch.randn(24, 4, 3, device=device).permute(2, 1, 0)
    assert not x.is_contiguous() and not scale.is_contiguous() and not dy.is_contiguous()
    _check(x, torch.randn(24, device=device), scale, shift, dy, "llama")
    full_scale = torch.randn(3, 4, 48, device=device)[..., 1::2]
    _check(x, torch.randn(24, device=device), full_scale, None, dy, "none")


def test_partial_gradients(device):
    # only some inputs want gradients: the others get none, the rest are unchanged
    x = torch.randn(2, 5, 16, device=device)
    w = torch.randn(16, device=device)
    scale, shift = torch.randn(2, 16, device=device), torch.randn(2, 16, device=device)
    dy = torch.randn(2, 5, 16, device=device)
    full = [t.clone().requires_grad_() for t in (x, w, scale, shift)]
    modulated_rms_norm(*full).backward(dy)
    for wants in [(True, False, False, False), (False, True, False, False), (False, False, True, True),
                  (False, False, False, True)]:
        leaves = [t.clone().requires_grad_(g) for t, g in zip((x, w, scale, shift), wants)]
        modulated_rms_norm(*leaves).backward(dy)
        for leaf, ref, g in zip(leaves, full, wants):
            assert (leaf.grad is not None) == g
            if g:
                assert torch.allclose(leaf.grad, ref.grad, atol=1e-6, rtol=1e-6)


def test_empty_batch(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    scale = torch.randn(16, device=device, requires_grad=True)
    y = modulated_rms_norm(x, torch.randn(16, device=device), scale)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(scale.grad, torch.zeros_like(scale))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_path(mode, dtype, monkeypatch):
    # CPU tensors without the interpreter run the torch reference, which also matches float64 math.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x, w, scale, shift = make((2, 3, 64), "batch", dtype, "cpu")
    _check(x, w, scale, shift, torch.randn(2, 3, 64).to(dtype), mode, OFFSETS[mode])


def test_module(device):
    norm = LigerModulatedRMSNorm(24, eps=1e-5, offset=1.0, casting_mode="gemma").to(device)
    with torch.no_grad():
        norm.weight.normal_()
    x, scale, shift = torch.randn(2, 3, 24, device=device), torch.randn(2, 1, 24, device=device), None
    expected = modulated_rms_norm_reference(x, norm.weight, scale, shift, 1e-5, 1.0, "gemma")
    assert_close(norm(x, scale), expected.double(), torch.float32)
    plain = LigerModulatedRMSNorm(24, elementwise_affine=False).to(device)
    assert plain.weight is None and not list(plain.parameters())
    scale, shift = torch.randn(24, device=device), torch.randn(24, device=device)
    assert_close(plain(x, scale, shift), modulated_rms_norm_reference(x, None, scale, shift).double(), torch.float32)
    assert "gemma" in repr(norm) and "no weight" in repr(plain)


def test_errors(device):
    x = torch.randn(2, 3, 8, device=device)
    w = torch.randn(8, device=device)
    s = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="x"):
        modulated_rms_norm(x.double(), w, s)
    with pytest.raises(TypeError, match="weight"):
        modulated_rms_norm(x, w.int(), s)
    with pytest.raises(TypeError, match="scale"):
        modulated_rms_norm(x, w, s.int())
    with pytest.raises(TypeError, match="scale has dtype"):
        modulated_rms_norm(x, w, s.bfloat16())
    with pytest.raises(TypeError, match="shift has dtype"):
        modulated_rms_norm(x, w, s, s.half())
    with pytest.raises(ValueError, match="weight"):
        modulated_rms_norm(x, torch.randn(9, device=device), s)
    with pytest.raises(ValueError, match="casting_mode"):
        modulated_rms_norm(x, w, s, casting_mode="llama3")
    with pytest.raises(ValueError, match="casting_mode"):
        modulated_rms_norm(x, None, s, casting_mode="gemma2")
    with pytest.raises(ValueError, match="scale must end in"):
        modulated_rms_norm(x, w, torch.randn(2, 9, device=device))
    with pytest.raises(ValueError, match="scale must have shape"):
        modulated_rms_norm(x, w, torch.randn(4, 8, device=device))  # 4 does not divide 6 rows
    with pytest.raises(ValueError, match="scale must have shape"):
        modulated_rms_norm(x, w, torch.randn(2, 2, 8, device=device))
    with pytest.raises(ValueError, match="scale must end in"):
        modulated_rms_norm(x, w, torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="shift must have scale's shape"):
        modulated_rms_norm(x, w, s, torch.randn(8, device=device))
    with pytest.raises(ValueError, match="offset"):
        modulated_rms_norm(x, None, s, offset=1.0)
    with pytest.raises(ValueError, match="one device"):
        modulated_rms_norm(x, w, s.to("meta"))
    wide = liger_kernels._utils.MAX_FUSED_SIZE + 1
    with pytest.raises(ValueError, match="at most"):
        modulated_rms_norm(torch.zeros(1, wide, device=device), None, torch.zeros(wide, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["shared", "batch", "row"])
def test_large_gpu(mode, kind, device):
    x, w, scale, shift = make((8, 1024, 4096), kind, torch.bfloat16, device)
    dy = torch.randn(8, 1024, 4096, device=device, dtype=torch.bfloat16)
    _check(x, w, scale, shift, dy, mode, OFFSETS[mode])
