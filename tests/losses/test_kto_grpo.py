"""KTO and GRPO-family fused losses vs unfused float64 references (TRL 1.16's formulas)."""

import math

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


def _vespo_phi(adv, log_ratio, mask, is_ratio, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """TRL 1.16 GRPOTrainer.get_gamma_weights (under no_grad)."""
    with torch.no_grad():
        lower = math.log(1e-8)
        seq = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
        if is_ratio is not None:
            seq += torch.sum(torch.clamp(torch.log(is_ratio), lower, 20.0), dim=-1, keepdim=True)
        log_w = torch.clamp(seq, lower, 20.0)
        w = torch.exp(log_w)
        k = torch.where(adv >= 0, k_pos, k_neg)
        lam = torch.where(adv >= 0, lambda_pos, lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _grpo_ref(
    lp, mask, old, ref, adv, *, loss_type, beta, eps_low, eps_high, delta, level, bias_kl, max_len, n_items,
    is_ratio=None, sapo_pos=1.0, sapo_neg=1.05,
):  # fmt: skip
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
    metrics = {}
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
    elif loss_type == "sapo":
        temperatures = torch.where(adv > 0, sapo_pos, sapo_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * adv
    elif loss_type == "vespo":
        phi = _vespo_phi(adv, log_ratio, mask, is_ratio)
        per_token_loss = -phi * adv * lp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * kl
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    else:  # dapo, cispo, vespo
        loss = (per_token_loss * mask).sum() / n_items
    if beta != 0.0:
        metrics["kl"] = (kl * mask).sum() / mask.sum()

    def global_masked_mean(x):
        return x.sum() / x.shape[0] if x.shape[1] == 1 else (x * mask).sum() / mask.sum()

    with torch.no_grad():
        if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low, high = (coef_1 < 1 - eps_low) & (adv < 0), (coef_1 > 1 + eps_high) & (adv > 0)
            metrics["clip_ratio_low"] = global_masked_mean(low.double())
            metrics["clip_ratio_high"] = global_masked_mean(high.double())
            metrics["clip_ratio_region"] = global_masked_mean((low | high).double())
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > eps_high) & (adv > 0)).double())
        elif loss_type == "vespo":
            metrics["phi_seq_mean"] = global_masked_mean(phi)
    return loss, metrics


