"""Llama-4 complex RoPE: Triton kernel (interpreter on CPU) and the torch reference vs float64 math and
transformers' own `apply_rotary_emb`."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.llama4_rope import llama4_rope, llama4_rope_reference
from tests.ops.test_rope import _qk as rope_qk
from tests.ops.test_rope import check_rotation
from tests.tolerances import DTYPES, assert_close


def _freqs_cis(batch, seq_len, dim, device, scaling=1.0):
    """complex64 (B, T, D/2) as Llama4TextRotaryEmbedding builds it: polar(1, positions * inv_freq) * scale."""
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    positions = torch.randint(0, 8192, (batch, seq_len), device=device).float()
    freqs = positions[..., None] * inv_freq
    return torch.polar(torch.ones_like(freqs), freqs) * scaling


def _qk(batch, seq_len, n_heads, dim, transposed, device, dtype):
    """(B, T, H, D); `transposed` makes it a non-contiguous view of a (B, H, T, D) tensor."""
    return rope_qk(batch, seq_len, n_heads, dim, 2, transposed, device, dtype)


def _check(q, k, freqs_cis, dtype):
    """Forward and both gradients of the public op vs the reference on float64 copies."""
    return check_rotation(llama4_rope, llama4_rope_reference, q, k, (freqs_cis,), dtype)


# (batch, seq, q heads, kv heads, head_dim, freqs batch is B, transposed views, freqs form)
CASES = [
    (2, 5, 4, 2, 16, True, False, "complex"),  # GQA, the contiguous views transformers passes
    (1, 1, 3, 1, 64, True, True, "complex"),  # T = 1 (decoding), odd head count, transposed views
    (2, 3, 5, 3, 128, False, True, "complex"),  # D = 128, batch-1 freqs
    (2, 4, 3, 3, 10, True, False, "real"),  # half dim 5 (not a power of two), real view, generic freqs
    (1, 2, 70, 6, 128, True, False, "real"),  # more q heads than one block holds: the head loop
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}Hq{}Hk{}D{}".format(*c[:5]) + f"-{c[7]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama4_rope_matches_float64(case, dtype, device):
    batch, seq_len, n_qh, n_kh, dim, f_batched, transposed, form = case
    q = _qk(batch, seq_len, n_qh, dim, transposed, device, dtype)
    k = _qk(batch, seq_len, n_kh, dim, transposed, device, dtype)
    f_batch = batch if f_batched else 1
    if form == "complex":
        freqs_cis = _freqs_cis(f_batch, seq_len, dim, device, scaling=1.25)
    else:
        # A generic table (not unit magnitude) in the input dtype exercises the exact transpose.
        freqs_cis = torch.randn(f_batch, seq_len, dim // 2, 2, device=device).to(dtype)
    q_out, _ = _check(q, k, freqs_cis, dtype)
    assert q_out.stride() == q.stride()  # outputs keep the inputs' memory order


def test_llama4_rope_gradients_keep_the_input_layout(device):
    # q, k are (B, T, H, D) views; the upstream gradients arrive in another order (after the attention's
    # transpose). dq, dk come back in q's and k's memory order, as in ops/rope.py.
    q = _qk(2, 5, 4, 8, False, device, torch.float32).requires_grad_()
    k = _qk(2, 5, 2, 8, False, device, torch.float32).requires_grad_()
    freqs_cis = _freqs_cis(2, 5, 8, device)
    outs = llama4_rope(q, k, freqs_cis)
    grads = tuple(torch.randn(o.transpose(1, 2).shape, device=device).transpose(1, 2) for o in outs)
    dq, dk = torch.autograd.grad(outs, (q, k), grads)
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    outs64 = llama4_rope_reference(q64, k64, freqs_cis.to(torch.complex128))
    expected = torch.autograd.grad(outs64, (q64, k64), tuple(g.double() for g in grads))
    assert_close(dq, expected[0], torch.float32, name="dq")
    assert_close(dk, expected[1], torch.float32, name="dk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_rope_matches_transformers(dtype, device):
    modeling_llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    q = _qk(2, 6, 4, 32, False, device, dtype)
    k = _qk(2, 6, 2, 32, False, device, dtype)
    freqs_cis = _freqs_cis(2, 6, 32, device, scaling=0.9)
    ours = llama4_rope(q, k, freqs_cis)
    theirs = modeling_llama4.apply_rotary_emb(q, k, freqs_cis)
    real_view = llama4_rope(q, k, torch.view_as_real(freqs_cis))
    for a, b, c, name in zip(ours, theirs, real_view, ("q", "k")):
        # Same fp32 math, one rounding to the input dtype.
        assert_close(a, b.double(), dtype, name=name)
        assert torch.equal(a, c), f"{name}: complex and real-view freqs differ"


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama4_rope_reference_path(dtype, device, monkeypatch):
    # CPU tensors without the interpreter dispatch to the torch reference; it must agree too.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    q = _qk(2, 5, 4, 8, True, device, dtype)
    k = _qk(2, 5, 2, 8, True, device, dtype)
    _check(q, k, _freqs_cis(1, 5, 8, device), dtype)


@pytest.mark.parametrize("form", ["complex", "real"])
def test_llama4_rope_freqs_gradient_falls_back_to_reference(form, device):
    q = _qk(2, 3, 2, 8, False, device, torch.float32).requires_grad_()
    k = _qk(2, 3, 1, 8, False, device, torch.float32).requires_grad_()
    freqs = _freqs_cis(1, 3, 8, device)
    freqs = (freqs if form == "complex" else torch.view_as_real(freqs)).clone().requires_grad_()
    q_out, k_out = llama4_rope(q, k, freqs)
    (q_out.sum() + (2 * k_out).sum()).backward()
    f64 = freqs.detach().to(torch.complex128 if form == "complex" else torch.float64)
    leaves64 = [q.detach().double().requires_grad_(), k.detach().double().requires_grad_(), f64.requires_grad_()]
    q64, k64 = llama4_rope_reference(*leaves64)
    (q64.sum() + (2 * k64).sum()).backward()
    for t, t64, name in zip((q, k), leaves64, ("dq", "dk")):
        assert_close(t.grad, t64.grad, torch.float32, name=name)
    grad, grad64 = freqs.grad, leaves64[2].grad
    if form == "complex":
        grad, grad64 = torch.view_as_real(grad), torch.view_as_real(grad64)
    assert_close(grad, grad64, torch.float32, name="dfreqs")


def test_llama4_rope_empty(device):
    q = torch.randn(2, 0, 4, 8, device=device, requires_grad=True)
    k = torch.randn(2, 0, 1, 8, device=device, requires_grad=True)
    freqs = _freqs_cis(1, 0, 8, device)
    q_out, k_out = llama4_rope(q, k, freqs)
    (q_out.sum() + k_out.sum()).backward()
    assert q_out.shape == q.shape and q.grad.shape == q.shape


@pytest.mark.parametrize("dispatch", ["triton", "reference"])
def test_llama4_rope_opcheck(dispatch, device, monkeypatch):
    # The torch.library op torch.compile records: schema, fake vs real, autograd registration.
    if dispatch == "reference":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        device = "cpu"
    q = torch.randn(2, 3, 4, 8, device=device, requires_grad=True)
    k = torch.randn(2, 3, 2, 8, device=device, requires_grad=True)
    freqs = torch.view_as_real(_freqs_cis(1, 3, 8, device))
    torch.library.opcheck(torch.ops.liger.llama4_rope, (q, k, freqs, False))


def test_llama4_rope_compiles(device):
    q = _qk(2, 5, 4, 8, False, device, torch.float32).requires_grad_()
    k = _qk(2, 5, 2, 8, False, device, torch.float32).requires_grad_()
    freqs_cis = _freqs_cis(2, 5, 8, device)
    compiled = torch.compile(lambda q, k: llama4_rope(q, k, freqs_cis), backend="aot_eager", fullgraph=True)
    outs = compiled(q, k)
    (outs[0].sum() + outs[1].sum()).backward()
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    outs64 = llama4_rope_reference(q64, k64, freqs_cis.to(torch.complex128))
    (outs64[0].sum() + outs64[1].sum()).backward()
    for a, b, name in ((outs[0], outs64[0], "q"), (outs[1], outs64[1], "k"), (q.grad, q64.grad, "dq"),
                       (k.grad, k64.grad, "dk")):
        assert_close(a, b, torch.float32, name=name)


def _bad(q=(2, 5, 4, 8), k=(2, 5, 2, 8), freqs=(1, 5, 4), q_dtype=torch.float32, freqs_dtype=torch.complex64):
    return torch.randn(q).to(q_dtype), torch.randn(k), torch.randn(freqs, dtype=freqs_dtype)


@pytest.mark.parametrize(
    "tensors, error, match",
    [
        (_bad(q=(2, 5, 4, 7), k=(2, 5, 2, 7)), ValueError, "even"),
        (_bad(q=(5, 4, 8)), ValueError, "q must be 4-D"),
        (_bad(k=(2, 5, 2, 16)), ValueError, "k .* must match q"),
        (_bad(k=(2, 4, 2, 8)), ValueError, "k .* must match q"),
        (_bad(freqs=(1, 5, 8)), ValueError, "freqs_cis must be"),
        (_bad(freqs=(3, 5, 4)), ValueError, "freqs_cis must be"),
        (_bad(freqs=(1, 5, 4, 3), freqs_dtype=torch.float32), ValueError, "freqs_cis must be"),
        (_bad(freqs=(1, 5, 4), freqs_dtype=torch.float32), ValueError, "freqs_cis must be"),
        (_bad(freqs_dtype=torch.complex128), TypeError, "complex64"),
        (_bad(freqs=(1, 5, 4, 2), freqs_dtype=torch.float64), TypeError, "freqs_cis has dtype"),
        (_bad(q_dtype=torch.int64), TypeError, "q has dtype"),
    ],
)
def test_llama4_rope_bad_inputs(tensors, error, match):
    with pytest.raises(error, match=match):
        llama4_rope(*tensors)


@pytest.mark.gpu
def test_llama4_rope_scout_size_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    batch, seq_len, n_qh, n_kh, dim = 4, 4096, 40, 8, 128
    q = _qk(batch, seq_len, n_qh, dim, False, device, torch.bfloat16)
    k = _qk(batch, seq_len, n_kh, dim, False, device, torch.bfloat16)
    _check(q, k, _freqs_cis(batch, seq_len, dim, device), torch.bfloat16)
