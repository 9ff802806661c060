"""KTO and GRPO-family fused losses vs unfused float64 references (TRL 1.16's formulas)."""

import pytest
import torch

import liger_kernels._utils
from liger_kernels.losses import (
    GRPO_LOSS_TYPES,
    FusedLinearGRPOLoss,
    FusedLinearKTOLoss,
    fused_linear_grpo_loss,
    fused_linear_kto_loss,
)
from tests.losses.reference import leaf64, logits64, make_inputs, token_logps, token_stats
from tests.tolerances import assert_close

N, T, H, V = 6, 7, 16, 53


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    return request.param


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _grads_close(ours, ref, dtype):
    for t, t64, name in zip(ours, ref, ("input", "weight", "bias")):
        if t is not None:
            assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")


# ----------------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kto(loss_type, dtype, path, device):
    h, w, b, target = make_inputs(N, T, H, V, dtype, device)
    ref_h, _, _, _ = make_inputs(N, T, H, V, dtype, device)
    labels = torch.tensor([True, False, True, True, False, False], device=device)
    kl = 0.05
    h, w, b = _leaves(h, w, b)
    out = FusedLinearKTOLoss(loss_type=loss_type, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7, chunk_size=4)(
        h, w, target, labels, b, ref_input=ref_h, kl=kl
    )
    out.loss.backward()

    h64, w64, b64 = leaf64(h, w, b)
    z = logits64(h64, w64, b64)
    lp, mask, _ = token_logps(z, target)
    rlp, _, _ = token_logps(logits64(ref_h.double(), w64.detach(), b64.detach()), target)
    logps, ref_logps = lp.sum(-1), rlp.sum(-1)
    c, r = logps[labels], logps[~labels]
    rc, rr = ref_logps[labels], ref_logps[~labels]
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(0.5 * ((c - rc) - kl))
        rejected = 1 - torch.sigmoid(0.5 * (kl - (r - rr)))
    else:
        chosen = 1 - torch.sigmoid(0.5 * (c - rc))
        rejected = torch.sigmoid(0.5 * (r - rr))
    ref_loss = torch.cat([1.3 * chosen, 0.7 * rejected]).nanmean()
    ref_loss.backward()
    assert_close(out.loss, ref_loss, dtype, reduction=True, name="loss")
    _, mean_logits, _ = token_stats(z, target, mask)
    expected = {
        "chosen_rewards": (0.5 * (c - rc)).mean(),
        "rejected_rewards": (0.5 * (r - rr)).mean(),
        "chosen_logps": c.mean(),
        "rejected_logps": r.mean(),
        "chosen_logits_mean": mean_logits[labels][mask[labels]].mean(),
        "rejected_logits_mean": mean_logits[~labels][mask[~labels]].mean(),
    }
    for key, value in expected.items():
        assert_close(out.metrics[key], value, dtype, reduction=True, name=key)
    _grads_close((h, w, b), (h64, w64, b64), dtype)


def test_kto_precomputed_reference_and_errors(device):
    h, w, b, target = make_inputs(N, T, H, V, torch.float32, device)
    labels = torch.tensor([1, 0, 1, 0, 1, 1], device=device).bool()
    ref_logps = torch.randn(N, device=device) - 4
    out = fused_linear_kto_loss(h, w, target, labels, b, ref_logps=ref_logps)
    lp, _, _ = token_logps(logits64(h.double(), w.double(), b.double()), target)
    lr = lp.sum(-1) - ref_logps.double()
    expected = torch.where(labels, 1 - torch.sigmoid(0.1 * lr), 1 - torch.sigmoid(-0.1 * lr)).mean()
    assert_close(out.loss, expected, torch.float32, reduction=True, name="loss")
    with pytest.raises(ValueError, match="preference_labels"):
        fused_linear_kto_loss(h, w, target, labels[:-1], b)
    with pytest.raises(ValueError, match="unknown KTO loss_type"):
        fused_linear_kto_loss(h, w, target, labels, b, loss_type="sigmoid")
    with pytest.raises(ValueError, match="not both"):
        fused_linear_kto_loss(h, w, target, labels, b, ref_logps=ref_logps, ref_input=h)


# ----------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------


def _grpo_ref(lp, mask, old, ref, adv, *, loss_type, beta, eps_low, eps_high, delta, level, bias_kl, max_len, n_items):
    """TRL 1.16 GRPOTrainer._compute_loss, float64, full tensors."""
    old = lp.detach() if old is None else old
    log_ratio = lp - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if bias_kl:
            kl = kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    else:
        loss = (per_token_loss * mask).sum() / n_items
    metrics = {}
    if beta != 0.0:
        metrics["kl"] = (kl * mask).sum() / mask.sum()
    return loss, metrics


