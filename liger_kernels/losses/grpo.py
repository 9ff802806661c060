"""GRPO-family policy losses fused with the final linear layer (TRL 1.16's GRPOTrainer math).

`input` (B, T, H) holds the hidden states of the completion positions, aligned with `target` (B, T),
the completion tokens (shift before calling); positions to ignore (padding, tool outputs) carry
`ignore_index`. Per token, with logp at `temperature` and old_logp (default: logp, detached):
    ratio = exp(logp - old_logp)              (importance_sampling_level="token"), or
            exp(mean over the sequence of it)  ("sequence")
    kl_t = exp(ref - logp) - (ref - logp) - 1  (k3 estimator, times ratio with use_bias_correction_kl)
and the policy term by `loss_type` (A: the advantage):
    grpo, bnpo, dr_grpo, dapo, luspo:
        pg_t = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
        (`delta`, two-sided clipping, caps the unclipped ratio: min(ratio, delta) * A)
    cispo (MiniMax-M1):  pg_t = -sg[min(ratio, epsilon_high)] * A * logp
        (sg: stop-gradient; epsilon_high is the absolute cap, TRL's eps_max, e.g. 5.0, not 1 + eps)
    sapo (Soft Adaptive PO):  pg_t = -sigmoid(tau * (ratio - 1)) * 4 / tau * A,
        tau = sapo_temperature_pos where A > 0, else sapo_temperature_neg
    vespo:  pg_t = -sg[phi] * A * logp, phi = exp(lam + k * log w - lam * w) (NaN/inf -> 0), per sequence,
        log w = clamp(sum over the sequence of clamp(logp - old_logp, -20, 20)
                      [+ sum over T of clamp(log importance_sampling_ratio, log 1e-8, 20)], log 1e-8, 20),
        (k, lam) = (vespo_k_pos, vespo_lambda_pos) where A >= 0, else (vespo_k_neg, vespo_lambda_neg);
        lam clamped to >= 1e-4
    loss_t = pg_t * importance_sampling_ratio (if given; not for vespo, where it enters w) + beta * kl_t
Aggregation by `loss_type`:
    "grpo", "sapo":           mean over sequences of the per-sequence token mean
    "bnpo":                   token mean over the whole batch
    "dr_grpo":                token sum / (B * max_completion_length)
    "dapo", "cispo", "vespo": token sum / num_items_in_batch (default: the batch's token count)
    "luspo":                  token sum / B (each sequence's loss scaled by its length; TRL 1.16)
Every normalizer is global, so chunking over sequences changes nothing.
"""

from __future__ import annotations

import math

import torch

from liger_kernels.losses.chunked import (
    FusedLossModule,
    Head,
    LossOutput,
    auto_chunk_size,
    check_head,
    check_target,
    chunked_fused_linear_loss,
    masked_mean,
    row_groups,
)

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the PPO-style clipped objective
_LOG_1E_8 = math.log(1e-8)


def vespo_gamma_weights(log_ratio, mask, advantages, is_ratio, *, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's detached per-sequence weight phi(w) = exp(lam + k log w - lam w), (B, 1) or (B, T)."""
    with torch.no_grad():
        seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:
            seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(is_ratio), _LOG_1E_8, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq_log_ratio, _LOG_1E_8, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, k_pos, k_neg)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
        log_phi = lam + k * log_w - lam * torch.exp(log_w)
        return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_token_terms(
    logps, old_logps, ref_logps, advantages, mask, is_ratio=None,
    *, loss_type="dapo", beta, epsilon_low, epsilon_high, delta, importance_sampling_level, use_bias_correction_kl,
    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo=None,
):  # fmt: skip
    """(per_token_loss, coef_1, per_token_kl or None, phi or None); coef_1 is (B, T) or (B, 1).
    `vespo`: dict(k_pos, lambda_pos, k_neg, lambda_neg) for loss_type "vespo"."""
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)
    per_token_kl = None
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    phi = None
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=epsilon_high).detach() * advantages * logps
    elif loss_type == "sapo":
        tau = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * advantages
    elif loss_type == "vespo":
        phi = vespo_gamma_weights(log_ratio, mask, advantages, is_ratio, **vespo)
        per_token_loss = -phi * advantages * logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        unclipped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(unclipped * advantages, coef_2 * advantages)
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl
    return per_token_loss, coef_1, per_token_kl, phi


