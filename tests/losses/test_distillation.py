"""Distillation fused with student and teacher heads vs unfused float64 references: generalized JSD
(TRL's `generalized_jsd_loss`) and cosine similarity (Liger-Kernel's `LigerFusedLinearCosineSimilarityLoss`)."""

import pytest
import torch
import torch.nn.functional as F

from liger_kernels.losses import (
    FusedLinearCosineSimilarityLoss,
    FusedLinearJSDLoss,
    fused_linear_cosine_similarity_loss,
    fused_linear_jsd_loss,
)
from tests.losses.reference import leaf64, logits64, make_inputs
from tests.tolerances import assert_close

B, T, HS, HT, V = 3, 5, 12, 20, 61


def _jsd_ref(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's GKD `generalized_jsd_loss` (batchmean over the unmasked tokens)."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-beta_t), t + torch.log(beta_t)]), dim=0)
        jsd = beta_t * F.kl_div(m, t, reduction="none", log_target=True) + (1 - beta_t) * F.kl_div(
            m, s, reduction="none", log_target=True
        )
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jsd(beta, dtype, device):
    hs, ws, bs, target = make_inputs(B, T, HS, V, dtype, device)
    ht, wt, bt, _ = make_inputs(B, T, HT, V, dtype, device)
    hs, ws, bs = (t.detach().requires_grad_() for t in (hs, ws, bs))
    hard = 0.3 if beta == 0.5 else 0.0
    out = fused_linear_jsd_loss(
        hs, ws, ht, wt, target, bs, bt, beta=beta, temperature=1.5, weight_hard_loss=hard, chunk_size=4
    )
    out.loss.backward()
    hs64, ws64, bs64 = leaf64(hs, ws, bs)
    zs = logits64(hs64, ws64, bs64)
    zt = logits64(ht.double(), wt.double(), bt.double())
    soft = _jsd_ref(zs, zt, target, beta, 1.5)
    ref_loss = soft
    if hard:
        ref_loss = soft + hard * F.cross_entropy(zs.reshape(-1, V), target.reshape(-1))
    ref_loss.backward()
    assert_close(out.loss, ref_loss, dtype, reduction=True, name="loss")
    assert_close(out.metrics["soft_loss"], soft, dtype, reduction=True, name="soft_loss")
    for t, t64, name in ((hs, hs64, "input"), (ws, ws64, "weight"), (bs, bs64, "bias")):
        assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jsd_soft_only_runs_the_op(beta, dtype, device, monkeypatch):
    """Without biases and hard-label term the loss is the fused_linear_jsd op (a Triton JSD pass)."""
    import liger_kernels.losses.distillation as distillation

    calls = []
    op = distillation.fused_linear_jsd
    monkeypatch.setattr(distillation, "fused_linear_jsd", lambda *a, **k: calls.append(1) or op(*a, **k))
    hs, ws, _, target = make_inputs(B, T, HS, V, dtype, device, bias=False)
    ht, wt, _, _ = make_inputs(B, T, HT, V, dtype, device, bias=False)
    hs, ws = (t.detach().requires_grad_() for t in (hs, ws))
    out = fused_linear_jsd_loss(hs, ws, ht, wt, target, beta=beta, temperature=0.7, weight_soft_loss=0.5, chunk_size=4)
    out.loss.backward()
    assert calls == [1]
    hs64, ws64 = leaf64(hs, ws)
    soft = _jsd_ref(logits64(hs64, ws64, None), logits64(ht.double(), wt.double(), None), target, beta, 0.7)
    (0.5 * soft).backward()
    assert_close(out.loss, 0.5 * soft, dtype, reduction=True, name="loss")
    assert_close(out.metrics["soft_loss"], soft, dtype, reduction=True, name="soft_loss")
    assert out.metrics["hard_loss"].item() == 0.0
    for t, t64, name in ((hs, hs64, "input"), (ws, ws64, "weight")):
        assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")


def test_jsd_flat_tokens_without_target(device):
    hs, ws, _, _ = make_inputs(1, 9, HS, V, torch.float32, device, bias=False)
    ht, wt, _, _ = make_inputs(1, 9, HT, V, torch.float32, device, bias=False)
    hs = hs[0].detach().requires_grad_()
    out = FusedLinearJSDLoss(beta=0.5, chunk_size=4)(hs, ws, ht[0], wt)
    out.loss.backward()
    hs64 = hs.detach().double().requires_grad_()
    ref = _jsd_ref(hs64 @ ws.double().T, ht[0].double() @ wt.double().T, torch.zeros(9, dtype=torch.long), 0.5, 1.0)
    ref.backward()
    assert_close(out.loss, ref, torch.float32, reduction=True, name="loss")
    assert_close(hs.grad, hs64.grad, torch.float32, name="grad input")


def test_jsd_errors(device):
    hs, ws, _, target = make_inputs(B, T, HS, V, torch.float32, device, bias=False)
    ht, wt, _, _ = make_inputs(B, T, HT, V, torch.float32, device, bias=False)
    with pytest.raises(ValueError, match="beta must be in"):
        fused_linear_jsd_loss(hs, ws, ht, wt, target, beta=1.5)
    with pytest.raises(ValueError, match="needs target"):
        fused_linear_jsd_loss(hs, ws, ht, wt, weight_hard_loss=1.0)
    with pytest.raises(ValueError, match="teacher_weight has vocab"):
        fused_linear_jsd_loss(hs, ws, ht, wt[:-1], target)
    with pytest.raises(ValueError, match="teacher_input has batch/seq shape"):
        fused_linear_jsd_loss(hs, ws, ht[:, :-1], wt, target)


# ----------------------------------------------------------------------------------------------------
# Cosine similarity
# ----------------------------------------------------------------------------------------------------


def _cosine_ref(student_logits, teacher_logits, labels, beta, temperature, ignore_index=-100):
    """Liger-Kernel's cosine distillation term: beta * (1 - cos(normalize(s / t), normalize(t / t))) per
    token, summed over the valid tokens and divided by their count."""
    s = F.normalize(student_logits / temperature, p=2, dim=-1)
    t = F.normalize(teacher_logits / temperature, p=2, dim=-1)
    per_token = beta * (1 - F.cosine_similarity(s, t, dim=-1))
    mask = labels != ignore_index
    return per_token[mask].sum() / mask.sum()


@pytest.mark.parametrize(
    "beta, temperature, soft, hard",
    [(0.5, 1.0, 1.0, 0.0), (1.0, 2.0, 0.7, 0.3), (0.2, 0.5, 0.0, 1.0)],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine(beta, temperature, soft, hard, bias, dtype, device):
    hs, ws, bs, target = make_inputs(B, T, HS, V, dtype, device, bias=bias)
    ht, wt, bt, _ = make_inputs(B, T, HT, V, dtype, device, bias=bias)
    hs, ws = (t.detach().requires_grad_() for t in (hs, ws))
    bs = bs.detach().requires_grad_() if bias else None
    out = fused_linear_cosine_similarity_loss(
        hs, ws, ht, wt, target, bs, bt, beta=beta, temperature=temperature, weight_soft_loss=soft,
        weight_hard_loss=hard, chunk_size=4,
    )  # fmt: skip
    out.loss.backward()
    hs64, ws64, bs64 = leaf64(hs, ws, bs)
    zs = logits64(hs64, ws64, bs64)
    zt = logits64(ht.double(), wt.double(), None if bt is None else bt.double())
    soft_ref = _cosine_ref(zs, zt, target, beta, temperature)
    hard_ref = F.cross_entropy(zs.reshape(-1, V), target.reshape(-1))
    ref_loss = soft * soft_ref + hard * hard_ref
    ref_loss.backward()
    assert_close(out.loss, ref_loss, dtype, reduction=True, name="loss")
    assert_close(out.metrics["soft_loss"], soft_ref, dtype, reduction=True, name="soft_loss")
    if hard:
        assert_close(out.metrics["hard_loss"], hard_ref, dtype, reduction=True, name="hard_loss")
    else:
        assert out.metrics["hard_loss"].item() == 0.0
    for t, t64, name in ((hs, hs64, "input"), (ws, ws64, "weight"), (bs, bs64, "bias")):
        if t is not None:
            assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")


def test_cosine_ignore_index_and_module(device):
    """A custom ignore_index: its tokens contribute neither to the sum nor to the count; flat (N, H)
    inputs; the module form; the temperature does not change the cosine term."""
    hs, ws, bs, target = make_inputs(B, T, HS, V, torch.float32, device)
    ht, wt, _, _ = make_inputs(B, T, HT, V, torch.float32, device, bias=False)
    target = torch.where(target == 7, 8, target)  # token 7 becomes the ignore_index: no real 7 left
    target = torch.where(target == -100, 7, target)
    target[0, :] = 7
    assert 0 < int((target[1:] == 7).sum()) < target[1:].numel()
    hs, ws, bs = (t.detach().requires_grad_() for t in (hs, ws, bs))
    module = FusedLinearCosineSimilarityLoss(beta=1.0, ignore_index=7, weight_hard_loss=0.25, chunk_size=3)
    out = module(hs.reshape(-1, HS), ws, ht.reshape(-1, HT), wt, target.reshape(-1), bs)
    out.loss.backward()
    hs64, ws64, bs64 = leaf64(hs, ws, bs)
    zs = logits64(hs64, ws64, bs64)
    zt = logits64(ht.double(), wt.double(), None)
    soft_ref = _cosine_ref(zs, zt, target, 1.0, 1.0, ignore_index=7)
    ref_loss = soft_ref + 0.25 * F.cross_entropy(zs.reshape(-1, V), target.reshape(-1), ignore_index=7)
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.float32, reduction=True, name="loss")
    for t, t64, name in ((hs, hs64, "input"), (ws, ws64, "weight"), (bs, bs64, "bias")):
        assert_close(t.grad, t64.grad, torch.float32, reduction=True, name=f"grad {name}")
    assert bool((hs.grad[0] == 0).all())  # a fully ignored sequence gets no gradient
    hot = fused_linear_cosine_similarity_loss(hs, ws, ht, wt, target, bs, beta=1.0, ignore_index=7, temperature=3.0)
    assert_close(hot.loss, soft_ref, torch.float32, reduction=True, name="loss at temperature 3")
    # without target every token counts
    no_target = fused_linear_cosine_similarity_loss(hs, ws, ht, wt, None, bs, beta=1.0)
    every = _cosine_ref(zs.detach(), zt, torch.zeros(B, T, dtype=torch.long), 1.0, 1.0)
    assert_close(no_target.loss, every, torch.float32, reduction=True, name="loss without target")


def test_cosine_errors(device):
    hs, ws, _, target = make_inputs(B, T, HS, V, torch.float32, device, bias=False)
    ht, wt, _, _ = make_inputs(B, T, HT, V, torch.float32, device, bias=False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_linear_cosine_similarity_loss(hs, ws, ht, wt, target, temperature=0.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        fused_linear_cosine_similarity_loss(hs, ws, ht, wt, target, beta=-0.1)
    with pytest.raises(ValueError, match="needs target"):
        fused_linear_cosine_similarity_loss(hs, ws, ht, wt, weight_hard_loss=1.0)
    with pytest.raises(ValueError, match="teacher_weight has vocab"):
        fused_linear_cosine_similarity_loss(hs, ws, ht, wt[:-1], target)
    with pytest.raises(ValueError, match="teacher_input has batch/seq shape"):
        fused_linear_cosine_similarity_loss(hs, ws, ht[:, :-1], wt, target)
    with pytest.raises(ValueError, match="target has"):
        fused_linear_cosine_similarity_loss(hs, ws, ht, wt, target[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cosine_similarity_loss(hs, ws, ht, wt, target, chunk_size=0)
    with pytest.raises(TypeError, match="unknown options"):
        FusedLinearCosineSimilarityLoss(alpha=0.1)
