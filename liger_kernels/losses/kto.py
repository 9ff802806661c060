"""KTO (unpaired preference) fused with the final linear layer.

Each row is one completion with a desirable (True) or undesirable (False) label. `input` (N, T, H)
is aligned with `target` (N, T) (shift before calling); ignored targets (prompt, padding) don't count.
Formulas from TRL 1.16 (`trl/trainer/kto_trainer.py`): with the log-ratio r = logp - ref_logp,
    "kto":               desirable 1 - sigmoid(beta * (r - kl)),  undesirable 1 - sigmoid(beta * (kl - r))
    "apo_zero_unpaired": desirable 1 - sigmoid(beta * r),         undesirable sigmoid(beta * r)
weighted by `desirable_weight` / `undesirable_weight` and averaged over all N rows. `kl` is the
batch's (detached) KL estimate, computed by the caller from mismatched completions.
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
from liger_kernels.losses.preference import sequence_logps

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_row_losses(logratios, desirable, kl, *, loss_type, beta, desirable_weight, undesirable_weight):
    """Weighted per-row KTO loss; `desirable` is a bool tensor of the rows' labels."""
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (logratios - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        chosen = 1 - torch.sigmoid(beta * logratios)
        rejected = torch.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    return torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)


def fused_linear_kto_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    preference_labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """KTO fused with the final linear layer.

    `preference_labels` (N,) bool: True for desirable completions. Reference: `ref_input` hidden states
    (through `ref_weight`/`ref_bias`, default the policy head), or precomputed sequence log-probs
    `ref_logps` (N,), or none (log-ratio = logp). `kl`: scalar KL estimate (default 0).
    `chunk_size`: sequences per chunk.

    Metrics: per-row "logps", "ref_logps", "rewards" (beta * log-ratio); means over desirable /
    undesirable rows "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps",
    "reward_margins"; token means "chosen_logits_mean", "rejected_logits_mean", "entropy"; and the
    per-token "per_token_logps", "per_token_entropy", "per_token_mean_logits".
    """
    check_head("", input, weight, bias)
    check_target("target", target, input, weight.shape[0], ignore_index)
    n_rows, seq_len = target.shape
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    if tuple(preference_labels.shape) != (n_rows,):
        raise ValueError(f"preference_labels must have shape ({n_rows},), got {tuple(preference_labels.shape)}")
    desirable = preference_labels.to(device=input.device, dtype=torch.bool)
    row_data = {"desirable": desirable}
    ref = None
    if ref_input is not None:
        if ref_logps is not None:
            raise ValueError("give either ref_input or ref_logps, not both")
        ref_weight = weight if ref_weight is None else ref_weight
        ref_bias = bias if ref_bias is None and ref_weight is weight else ref_bias
        check_head("ref_", ref_input, ref_weight, ref_bias, n_rows, seq_len)
        ref = Head(ref_input, ref_weight, ref_bias)
    elif ref_logps is not None:
        if tuple(ref_logps.shape) != (n_rows,):
            raise ValueError(f"ref_logps must have shape ({n_rows},), got {tuple(ref_logps.shape)}")
        row_data["ref_seq_logps"] = ref_logps.float().to(input.device)
    kl = torch.as_tensor(0.0 if kl is None else kl, dtype=torch.float32, device=input.device).detach()
    options = dict(
        loss_type=loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight
    )

    def ref_seq(ref_token_logps, mask, data, like):
        if ref_token_logps is not None:
            return sequence_logps(ref_token_logps, mask, average_log_prob)
        return data.get("ref_seq_logps", torch.zeros_like(like))

    def loss_fn(lp, chunk):
        seq = sequence_logps(lp, chunk.mask, average_log_prob)
        logratios = seq - ref_seq(chunk.ref_logps, chunk.mask, chunk.data, seq)
        return kto_row_losses(logratios, chunk.data["desirable"], kl, **options).sum() / n_rows

    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size (sequences per chunk) must be >= 1, got {chunk_size}")
    groups = row_groups(n_rows, chunk_size or auto_chunk_size(1, seq_len, weight.shape[0]), input.device)
    loss, out = chunked_fused_linear_loss(
        input, weight, target, loss_fn, groups,
        bias=bias, temperature=temperature, ignore_index=ignore_index, ref=ref, row_data=row_data,
        with_stats=True, accum_dtype=accum_dtype, fused=fused,
    )  # fmt: skip

    mask = target != ignore_index
    seq = sequence_logps(out["logps"], mask, average_log_prob)
    ref_seq_all = ref_seq(out.get("ref_logps"), mask, row_data, seq)
    rewards = beta * (seq - ref_seq_all)
    undesirable = ~desirable
    chosen_rewards = masked_mean(rewards, desirable)
    rejected_rewards = masked_mean(rewards, undesirable)
    metrics = {
        "logps": seq,
        "ref_logps": ref_seq_all,
        "rewards": rewards,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_margins": chosen_rewards - rejected_rewards,
        "chosen_logps": masked_mean(seq, desirable),
        "rejected_logps": masked_mean(seq, undesirable),
        "chosen_logits_mean": masked_mean(out["mean_logits"], mask & desirable[:, None]),
        "rejected_logits_mean": masked_mean(out["mean_logits"], mask & undesirable[:, None]),
        "entropy": masked_mean(out["entropy"], mask),
        "kl": kl,
        "per_token_logps": out["logps"],
        "per_token_entropy": out["entropy"],
        "per_token_mean_logits": out["mean_logits"],
    }
    return LossOutput(loss, metrics)


class FusedLinearKTOLoss(FusedLossModule):
    """Module form of `fused_linear_kto_loss`: `(input, weight, target, preference_labels, bias)`."""

    function = staticmethod(fused_linear_kto_loss)
    call_keywords = ("ref_input", "ref_weight", "ref_bias", "ref_logps", "kl")
