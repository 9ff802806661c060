"""RoPE (rotate-half): Triton kernel (interpreter on CPU) and the torch reference vs float64 math."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.rope import rope, rope_reference
from tests.tolerances import DTYPES, assert_close


def _hf_cos_sin(batch, seq_len, dim, device):
    """cos/sin as Hugging Face's rotary embedding builds them: cat(freqs, freqs), arbitrary positions."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    positions = torch.randint(0, 8192, (batch, seq_len), device=device).float()
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _qk(batch, seq_len, n_heads, dim, unsqueeze_dim, transposed, device, dtype):
    """q or k in the layout unsqueeze_dim implies; `transposed` makes it the usual non-contiguous view."""
    if unsqueeze_dim == 1:
        if transposed:  # view(B, T, H, D).transpose(1, 2), as attention modules do
            return torch.randn(batch, seq_len, n_heads, dim, device=device).to(dtype).transpose(1, 2)
        return torch.randn(batch, n_heads, seq_len, dim, device=device).to(dtype)
    if transposed:
        return torch.randn(batch, n_heads, seq_len, dim, device=device).to(dtype).transpose(1, 2)
    return torch.randn(batch, seq_len, n_heads, dim, device=device).to(dtype)


def check_rotation(apply, reference, q, k, tables, dtype):
    """Forward and both gradients of apply(q, k, *tables) vs reference(...) on float64 copies (complex
    tables in complex128); the RoPE variants' tests (M-RoPE, Llama-4) use it too."""
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_before, k_before = q.detach().clone(), k.detach().clone()
    q_embed, k_embed = apply(q, k, *tables)
    grad_q = torch.randn_like(q_embed)
    grad_k = torch.randn_like(k_embed)
    ((q_embed * grad_q).sum() + (k_embed * grad_k).sum()).backward()

    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    tables64 = [t.to(torch.complex128) if t.is_complex() else t.double() for t in tables]
    q64_embed, k64_embed = reference(q64, k64, *tables64)
    ((q64_embed * grad_q.double()).sum() + (k64_embed * grad_k.double()).sum()).backward()

    assert q_embed.dtype == q.dtype and q_embed.shape == q.shape and k_embed.shape == k.shape
    assert_close(q_embed, q64_embed, dtype, name="q_embed")
    assert_close(k_embed, k64_embed, dtype, name="k_embed")
    assert_close(q.grad, q64.grad, dtype, name="dq")
    assert_close(k.grad, k64.grad, dtype, name="dk")
    assert torch.equal(q.detach(), q_before) and torch.equal(k.detach(), k_before)
    return q_embed, k_embed


def _check(q, k, cos, sin, unsqueeze_dim, dtype):
    return check_rotation(
        lambda *t: rope(*t, unsqueeze_dim), lambda *t: rope_reference(*t, unsqueeze_dim), q, k, (cos, sin), dtype
    )


# (batch, seq, q heads, kv heads, head_dim, unsqueeze_dim, cos batch is B, transposed views, HF cos/sin)
CASES = [
    (2, 5, 4, 2, 8, 1, False, True, True),  # GQA, batch-1 cos/sin, transposed views (HF default)
    (2, 3, 4, 3, 6, 2, True, False, False),  # kv heads not dividing q heads, half dim 3, (B, T, H, D)
    (1, 1, 1, 1, 2, 1, True, False, True),  # one token, one head, D = 2
    (2, 4, 3, 3, 16, 2, False, True, False),  # MHA, (B, T, H, D) given as a transposed view
    (1, 2, 70, 6, 128, 1, True, True, False),  # more q heads than one block holds: the head loop
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}Hq{}Hk{}D{}u{}".format(*c[:6]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_float64(case, dtype, device):
    batch, seq_len, n_qh, n_kh, dim, unsqueeze_dim, cos_batched, transposed, hf = case
    q = _qk(batch, seq_len, n_qh, dim, unsqueeze_dim, transposed, device, dtype)
    k = _qk(batch, seq_len, n_kh, dim, unsqueeze_dim, transposed, device, dtype)
    cos_batch = batch if cos_batched else 1
    if hf:
        cos, sin = _hf_cos_sin(cos_batch, seq_len, dim, device)
    else:
        # Generic tables (halves differ) exercise the exact transpose used by the backward.
        cos = torch.randn(cos_batch, seq_len, dim, device=device)
        sin = torch.randn(cos_batch, seq_len, dim, device=device)
    q_embed, _ = _check(q, k, cos.to(dtype), sin.to(dtype), unsqueeze_dim, dtype)
    # Outputs keep the inputs' memory order (a transposed view gives a transposed output).
    assert q_embed.stride() == q.stride()


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_gradients_keep_the_input_layout(unsqueeze_dim, device):
    # q, k are views of (B, T, H, D) projections; the upstream gradients arrive contiguous in the
    # op's logical order. dq, dk come back in q's and k's memory order, so that autograd passes them
    # on to the projections without a copy (a layout mismatch costs a copy at every view/leaf).
    q = _qk(2, 5, 4, 8, unsqueeze_dim, True, device, torch.float32).requires_grad_()
    k = _qk(2, 5, 2, 8, unsqueeze_dim, True, device, torch.float32).requires_grad_()
    cos, sin = _hf_cos_sin(1, 5, 8, device)
    q_embed, k_embed = rope(q, k, cos, sin, unsqueeze_dim)
    grads = (torch.randn(q.shape, device=device), torch.randn(k.shape, device=device))
    dq, dk = torch.autograd.grad((q_embed, k_embed), (q, k), grads)
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    outs64 = rope_reference(q64, k64, cos.double(), sin.double(), unsqueeze_dim)
    expected = torch.autograd.grad(outs64, (q64, k64), tuple(g.double() for g in grads))
    assert_close(dq, expected[0], torch.float32, name="dq")
    assert_close(dk, expected[1], torch.float32, name="dk")


