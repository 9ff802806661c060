"""Post-training losses fused with the final linear layer, computed chunk by chunk without ever
materializing the (batch x seq_len x vocab) logits. All share one engine (`chunked.py`).

Functional forms return `LossOutput(loss, metrics)`; modules take the options at construction.
- Preference (paired, batch = [chosen..., rejected...]): `fused_linear_dpo_loss` (TRL's DPO loss
  types), `fused_linear_orpo_loss`, `fused_linear_cpo_loss`, `fused_linear_simpo_loss`.
- Unpaired: `fused_linear_kto_loss`.  RL: `fused_linear_grpo_loss` (grpo, bnpo, dr_grpo, dapo, cispo,
  sapo, luspo, vespo).
- Distillation: `fused_linear_jsd_loss` (generalized JSD; beta 0 / 1 = forward / reverse KL),
  `fused_linear_cosine_similarity_loss` (beta * (1 - cosine similarity) of the logits).
- `chunked_logprobs`: per-token log-probabilities (no gradient), e.g. for reference models.

Common keywords: `chunk_size` (pairs / sequences / tokens per chunk; default about 2^28 logits per
chunk), `accum_dtype` (grad_weight accumulation: the weight's dtype by default, or torch.float32),
`temperature`, `ignore_index`, and `fused=False`, which computes the same loss the plain PyTorch way
(full logits): the unfused baseline for benchmarks.
"""

from liger_kernels.losses.chunked import LossOutput, chunked_logprobs
from liger_kernels.losses.distillation import (
    FusedLinearCosineSimilarityLoss,
    FusedLinearJSDLoss,
    fused_linear_cosine_similarity_loss,
    fused_linear_jsd_loss,
)
from liger_kernels.losses.grpo import GRPO_LOSS_TYPES, FusedLinearGRPOLoss, fused_linear_grpo_loss
from liger_kernels.losses.kto import KTO_LOSS_TYPES, FusedLinearKTOLoss, fused_linear_kto_loss
from liger_kernels.losses.preference import (
    CPO_LOSS_TYPES,
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

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "FusedLinearCPOLoss",
    "FusedLinearCosineSimilarityLoss",
    "FusedLinearDPOLoss",
    "FusedLinearGRPOLoss",
    "FusedLinearJSDLoss",
    "FusedLinearKTOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearSimPOLoss",
    "LossOutput",
    "chunked_logprobs",
    "fused_linear_cosine_similarity_loss",
    "fused_linear_cpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_grpo_loss",
    "fused_linear_jsd_loss",
    "fused_linear_kto_loss",
    "fused_linear_orpo_loss",
    "fused_linear_simpo_loss",
]
