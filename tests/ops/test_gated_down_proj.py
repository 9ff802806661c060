"""gated_down_proj: (f(a) * b) @ W.T + bias keeping only a, b, W; vs float64 math, and what it saves."""

import pytest
import torch
import torch.nn.functional as F

import liger_kernels._utils
from liger_kernels.ops.gated_down_proj import gated_down_proj, gated_down_proj_reference
from tests.tolerances import DTYPES, assert_close

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def _inputs(shape, out_features, dtype, device, bias):
    a = (torch.randn(shape, device=device) * 2).to(dtype).requires_grad_()
    b = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (torch.randn(out_features, shape[-1], device=device) / shape[-1] ** 0.5).to(dtype).requires_grad_()
    bb = (torch.randn(out_features, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    return a, b, w, bb


def _check(a, b, w, bias, activation, dtype):
    grad = torch.randn(*a.shape[:-1], w.shape[0], device=a.device).to(dtype)
    y = gated_down_proj(a, b, w, bias, activation)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (a, b, w, bias)]
    y64 = gated_down_proj_reference(*leaves64, activation)
    y64.backward(grad.double())
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close(y, y64, dtype, reduction=True, name="y")
    for name, t, t64 in zip(("a", "b", "weight", "bias"), (a, b, w, bias), leaves64):
        if t is not None:
            assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, out_features, bias", [((1, 1), 3, False), ((2, 5, 13), 7, True),
                                                       ((9, 130), 33, False)])
def test_matches_float64(activation, dtype, shape, out_features, bias, device):
    _check(*_inputs(shape, out_features, dtype, device, bias), activation, dtype)


@pytest.mark.parametrize("needs", [("weight",), ("a", "b"), ("b",), ("a", "b", "weight")])
def test_only_the_gradients_asked_for(needs, device):
    # The backward has one path per need: (da, db) alone, dW alone (c recomputed on its own), or both
    # (c written by the glu backward pass, da over dc's buffer).
    leaves = dict(zip(("a", "b", "weight"), _inputs((5, 37), 11, torch.float32, device, False)[:3]))
    for name, t in leaves.items():
        t.requires_grad_(name in needs)
    grad = torch.randn(5, 11, device=device)
    gated_down_proj(leaves["a"], leaves["b"], leaves["weight"]).backward(grad)
    leaves64 = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    gated_down_proj_reference(leaves64["a"], leaves64["b"], leaves64["weight"]).backward(grad.double())
    for name, t in leaves.items():
        if name in needs:
            assert_close(t.grad, leaves64[name].grad, torch.float32, reduction=True, name=f"grad {name}")
        else:
            assert t.grad is None


def test_halves_of_a_fused_projection(device):
    # Phi-3 style: gate and up are the two halves of one (.., 2I) tensor (strided views, no copy).
    gate_up = torch.randn(3, 4, 2 * 24, device=device).requires_grad_()
    w = torch.randn(10, 24, device=device).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    gated_down_proj(gate, up, w).sum().backward()
    g64, w64 = gate_up.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    gated_down_proj_reference(*g64.chunk(2, dim=-1), w64).sum().backward()
    assert_close(gate_up.grad, g64.grad, torch.float32, reduction=True, name="grad gate_up")
    assert_close(w.grad, w64.grad, torch.float32, reduction=True, name="grad weight")


def test_saves_inputs_not_the_activation(device):
    # The whole point: the (tokens x intermediate) product f(a) * b is not kept for the backward.
    a, b, w, _ = _inputs((64, 96), 32, torch.float32, device, False)
    y = gated_down_proj(a, b, w)
    saved = y.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == a.numel() + b.numel() + w.numel()
    assert {t.data_ptr() for t in saved} == {a.data_ptr(), b.data_ptr(), w.data_ptr()}
    y.sum().backward()
    assert a.grad is not None and w.grad is not None


