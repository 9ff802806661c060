"""Paired preference losses fused with the final linear layer: DPO (TRL's loss types), ORPO, CPO, SimPO.

Batch layout (TRL's concatenation): rows [0, P) hold the chosen completions and rows [P, 2P) the
rejected ones; pair i is rows (i, P + i). `input` (2P, T, H) is aligned with `target` (2P, T):
``input[:, t]`` predicts ``target[:, t]`` (shift before calling: ``hidden[:, :-1]``, ``labels[:, 1:]``).
Positions whose target is `ignore_index` (prompt, padding) do not count. Every chunk holds whole
pairs, so each pair's loss is computed in one piece; means over pairs or tokens divide by the global
count, so the chunked loss equals the unchunked one.

Sequence log-probabilities are summed over the valid tokens, or averaged with `average_log_prob`.
The formulas follow TRL 1.16 (`trl/trainer/dpo_trainer.py`, `trl/experimental/{orpo,cpo}`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from liger_kernels.losses.chunked import (
    FusedLossModule,
    Head,
    LossOutput,
    auto_chunk_size,
    check_head,
    check_target,
    chunked_fused_linear_loss,
    masked_mean,
    pair_groups,
)

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)  # fmt: skip
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean, with `average`) over the valid tokens of each row; token_logps is 0 elsewhere."""
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_pair_losses(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    average_log_prob: bool,
) -> torch.Tensor:
    """Per-pair DPO loss for every loss type but "sft" (a token mean, handled by the caller).

    The log-ratios are policy minus reference sequence log-probabilities. "ipo" and "sigmoid_norm"
    work on length-normalized log-ratios: divided by the completion length, unless already averaged.
    """
    delta = chosen_logratios - rejected_logratios
    if loss_type in ("ipo", "sigmoid_norm"):
        if not average_log_prob:
            delta = chosen_logratios / chosen_len.clamp(min=1) - rejected_logratios / rejected_len.clamp(min=1)
        if loss_type == "ipo":
            return (delta - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * delta)
    x = beta * delta
    if loss_type == "sigmoid":
        return -F.logsigmoid(x)
    if loss_type == "hinge":
        return torch.relu(1 - x)
    if loss_type == "exo_pair":
        # KL between softmax(x) over {chosen, rejected} and the smoothed labels [1 - eps, eps]
        eps = label_smoothing
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(eps)
        )
    if loss_type == "robust":
        ls = label_smoothing
        return (-(1 - ls) * F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1 - 2 * ls)
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    if loss_type == "nca_pair":
        return (
            -F.logsigmoid(chosen_rewards)
            - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(chosen_rewards)) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_rewards) + (1 - torch.sigmoid(beta * delta))
    if loss_type == "discopop":
        modulation = torch.sigmoid(x / discopop_tau)
        return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, with each branch fed only the inputs it is accurate (and finite) for,
    so the branch torch.where discards cannot put NaN into the gradient."""
    t = -math.log(2)
    low = torch.where(x < t, x, t)
    high = torch.where(x < t, t, x)
    return torch.where(x < t, torch.log1p(-torch.exp(low)), torch.log(-torch.expm1(high)))


def orpo_log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log odds(chosen) - log odds(rejected), with odds(y) = p / (1 - p) and log p the (mean) logps."""
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def cpo_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """The implicit reward of CPO/SimPO: log p, or AlphaPO's (1 - p^-alpha) / alpha when alpha != 0."""
    if alpha == 0.0:
        return logps
    return (1 - torch.exp(-alpha * logps)) / alpha


def cpo_pair_losses(loss_type, logits, *, beta, label_smoothing, simpo_gamma) -> torch.Tensor:
    """Per-pair CPO loss; `logits` is the chosen minus rejected reward."""
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}")


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------


def _check_paired(input, weight, target, bias, ignore_index) -> int:
    check_head("", input, weight, bias)
    check_target("target", target, input, weight.shape[0], ignore_index)
    if input.shape[0] % 2 or input.shape[0] == 0:
        raise ValueError(
            f"input has {input.shape[0]} rows; paired losses need an even, non-zero batch laid out as "
            "[chosen rows..., rejected rows...]"
        )
    return input.shape[0] // 2


def _groups(n_pairs, seq_len, vocab, chunk_size, device):
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size (pairs per chunk) must be >= 1, got {chunk_size}")
    return pair_groups(n_pairs, chunk_size or auto_chunk_size(2, seq_len, vocab), device)


