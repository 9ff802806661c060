"""Generalized JSD distillation fused with student and teacher heads vs TRL's unfused
`generalized_jsd_loss` math in float64."""

import pytest
import torch
import torch.nn.functional as F

from liger_kernels.losses import FusedLinearJSDLoss, fused_linear_jsd_loss
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