def test_rope_matches_hugging_face(device):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q = _qk(2, 6, 4, 16, 1, True, device, torch.float32)
    k = _qk(2, 6, 2, 16, 1, True, device, torch.float32)
    cos, sin = _hf_cos_sin(2, 6, 16, device)
    ours = rope(q, k, cos, sin)
    theirs = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b, name in zip(ours, theirs, ("q", "k")):
        assert_close(a, b.double(), torch.float32, name=name)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_reference_path(unsqueeze_dim, dtype, device, monkeypatch):
    # CPU tensors without the interpreter dispatch to the torch reference; it must agree too.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    q = _qk(2, 5, 4, 8, unsqueeze_dim, True, device, dtype)
    k = _qk(2, 5, 2, 8, unsqueeze_dim, True, device, dtype)
    cos, sin = _hf_cos_sin(1, 5, 8, device)
    _check(q, k, cos.to(dtype), sin.to(dtype), unsqueeze_dim, dtype)


def test_rope_cos_sin_gradient_falls_back_to_reference(device):
    # The kernel gives cos/sin no gradient; when they require one, the exact reference runs instead.
    q = _qk(2, 3, 2, 8, 1, True, device, torch.float32).requires_grad_()
    k = _qk(2, 3, 1, 8, 1, True, device, torch.float32).requires_grad_()
    cos = torch.randn(1, 3, 8, device=device, requires_grad=True)
    sin = torch.randn(1, 3, 8, device=device, requires_grad=True)
    q_embed, k_embed = rope(q, k, cos, sin)
    (q_embed.sum() + (2 * k_embed).sum()).backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, cos, sin)]
    q64, k64 = rope_reference(*leaves64)
    (q64.sum() + (2 * k64).sum()).backward()
    for t, t64, name in zip((q, k, cos, sin), leaves64, ("dq", "dk", "dcos", "dsin")):
        assert_close(t.grad, t64.grad, torch.float32, name=name)


def test_rope_empty(device):
    q = torch.randn(2, 4, 0, 8, device=device, requires_grad=True)
    k = torch.randn(2, 1, 0, 8, device=device, requires_grad=True)
    cos = torch.randn(1, 0, 8, device=device)
    q_embed, k_embed = rope(q, k, cos, cos)
    (q_embed.sum() + k_embed.sum()).backward()
    assert q_embed.shape == q.shape and q.grad.shape == q.shape


def _bad(**overrides):
    shapes = {"q": (2, 4, 5, 8), "k": (2, 2, 5, 8), "cos": (1, 5, 8), "sin": (1, 5, 8)}
    shapes.update({n: s for n, s in overrides.items() if n in shapes})
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    if "dtype" in overrides:
        name, dtype = overrides["dtype"]
        tensors[name] = tensors[name].to(dtype)
    return tensors


@pytest.mark.parametrize(
    "tensors, unsqueeze_dim, error, match",
    [
        (_bad(q=(2, 4, 5, 7), k=(2, 2, 5, 7), cos=(1, 5, 7), sin=(1, 5, 7)), 1, ValueError, "even"),
        (_bad(q=(4, 5, 8)), 1, ValueError, "q must be 4-D"),
        (_bad(k=(2, 2, 5, 16)), 1, ValueError, "k .* must match q"),
        (_bad(k=(3, 2, 5, 8)), 1, ValueError, "k .* must match q"),
        (_bad(cos=(1, 6, 8), sin=(1, 6, 8)), 1, ValueError, "cos/sin must be"),
        (_bad(cos=(3, 5, 8), sin=(3, 5, 8)), 1, ValueError, "cos/sin must be"),
        (_bad(cos=(5, 8), sin=(5, 8)), 1, ValueError, "cos/sin must be"),
        (_bad(sin=(2, 5, 8)), 1, ValueError, "one shape"),
        (_bad(), 3, ValueError, "unsqueeze_dim"),
        (_bad(), 2, ValueError, "k .* must match q"),  # (B, H, T, D) tensors read as (B, T, H, D)
        (_bad(dtype=("q", torch.int64)), 1, TypeError, "q has dtype"),
        (_bad(dtype=("cos", torch.float64)), 1, TypeError, "cos has dtype"),
    ],
)
def test_rope_bad_inputs(tensors, unsqueeze_dim, error, match):
    with pytest.raises(error, match=match):
        rope(tensors["q"], tensors["k"], tensors["cos"], tensors["sin"], unsqueeze_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_llama_size_gpu(unsqueeze_dim, device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    batch, seq_len, n_qh, n_kh, dim = 4, 4096, 32, 8, 128
    q = _qk(batch, seq_len, n_qh, dim, unsqueeze_dim, True, device, torch.bfloat16)
    k = _qk(batch, seq_len, n_kh, dim, unsqueeze_dim, True, device, torch.bfloat16)
    cos, sin = _hf_cos_sin(batch, seq_len, dim, device)
    _check(q, k, cos.to(torch.bfloat16), sin.to(torch.bfloat16), unsqueeze_dim, torch.bfloat16)
