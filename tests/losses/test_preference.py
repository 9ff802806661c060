"""DPO / ORPO / CPO / SimPO fused losses vs unfused float64 references (TRL's formulas).

Loss, metrics and the gradients of input, weight and bias; chunk sizes that force several chunks;
the Triton kernels under the interpreter, and the torch reference path (`INTERPRET` off)."""

import pytest
import torch
import torch.nn.functional as F

import liger_kernels._utils
from liger_kernels.losses import (
    DPO_LOSS_TYPES,
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
    fused_linear_cpo_loss,
    fused_linear_dpo_loss,
    fused_linear_orpo_loss,
    fused_linear_simpo_loss,
)
from tests.losses.reference import (
    dpo_reference,
    leaf64,
    log1mexp,
    logits64,
    make_inputs,
    seq_logps,
    token_logps,
    token_stats,
)
from tests.tolerances import assert_close

P, T, H, V = 3, 7, 16, 67  # pairs, tokens, hidden, vocab (odd on purpose)


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Run each test through the Triton kernels (interpreter on CPU) and the torch reference path."""
    if request.param == "torch":
        monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    return request.param


def _grads_close(ours, ref, dtype, names=("input", "weight", "bias")):
    for t, t64, name in zip(ours, ref, names):
        if t is None:
            continue
        assert_close(t.grad, t64.grad, dtype, reduction=True, name=f"grad {name}")


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _dpo_ref(h, w, b, target, loss_types, weights, *, ref=None, ref_pre=None, beta=0.1, ls=0.0, average=False,
             rpo_alpha=None, temperature=1.0):  # fmt: skip
    z = logits64(h, w, b)
    lp, mask, _ = token_logps(z, target, temperature=temperature)
    seq = seq_logps(lp, mask, average)
    if ref is not None:
        rlp, _, _ = token_logps(logits64(*ref), target, temperature=temperature)
        ref_seq = seq_logps(rlp, mask, average)
    elif ref_pre is not None:
        ref_seq = torch.cat(ref_pre).double()
    else:
        ref_seq = torch.zeros_like(seq)
    c, r = seq[:P], seq[P:]
    rc, rr = ref_seq[:P], ref_seq[P:]
    lens = mask.sum(-1).double()
    loss = 0.0
    for lt, wt in zip(loss_types, weights):
        if lt == "sft":
            per = -lp[:P][mask[:P]].mean()
        else:
            if average and lt in ("ipo", "sigmoid_norm"):
                # our contract: averaged log-probs are already length-normalized
                per = dpo_reference(lt, c, r, rc, rr, torch.ones_like(lens[:P]), torch.ones_like(lens[P:]), beta, ls)
            else:
                per = dpo_reference(lt, c, r, rc, rr, lens[:P], lens[P:], beta, ls)
            per = per.mean()
        loss = loss + wt * per
    if rpo_alpha:
        loss = loss + rpo_alpha * -lp[:P][mask[:P]].mean()
    entropy, mean_logits, top1 = token_stats(z, target, mask, temperature)
    metrics = {
        "chosen_logps": c,
        "rejected_logps": r,
        "chosen_rewards": beta * (c - rc),
        "rejected_rewards": beta * (r - rr),
        "reward_margins": beta * (c - rc) - beta * (r - rr),
        "chosen_logits_mean": mean_logits[:P][mask[:P]].mean(),
        "rejected_logits_mean": mean_logits[P:][mask[P:]].mean(),
        "entropy": entropy[mask].mean(),
        "nll_loss": -lp[:P][mask[:P]].mean(),
    }
    accuracy = top1[:P][mask[:P]].double().mean()
    return loss, metrics, accuracy


def _check_metrics(metrics, expected, dtype):
    for key, value in expected.items():
        assert_close(metrics[key], value, dtype, reduction=True, name=key)


# ----------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_with_ref_model(loss_type, path, device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    ref_h, ref_w, ref_b, _ = make_inputs(2 * P, T, H, V, torch.float32, device)
    ls = {"robust": 0.2, "exo_pair": 1e-3}.get(loss_type, 0.0)
    h, w, b = _leaves(h, w, b)
    out = fused_linear_dpo_loss(
        h, w, target, b, ref_input=ref_h, ref_weight=ref_w, ref_bias=ref_b,
        loss_type=loss_type, beta=0.7, label_smoothing=ls, chunk_size=1,
    )  # fmt: skip
    out.loss.backward()
    h64, w64, b64 = leaf64(h, w, b)
    ref_loss, ref_metrics, accuracy = _dpo_ref(
        h64, w64, b64, target, [loss_type], [1.0], ref=leaf64(ref_h, ref_w, ref_b), beta=0.7, ls=ls
    )
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.float32, reduction=True, name="loss")
    _check_metrics(out.metrics, ref_metrics, torch.float32)
    assert out.metrics["mean_token_accuracy"].item() == pytest.approx(accuracy.item())
    _grads_close((h, w, b), (h64, w64, b64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dpo_half_precision(dtype, device):
    h, w, b, target = make_inputs(2 * P, T, H, V, dtype, device)
    ref_h, _, _, _ = make_inputs(2 * P, T, H, V, dtype, device)
    h, w, b = _leaves(h, w, b)
    out = fused_linear_dpo_loss(h, w, target, b, ref_input=ref_h, beta=0.5, chunk_size=2)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert h.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    h64, w64, b64 = leaf64(h, w, b)
    ref = (ref_h.double(), w64.detach(), b64.detach())
    ref_loss, ref_metrics, _ = _dpo_ref(h64, w64, b64, target, ["sigmoid"], [1.0], ref=ref, beta=0.5)
    ref_loss.backward()
    assert_close(out.loss, ref_loss, dtype, reduction=True, name="loss")
    _check_metrics(out.metrics, ref_metrics, dtype)
    _grads_close((h, w, b), (h64, w64, b64), dtype)


@pytest.mark.parametrize("ref_mode", ["precomputed", "none"])
@pytest.mark.parametrize("average", [False, True])
def test_dpo_reference_modes_and_average(ref_mode, average, path, device):
    h, w, _, target = make_inputs(2 * P, T, H, V, torch.float32, device, bias=False)
    h, w = _leaves(h, w)
    ref_pre = None
    kwargs = {}
    if ref_mode == "precomputed":
        ref_pre = (torch.randn(P, device=device) - 5, torch.randn(P, device=device) - 5)
        kwargs = dict(ref_chosen_logps=ref_pre[0], ref_rejected_logps=ref_pre[1])
    types, weights = ["sigmoid", "ipo", "sft"], [0.8, 0.3, 1.0]
    out = fused_linear_dpo_loss(
        h, w, target, loss_type=types, loss_weights=weights, average_log_prob=average, rpo_alpha=0.5,
        temperature=0.8, chunk_size=2, **kwargs,
    )  # fmt: skip
    out.loss.backward()
    h64, w64 = leaf64(h, w)
    ref_loss, ref_metrics, _ = _dpo_ref(
        h64, w64, None, target, types, weights, ref_pre=ref_pre, average=average, rpo_alpha=0.5, temperature=0.8
    )
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.float32, reduction=True, name="loss")
    _check_metrics(out.metrics, ref_metrics, torch.float32)
    _grads_close((h, w), (h64, w64), torch.float32, names=("input", "weight"))


def test_dpo_chunking_does_not_change_the_result(device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    results = []
    for chunk_size in (1, 2, P, None):
        hh, ww, bb = _leaves(h, w, b)
        out = fused_linear_dpo_loss(hh, ww, target, bb, loss_type=["ipo", "sft"], chunk_size=chunk_size)
        out.loss.backward()
        results.append((out.loss.detach(), hh.grad, ww.grad, bb.grad))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_dpo_module_and_grad_output_scaling(device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    module = FusedLinearDPOLoss(loss_type="hinge", beta=0.3, chunk_size=1)
    h1, w1, b1 = _leaves(h, w, b)
    out = module(h1, w1, target, b1)
    (out.loss * 3.0).backward()
    h2, w2, b2 = _leaves(h, w, b)
    fused_linear_dpo_loss(h2, w2, target, b2, loss_type="hinge", beta=0.3).loss.backward()
    for a, e in ((h1.grad, h2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad)):
        torch.testing.assert_close(a, 3.0 * e, atol=1e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="unknown options"):
        FusedLinearDPOLoss(bta=0.1)


def test_dpo_no_grad_and_frozen_weight(device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    with torch.no_grad():
        out = fused_linear_dpo_loss(h, w, target, b)
    assert out.loss.grad_fn is None
    # Only the input needs a gradient: the weight/bias gradients are skipped.
    hh = h.clone().requires_grad_()
    again = fused_linear_dpo_loss(hh, w, target, b)
    again.loss.backward()
    torch.testing.assert_close(again.loss.detach(), out.loss)
    assert hh.grad is not None and not torch.isnan(hh.grad).any()


def test_dpo_under_autocast_uses_the_autocast_dtype(device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    h, w, b = _leaves(h, w, b)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = fused_linear_dpo_loss(h, w, target, b, chunk_size=2)
    out.loss.backward()
    assert w.grad.dtype == torch.float32
    h64, w64, b64 = leaf64(h, w, b)
    ref_loss, _, _ = _dpo_ref(h64, w64, b64, target, ["sigmoid"], [1.0])
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.bfloat16, reduction=True, name="loss")
    _grads_close((h, w, b), (h64, w64, b64), torch.bfloat16)


def test_dpo_bad_input(device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    with pytest.raises(ValueError, match="even"):
        fused_linear_dpo_loss(h[:-1], w, target[:-1], b)
    with pytest.raises(ValueError, match="target has ids outside"):
        bad = target.clone()
        bad[0, -1] = V
        fused_linear_dpo_loss(h, w, bad, b)
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_dpo_loss(h, w[:, :-1], target, b)
    with pytest.raises(ValueError, match="target has shape"):
        fused_linear_dpo_loss(h, w, target[:, :-1], b)
    with pytest.raises(TypeError, match="input has dtype"):
        fused_linear_dpo_loss(h.double(), w, target, b)
    with pytest.raises(TypeError, match="weight is"):
        fused_linear_dpo_loss(h.bfloat16(), w, target, b)
    with pytest.raises(TypeError, match="target must be"):
        fused_linear_dpo_loss(h, w, target.float(), b)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        fused_linear_dpo_loss(h, w, target, b, loss_type="aot")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_dpo_loss(h, w, target, b, loss_type="exo_pair")
    with pytest.raises(ValueError, match="together"):
        fused_linear_dpo_loss(h, w, target, b, ref_chosen_logps=torch.zeros(P))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_dpo_loss(h, w, target, b, chunk_size=0)


# ----------------------------------------------------------------------------------------------------
# ORPO
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orpo(dtype, path, device):
    h, w, b, target = make_inputs(2 * P, T, H, V, dtype, device)
    # TRL's ORPO: NLL over prompt + completion (here: every position), odds ratio over the completion
    nll_target = torch.where(target == -100, torch.randint(0, V, target.shape, device=device), target)
    h, w, b = _leaves(h, w, b)
    out = FusedLinearORPOLoss(beta=0.3, chunk_size=2)(h, w, target, b, nll_target=nll_target)
    out.loss.backward()

    h64, w64, b64 = leaf64(h, w, b)
    z = logits64(h64, w64, b64)
    lp, mask, _ = token_logps(z, target)
    nll = F.cross_entropy(z[:P].reshape(-1, V), nll_target[:P].reshape(-1))
    avg = lp.sum(-1) / mask.sum(-1)
    c, r = avg[:P], avg[P:]
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    ref_loss = nll - (0.3 * ratio).mean()
    ref_loss.backward()
    assert_close(out.loss, ref_loss, dtype, reduction=True, name="loss")
    _check_metrics(
        out.metrics,
        {
            "chosen_rewards": 0.3 * c, "rejected_rewards": 0.3 * r, "chosen_logps": c, "rejected_logps": r,
            "nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(),
        },
        dtype,
    )  # fmt: skip
    _grads_close((h, w, b), (h64, w64, b64), dtype)


def test_orpo_bad_nll_target(device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    other = (target + 1) % V
    with pytest.raises(ValueError, match="nll_target must equal target"):
        fused_linear_orpo_loss(h, w, target, b, nll_target=torch.where(target == -100, -100, other))


# ----------------------------------------------------------------------------------------------------
# CPO / SimPO
# ----------------------------------------------------------------------------------------------------


def _cpo_ref(h, w, b, target, loss_type, beta, ls, cpo_alpha, gamma, alpha):
    z = logits64(h, w, b)
    lp, mask, _ = token_logps(z, target)
    seq = seq_logps(lp, mask, loss_type in ("ipo", "simpo"))
    c, r = seq[:P], seq[P:]
    if alpha:
        cw, rw = (1 - torch.exp(c).pow(-alpha)) / alpha, (1 - torch.exp(r).pow(-alpha)) / alpha
    else:
        cw, rw = c, r
    logits = cw - rw
    if loss_type == "simpo":
        logits = logits - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    nll = F.cross_entropy(z[:P].reshape(-1, V), target[:P].reshape(-1), ignore_index=-100)
    loss = losses.mean() + (cpo_alpha * nll if cpo_alpha else 0.0)
    metrics = {"chosen_rewards": beta * cw, "rejected_rewards": beta * rw, "chosen_logps": c, "rejected_logps": r}
    return loss, metrics


@pytest.mark.parametrize(
    "loss_type,ls,cpo_alpha,alpha",
    [("sigmoid", 0.1, 1.0, 0.0), ("hinge", 0.0, 0.5, 0.0), ("ipo", 0.0, 1.0, 0.0), ("simpo", 0.0, 0.0, 0.0),
     ("sigmoid", 0.0, 1.0, 0.3)],
)  # fmt: skip
def test_cpo(loss_type, ls, cpo_alpha, alpha, path, device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.float32, device)
    h, w, b = _leaves(h, w, b)
    out = fused_linear_cpo_loss(
        h, w, target, b, loss_type=loss_type, beta=0.4, label_smoothing=ls, cpo_alpha=cpo_alpha,
        simpo_gamma=0.6, alpha=alpha, chunk_size=1,
    )  # fmt: skip
    out.loss.backward()
    h64, w64, b64 = leaf64(h, w, b)
    ref_loss, ref_metrics = _cpo_ref(h64, w64, b64, target, loss_type, 0.4, ls, cpo_alpha, 0.6, alpha)
    ref_loss.backward()
    assert_close(out.loss, ref_loss, torch.float32, reduction=True, name="loss")
    _check_metrics(out.metrics, ref_metrics, torch.float32)
    _grads_close((h, w, b), (h64, w64, b64), torch.float32)


def test_simpo_is_cpo_simpo(device):
    h, w, b, target = make_inputs(2 * P, T, H, V, torch.bfloat16, device)
    ours = FusedLinearSimPOLoss(beta=2.0, gamma=0.5)(h, w, target, b).loss
    same = fused_linear_simpo_loss(h, w, target, b, beta=2.0, gamma=0.5).loss
    h64, w64, b64 = leaf64(h, w, b)
    ref_loss, _ = _cpo_ref(h64, w64, b64, target, "simpo", 2.0, 0.0, 0.0, 0.5, 0.0)
    assert torch.equal(ours, same)
    assert_close(ours, ref_loss, torch.bfloat16, reduction=True, name="simpo loss")
    with pytest.raises(ValueError, match="unknown CPO loss_type"):
        FusedLinearCPOLoss(loss_type="kto")(h, w, target, b)