def _token_metrics(outputs, mask, n_pairs) -> dict[str, torch.Tensor]:
    """Token-level metrics as TRL logs them, plus the per-token tensors for callers that aggregate
    them their own way (across processes, over other masks)."""
    chosen_mask = mask[:n_pairs]
    logps = outputs["logps"]
    return {
        "chosen_logits_mean": masked_mean(outputs["mean_logits"][:n_pairs], chosen_mask),
        "rejected_logits_mean": masked_mean(outputs["mean_logits"][n_pairs:], mask[n_pairs:]),
        "entropy": masked_mean(outputs["entropy"], mask),
        "mean_token_accuracy": masked_mean(outputs["is_top1"][:n_pairs].float(), chosen_mask),
        "nll_loss": -masked_mean(logps[:n_pairs], chosen_mask),
        "per_token_logps": logps,
        "per_token_entropy": outputs["entropy"],
        "per_token_mean_logits": outputs["mean_logits"],
        "per_token_is_top1": outputs["is_top1"],
    }


def _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    return {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_margins": chosen_rewards - rejected_rewards,
        "reward_accuracies": (chosen_rewards > rejected_rewards).float(),
    }


# ----------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------


def fused_linear_dpo_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    average_log_prob: bool = False,
    rpo_alpha: float | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """DPO fused with the final linear layer.

    Reference: hidden states `ref_input` (projected chunk by chunk, no grad, through `ref_weight` /
    `ref_bias`, which default to the policy's head), or precomputed sequence log-probabilities
    `ref_chosen_logps` / `ref_rejected_logps` (P,) on the same scale as `average_log_prob`, or none
    (reference-free: log-ratios are the policy log-probabilities).

    `loss_type`: one of `DPO_LOSS_TYPES` or a list of them combined with `loss_weights` (TRL's MPO);
    "sft" is the mean NLL of the chosen tokens. `label_smoothing` is used by "robust" (flip probability,
    in [0, 0.5)) and "exo_pair" (epsilon, in (0, 1)). `rpo_alpha` adds `rpo_alpha * NLL(chosen)`.
    `chunk_size`: pairs per chunk (default: about 2^28 logits per chunk).

    Returns LossOutput(loss, metrics): per-pair "chosen_logps", "rejected_logps", "chosen_rewards",
    "rejected_rewards" (beta * log-ratio), "reward_margins", "reward_accuracies"; scalars
    "chosen_logits_mean", "rejected_logits_mean" (mean over valid tokens of the per-token mean logit),
    "entropy", "mean_token_accuracy" (chosen tokens whose target is the argmax), "nll_loss"; and the
    per-token "per_token_logps", "per_token_entropy", "per_token_mean_logits", "per_token_is_top1".
    """
    n_pairs = _check_paired(input, weight, target, bias, ignore_index)
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not loss_types:
        raise ValueError("loss_type is empty")
    for lt in loss_types:
        if lt not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {lt!r}; expected one of {DPO_LOSS_TYPES}")
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust', got {label_smoothing}")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing (epsilon) must be in (0, 1) for 'exo_pair', got {label_smoothing}")

    ref, row_data = None, {}
    if ref_input is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("give either ref_input or ref_chosen_logps/ref_rejected_logps, not both")
        ref_weight = weight if ref_weight is None else ref_weight
        ref_bias = bias if ref_bias is None and ref_weight is weight else ref_bias
        check_head("ref_", ref_input, ref_weight, ref_bias, *input.shape[:2])
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight has vocab {ref_weight.shape[0]}, weight has {weight.shape[0]}")
        ref = Head(ref_input, ref_weight, ref_bias)
    elif (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together")
    elif ref_chosen_logps is not None:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if tuple(t.shape) != (n_pairs,):
                raise ValueError(f"{name} must have shape ({n_pairs},), got {tuple(t.shape)}")
        row_data["ref_seq_logps"] = torch.cat([ref_chosen_logps, ref_rejected_logps]).float().to(input.device)

    mask = target != ignore_index
    n_chosen_tokens = mask[:n_pairs].sum().clamp(min=1)
    nll_weight = sum(w for lt, w in zip(loss_types, weights) if lt == "sft") + (rpo_alpha or 0.0)
    pair_types = [(lt, w) for lt, w in zip(loss_types, weights) if lt != "sft"]

    def ref_seq(chunk, seq):
        if chunk.ref_logps is not None:
            return sequence_logps(chunk.ref_logps, chunk.mask, average_log_prob)
        if "ref_seq_logps" in chunk.data:
            return chunk.data["ref_seq_logps"]
        return torch.zeros_like(seq)

    def loss_fn(lp, chunk):
        k = lp.shape[0] // 2
        seq = sequence_logps(lp, chunk.mask, average_log_prob)
        logratios = seq - ref_seq(chunk, seq)
        lens = chunk.mask.sum(-1)
        total = lp.new_zeros(())
        for lt, w in pair_types:
            per_pair = dpo_pair_losses(
                lt, logratios[:k], logratios[k:], lens[:k], lens[k:],
                beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
                average_log_prob=average_log_prob,
            )  # fmt: skip
            total = total + w * per_pair.sum() / n_pairs
        if nll_weight:
            total = total - nll_weight * lp[:k].sum() / n_chosen_tokens
        return total

    loss, out = chunked_fused_linear_loss(
        input, weight, target, loss_fn, _groups(n_pairs, target.shape[1], weight.shape[0], chunk_size, input.device),
        bias=bias, temperature=temperature, ignore_index=ignore_index, ref=ref, row_data=row_data,
        with_stats=True, accum_dtype=accum_dtype, fused=fused,
    )  # fmt: skip

    seq = sequence_logps(out["logps"], mask, average_log_prob)
    if ref is not None:
        ref_seq_all = sequence_logps(out["ref_logps"], mask, average_log_prob)
    elif row_data:
        ref_seq_all = row_data["ref_seq_logps"]
    else:
        ref_seq_all = torch.zeros_like(seq)
    rewards = beta * (seq - ref_seq_all)
    metrics = _reward_metrics(rewards[:n_pairs], rewards[n_pairs:], seq[:n_pairs], seq[n_pairs:])
    metrics["ref_chosen_logps"] = ref_seq_all[:n_pairs]
    metrics["ref_rejected_logps"] = ref_seq_all[n_pairs:]
    metrics.update(_token_metrics(out, mask, n_pairs))
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------
# ORPO
# ----------------------------------------------------------------------------------------------------


def fused_linear_orpo_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    nll_target: torch.Tensor | None = None,
    beta: float = 0.1,
    compute_nll_loss: bool = True,
    average_log_prob: bool = True,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """ORPO: NLL(chosen) - beta * mean(logsigmoid(log odds ratio)), fused with the final linear layer.

    The odds ratio uses the (mean, with `average_log_prob`) log-probabilities of `target` (the
    completion). The NLL is the mean over the chosen tokens of `nll_target` when given (TRL's ORPO
    scores prompt and completion there), else of `target`; `nll_target` must agree with `target`
    wherever `target` is not ignored.

    Metrics: per-pair logps and rewards (beta * logps) as in DPO, "log_odds_ratio" (mean of the
    logsigmoid term), "log_odds_chosen" (mean log odds ratio), "nll_loss", and the token metrics
    (over the `target` positions).
    """
    n_pairs = _check_paired(input, weight, target, bias, ignore_index)
    pref_mask = target != ignore_index
    engine_target = target
    if nll_target is not None:
        check_target("nll_target", nll_target, input, weight.shape[0], ignore_index)
        if bool((pref_mask & (nll_target != target)).any()):
            raise ValueError("nll_target must equal target wherever target is not ignore_index")
        engine_target = torch.where(pref_mask, target, nll_target)
    nll_mask = engine_target != ignore_index
    n_nll_tokens = nll_mask[:n_pairs].sum().clamp(min=1)

    def loss_fn(lp, chunk):
        k = lp.shape[0] // 2
        pm = chunk.data["pref_mask"]
        seq = sequence_logps(lp, pm, average_log_prob)
        ratio = F.logsigmoid(orpo_log_odds(seq[:k], seq[k:]))
        total = -beta * ratio.sum() / n_pairs
        if compute_nll_loss:
            total = total - lp[:k].sum() / n_nll_tokens
        return total

    loss, out = chunked_fused_linear_loss(
        input, weight, engine_target, loss_fn,
        _groups(n_pairs, target.shape[1], weight.shape[0], chunk_size, input.device),
        bias=bias, temperature=temperature, ignore_index=ignore_index, row_data={"pref_mask": pref_mask},
        with_stats=True, accum_dtype=accum_dtype, fused=fused,
    )  # fmt: skip

    seq = sequence_logps(out["logps"], pref_mask, average_log_prob)
    chosen, rejected = seq[:n_pairs], seq[n_pairs:]
    log_odds = orpo_log_odds(chosen, rejected)
    metrics = _reward_metrics(beta * chosen, beta * rejected, chosen, rejected)
    metrics.update(_token_metrics(out, pref_mask, n_pairs))
    metrics["nll_loss"] = -masked_mean(out["logps"][:n_pairs], nll_mask[:n_pairs])
    metrics["log_odds_ratio"] = F.logsigmoid(log_odds).mean()
    metrics["log_odds_chosen"] = log_odds.mean()
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------
# CPO and SimPO
# ----------------------------------------------------------------------------------------------------


def fused_linear_cpo_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    average_log_prob: bool | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """CPO: mean(pair loss on reward(chosen) - reward(rejected)) + cpo_alpha * NLL(chosen).

    `loss_type` in `CPO_LOSS_TYPES`; "simpo" subtracts the margin `simpo_gamma / beta`. `alpha != 0`
    applies AlphaPO's reward (1 - p^-alpha) / alpha. `average_log_prob` defaults to True for "ipo"
    and "simpo" (TRL's choice), False otherwise. Metrics as in DPO, rewards being beta * reward.
    """
    n_pairs = _check_paired(input, weight, target, bias, ignore_index)
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}")
    average = loss_type in ("ipo", "simpo") if average_log_prob is None else average_log_prob
    mask = target != ignore_index
    n_chosen_tokens = mask[:n_pairs].sum().clamp(min=1)

    def loss_fn(lp, chunk):
        k = lp.shape[0] // 2
        rewards = cpo_rewards(sequence_logps(lp, chunk.mask, average), alpha)
        per_pair = cpo_pair_losses(
            loss_type, rewards[:k] - rewards[k:],
            beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
        )  # fmt: skip
        total = per_pair.sum() / n_pairs
        if cpo_alpha != 0.0:
            total = total - cpo_alpha * lp[:k].sum() / n_chosen_tokens
        return total

    loss, out = chunked_fused_linear_loss(
        input, weight, target, loss_fn, _groups(n_pairs, target.shape[1], weight.shape[0], chunk_size, input.device),
        bias=bias, temperature=temperature, ignore_index=ignore_index, with_stats=True,
        accum_dtype=accum_dtype, fused=fused,
    )  # fmt: skip

    seq = sequence_logps(out["logps"], mask, average)
    rewards = beta * cpo_rewards(seq, alpha)
    metrics = _reward_metrics(rewards[:n_pairs], rewards[n_pairs:], seq[:n_pairs], seq[n_pairs:])
    metrics.update(_token_metrics(out, mask, n_pairs))
    return LossOutput(loss, metrics)