def test_plain_composition_under_checkpointing(device):
    # Non-reentrant checkpointing packs every saved tensor through its hooks and keeps none: nothing to save.
    from torch.utils.checkpoint import checkpoint

    a, b, w, _ = _inputs((8, 24), 6, torch.float32, device, False)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
        gated_down_proj(a, b, w)
    assert sum(seen) > a.numel() + b.numel() + w.numel()  # the composition saved f(a) * b too
    y = checkpoint(gated_down_proj, a, b, w, use_reentrant=False)
    y.sum().backward()
    a64, b64, w64 = (t.detach().double().requires_grad_() for t in (a, b, w))
    gated_down_proj_reference(a64, b64, w64).sum().backward()
    assert_close(w.grad, w64.grad, torch.float32, reduction=True, name="grad weight")
    assert_close(a.grad, a64.grad, torch.float32, reduction=True, name="grad a")


def test_reference_path_on_cpu_matches(monkeypatch):
    a, b, w, bias = _inputs((5, 11), 6, torch.float32, "cpu", True)
    kernel = gated_down_proj(a, b, w, bias, "gelu_tanh")
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    reference = gated_down_proj(a, b, w, bias, "gelu_tanh")
    torch.testing.assert_close(kernel, reference, atol=1e-5, rtol=1e-5)


def test_autocast_casts_like_linear(device):
    # fp32 parameters under bf16 autocast (mixed-precision training): bf16 math, fp32 weight gradient.
    a, b, w, bias = _inputs((6, 40), 12, torch.float32, device, True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)  # what autocast linears hand over
        y = gated_down_proj(a16, b16, w, bias)
        expected = F.linear(F.silu(a16) * b16, w, bias)
    assert y.dtype == torch.bfloat16
    assert_close(y, expected.float().double(), torch.bfloat16, reduction=True, name="y")
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, out_features, bias", [((1, 1), 3, False), ((2, 5, 13), 7, True),
                                                       ((9, 130), 33, False)])
def test_residual_summed_in_the_product(dtype, shape, out_features, bias, device, monkeypatch):
    """residual + (f(a) * b) @ W.T (+ bias): values and all five gradients vs float64; without bias the
    sum is addmm's (no separate add)."""
    a, b, w, bb = _inputs(shape, out_features, dtype, device, bias)
    residual = torch.randn(*shape[:-1], out_features, device=device).to(dtype).requires_grad_()
    addmm_calls = []
    original_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *args, **kw: addmm_calls.append(1) or original_addmm(*args, **kw))
    y = gated_down_proj(a, b, w, bb, "silu", residual)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (a, b, w, bb, residual)]
    y64 = leaves64[4] + gated_down_proj_reference(*leaves64[:4], "silu")
    y64.backward(grad.double())
    assert_close(y, y64, dtype, reduction=True, name="y")
    for name, t, t64 in zip(("a", "b", "weight", "bias", "residual"), (a, b, w, bb, residual), leaves64):
        if t is not None:
            assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")
    assert len(addmm_calls) == (0 if bias else 1)


def test_residual_of_another_dtype_is_added_after(device):
    a, b, w, _ = _inputs((4, 9), 5, torch.bfloat16, device, False)
    residual = torch.randn(4, 5, device=device)  # fp32 residual stream: the sum promotes, as unfused
    y = gated_down_proj(a, b, w, residual=residual)
    expected = residual + gated_down_proj(a, b, w)
    assert y.dtype == torch.float32 and torch.equal(y, expected)


def test_bad_inputs(device):
    a, b, w, _ = _inputs((3, 8), 4, torch.float32, device, False)
    with pytest.raises(ValueError, match="activation"):
        gated_down_proj(a, b, w, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        gated_down_proj(a, b, w.t())
    with pytest.raises(ValueError, match="bias"):
        gated_down_proj(a, b, w, torch.zeros(5, device=device))
    with pytest.raises(ValueError, match="same shape"):
        gated_down_proj(a, b[:, :4], w)
    with pytest.raises(TypeError, match="weight"):
        gated_down_proj(a, b, w.double())
    with pytest.raises(ValueError, match="residual must have shape"):
        gated_down_proj(a, b, w, residual=torch.zeros(3, 5, device=device))
