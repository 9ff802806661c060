"""Distillation losses fused with the student's AND the teacher's final linear layers.

Generalized Jensen-Shannon divergence (GKD, https://huggingface.co/papers/2306.13649; TRL's
`generalized_jsd_loss`) between the student distribution s = softmax(z_s / t) and the teacher's
p = softmax(z_t / t), per token, with the mixture m = (1 - beta) * s + beta * p:
    beta = 0:  KL(p || s)    (forward KL)
    beta = 1:  KL(s || p)    (reverse KL)
    else:      beta * KL(p || m) + (1 - beta) * KL(s || m)
summed over the vocabulary, averaged over the valid tokens, plus an optional hard-label
cross-entropy of the student (at temperature 1):
    loss = weight_soft_loss * divergence + weight_hard_loss * CE(z_s, target)
Chunks are groups of tokens; the teacher's logits are computed per chunk without gradient.

The soft-only, bias-free case (weight_hard_loss = 0, no biases: the usual distillation set-up) runs
the `fused_linear_jsd` op (liger_kernels/ops/fused_linear_jsd.py: cuBLAS products and one Triton JSD
pass per chunk, gradients in the forward); the others run the shared chunking engine with the
divergence in torch per chunk (2.5x slower on the H200 at 16k tokens x 128k vocab: 389.9 vs 154.1 ms).

Cosine-similarity distillation (`fused_linear_cosine_similarity_loss`, Liger-Kernel's
`LigerFusedLinearCosineSimilarityLoss`): per token beta * (1 - cos(z_s / t, z_t / t)) on the logits,
same structure (teacher head per chunk, hard-label term, valid-token mean); it runs on the engine.
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
    row_groups,
)
from liger_kernels.ops.fused_linear_jsd import fused_linear_jsd

# The logits-mode chunk holds several fp32 (rows, V) temporaries: use 1/8 of the default budget.
_TEMPORARIES = 8


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD from log-probabilities (rows, V) -> (rows,)."""
    if beta == 0.0:
        return (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
    if beta == 1.0:
        return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)
    mixture = torch.logsumexp(
        torch.stack([student_logps + math.log1p(-beta), teacher_logps + math.log(beta)]), dim=0
    )
    kl_teacher = (teacher_logps.exp() * (teacher_logps - mixture)).sum(-1)
    kl_student = (student_logps.exp() * (student_logps - mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def _as_rows(name, x):
    """(B, T, H) or (N, H) -> (N, 1, H): distillation chunks are groups of tokens."""
    if x.dim() == 3:
        return x.reshape(-1, 1, x.shape[-1])
    if x.dim() == 2:
        return x.unsqueeze(1)
    raise ValueError(f"{name} must be (batch, seq_len, hidden) or (tokens, hidden), got shape {tuple(x.shape)}")


def _prepare(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, target,
             weight_hard_loss, ignore_index, chunk_size):
    """Checks shared by the distillation losses -> (student, teacher (N, 1, H) rows, target (N, 1))."""
    student = _as_rows("student_input", student_input)
    teacher = _as_rows("teacher_input", teacher_input)
    check_head("student_", student, student_weight, student_bias)
    check_head("teacher_", teacher, teacher_weight, teacher_bias, *student.shape[:2])
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight has vocab {teacher_weight.shape[0]}, student_weight has {vocab}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size (tokens per chunk) must be >= 1, got {chunk_size}")
    if target is None:
        if weight_hard_loss != 0.0:
            raise ValueError("weight_hard_loss != 0 needs target")
        return student, teacher, torch.zeros(student.shape[:2], dtype=torch.long, device=student.device)
    if target.numel() != student.shape[0]:
        raise ValueError(f"target has {target.numel()} elements for {student.shape[0]} tokens")
    target = target.reshape(-1, 1)
    check_target("target", target, student, vocab, ignore_index)
    return student, teacher, target


def _distill_with_engine(student, student_weight, student_bias, teacher, teacher_weight, teacher_bias, target,
                         soft_rows, weight_soft_loss, weight_hard_loss, temperature, ignore_index, chunk_size,
                         accum_dtype, fused):
    """weight_soft_loss * mean over valid tokens of soft_rows(z_s / t, z_t / t) (per token, (rows,)) +
    weight_hard_loss * the student's mean cross-entropy at t = 1, on the chunking engine."""
    n_valid = (target != ignore_index).sum().clamp(min=1)
    inv_t = 1.0 / temperature
    parts = {name: torch.zeros((), device=student.device) for name in ("soft_loss", "hard_loss")}

    def loss_fn(logits, chunk):
        valid = chunk.mask.reshape(-1)
        soft = (soft_rows(logits * inv_t, chunk.teacher_logits * inv_t) * valid).sum() / n_valid
        parts["soft_loss"] += soft.detach()
        loss = weight_soft_loss * soft
        if weight_hard_loss != 0.0:
            ce = F.cross_entropy(logits, chunk.target, reduction="none")
            hard = (ce * valid).sum() / n_valid
            parts["hard_loss"] += hard.detach()
            loss = loss + weight_hard_loss * hard
        return loss

    chunk_size = chunk_size or auto_chunk_size(_TEMPORARIES, 1, student_weight.shape[0])
    loss, _ = chunked_fused_linear_loss(
        student, student_weight, target, loss_fn, row_groups(student.shape[0], chunk_size, student.device),
        bias=student_bias, mode="logits", temperature=temperature, ignore_index=ignore_index,
        teacher=Head(teacher, teacher_weight, teacher_bias), accum_dtype=accum_dtype, fused=fused,
    )  # fmt: skip
    return LossOutput(loss, parts)


def fused_linear_jsd_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    weight_soft_loss: float = 1.0,
    weight_hard_loss: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """Generalized JSD distillation fused with both heads (teacher under no_grad).

    `student_input` (B, T, H_s) or (N, H_s); `teacher_input` the same tokens with the teacher's hidden
    size; the weights (V, H_s), (V, H_t) share the vocabulary. `target` (B, T) / (N,): positions equal
    to `ignore_index` are skipped; it is required when `weight_hard_loss != 0`; without it every token
    counts. `chunk_size`: tokens per chunk. Metrics: "soft_loss" (the mean divergence), "hard_loss".
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = target
    student, teacher, target = _prepare(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                                        teacher_bias, target, weight_hard_loss, ignore_index, chunk_size)
    if fused and weight_hard_loss == 0.0 and student_bias is None and teacher_bias is None:
        soft = fused_linear_jsd(
            student.squeeze(1), student_weight, teacher.squeeze(1), teacher_weight,
            labels.reshape(-1) if labels is not None else None, beta, ignore_index, temperature,
            chunk_size=chunk_size, accum_dtype=accum_dtype,
        )  # fmt: skip
        hard = torch.zeros((), device=student.device)
        return LossOutput(weight_soft_loss * soft, {"soft_loss": soft.detach(), "hard_loss": hard})
    return _distill_with_engine(
        student, student_weight, student_bias, teacher, teacher_weight, teacher_bias, target,
        lambda z_s, z_t: generalized_jsd(F.log_softmax(z_s, dim=-1), F.log_softmax(z_t, dim=-1), beta),
        weight_soft_loss, weight_hard_loss, temperature, ignore_index, chunk_size, accum_dtype, fused,
    )  # fmt: skip


class FusedLinearJSDLoss(FusedLossModule):
    """Module form of `fused_linear_jsd_loss`:
    `(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias)`."""

    function = staticmethod(fused_linear_jsd_loss)


# ----------------------------------------------------------------------------------------------------
# Cosine-similarity distillation
# ----------------------------------------------------------------------------------------------------


def cosine_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-row 1 - cosine_similarity(normalize(s), normalize(t)) over the vocabulary, (rows, V) -> (rows,),
    computed as Liger-Kernel does (`F.normalize` then `F.cosine_similarity`, both with torch's eps)."""
    s = F.normalize(student_logits, p=2, dim=-1)
    t = F.normalize(teacher_logits, p=2, dim=-1)
    return 1 - F.cosine_similarity(s, t, dim=-1)


def fused_linear_cosine_similarity_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    weight_soft_loss: float = 1.0,
    weight_hard_loss: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    fused: bool = True,
) -> LossOutput:
    """Cosine-similarity distillation fused with both heads (teacher under no_grad): Liger-Kernel's
    `LigerFusedLinearCosineSimilarityLoss` (chunked_loss/cosine_similarity_loss.py, 0.8.x).

    On the raw logits (not probabilities) at temperature t, z_s = student logits / t, z_t = teacher
    logits / t, per token i
        d_i = beta * (1 - cos(z_s[i], z_t[i]))        (cos over the vocabulary, of the L2-normalized rows)
        soft_loss = sum over valid tokens of d_i / n_valid
        hard_loss = mean over valid tokens of CE(student logits at t = 1, target)
        loss = weight_soft_loss * soft_loss + weight_hard_loss * hard_loss
    `beta` (Liger's default 0.5) only scales the soft term; the cosine is scale-invariant, so the
    temperature leaves it unchanged (kept for Liger's signature). Valid tokens: `target != ignore_index`
    (every token without `target`). Liger sums d_i over all tokens, ignored ones included, while dividing
    by the valid count; here ignored tokens contribute nothing (the same value when none is ignored).
    Liger's defaults weight the two terms 0.5 / 0.5; here, as in `fused_linear_jsd_loss`, soft only.

    Shapes as `fused_linear_jsd_loss`: `student_input` (B, T, H_s) or (N, H_s), `teacher_input` the same
    tokens with the teacher's hidden size, weights (V, H_s) and (V, H_t) over one vocabulary. `target`
    is required when `weight_hard_loss != 0`. `chunk_size`: tokens per chunk. Metrics: "soft_loss",
    "hard_loss". Gradients flow to the student's input, weight and bias only.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    student, teacher, target = _prepare(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                                        teacher_bias, target, weight_hard_loss, ignore_index, chunk_size)
    return _distill_with_engine(
        student, student_weight, student_bias, teacher, teacher_weight, teacher_bias, target,
        lambda z_s, z_t: beta * cosine_distance(z_s, z_t),
        weight_soft_loss, weight_hard_loss, temperature, ignore_index, chunk_size, accum_dtype, fused,
    )  # fmt: skip


class FusedLinearCosineSimilarityLoss(FusedLossModule):
    """Module form of `fused_linear_cosine_similarity_loss`:
    `(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias)`."""

    function = staticmethod(fused_linear_cosine_similarity_loss)