CASES = {
    # loss_type, beta, delta, level, old logps, advantages per token, bias-corrected KL[, extra options]
    "grpo": ("grpo", 0.04, None, "token", True, False, False),
    "bnpo": ("bnpo", 0.0, None, "token", True, False, False),
    "dr_grpo": ("dr_grpo", 0.1, 1.8, "token", True, True, True),
    "dr_grpo_small_delta": ("dr_grpo", 0.0, 1.1, "token", True, False, False),  # delta < 1 + eps_high
    "dapo": ("dapo", 0.0, None, "token", False, False, False),
    "dapo_seq": ("dapo", 0.02, None, "sequence", True, False, False),
    "dapo_is_ratio": ("dapo", 0.0, None, "token", True, False, False, {"is_ratio": "token"}),
    # cispo: epsilon_high is the absolute cap of the ratio (TRL recommends 5.0; 1.1 here so some clip)
    "cispo": ("cispo", 0.0, None, "token", True, False, False, {"eps_high": 1.1}),
    "cispo_kl_seq": ("cispo", 0.05, None, "sequence", True, True, True, {"eps_high": 1.02}),
    "cispo_on_policy": ("cispo", 0.0, None, "token", False, False, False, {"eps_high": 5.0}),
    "sapo": ("sapo", 0.0, None, "token", True, False, False),
    "sapo_kl_token_adv": ("sapo", 0.03, None, "token", True, True, False, {"sapo": (1.3, 0.8)}),
    "sapo_seq": ("sapo", 0.0, None, "sequence", True, False, False, {"is_ratio": "sequence"}),
    "luspo_seq": ("luspo", 0.0, None, "sequence", True, False, False),
    "luspo_kl_token": ("luspo", 0.04, 1.5, "token", True, False, True),
    "vespo": ("vespo", 0.0, None, "token", True, False, False),
    "vespo_is_ratio_kl": ("vespo", 0.02, None, "token", True, True, False, {"is_ratio": "token"}),
    "vespo_on_policy": ("vespo", 0.0, None, "token", False, False, False, {"is_ratio": "sequence"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo(case, path, device):
    loss_type, beta, delta, level, with_old, token_adv, bias_kl, *extra = CASES[case]
    extra = extra[0] if extra else {}
    eps_high = extra.get("eps_high", 0.28)
    sapo_pos, sapo_neg = extra.get("sapo", (1.0, 1.05))
    h, w, b, target = make_inputs(N, T, H, V, torch.float32, device)
    lp0, mask, _ = token_logps(logits64(h.double(), w.double(), b.double()), target)
    # old and reference log-probs near the current ones, so some ratios clip on either side
    old = (lp0 + 0.3 * torch.randn_like(lp0)).float() if with_old else None
    ref = (lp0 + 0.2 * torch.randn_like(lp0)).float()
    adv = torch.randn(N, T, device=device) if token_adv else torch.randn(N, device=device)
    is_ratio = None
    if "is_ratio" in extra:  # vLLM importance-sampling correction: ratios around 1, some masked to 0
        is_ratio = torch.exp(0.2 * torch.randn(N, T if extra["is_ratio"] == "token" else 1, device=device))
        is_ratio[0, 0] = 0.0
    options = dict(
        loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=eps_high, delta=delta,
        importance_sampling_level=level, use_bias_correction_kl=bias_kl, max_completion_length=T + 3,
        temperature=0.9, chunk_size=4, sapo_temperature_pos=sapo_pos, sapo_temperature_neg=sapo_neg,
    )  # fmt: skip
    n_items = 17.0 if loss_type in ("dapo", "cispo", "vespo") else None
    h, w, b = _leaves(h, w, b)
    out = fused_linear_grpo_loss(
        h, w, target, adv, b, old_logps=old, ref_logps=ref, num_items_in_batch=n_items,
        importance_sampling_ratio=is_ratio, **options,
    )  # fmt: skip
    out.loss.backward()

    h64, w64, b64 = leaf64(h, w, b)
    z = logits64(h64, w64, b64)
    lp, mask, _ = token_logps(z, target, temperature=0.9)
    adv64 = adv.double() if token_adv else adv.double().unsqueeze(1)
    ref_loss, ref_metrics = _grpo_ref(
        lp, mask, None if old is None else old.double() * mask, ref.double() * mask, adv64,
        loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=eps_high, delta=delta, level=level, bias_kl=bias_kl,
        max_len=T + 3, n_items=n_items, is_ratio=None if is_ratio is None else is_ratio.double(),
        sapo_pos=sapo_pos, sapo_neg=sapo_neg,
    )  # fmt: skip
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.float32, reduction=True, name="loss")
    if case == "cispo":
        assert 0 < out.metrics["cispo_clip_ratio"].item() < 1  # the cap is exercised
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


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "vespo"])
def test_grpo_new_loss_types_bf16(loss_type, device):
    h, w, b, target = make_inputs(N, T, H, V, torch.bfloat16, device)
    lp0, mask, _ = token_logps(logits64(h.double(), w.double(), b.double()), target)
    old = (lp0 + 0.3 * torch.randn_like(lp0)).float()
    adv = torch.randn(N, device=device)
    level = "sequence" if loss_type == "luspo" else "token"
    h, w, b = _leaves(h, w, b)
    out = FusedLinearGRPOLoss(loss_type=loss_type, epsilon_high=1.1, importance_sampling_level=level, chunk_size=2)(
        h, w, target, adv, b, old_logps=old
    )
    out.loss.backward()
    h64, w64, b64 = leaf64(h, w, b)
    lp, mask, _ = token_logps(logits64(h64, w64, b64), target)
    ref_loss, ref_metrics = _grpo_ref(
        lp, mask, old.double() * mask, None, adv.double()[:, None], loss_type=loss_type, beta=0.0, eps_low=0.2,
        eps_high=1.1, delta=None, level=level, bias_kl=False, max_len=T, n_items=mask.sum(),
    )  # fmt: skip
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.bfloat16, reduction=True, name="loss")
    _grads_close((h, w, b), (h64, w64, b64), torch.bfloat16)


def test_grpo_errors(device):
    h, w, b, target = make_inputs(N, T, H, V, torch.float32, device)
    adv = torch.randn(N, device=device)
    with pytest.raises(ValueError, match="needs a reference"):
        fused_linear_grpo_loss(h, w, target, adv, b, beta=0.1)
    with pytest.raises(ValueError, match="advantages must have shape"):
        fused_linear_grpo_loss(h, w, target, adv[:-1], b)
    with pytest.raises(ValueError, match="unknown GRPO loss_type"):
        fused_linear_grpo_loss(h, w, target, adv, b, loss_type="gspo")
    with pytest.raises(ValueError, match="old_logps must have shape"):
        fused_linear_grpo_loss(h, w, target, adv, b, old_logps=torch.zeros(N, T + 1))
    with pytest.raises(ValueError, match="importance_sampling_ratio must have shape"):
        fused_linear_grpo_loss(h, w, target, adv, b, importance_sampling_ratio=torch.ones(N, T + 1))
    assert set(GRPO_LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
