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
"""

from liger_kernels.ops.cross_entropy import cross_entropy
from liger_kernels.ops.fused_add_rms_norm import fused_add_rms_norm
from liger_kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_kernels.ops.glu import geglu, swiglu
from liger_kernels.ops.layer_norm import layer_norm
from liger_kernels.ops.rms_norm import rms_norm
from liger_kernels.ops.rope import rope

__all__ = [
    "cross_entropy",
    "fused_add_rms_norm",
    "fused_linear_cross_entropy",
    "geglu",
    "layer_norm",
    "rms_norm",
    "rope",
    "swiglu",
]
