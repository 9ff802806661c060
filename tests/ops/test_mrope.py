"""Qwen2-VL M-RoPE: Triton kernel (interpreter on CPU) and the torch reference vs float64 math and
transformers' own implementation."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.ops.mrope import mrope, mrope_reference
from tests.ops.test_rope import _qk, check_rotation
from tests.tolerances import DTYPES, assert_close


def _position_ids(batch, seq_len, device):
    """(3, B, T) temporal/height/width ids, different per component (an image patch grid)."""
    return torch.randint(0, 4096, (3, batch, seq_len), device=device)


def _hf_cos_sin(position_ids, dim, device):
    """Per-component (3, B, T, D) tables as Qwen2-VL's rotary embedding builds them: cat(freqs, freqs)."""
    inv_freq = 1.0 / (1000000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _check(q, k, cos, sin, section, unsqueeze_dim, dtype):
    return check_rotation(
        lambda *t: mrope(*t, section, unsqueeze_dim), lambda *t: mrope_reference(*t, section, unsqueeze_dim),
        q, k, (cos, sin), dtype,
    )


# (batch, seq, q heads, kv heads, head_dim, section, unsqueeze_dim, cos batch is B, transposed, HF tables)
CASES = [
    (2, 5, 4, 2, 16, [2, 3, 3], 1, True, True, True),  # GQA, transposed views (the HF default)
    (1, 1, 3, 1, 64, [8, 12, 12], 1, True, True, True),  # T = 1 (decoding), odd head count
    (2, 3, 5, 3, 128, [16, 24, 24], 2, False, False, True),  # Qwen2-VL's section, (B, T, H, D), batch-1 tables
    (2, 4, 3, 3, 10, [0, 3, 2], 1, True, False, False),  # empty temporal run, half dim 5, generic tables
    (1, 2, 7, 1, 12, [6, 0, 0], 2, True, True, False),  # all pairs temporal (plain RoPE)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}Hq{}Hk{}D{}".format(*c[:5]) + f"u{c[6]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_matches_float64(case, dtype, device):
    batch, seq_len, n_qh, n_kh, dim, section, unsqueeze_dim, cos_batched, transposed, hf = case
    q = _qk(batch, seq_len, n_qh, dim, unsqueeze_dim, transposed, device, dtype)
    k = _qk(batch, seq_len, n_kh, dim, unsqueeze_dim, transposed, device, dtype)
    cos_batch = batch if cos_batched else 1
    if hf:
        cos, sin = _hf_cos_sin(_position_ids(cos_batch, seq_len, device), dim, device)
    else:
        # Generic tables (halves differ) exercise the exact transpose used by the backward.
        cos = torch.randn(3, cos_batch, seq_len, dim, device=device)
        sin = torch.randn(3, cos_batch, seq_len, dim, device=device)
    q_embed, _ = _check(q, k, cos.to(dtype), sin.to(dtype), section, unsqueeze_dim, dtype)
    assert q_embed.stride() == q.stride()  # outputs keep the inputs' memory order


def test_mrope_gradients_keep_the_input_layout(device):
    # dq, dk come back in q's and k's memory order (views of the projections), as in ops/rope.py.
    q = _qk(2, 5, 4, 8, 1, True, device, torch.float32).requires_grad_()
    k = _qk(2, 5, 2, 8, 1, True, device, torch.float32).requires_grad_()
    cos, sin = _hf_cos_sin(_position_ids(2, 5, device), 8, device)
    outs = mrope(q, k, cos, sin, [2, 1, 1])
    grads = tuple(torch.randn(o.shape, device=device) for o in outs)  # contiguous (B, H, T, D)
    dq, dk = torch.autograd.grad(outs, (q, k), grads)
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    outs64 = mrope_reference(q64, k64, cos.double(), sin.double(), [2, 1, 1])
    expected = torch.autograd.grad(outs64, (q64, k64), tuple(g.double() for g in grads))
    assert_close(dq, expected[0], torch.float32, name="dq")
    assert_close(dk, expected[1], torch.float32, name="dk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrope_matches_transformers(dtype, device):
    # Older transformers apply the sections in `apply_multimodal_rotary_pos_emb`; newer ones inside
    # Qwen2-VL's rotary embedding, followed by the plain `apply_rotary_pos_emb`. Check whichever exists.
    qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    from transformers import Qwen2VLConfig

    batch, seq_len, n_qh, n_kh, dim, section = 2, 6, 4, 2, 32, [4, 6, 6]
    q = _qk(batch, seq_len, n_qh, dim, 1, True, device, dtype)
    k = _qk(batch, seq_len, n_kh, dim, 1, True, device, dtype)
    position_ids = _position_ids(batch, seq_len, device)
    cos, sin = _hf_cos_sin(position_ids, dim, device)
    cos, sin = cos.to(dtype), sin.to(dtype)
    ours = mrope(q, k, cos, sin, section)
    if hasattr(qwen2_vl, "apply_multimodal_rotary_pos_emb"):
        theirs = qwen2_vl.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)
    else:
        config = Qwen2VLConfig(
            hidden_size=dim * n_qh, num_attention_heads=n_qh, num_key_value_heads=n_kh,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
        ).get_text_config()
        rotary = qwen2_vl.Qwen2VLRotaryEmbedding(config).to(device)
        hf_cos, hf_sin = rotary(q, position_ids)
        theirs = qwen2_vl.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    for a, b, name in zip(ours, theirs, ("q", "k")):
        # Both round the product to the input dtype; transformers' bf16 math rounds every step.
        assert_close(a, b.double(), dtype, name=name)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_reference_path(unsqueeze_dim, dtype, device, monkeypatch):
    # CPU tensors without the interpreter dispatch to the torch reference; it must agree too.
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    q = _qk(2, 5, 4, 8, unsqueeze_dim, True, device, dtype)
    k = _qk(2, 5, 2, 8, unsqueeze_dim, True, device, dtype)
    cos, sin = _hf_cos_sin(_position_ids(2, 5, device), 8, device)
    _check(q, k, cos.to(dtype), sin.to(dtype), [1, 2, 1], unsqueeze_dim, dtype)


def test_mrope_cos_sin_gradient_falls_back_to_reference(device):
    q = _qk(2, 3, 2, 8, 1, True, device, torch.float32).requires_grad_()
    k = _qk(2, 3, 1, 8, 1, True, device, torch.float32).requires_grad_()
    cos = torch.randn(3, 1, 3, 8, device=device, requires_grad=True)
    sin = torch.randn(3, 1, 3, 8, device=device, requires_grad=True)
    q_embed, k_embed = mrope(q, k, cos, sin, [2, 1, 1])
    (q_embed.sum() + (2 * k_embed).sum()).backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, cos, sin)]
    q64, k64 = mrope_reference(*leaves64, [2, 1, 1])
    (q64.sum() + (2 * k64).sum()).backward()
    for t, t64, name in zip((q, k, cos, sin), leaves64, ("dq", "dk", "dcos", "dsin")):
        assert_close(t.grad, t64.grad, torch.float32, name=name)


