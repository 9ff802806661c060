"""Functional API: plain functions over the ops. Each dispatches on device (see `_utils.use_triton`).

Signatures (the contract every op file implements):
- rms_norm(x, weight, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False) -> y
- fused_add_rms_norm(x, residual, weight, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False)
      -> (y, new_residual)            new_residual = x + residual, y = rms_norm(new_residual)
- layer_norm(x, weight, bias=None, eps=1e-5) -> y
- rope(q, k, cos, sin, unsqueeze_dim=1) -> (q_embed, k_embed)   Hugging Face rotate-half layout
- swiglu(a, b) -> silu(a) * b
- geglu(a, b, approximate="tanh") -> gelu(a, approximate) * b
- cross_entropy(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
      lse_square_scale=0.0, softcap=None, logit_scale=1.0, reduction="mean", return_z_loss=False,
      in_place=False) -> loss  or (loss, z_loss)
- fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
      label_smoothing=0.0, lse_square_scale=0.0, softcap=None, logit_scale=1.0, reduction="mean",
      return_z_loss=False, num_items_in_batch=None) -> loss  or (loss, z_loss)
- kl_div(input, target, reduction="batchmean", log_target=False, eps=1e-10) -> loss   torch kl_div
- jsd(student_logprobs, teacher_logprobs, label=None, beta=0.5, ignore_index=-100) -> loss
- tvd(p, q, reduction="batchmean", label=None, ignore_index=-100) -> loss
- dyt(x, alpha, weight, bias=None) -> weight * tanh(alpha * x) + bias
- relu_squared(x) -> relu(x)^2
- softmax(x, dim=-1), sparsemax(x, dim=-1) -> y
- group_norm(x, num_groups, weight=None, bias=None, eps=1e-5) -> y          x (N, C, *)
- poly_norm(x, weight, bias, eps=1e-6) -> w0 norm(x^3) + w1 norm(x^2) + w2 norm(x) + b
"""

from liger_kernels.ops.cross_entropy import cross_entropy
from liger_kernels.ops.fused_add_rms_norm import fused_add_rms_norm
from liger_kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_kernels.ops.glu import geglu, swiglu
from liger_kernels.ops.layer_norm import layer_norm
from liger_kernels.ops.rms_norm import rms_norm
from liger_kernels.ops.rope import rope
from liger_kernels.ops.dyt import dyt
from liger_kernels.ops.group_norm import group_norm
from liger_kernels.ops.jsd import jsd
from liger_kernels.ops.kl_div import kl_div
from liger_kernels.ops.poly_norm import poly_norm
from liger_kernels.ops.relu_squared import relu_squared
from liger_kernels.ops.softmax import softmax
from liger_kernels.ops.sparsemax import sparsemax
from liger_kernels.ops.tvd import tvd

__all__ = [
    "cross_entropy",
    "fused_add_rms_norm",
    "fused_linear_cross_entropy",
    "geglu",
    "layer_norm",
    "rms_norm",
    "rope",
    "swiglu",
    "dyt",
    "group_norm",
    "jsd",
    "kl_div",
    "poly_norm",
    "relu_squared",
    "softmax",
    "sparsemax",
    "tvd",
]