def fused_linear_simpo_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """SimPO: -logsigmoid(beta * (mean logp(chosen) - mean logp(rejected)) - gamma), reference-free,
    with an optional NLL term (`cpo_alpha`). CPO's "simpo" loss type with the SimPO paper's beta."""
    return fused_linear_cpo_loss(
        input, weight, target, bias,
        loss_type="simpo", beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
        simpo_gamma=gamma, ignore_index=ignore_index, temperature=temperature,
        chunk_size=chunk_size, accum_dtype=accum_dtype, fused=fused,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


class FusedLinearDPOLoss(FusedLossModule):
    """Module form of `fused_linear_dpo_loss`: `FusedLinearDPOLoss(beta=0.1)(input, weight, target, bias)`."""

    function = staticmethod(fused_linear_dpo_loss)
    call_keywords = ("ref_input", "ref_weight", "ref_bias", "ref_chosen_logps", "ref_rejected_logps")


class FusedLinearORPOLoss(FusedLossModule):
    """Module form of `fused_linear_orpo_loss`."""

    function = staticmethod(fused_linear_orpo_loss)
    call_keywords = ("nll_target",)


class FusedLinearCPOLoss(FusedLossModule):
    """Module form of `fused_linear_cpo_loss`."""

    function = staticmethod(fused_linear_cpo_loss)


class FusedLinearSimPOLoss(FusedLossModule):
    """Module form of `fused_linear_simpo_loss`."""

    function = staticmethod(fused_linear_simpo_loss)