def test_mrope_empty(device):
    q = torch.randn(2, 4, 0, 8, device=device, requires_grad=True)
    k = torch.randn(2, 1, 0, 8, device=device, requires_grad=True)
    cos = torch.randn(3, 1, 0, 8, device=device)
    q_embed, k_embed = mrope(q, k, cos, cos, [2, 1, 1])
    (q_embed.sum() + k_embed.sum()).backward()
    assert q_embed.shape == q.shape and q.grad.shape == q.shape


@pytest.mark.parametrize("dispatch", ["triton", "reference"])
def test_mrope_opcheck(dispatch, device, monkeypatch):
    # The torch.library op torch.compile records: schema, fake vs real, autograd registration.
    if dispatch == "reference":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
        device = "cpu"
    q = torch.randn(2, 4, 3, 8, device=device, requires_grad=True)
    k = torch.randn(2, 2, 3, 8, device=device, requires_grad=True)
    cos, sin = torch.randn(3, 1, 3, 8, device=device), torch.randn(3, 1, 3, 8, device=device)
    torch.library.opcheck(torch.ops.liger.mrope, (q, k, cos, sin, [2, 1, 1], 1, False))


def test_mrope_compiles_to_one_node(device):
    q = _qk(2, 5, 4, 8, 1, True, device, torch.float32).requires_grad_()
    k = _qk(2, 5, 2, 8, 1, True, device, torch.float32).requires_grad_()
    cos, sin = _hf_cos_sin(_position_ids(2, 5, device), 8, device)
    compiled = torch.compile(lambda q, k: mrope(q, k, cos, sin, [2, 1, 1]), backend="aot_eager", fullgraph=True)
    outs = compiled(q, k)
    (outs[0].sum() + outs[1].sum()).backward()
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    outs64 = mrope_reference(q64, k64, cos.double(), sin.double(), [2, 1, 1])
    (outs64[0].sum() + outs64[1].sum()).backward()
    for a, b, name in ((outs[0], outs64[0], "q"), (outs[1], outs64[1], "k"), (q.grad, q64.grad, "dq"),
                       (k.grad, k64.grad, "dk")):
        assert_close(a, b, torch.float32, name=name)


