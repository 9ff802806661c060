"""linear_projections: several projections of one input as one op (attention's q/k/v), vs float64
math; each output exactly F.linear's; unused outputs; its fallbacks and errors."""

import pytest
import torch
import torch.nn.functional as F

from liger_kernels.ops import linear_projections as module
from liger_kernels.ops.linear_projections import linear_projections, linear_projections_reference
from tests.tolerances import DTYPES, assert_close


def _inputs(shape, widths, dtype, device, bias):
    hidden = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    weights = [(torch.randn(n, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_() for n in widths]
    biases = [torch.randn(n, device=device).to(dtype).requires_grad_() if bias else None for n in widths]
    return x, weights, biases


def _leaves(x, weights, biases):
    return [t for t in (x, *weights, *biases) if t is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, widths, bias", [((1, 8), (8, 4, 4), False), ((2, 5, 24), (24, 8, 8), True),
                                                 ((9, 16), (37,), False), ((3, 7, 12), (5, 13), True)])
def test_matches_float64(dtype, shape, widths, bias, device):
    x, weights, biases = _inputs(shape, widths, dtype, device, bias)
    ys = linear_projections(x, weights, biases)
    grads = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, grads)
    leaves = _leaves(x, weights, biases)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, rest = leaves64[0], leaves64[1:]
    w64, b64 = rest[:len(widths)], rest[len(widths):] or None
    ys64 = linear_projections_reference(x64, w64, b64)
    torch.autograd.backward(ys64, [g.double() for g in grads])
    for i, (y, y64) in enumerate(zip(ys, ys64)):
        assert y.dtype == dtype and y.shape == y64.shape == (*shape[:-1], widths[i])
        assert_close(y, y64, dtype, reduction=True, name=f"y{i}")
        # each output is F.linear's own result, bit for bit
        torch.testing.assert_close(y, F.linear(x, weights[i], biases[i]), rtol=0, atol=0)
    for i, (t, t64) in enumerate(zip(leaves, leaves64)):
        assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad of leaf {i}")


def test_unused_outputs_and_inputs_without_grad(device):
    """An output that gets no gradient adds nothing (its products are skipped), as autograd's sum."""
    x, weights, biases = _inputs((6, 16), (16, 8, 8), torch.float32, device, True)
    weights[1].requires_grad_(False)
    q, k, v = linear_projections(x, weights, biases)
    (q.sum() + 2 * v.sum()).backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = [w.detach().clone().requires_grad_(w.requires_grad) for w in weights]
    b2 = [b.detach().clone().requires_grad_() for b in biases]
    q2, _, v2 = linear_projections_reference(x2, w2, b2)
    (q2.sum() + 2 * v2.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert weights[1].grad is None and biases[1].grad is None
    for a, b in ((weights[0], w2[0]), (weights[2], w2[2]), (biases[0], b2[0]), (biases[2], b2[2])):
        torch.testing.assert_close(a.grad, b.grad)
    # no output used at all: x still gets its (zero) gradient
    x.grad = None
    (linear_projections(x, weights)[0] * 0).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_function_runs_where_it_should(device, monkeypatch):
    """The one-op path on kernel tensors; the composition under autocast and checkpointing."""
    calls = []
    original = module.LinearProjectionsFunction.apply
    monkeypatch.setattr(module.LinearProjectionsFunction, "apply", lambda *args: calls.append(1) or original(*args))
    x, weights, _ = _inputs((4, 16), (16, 8), torch.float32, device, False)
    sum(y.sum() for y in linear_projections(x, weights)).backward()
    assert calls == [1]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        sum(y.sum() for y in linear_projections(x, weights)).backward()
    with torch.autocast(device if device == "cuda" else "cpu", dtype=torch.bfloat16):
        ys = linear_projections(x, weights)
    assert calls == [1] and all(y.dtype == torch.bfloat16 for y in ys)


def test_bad_inputs(device):
    x, weights, biases = _inputs((3, 8), (8, 4), torch.float32, device, True)
    with pytest.raises(ValueError, match="at least one weight"):
        linear_projections(x, [])
    with pytest.raises(ValueError, match="2 weights"):
        linear_projections(x, weights, biases[:1])
    with pytest.raises(ValueError, match=r"weights\[1\] must be \(out_features, 8\)"):
        linear_projections(x, [weights[0], weights[1][:, :5]])
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape \(8,\)"):
        linear_projections(x, weights, [biases[1], biases[1]])