def fused_linear_grpo_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    importance_sampling_ratio: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """GRPO-family policy loss (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo: formulas in the
    module docstring) fused with the final linear layer.

    `advantages`: (B,) or (B, T). `old_logps`: (B, T) log-probs of the sampling policy (default: the
    current ones, detached: ratio 1 with the policy gradient). With `beta != 0`, the reference is
    `ref_logps` (B, T) or `ref_input` hidden states projected through `ref_weight`/`ref_bias` (default
    the policy head). `max_completion_length` (dr_grpo) defaults to T. `chunk_size`: sequences per chunk.
    `epsilon_high` defaults to `epsilon_low`; for "cispo" it is the absolute cap of the ratio (TRL's
    `epsilon_high`, recommended 5.0). `importance_sampling_ratio`: (B, T) or (B, 1) vLLM
    importance-sampling correction (TRL's `inputs["importance_sampling_ratio"]`), multiplied into the
    policy term, or into VESPO's sequence weight.

    Metrics: "kl" (token mean, with beta), "entropy", "clip_ratio_low", "clip_ratio_high",
    "clip_ratio_region" (token means of the clipped events), "clip_ratio_low_per_seq",
    "clip_ratio_high_per_seq" (B,), and per token "per_token_logps", "per_token_entropy",
    "per_token_kl", "per_token_is_low_clipped", "per_token_is_high_clipped" ((B, 1) at sequence level).
    The clip metrics are TRL's for the clipped types (with `delta`, from the capped ratio, as TRL does).
    "cispo": also "cispo_clip_ratio" (token mean of ratio > epsilon_high with A > 0) and
    "per_token_is_cispo_clipped". "vespo": also "phi_seq_mean" (TRL's "vespo/phi_seq_mean") and "phi_seq".
    """
    check_head("", input, weight, bias)
    check_target("target", target, input, weight.shape[0], ignore_index)
    n_seqs, seq_len = target.shape
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = target != ignore_index
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.dim() != 2 or advantages.shape[0] != n_seqs or advantages.shape[1] not in (1, seq_len):
        raise ValueError(
            f"advantages must have shape ({n_seqs},) or ({n_seqs}, {seq_len}), got {tuple(advantages.shape)}"
        )
    row_data = {"advantages": advantages.float().to(input.device)}
    if importance_sampling_ratio is not None:
        isr = importance_sampling_ratio
        if isr.dim() != 2 or isr.shape[0] != n_seqs or isr.shape[1] not in (1, seq_len):
            raise ValueError(
                f"importance_sampling_ratio must have shape ({n_seqs}, 1) or ({n_seqs}, {seq_len}), "
                f"got {tuple(isr.shape)}"
            )
        row_data["is_ratio"] = isr.float().to(input.device)
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None:
            if tuple(t.shape) != (n_seqs, seq_len):
                raise ValueError(f"{name} must have shape ({n_seqs}, {seq_len}), got {tuple(t.shape)}")
            # zeros where ignored, so padding values (even inf) cannot leak through 0 * x
            row_data[name] = torch.where(mask, t.float().to(input.device), 0.0)
    ref = None
    if beta != 0.0:
        if ref_input is not None:
            if ref_logps is not None:
                raise ValueError("give either ref_input or ref_logps, not both")
            ref_weight = weight if ref_weight is None else ref_weight
            ref_bias = bias if ref_bias is None and ref_weight is weight else ref_bias
            check_head("ref_", ref_input, ref_weight, ref_bias, n_seqs, seq_len)
            ref = Head(ref_input, ref_weight, ref_bias)
        elif ref_logps is None:
            raise ValueError("beta != 0 needs a reference: ref_logps or ref_input")
    options = dict(
        loss_type=loss_type, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        importance_sampling_level=importance_sampling_level, use_bias_correction_kl=use_bias_correction_kl,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        vespo=dict(k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg),
    )  # fmt: skip
    if loss_type in ("grpo", "sapo", "luspo"):
        normalizer = float(n_seqs)
    elif loss_type == "bnpo":
        normalizer = mask.sum().clamp(min=1).float()
    elif loss_type == "dr_grpo":
        normalizer = float(n_seqs * (max_completion_length or seq_len))
    else:
        normalizer = mask.sum().clamp(min=1).float() if num_items_in_batch is None else num_items_in_batch

    def terms(logps, chunk_mask, data, ref_token_logps):
        old = data["old_logps"] if "old_logps" in data else logps.detach()
        ref_lp = ref_token_logps if ref_token_logps is not None else data.get("ref_logps")
        return grpo_token_terms(
            logps, old, ref_lp, data["advantages"], chunk_mask, data.get("is_ratio"), **options
        )

    def loss_fn(lp, chunk):
        per_token_loss, _, _, _ = terms(lp, chunk.mask, chunk.data, chunk.ref_logps)
        masked = per_token_loss * chunk.mask
        if loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / chunk.mask.sum(-1).clamp(min=1.0)).sum() / normalizer
        return masked.sum() / normalizer

    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size (sequences per chunk) must be >= 1, got {chunk_size}")
    groups = row_groups(n_seqs, chunk_size or auto_chunk_size(1, seq_len, weight.shape[0]), input.device)
    loss, out = chunked_fused_linear_loss(
        input, weight, target, loss_fn, groups,
        bias=bias, temperature=temperature, ignore_index=ignore_index, ref=ref, row_data=row_data,
        with_stats=True, accum_dtype=accum_dtype, fused=fused,
    )  # fmt: skip

    _, coef_1, per_token_kl, phi = terms(out["logps"], mask, row_data, out.get("ref_logps"))
    adv = row_data["advantages"]
    # TRL caps the ratio with delta before it counts the clipped tokens
    capped = coef_1 if delta is None or loss_type not in _CLIPPED else torch.clamp(coef_1, max=delta)
    is_low = (capped < 1 - epsilon_low) & (adv < 0)
    is_high = (capped > 1 + epsilon_high) & (adv > 0)

    def token_mean(x):
        if x.shape[1] == 1:  # sequence level: one value per sequence
            return x.float().mean()
        return masked_mean(x.float(), mask)

    def seq_mean(x):
        if x.shape[1] == 1:
            return x.float().squeeze(1)
        return (x.float() * mask).sum(-1) / mask.sum(-1)

    metrics = {
        "entropy": masked_mean(out["entropy"], mask),
        "clip_ratio_low": token_mean(is_low),
        "clip_ratio_high": token_mean(is_high),
        "clip_ratio_region": token_mean(is_low | is_high),
        "clip_ratio_low_per_seq": seq_mean(is_low),
        "clip_ratio_high_per_seq": seq_mean(is_high),
        "per_token_logps": out["logps"],
        "per_token_entropy": out["entropy"],
        "per_token_is_low_clipped": is_low,
        "per_token_is_high_clipped": is_high,
    }
    if per_token_kl is not None:
        metrics["kl"] = masked_mean(per_token_kl, mask)
        metrics["per_token_kl"] = per_token_kl
    if loss_type == "cispo":
        is_cispo = (coef_1 > epsilon_high) & (adv > 0)
        metrics["cispo_clip_ratio"] = token_mean(is_cispo)
        metrics["per_token_is_cispo_clipped"] = is_cispo
    if phi is not None:
        metrics["phi_seq_mean"] = token_mean(phi)
        metrics["phi_seq"] = phi
    return LossOutput(loss, metrics)


class FusedLinearGRPOLoss(FusedLossModule):
    """Module form of `fused_linear_grpo_loss`: `(input, weight, target, advantages, bias)`."""

    function = staticmethod(fused_linear_grpo_loss)
    call_keywords = (
        "old_logps", "ref_logps", "ref_input", "ref_weight", "ref_bias", "num_items_in_batch",
        "importance_sampling_ratio",
    )  # fmt: skip
