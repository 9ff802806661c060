"""jsd: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import math

import pytest
import torch

import liger_kernels._utils
from liger_kernels.losses.distillation import generalized_jsd
from liger_kernels.ops.jsd import jsd, jsd_reference
from tests.tolerances import DTYPES, assert_close

BETAS = [0.0, 0.5, 0.1, 1.0]


def _inputs(shape, dtype, device, labels=True):
    x = (torch.randn(shape, device=device) * 2).log_softmax(-1).to(dtype)
    y = (torch.randn(shape, device=device) * 2).log_softmax(-1).to(dtype)
    label = None
    if labels:
        label = torch.randint(0, shape[-1], shape[:-1], device=device)
        label.view(-1)[::3] = -100
    return x, y, label


def _check(x, y, label, beta, dtype, teacher_grad=True):
    """Run jsd on leaf copies; compare loss, dx (and dy) with float64 reference math."""
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_(teacher_grad)
    loss = jsd(x, y, label, beta)
    grad = torch.tensor(1.7, device=x.device)
    loss.backward(grad.to(loss.dtype))

    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    loss64 = jsd_reference(x64, y64, label, beta)
    loss64.backward(grad.to(loss.dtype).double())

    assert loss.dtype == dtype and loss.shape == ()
    assert_close(loss, loss64, dtype, reduction=True, name=f"jsd beta={beta} loss")
    assert_close(x.grad, x64.grad, dtype, name=f"jsd beta={beta} dx")
    if teacher_grad:
        assert_close(y.grad, y64.grad, dtype, name=f"jsd beta={beta} dy")
    else:
        assert y.grad is None


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 3, 300)])
def test_jsd_matches_float64(shape, dtype, beta, device):
    x, y, label = _inputs(shape, dtype, device)
    _check(x, y, label, beta, dtype)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_reference_is_the_distillation_definition(beta, device):
    # The specification agrees with the chunked distillation loss's per-row divergence
    # and, at beta = 0 / 1, with torch's KL divergence.
    x, y, _ = _inputs((6, 11), torch.float64, device, labels=False)
    expected = generalized_jsd(x, y, beta).mean()
    torch.testing.assert_close(jsd_reference(x, y, beta=beta), expected)
    if beta in (0.0, 1.0):
        inp, target = (x, y) if beta == 0.0 else (y, x)
        kl = torch.nn.functional.kl_div(inp, target, reduction="batchmean", log_target=True)
        torch.testing.assert_close(jsd_reference(x, y, beta=beta), kl)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_jsd_wide_rows_no_labels(beta, device):
    x, y, _ = _inputs((3, 4097), torch.bfloat16, device, labels=False)
    _check(x, y, None, beta, torch.bfloat16, teacher_grad=False)


def test_jsd_all_ignored(device):
    x, y, label = _inputs((3, 9), torch.float32, device)
    label.fill_(-100)
    x.requires_grad_()
    loss = jsd(x, y, label)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_jsd_underflowing_probabilities(device):
    # Log-probabilities far below fp32's exp range in both inputs: the mixture's log stays finite.
    x = torch.full((2, 5), -200.0, device=device)
    y = torch.full((2, 5), -150.0, device=device)
    x[:, 0], y[:, 0] = 0.0, 0.0
    _check(x, y, None, 0.5, torch.float32)
    assert math.isfinite(jsd(x, y).item())


def test_jsd_strided_inputs(device):
    x = torch.randn(4, 50, device=device).log_softmax(-1)[:, 3:40]
    y = torch.randn(37, 4, device=device).log_softmax(0).t()
    label = torch.tensor([1, -100, 2, 3], device=device)
    _check(x, y, label, 0.3, torch.float32)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_reference_path(beta, dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x, y, label = _inputs((4, 33), dtype, device)
    _check(x, y, label, beta, dtype)


def test_jsd_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    loss = jsd(x, torch.randn(0, 8, device=device))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "x_shape, y_shape, label, kwargs, error, match",
    [
        ((3, 8), (3, 9), None, {}, ValueError, "same shape"),
        ((3, 8), (3, 8), torch.zeros(4, dtype=torch.long), {}, ValueError, "label has shape"),
        ((3, 8), (3, 8), torch.zeros(3), {}, TypeError, "label must be an integer"),
        ((3, 8), (3, 8), None, {"beta": 1.5}, ValueError, "beta"),
        ((), (), None, {}, ValueError, "at least one dimension"),
    ],
)
def test_jsd_bad_inputs(x_shape, y_shape, label, kwargs, error, match, device):
    with pytest.raises(error, match=match):
        label = label.to(device) if label is not None else None
        jsd(torch.zeros(x_shape, device=device), torch.zeros(y_shape, device=device), label, **kwargs)


def test_jsd_bad_dtype(device):
    with pytest.raises(TypeError, match="teacher_logprobs has dtype"):
        jsd(torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_large_gpu(beta, device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    x, y, label = _inputs((2048, 128256), torch.bfloat16, device)
    _check(x, y, label, beta, torch.bfloat16, teacher_grad=False)


def test_jsd_module(device):
    from liger_kernels.nn import LigerJSD

    x, y, label = _inputs((3, 10), torch.float32, device)
    assert torch.equal(LigerJSD(beta=0.2)(x, y, label), jsd(x, y, label, 0.2))
