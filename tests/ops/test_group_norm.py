"""group_norm: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
import liger_kernels.ops.group_norm as group_norm_module
from liger_kernels.ops.group_norm import group_norm, group_norm_reference
from tests.tolerances import DTYPES, assert_close


def _check(x, num_groups, weight, bias, grad, dtype, eps=1e-5):
    """Run group_norm on leaf copies; compare y and every gradient with float64 reference math."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = group_norm(leaves[0], num_groups, leaves[1], leaves[2], eps)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    y64 = group_norm_reference(leaves64[0], num_groups, leaves64[1], leaves64[2], eps)
    y64.backward(grad.double())
    if x.numel() > x.shape[1]:  # torch refuses one value per channel
        expected = torch.nn.functional.group_norm(leaves64[0], num_groups, leaves64[1], leaves64[2], eps)
        torch.testing.assert_close(y64, expected)

    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y64, dtype, name="group_norm y")
    assert_close(leaves[0].grad, leaves64[0].grad, dtype, name="group_norm dx")
    for name, leaf, leaf64 in zip(("dweight", "dbias"), leaves[1:], leaves64[1:]):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, leaf64.grad, dtype, reduction=True, name=f"group_norm {name}")


def _params(channels, dtype, device, affine=True):
    if not affine:
        return None, None
    weight = (torch.randn(channels, device=device) + 1).to(dtype)
    return weight, torch.randn(channels, device=device).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, num_groups",
    [((1, 1), 1), ((3, 6), 3), ((2, 6, 7), 2), ((2, 4, 5, 3), 4), ((2, 8, 300), 2)],
)
def test_group_norm_matches_float64(shape, num_groups, dtype, device):
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    weight, bias = _params(shape[1], dtype, device)
    grad = (torch.randn(shape, device=device) / shape[0]).to(dtype)
    _check(x, num_groups, weight, bias, grad, dtype)


def test_group_norm_multi_tile_groups(device, monkeypatch):
    # Groups spanning several channel tiles and spatial tiles, with ragged ends in both.
    monkeypatch.setattr(group_norm_module, "_TILE_ELEMENTS", 64)
    monkeypatch.setattr(group_norm_module, "_MAX_BLOCK_S", 16)
    x = torch.randn(2, 12, 37, device=device)
    weight, bias = _params(12, torch.float32, device)
    _check(x, 2, weight, bias, torch.randn(2, 12, 37, device=device) / 2, torch.float32)


@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_no_affine_and_offset_mean(affine, device):
    # A large common offset: the centered variance keeps full precision.
    x = torch.randn(3, 4, 10, device=device) + 30.0
    weight, bias = _params(4, torch.float32, device, affine)
    _check(x, 2, weight, bias, torch.randn(3, 4, 10, device=device), torch.float32)


def test_group_norm_weight_only_fp32_params_bf16_input(device):
    x = torch.randn(2, 6, 11, device=device, dtype=torch.bfloat16)
    weight, _ = _params(6, torch.float32, device)
    _check(x, 3, weight, None, torch.randn(2, 6, 11, device=device, dtype=torch.bfloat16) / 2, torch.bfloat16)


def test_group_norm_non_contiguous(device):
    x = torch.randn(5, 2, 6, device=device).transpose(0, 2)  # (6, 2, 5) channels-last-like strides
    grad = torch.randn(6, 2, 5, device=device)
    weight, bias = _params(2, torch.float32, device)
    _check(x, 1, weight, bias, grad / 6, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x = torch.randn(2, 6, 9, device=device).to(dtype)
    weight, bias = _params(6, dtype, device)
    _check(x, 3, weight, bias, (torch.randn(2, 6, 9, device=device) / 2).to(dtype), dtype)


def test_group_norm_empty(device):
    x = torch.randn(0, 4, 3, device=device, requires_grad=True)
    group_norm(x, 2).sum().backward()
    assert x.grad.shape == (0, 4, 3)


@pytest.mark.parametrize(
    "x_shape, num_groups, w_shape, error, match",
    [
        ((2, 6, 3), 4, (6,), ValueError, "positive divisor"),
        ((2, 6, 3), 0, (6,), ValueError, "positive divisor"),
        ((2, 6, 3), 3, (5,), ValueError, "weight must have shape"),
        ((6,), 3, (6,), ValueError, r"shape \(N, C, \*\)"),
    ],
)
def test_group_norm_bad_inputs(x_shape, num_groups, w_shape, error, match, device):
    with pytest.raises(error, match=match):
        group_norm(torch.ones(x_shape, device=device), num_groups, torch.ones(w_shape, device=device))


def test_group_norm_bad_dtype(device):
    with pytest.raises(TypeError, match="bias has dtype"):
        group_norm(torch.ones(2, 4, device=device), 2, None, torch.ones(4, dtype=torch.int64, device=device))


@pytest.mark.gpu
def test_group_norm_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    x = torch.randn(16, 512, 64, 64, device=device, dtype=torch.bfloat16)
    weight, bias = _params(512, torch.bfloat16, device)
    _check(x, 32, weight, bias, torch.randn_like(x) / 16, torch.bfloat16)


def test_group_norm_module_matches_torch(device):
    from liger_kernels.nn import LigerGroupNorm

    module = LigerGroupNorm(2, 6, eps=1e-4).to(device)
    reference = torch.nn.GroupNorm(2, 6, eps=1e-4).to(device).double()
    x = torch.randn(3, 6, 5, device=device)
    assert_close(module(x), reference(x.double()), torch.float32, name="module")
    assert LigerGroupNorm(2, 6, affine=False).weight is None