def _bad(**overrides):
    shapes = {"q": (2, 4, 5, 8), "k": (2, 2, 5, 8), "cos": (3, 1, 5, 8), "sin": (3, 1, 5, 8)}
    shapes.update({n: s for n, s in overrides.items() if n in shapes})
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    if "dtype" in overrides:
        name, dtype = overrides["dtype"]
        tensors[name] = tensors[name].to(dtype)
    return tensors


@pytest.mark.parametrize(
    "tensors, section, unsqueeze_dim, error, match",
    [
        (_bad(q=(2, 4, 5, 7), k=(2, 2, 5, 7), cos=(3, 1, 5, 7), sin=(3, 1, 5, 7)), [1, 1, 1], 1, ValueError,
         "even"),
        (_bad(q=(4, 5, 8)), [2, 1, 1], 1, ValueError, "q must be 4-D"),
        (_bad(k=(2, 2, 5, 16)), [2, 1, 1], 1, ValueError, "k .* must match q"),
        (_bad(cos=(1, 5, 8), sin=(1, 5, 8)), [2, 1, 1], 1, ValueError, "cos/sin must be"),
        (_bad(cos=(2, 1, 5, 8), sin=(2, 1, 5, 8)), [2, 1, 1], 1, ValueError, "cos/sin must be"),
        (_bad(cos=(3, 3, 5, 8), sin=(3, 3, 5, 8)), [2, 1, 1], 1, ValueError, "cos/sin must be"),
        (_bad(sin=(3, 2, 5, 8)), [2, 1, 1], 1, ValueError, "one shape"),
        (_bad(), [2, 1, 2], 1, ValueError, "mrope_section"),
        (_bad(), [4], 1, ValueError, "mrope_section"),
        (_bad(), [3, 2, -1], 1, ValueError, "mrope_section"),
        (_bad(), [2, 1, 1], 3, ValueError, "unsqueeze_dim"),
        (_bad(dtype=("k", torch.int64)), [2, 1, 1], 1, TypeError, "k has dtype"),
        (_bad(dtype=("sin", torch.float64)), [2, 1, 1], 1, TypeError, "sin has dtype"),
    ],
)
def test_mrope_bad_inputs(tensors, section, unsqueeze_dim, error, match):
    with pytest.raises(error, match=match):
        mrope(tensors["q"], tensors["k"], tensors["cos"], tensors["sin"], section, unsqueeze_dim)


@pytest.mark.gpu
def test_mrope_qwen2_vl_size_gpu(device):
    if device != "cuda":
        pytest.skip("real-size check; run with LIGER_TEST_DEVICE=cuda")
    batch, seq_len, n_qh, n_kh, dim = 4, 4096, 28, 4, 128
    q = _qk(batch, seq_len, n_qh, dim, 1, True, device, torch.bfloat16)
    k = _qk(batch, seq_len, n_kh, dim, 1, True, device, torch.bfloat16)
    cos, sin = _hf_cos_sin(_position_ids(batch, seq_len, device), dim, device)
    _check(q, k, cos.to(torch.bfloat16), sin.to(torch.bfloat16), [16, 24, 24], 1, torch.bfloat16)
