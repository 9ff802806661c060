"""swiglu / geglu: Triton kernels (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.nn import LigerFusedGateUpSwiGLUMLP
from liger_kernels.ops.glu import (
    geglu,
    geglu_reference,
    swiglu,
    swiglu_gate_up,
    swiglu_gate_up_reference,
    swiglu_reference,
)
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


# ---- swiglu_gate_up: the halves of one fused gate/up projection (Phi-3, GLM-4) ------------------


def _check_gate_up(gate_up, grad, dtype):
    """swiglu_gate_up on a leaf copy vs float64 reference math: output and the (..., 2I) gradient."""
    gate_up = gate_up.detach().requires_grad_()
    before = gate_up.detach().clone()
    c = swiglu_gate_up(gate_up)
    c.backward(grad)
    gate_up64 = gate_up.detach().double().requires_grad_()
    swiglu_gate_up_reference(gate_up64).backward(grad.double())
    width = gate_up.shape[-1] // 2
    assert c.dtype == dtype and c.shape == (*gate_up.shape[:-1], width)
    assert gate_up.grad.shape == gate_up.shape
    assert_close(c, swiglu_gate_up_reference(gate_up64.detach()), dtype, name="c")
    assert_close(gate_up.grad, gate_up64.grad, dtype, name="d_gate_up")
    assert torch.equal(gate_up.detach(), before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 14), (2, 3, 2000), (2, 8194)])
def test_swiglu_gate_up_matches_float64(dtype, shape, device):
    gate_up = (torch.randn(shape, device=device) * 3).to(dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, device=device).to(dtype)
    _check_gate_up(gate_up, grad, dtype)


def test_swiglu_gate_up_matches_phi3_mlp(device):
    # Phi-3's MLP activation step: gate, up = gate_up.chunk(2, -1); up * silu(gate).
    gate_up = torch.randn(2, 5, 2 * 24, device=device)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_close(swiglu_gate_up(gate_up), (up * torch.nn.functional.silu(gate)).double(), torch.float32)


def test_swiglu_gate_up_strided_inputs(device):
    # gate_up a non-contiguous view (rows with a gap), gradient transposed in memory.
    gate_up = torch.randn(6, 2 * 37 + 5, device=device)[:, : 2 * 37]
    grad = torch.randn(37, 6, device=device).t()
    assert not gate_up.is_contiguous() and not grad.is_contiguous()
    _check_gate_up(gate_up, grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_gate_up_reference_path(dtype, device, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    gate_up = (torch.randn(4, 66, device=device) * 3).to(dtype)
    grad = torch.randn(4, 33, device=device).to(dtype)
    _check_gate_up(gate_up, grad, dtype)


def test_swiglu_gate_up_empty(device):
    gate_up = torch.randn(0, 8, device=device, requires_grad=True)
    c = swiglu_gate_up(gate_up)
    c.sum().backward()
    assert c.shape == (0, 4) and gate_up.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"size": (3, 7)}, ValueError, "even last dimension"),
        ({"size": ()}, ValueError, "even last dimension"),
        ({"size": (3, 8), "dtype": torch.int32}, TypeError, "gate_up has dtype"),
        ({"size": (3, 8), "dtype": torch.float64}, TypeError, "gate_up has dtype"),
    ],
)
def test_swiglu_gate_up_bad_inputs(kwargs, error, match, device):
    with pytest.raises(error, match=match):
        swiglu_gate_up(torch.ones(**kwargs, device=device))


@pytest.mark.parametrize("dispatch", ["triton", "reference"])
def test_swiglu_gate_up_opcheck(dispatch, device, monkeypatch):
    # The torch.library op torch.compile records: schema, fake vs real, autograd registration.
    if dispatch == "reference":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        device = "cpu"
    gate_up = torch.randn(3, 2, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.liger.swiglu_gate_up, (gate_up,))


def test_fused_gate_up_swiglu_mlp(device):
    torch.manual_seed(0)
    mlp = LigerFusedGateUpSwiGLUMLP(16, 24).to(device)
    assert mlp.gate_up_proj.weight.shape == (48, 16) and mlp.down_proj.weight.shape == (16, 24)
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    y = mlp(x)
    y.square().sum().backward()
    # The same module in float64 with plain torch: down(up * silu(gate)).
    params64 = {n: p.detach().double().requires_grad_() for n, p in mlp.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    gate, up = (x64 @ params64["gate_up_proj.weight"].t()).chunk(2, dim=-1)
    y64 = (up * torch.nn.functional.silu(gate)) @ params64["down_proj.weight"].t()
    y64.square().sum().backward()
    assert_close(y, y64, torch.float32, name="y")
    assert_close(x.grad, x64.grad, torch.float32, reduction=True, name="dx")
    for n, p in mlp.named_parameters():
        assert_close(p.grad, params64[n].grad, torch.float32, reduction=True, name=f"d{n}")


@pytest.mark.gpu
def test_swiglu_gate_up_large_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    gate_up = torch.randn(4096, 2 * 8192, device=device, dtype=torch.bfloat16)
    grad = torch.randn(4096, 8192, device=device, dtype=torch.bfloat16)
    _check_gate_up(gate_up, grad, torch.bfloat16)


def test_swiglu_gate_up_compiles(device):
    gate_up = torch.randn(3, 2, 16, device=device, requires_grad=True)
    compiled = torch.compile(swiglu_gate_up, backend="aot_eager", fullgraph=True)
    c = compiled(gate_up)
    c.square().sum().backward()
    gate_up64 = gate_up.detach().double().requires_grad_()
    c64 = swiglu_gate_up_reference(gate_up64)
    c64.square().sum().backward()
    assert_close(c, c64, torch.float32, name="c")
    assert_close(gate_up.grad, gate_up64.grad, torch.float32, name="d_gate_up")
