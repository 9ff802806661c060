"""Straightforward, unfused float64 references for the fused-linear losses.

Each materializes the full logits, takes a full log-softmax and applies the loss formula as TRL 1.16
writes it (trl/trainer/dpo_trainer.py, kto_trainer.py, grpo_trainer.py, experimental/orpo, cpo, gkd).
Independent of liger_kernels on purpose: nothing here imports the code under test.
"""

import math

import torch
import torch.nn.functional as F


def make_inputs(n_rows, seq_len, hidden, vocab, dtype, device, *, bias=True, ignore_index=-100, scale=1.0):
    """Random hidden states / head / targets. Some rows get a masked prompt and padded tail; logits
    are O(1) so every dtype keeps a meaningful softmax."""
    h = (torch.randn(n_rows, seq_len, hidden, device=device) * scale).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) / math.sqrt(hidden) * 2).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, vocab, (n_rows, seq_len), device=device)
    for r in range(n_rows):
        prompt = r % 3
        pad = (r * 2) % max(1, seq_len // 2)
        target[r, :prompt] = ignore_index
        if pad:
            target[r, seq_len - pad :] = ignore_index
    return h, w, b, target


def leaf64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def logits64(h, w, b):
    z = h @ w.T
    return z if b is None else z + b


def token_logps(z, target, ignore_index=-100, temperature=1.0):
    """(per-token log-probs zeroed where ignored, mask, log-softmax) from full logits."""
    logsm = F.log_softmax(z / temperature, dim=-1)
    mask = target != ignore_index
    lp = logsm.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask, logsm


def token_stats(z, target, mask, temperature=1.0):
    """Per-token entropy, mean logit and target-is-argmax, as TRL's fused LM head reports them."""
    zs = z / temperature
    logsm = F.log_softmax(zs, dim=-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return entropy, zs.mean(-1), zs.argmax(-1) == target


def seq_logps(lp, mask, average):
    s = lp.sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


def dpo_reference(loss_type, c, r, rc, rr, c_len, r_len, beta, ls=0.0, tau=0.05):
    """TRL's per-sequence DPO loss (reverse KL). c, r: summed policy logps; rc, rr: reference."""
    clr, rlr = c - rc, r - rr
    d = clr - rlr
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        return (clr / c_len.clamp(min=1.0) - rlr / r_len.clamp(min=1.0) - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = torch.tensor(ls, dtype=d.dtype)
        return torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - torch.log1p(-eps)) + torch.sigmoid(
            -beta * d
        ) * (F.logsigmoid(-beta * d) - torch.log(eps))
    if loss_type == "nca_pair":
        cr, rr_ = beta * clr, beta * rlr
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr_)
    if loss_type == "robust":
        clean = -(1 - ls) * F.logsigmoid(beta * d)
        flipped = -ls * F.logsigmoid(-beta * d)
        return (clean - flipped) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * clr) - F.logsigmoid(-beta * rlr)
    if loss_type == "sppo_hard":
        return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * clr) + torch.sigmoid(beta * rlr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * clr) + 1 - torch.sigmoid(beta * (clr - rlr))
    if loss_type == "discopop":
        x = beta * d
        mod = torch.sigmoid(x / tau)
        return -F.logsigmoid(x) * (1 - mod) + torch.exp(-x) * mod
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * (clr / c_len.clamp(min=1.0) - rlr / r_len.clamp(min=1.0)))
    raise ValueError(loss_type)


def log1mexp(x):
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
