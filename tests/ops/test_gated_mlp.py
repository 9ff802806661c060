"""gated_mlp: the bias-free gated MLP (+ residual) as one op, vs float64 math; its fallbacks."""

import pytest
import torch

from liger_kernels.ops import gated_mlp as gated_mlp_module
from liger_kernels.ops.gated_mlp import gated_mlp, gated_mlp_reference
from tests.tolerances import DTYPES, assert_close

NAMES = ("x", "gate_weight", "up_weight", "down_weight", "residual")


def _inputs(shape, intermediate, out_features, dtype, device, residual):
    hidden = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    wg = (torch.randn(intermediate, hidden, device=device) / hidden**0.5).to(dtype)
    wu = (torch.randn(intermediate, hidden, device=device) / hidden**0.5).to(dtype)
    wd = (torch.randn(out_features, intermediate, device=device) / intermediate**0.5).to(dtype)
    r = torch.randn(*shape[:-1], out_features, device=device).to(dtype) if residual else None
    return [t.requires_grad_() if t is not None else None for t in (x, wg, wu, wd, r)]


def _check(leaves, activation, dtype, needs=NAMES):
    for name, t in zip(NAMES, leaves):
        if t is not None:
            t.requires_grad_(name in needs)
    x, wg, wu, wd, r = leaves
    y = gated_mlp(x, wg, wu, wd, activation, r)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in leaves]
    y64 = gated_mlp_reference(*leaves64[:4], activation, leaves64[4])
    y64.backward(grad.double())
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close(y, y64, dtype, reduction=True, name="y")
    for name, t, t64 in zip(NAMES, leaves, leaves64):
        if t is None:
            continue
        if name in needs:
            assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")
        else:
            assert t.grad is None, name


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, intermediate, out_features, residual",
                         [((1, 8), 5, 8, False), ((2, 5, 24), 37, 24, True), ((9, 16), 130, 7, True)])
def test_matches_float64(activation, dtype, shape, intermediate, out_features, residual, device):
    _check(_inputs(shape, intermediate, out_features, dtype, device, residual), activation, dtype)


@pytest.mark.parametrize("needs", [("x",), ("gate_weight", "down_weight"), ("up_weight",), ("residual",),
                                   ("x", "residual")])
def test_only_the_gradients_asked_for(needs, device):
    _check(_inputs((6, 16), 24, 16, torch.float32, device, True), "silu", torch.float32, needs)


def test_function_runs_where_it_should(device, monkeypatch):
    """The one-op path on kernel tensors; the composition under autocast and checkpointing."""
    calls = []
    original = gated_mlp_module.GatedMLPFunction.apply
    monkeypatch.setattr(gated_mlp_module.GatedMLPFunction, "apply",
                        lambda *args: calls.append(1) or original(*args))
    x, wg, wu, wd, r = _inputs((4, 16), 24, 16, torch.float32, device, True)
    gated_mlp(x, wg, wu, wd, residual=r).sum().backward()
    assert calls == [1]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        gated_mlp(x, wg, wu, wd, residual=r).sum().backward()
    with torch.autocast(device if device == "cuda" else "cpu", dtype=torch.bfloat16):
        y = gated_mlp(x, wg, wu, wd)
    assert calls == [1] and y.dtype == torch.bfloat16


def test_bad_inputs(device):
    x, wg, wu, wd, _ = _inputs((3, 8), 6, 8, torch.float32, device, False)
    with pytest.raises(ValueError, match="activation"):
        gated_mlp(x, wg, wu, wd, "relu")
    with pytest.raises(ValueError, match="gate_weight and up_weight"):
        gated_mlp(x, wg, wu[:, :4], wd)
    with pytest.raises(ValueError, match="down_weight"):
        gated_mlp(x, wg, wu, wd.t())
    with pytest.raises(ValueError, match="residual must have shape"):
        gated_mlp(x, wg, wu, wd, residual=torch.zeros(3, 5, device=device))
    with pytest.raises(TypeError, match="x"):
        gated_mlp(x.long(), wg, wu, wd)
