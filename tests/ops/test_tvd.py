"""tvd: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.tvd import REDUCTIONS, tvd, tvd_reference
from tests.tolerances import DTYPES, assert_close


def _inputs(shape, dtype, device, labels=True):
    p = torch.randn(shape, device=device).softmax(-1).to(dtype)
    q = torch.randn(shape, device=device).softmax(-1).to(dtype)
    q.view(-1)[::4] = p.view(-1)[::4]  # ties: sign(0) = 0
    label = None
    if labels:
        label = torch.randint(0, shape[-1], shape[:-1], device=device)
        label.view(-1)[1::3] = -100
    return p, q, label


def _check(p, q, label, reduction, dtype, grad=None):
    """Run tvd on leaf copies; compare the loss, dp and dq with float64 reference math."""
    p = p.detach().requires_grad_()
    q = q.detach().requires_grad_()
    loss = tvd(p, q, reduction, label)
    if grad is None:
        grad = torch.randn(loss.shape, device=p.device).to(loss.dtype)
    loss.backward(grad)

    p64 = p.detach().double().requires_grad_()
    q64 = q.detach().double().requires_grad_()
    loss64 = tvd_reference(p64, q64, reduction, label)
    loss64.backward(grad.double())

    assert loss.dtype == dtype and loss.shape == loss64.shape
    assert_close(loss, loss64, dtype, reduction=reduction != "none", name=f"tvd {reduction} loss")
    assert_close(p.grad, p64.grad, dtype, name="tvd dp")
    assert_close(q.grad, q64.grad, dtype, name="tvd dq")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 3, 300)])
def test_tvd_matches_float64(shape, dtype, reduction, device):
    p, q, label = _inputs(shape, dtype, device)
    _check(p, q, label, reduction, dtype)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_tvd_wide_rows_no_labels(reduction, device):
    p, q, _ = _inputs((3, 4097), torch.bfloat16, device, labels=False)
    _check(p, q, None, reduction, torch.bfloat16)


def test_tvd_definition(device):
    # batchmean is the mean per-row TVD; two disjoint one-hot rows are at distance 1.
    p = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], device=device)
    q = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]], device=device)
    assert tvd(p, q).item() == pytest.approx(0.5)
    assert tvd(p, q, "sum").item() == pytest.approx(1.0)
    assert tvd(p, q, "mean").item() == pytest.approx(1.0 / 6)
    label = torch.tensor([-100, 3], device=device)
    assert tvd(p, q, "batchmean", label).item() == 0.0


def test_tvd_all_ignored(device):
    p, q, label = _inputs((3, 9), torch.float32, device)
    label.fill_(-100)
    p.requires_grad_()
    loss = tvd(p, q, "mean", label)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p))


def test_tvd_strided_inputs(device):
    p = torch.randn(4, 50, device=device).softmax(-1)[:, 3:40]
    q = torch.randn(37, 4, device=device).softmax(0).t()
    grad = torch.randn(37, 4, device=device).t()
    label = torch.tensor([1, -100, 2, 3], device=device)
    _check(p, q, label, "none", torch.float32, grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tvd_reference_path(reduction, dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    p, q, label = _inputs((4, 33), dtype, device)
    _check(p, q, label, reduction, dtype)


def test_tvd_empty(device):
    p = torch.rand(0, 8, device=device, requires_grad=True)
    loss = tvd(p, torch.rand(0, 8, device=device), "sum")
    loss.backward()
    assert loss.item() == 0.0 and p.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "p_shape, q_shape, label, kwargs, error, match",
    [
        ((3, 8), (3, 9), None, {}, ValueError, "same shape"),
        ((3, 8), (3, 8), torch.zeros(4, dtype=torch.long), {}, ValueError, "label has shape"),
        ((3, 8), (3, 8), torch.zeros(3), {}, TypeError, "label must be an integer"),
        ((3, 8), (3, 8), None, {"reduction": "avg"}, ValueError, "reduction"),
        ((), (), None, {}, ValueError, "at least one dimension"),
    ],
)
def test_tvd_bad_inputs(p_shape, q_shape, label, kwargs, error, match, device):
    with pytest.raises(error, match=match):
        label = label.to(device) if label is not None else None
        tvd(torch.zeros(p_shape, device=device), torch.zeros(q_shape, device=device), label=label, **kwargs)


def test_tvd_bad_dtype(device):
    with pytest.raises(TypeError, match="q has dtype"):
        tvd(torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device, dtype=torch.int64))


@pytest.mark.gpu
def test_tvd_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    p, q, label = _inputs((4096, 32000), torch.bfloat16, device)
    _check(p, q, label, "batchmean", torch.bfloat16)


def test_tvd_module(device):
    from liger_kernels.nn import LigerTVDLoss

    p, q, label = _inputs((3, 10), torch.float32, device)
    assert torch.equal(LigerTVDLoss(reduction="sum")(p, q, label), tvd(p, q, "sum", label))
