"""swiglu / geglu: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.glu import geglu, geglu_reference, swiglu, swiglu_reference
from tests.tolerances import DTYPES, assert_close

ACTIVATIONS = {
    "swiglu": (swiglu, swiglu_reference),
    "geglu_tanh": (lambda a, b: geglu(a, b, "tanh"), lambda a, b: geglu_reference(a, b, "tanh")),
    "geglu_erf": (lambda a, b: geglu(a, b, "none"), lambda a, b: geglu_reference(a, b, "none")),
}


def _check(act, a, b, grad, dtype):
    """Run the public op on leaf copies of a, b; compare c, da, db with float64 reference math."""
    fn, ref = ACTIVATIONS[act]
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    a_before, b_before = a.detach().clone(), b.detach().clone()
    c = fn(a, b)
    c.backward(grad)

    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    c64 = ref(a64, b64)
    c64.backward(grad.double())

    assert c.dtype == dtype and c.shape == a.shape
    assert_close(c, c64, dtype, name=f"{act} c")
    assert_close(a.grad, a64.grad, dtype, name=f"{act} da")
    assert_close(b.grad, b64.grad, dtype, name=f"{act} db")
    # The backward must not write into the saved inputs.
    assert torch.equal(a.detach(), a_before) and torch.equal(b.detach(), b_before)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 1000), (2, 4097)])
def test_glu_matches_float64(act, dtype, shape, device):
    a = (torch.randn(shape, device=device) * 3).to(dtype)
    b = torch.randn(shape, device=device).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    _check(act, a, b, grad, dtype)


def test_swiglu_llama_width(device):
    # One full-width row pair of Llama-3-8B's MLP (I = 14336): seven column blocks per row.
    shape = (2, 14336)
    a = torch.randn(shape, device=device, dtype=torch.bfloat16)
    b = torch.randn(shape, device=device, dtype=torch.bfloat16)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    _check("swiglu", a, b, grad, torch.bfloat16)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_glu_saturated_inputs(act, device):
    # Large |a|: sigmoid/tanh saturate; no inf/NaN may leak into outputs or gradients.
    a = torch.linspace(-80, 80, 161, device=device).reshape(7, 23)
    b = torch.randn(7, 23, device=device)
    grad = torch.randn(7, 23, device=device)
    _check(act, a, b, grad, torch.float32)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_glu_strided_inputs(act, device):
    # a, b as the halves of a fused gate/up projection (row stride 2I), gradient transposed in memory.
    rows, width = 6, 37
    gate_up = torch.randn(2, 3, 2 * width, device=device)
    a, b = gate_up.chunk(2, dim=-1)
    grad = torch.randn(width, 3, 2, device=device).permute(2, 1, 0)
    assert not a.is_contiguous() and not grad.is_contiguous() and a.shape[0] * a.shape[1] == rows
    _check(act, a, b, grad, torch.float32)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_reference_path(act, dtype, device, monkeypatch):
    # CPU tensors without the interpreter dispatch to the torch reference; it must agree too.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    a = (torch.randn(4, 33, device=device) * 3).to(dtype)
    b = torch.randn(4, 33, device=device).to(dtype)
    grad = torch.randn(4, 33, device=device).to(dtype)
    _check(act, a, b, grad, dtype)


def test_glu_empty(device):
    a = torch.randn(0, 8, device=device, requires_grad=True)
    b = torch.randn(0, 8, device=device, requires_grad=True)
    c = swiglu(a, b)
    c.sum().backward()
    assert c.shape == (0, 8) and a.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "a_kwargs, b_kwargs, error, match",
    [
        ({"size": (3, 8)}, {"size": (3, 9)}, ValueError, "same shape"),
        ({"size": (3, 8), "dtype": torch.int32}, {"size": (3, 8)}, TypeError, "a has dtype"),
        ({"size": (3, 8)}, {"size": (3, 8), "dtype": torch.float64}, TypeError, "b has dtype"),
        ({"size": (3, 8)}, {"size": (3, 8), "dtype": torch.float16}, TypeError, "same dtype"),
        ({"size": ()}, {"size": ()}, ValueError, "at least one dimension"),
    ],
)
@pytest.mark.parametrize("op", [swiglu, geglu])
def test_glu_bad_inputs(op, a_kwargs, b_kwargs, error, match, device):
    a = torch.ones(**a_kwargs, device=device)
    b = torch.ones(**b_kwargs, device=device)
    with pytest.raises(error, match=match):
        op(a, b)


def test_geglu_bad_approximate(device):
    a = torch.randn(2, 4, device=device)
    with pytest.raises(ValueError, match="approximate"):
        geglu(a, a, approximate="sigmoid")


@pytest.mark.gpu
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_glu_large_gpu(act, device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    shape = (4096, 14336)
    a = torch.randn(shape, device=device, dtype=torch.bfloat16)
    b = torch.randn(shape, device=device, dtype=torch.bfloat16)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    _check(act, a, b, grad, torch.bfloat16)
