"""GRPO-family policy losses fused with the final linear layer (TRL 1.16's GRPOTrainer math).

`input` (B, T, H) holds the hidden states of the completion positions, aligned with `target` (B, T),
the completion tokens (shift before calling); positions to ignore (padding, tool outputs) carry
`ignore_index`. Per token, with logp at `temperature` and old_logp (default: logp, detached):
    ratio = exp(logp - old_logp)              (importance_sampling_level="token"), or
            exp(mean over the sequence of it)  ("sequence")
    loss_t = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * kl_t
    kl_t = exp(ref - logp) - (ref - logp) - 1  (k3 estimator, times ratio with use_bias_correction_kl)
where `delta` (two-sided clipping) caps the unclipped ratio. Aggregation by `loss_type`:
    "grpo":    mean over sequences of the per-sequence token mean
    "bnpo":    token mean over the whole batch
    "dr_grpo": token sum / (B * max_completion_length)
    "dapo":    token sum / num_items_in_batch (default: the batch's token count)
Every normalizer is global, so chunking over sequences changes nothing.
"""

from __future__ import annotations

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

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_token_terms(
    logps, old_logps, ref_logps, advantages, mask,
    *, beta, epsilon_low, epsilon_high, delta, importance_sampling_level, use_bias_correction_kl,
):  # fmt: skip
    """(per_token_loss, coef_1, per_token_kl or None); coef_1 is (B, T) or (B, 1)."""
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
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(unclipped * advantages, coef_2 * advantages)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl
    return per_token_loss, coef_1, per_token_kl


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
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """GRPO / BNPO / Dr. GRPO / DAPO policy loss fused with the final linear layer.

    `advantages`: (B,) or (B, T). `old_logps`: (B, T) log-probs of the sampling policy (default: the
    current ones, detached: ratio 1 with the policy gradient). With `beta != 0`, the reference is
    `ref_logps` (B, T) or `ref_input` hidden states projected through `ref_weight`/`ref_bias` (default
    the policy head). `max_completion_length` (dr_grpo) defaults to T. `chunk_size`: sequences per chunk.

    Metrics: "kl" (token mean, with beta), "entropy", "clip_ratio_low", "clip_ratio_high",
    "clip_ratio_region" (token means of the clipped events), "clip_ratio_low_per_seq",
    "clip_ratio_high_per_seq" (B,), and per token "per_token_logps", "per_token_entropy",
    "per_token_kl", "per_token_is_low_clipped", "per_token_is_high_clipped" ((B, 1) at sequence level).
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
        beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        importance_sampling_level=importance_sampling_level, use_bias_correction_kl=use_bias_correction_kl,
    )  # fmt: skip
    if loss_type == "grpo":
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
        return grpo_token_terms(logps, old, ref_lp, data["advantages"], chunk_mask, **options)

    def loss_fn(lp, chunk):
        per_token_loss, _, _ = terms(lp, chunk.mask, chunk.data, chunk.ref_logps)
        masked = per_token_loss * chunk.mask
        if loss_type == "grpo":
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

    _, coef_1, per_token_kl = terms(out["logps"], mask, row_data, out.get("ref_logps"))
    adv = row_data["advantages"]
    is_low = (coef_1 < 1 - epsilon_low) & (adv < 0)
    is_high = (coef_1 > 1 + epsilon_high) & (adv > 0)

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
    return LossOutput(loss, metrics)


class FusedLinearGRPOLoss(FusedLossModule):
    """Module form of `fused_linear_grpo_loss`: `(input, weight, target, advantages, bias)`."""

    function = staticmethod(fused_linear_grpo_loss)
    call_keywords = ("old_logps", "ref_logps", "ref_input", "ref_weight", "ref_bias", "num_items_in_batch")