CASES = {
    # loss_type, beta, delta, level, old logps, advantages per token, bias-corrected KL
    "grpo": ("grpo", 0.04, None, "token", True, False, False),
    "bnpo": ("bnpo", 0.0, None, "token", True, False, False),
    "dr_grpo": ("dr_grpo", 0.1, 1.8, "token", True, True, True),
    "dapo": ("dapo", 0.0, None, "token", False, False, False),
    "dapo_seq": ("dapo", 0.02, None, "sequence", True, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo(case, path, device):
    loss_type, beta, delta, level, with_old, token_adv, bias_kl = CASES[case]
    h, w, b, target = make_inputs(N, T, H, V, torch.float32, device)
    lp0, mask, _ = token_logps(logits64(h.double(), w.double(), b.double()), target)
    # old and reference log-probs near the current ones, so some ratios clip on either side
    old = (lp0 + 0.3 * torch.randn_like(lp0)).float() if with_old else None
    ref = (lp0 + 0.2 * torch.randn_like(lp0)).float()
    adv = torch.randn(N, T, device=device) if token_adv else torch.randn(N, device=device)
    options = dict(
        loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28, delta=delta,
        importance_sampling_level=level, use_bias_correction_kl=bias_kl, max_completion_length=T + 3,
        temperature=0.9, chunk_size=4,
    )  # fmt: skip
    n_items = 17.0 if loss_type == "dapo" else None
    h, w, b = _leaves(h, w, b)
    out = fused_linear_grpo_loss(
        h, w, target, adv, b, old_logps=old, ref_logps=ref, num_items_in_batch=n_items, **options
    )
    out.loss.backward()

    h64, w64, b64 = leaf64(h, w, b)
    z = logits64(h64, w64, b64)
    lp, mask, _ = token_logps(z, target, temperature=0.9)
    adv64 = adv.double() if token_adv else adv.double().unsqueeze(1)
    ref_loss, ref_metrics = _grpo_ref(
        lp, mask, None if old is None else old.double() * mask, ref.double() * mask, adv64,
        loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28, delta=delta, level=level, bias_kl=bias_kl,
        max_len=T + 3, n_items=n_items,
    )  # fmt: skip
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.float32, reduction=True, name="loss")
    for key, value in ref_metrics.items():
        assert_close(out.metrics[key], value, torch.float32, reduction=True, name=key)
    entropy, _, _ = token_stats(z, target, mask, 0.9)
    assert_close(out.metrics["entropy"], entropy[mask].mean(), torch.float32, reduction=True, name="entropy")
    _grads_close((h, w, b), (h64, w64, b64), torch.float32)


def test_grpo_ref_model_bf16_and_clip_metrics(device):
    h, w, b, target = make_inputs(N, T, H, V, torch.bfloat16, device)
    ref_h = (h.float() + 0.1 * torch.randn_like(h.float())).bfloat16()
    lp0, mask, _ = token_logps(logits64(h.double(), w.double(), b.double()), target)
    old = (lp0 + 0.5 * torch.randn_like(lp0)).float()
    adv = torch.randn(N, device=device)
    h, w, b = _leaves(h, w, b)
    out = FusedLinearGRPOLoss(loss_type="bnpo", beta=0.05, epsilon_high=0.28, chunk_size=2)(
        h, w, target, adv, b, old_logps=old, ref_input=ref_h
    )
    out.loss.backward()
    h64, w64, b64 = leaf64(h, w, b)
    lp, mask, _ = token_logps(logits64(h64, w64, b64), target)
    rlp, _, _ = token_logps(logits64(ref_h.double(), w64.detach(), b64.detach()), target)
    ref_loss, ref_metrics = _grpo_ref(
        lp, mask, old.double() * mask, rlp, adv.double()[:, None], loss_type="bnpo", beta=0.05, eps_low=0.2,
        eps_high=0.28, delta=None, level="token", bias_kl=False, max_len=T, n_items=None,
    )  # fmt: skip
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.bfloat16, reduction=True, name="loss")
    assert_close(out.metrics["kl"], ref_metrics["kl"], torch.bfloat16, reduction=True, name="kl")
    _grads_close((h, w, b), (h64, w64, b64), torch.bfloat16)
    coef = torch.exp(out.metrics["per_token_logps"].double() - old.double() * mask)
    low = ((coef < 0.8) & (adv[:, None] < 0) & mask).sum() / mask.sum()
    assert out.metrics["clip_ratio_low"].item() == pytest.approx(low.item())


def test_grpo_errors(device):
    h, w, b, target = make_inputs(N, T, H, V, torch.float32, device)
    adv = torch.randn(N, device=device)
    with pytest.raises(ValueError, match="needs a reference"):
        fused_linear_grpo_loss(h, w, target, adv, b, beta=0.1)
    with pytest.raises(ValueError, match="advantages must have shape"):
        fused_linear_grpo_loss(h, w, target, adv[:-1], b)
    with pytest.raises(ValueError, match="unknown GRPO loss_type"):
        fused_linear_grpo_loss(h, w, target, adv, b, loss_type="cispo")
    with pytest.raises(ValueError, match="old_logps must have shape"):
        fused_linear_grpo_loss(h, w, target, adv, b, old_logps=torch.zeros(N, T + 1))
    assert set(GRPO_LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo"}
