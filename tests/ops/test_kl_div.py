"""kl_div: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.kl_div import REDUCTIONS, kl_div, kl_div_reference
from tests.tolerances import DTYPES, assert_close


def _inputs(shape, dtype, log_target, device):
    x = torch.randn(shape, device=device).log_softmax(-1).to(dtype)
    t = (torch.randn(shape, device=device) * 2).log_softmax(-1)
    if not log_target:
        t = t.exp()
        t.view(-1)[::5] = 0.0  # zero probabilities: the 0 * log 0 = 0 convention
    return x, t.to(dtype)


def _check(x, t, reduction, log_target, dtype, grad=None):
    """Run kl_div on leaf copies; compare loss, dx and dt with float64 reference math."""
    x = x.detach().requires_grad_()
    t = t.detach().requires_grad_()
    loss = kl_div(x, t, reduction, log_target)
    if grad is None:
        grad = torch.randn(loss.shape, device=x.device).to(loss.dtype)
    loss.backward(grad)

    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    loss64 = kl_div_reference(x64, t64, reduction, log_target)
    loss64.backward(grad.double())
    # The reference is torch's kl_div (eps only matters for targets in (0, eps), absent here).
    expected = torch.nn.functional.kl_div(x64, t64, reduction=reduction, log_target=log_target)
    torch.testing.assert_close(loss64, expected, rtol=1e-12, atol=1e-12)

    reduced = reduction != "none"
    assert loss.dtype == dtype and loss.shape == loss64.shape
    assert_close(loss, loss64, dtype, reduction=reduced, name=f"kl_div {reduction} loss")
    assert_close(x.grad, x64.grad, dtype, name="kl_div dx")
    assert_close(t.grad, t64.grad, dtype, name="kl_div dt")


# torch warns that "mean" will change meaning one day; the reference pins today's meaning.
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 300)])
def test_kl_div_matches_float64(shape, dtype, reduction, log_target, device):
    x, t = _inputs(shape, dtype, log_target, device)
    _check(x, t, reduction, log_target, dtype)


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_wide_rows(log_target, device):
    # A vocabulary wider than one tile and not a multiple of any block.
    x, t = _inputs((2, 4097), torch.bfloat16, log_target, device)
    _check(x, t, "batchmean", log_target, torch.bfloat16)


def test_kl_div_strided_inputs(device):
    # Row-strided input (a slice of a wider tensor), transposed target and gradient.
    x = torch.randn(5, 40, device=device).log_softmax(-1)[:, :33]
    t = torch.randn(33, 5, device=device).softmax(0).t()
    grad = torch.randn(33, 5, device=device).t()
    assert not x.is_contiguous() and not t.is_contiguous()
    _check(x, t, "none", False, torch.float32, grad)


def test_kl_div_only_input_grad(device):
    # A teacher target without gradient: only dx is computed.
    x, t = _inputs((4, 9), torch.float32, False, device)
    x.requires_grad_()
    kl_div(x, t).backward()
    expected = -t / 4
    assert_close(x.grad, expected.double(), torch.float32, name="dx")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_div_reference_path(reduction, dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    x, t = _inputs((4, 33), dtype, False, device)
    _check(x, t, reduction, False, dtype)


def test_kl_div_mixed_dtypes(device):
    # bf16 student log-probs against fp32 teacher probabilities: output in the promoted dtype.
    x, t = _inputs((3, 50), torch.bfloat16, False, device)
    t = t.float()
    loss = kl_div(x, t, "sum")
    assert loss.dtype == torch.float32
    expected = kl_div_reference(x.double(), t.double(), "sum")
    assert_close(loss, expected, torch.bfloat16, reduction=True, name="loss")


def test_kl_div_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    loss = kl_div(x, torch.rand(0, 8, device=device), "sum")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "x_kwargs, t_kwargs, kwargs, error, match",
    [
        ({"size": (3, 8)}, {"size": (3, 9)}, {}, ValueError, "same shape"),
        ({"size": (3, 8), "dtype": torch.int32}, {"size": (3, 8)}, {}, TypeError, "input has dtype"),
        ({"size": (3, 8)}, {"size": (3, 8), "dtype": torch.float64}, {}, TypeError, "target has dtype"),
        ({"size": ()}, {"size": ()}, {}, ValueError, "at least one dimension"),
        ({"size": (3, 8)}, {"size": (3, 8)}, {"reduction": "avg"}, ValueError, "reduction"),
        ({"size": (3, 8)}, {"size": (3, 8)}, {"eps": 0.0}, ValueError, "eps"),
    ],
)
def test_kl_div_bad_inputs(x_kwargs, t_kwargs, kwargs, error, match, device):
    with pytest.raises(error, match=match):
        kl_div(torch.ones(**x_kwargs, device=device), torch.ones(**t_kwargs, device=device), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_large_gpu(log_target, device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    x, t = _inputs((4096, 32000), torch.bfloat16, log_target, device)
    _check(x, t, "batchmean", log_target, torch.bfloat16)


def test_kl_div_module(device):
    from liger_kernels.nn import LigerKLDivLoss

    x, t = _inputs((3, 10), torch.float32, True, device)
    module = LigerKLDivLoss(reduction="sum", log_target=True)
    assert torch.equal(module(x, t), kl_div(x, t, "sum", True))
