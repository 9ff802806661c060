"""Functional API: plain functions over the ops. Each dispatches on device (see `_utils.use_triton`).

Signatures (the contract every op file implements):
- rms_norm(x, weight, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False) -> y
- fused_add_rms_norm(x, residual, weight, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False)
      -> (y, new_residual)            new_residual = x + residual, y = rms_norm(new_residual)
- rms_norm_with_residual(x, weight, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False)
      -> (rms_norm(x), x)             the two gradients added inside the norm's backward kernel
- layer_norm(x, weight, bias=None, eps=1e-5) -> y
- rope(q, k, cos, sin, unsqueeze_dim=1) -> (q_embed, k_embed)   Hugging Face rotate-half layout
- mrope(q, k, cos, sin, mrope_section, unsqueeze_dim=1) -> (q_embed, k_embed)   Qwen2-VL multimodal RoPE,
      cos/sin (3, B or 1, T, D)
- llama4_rope(q, k, freqs_cis) -> (q_out, k_out)   Llama-4 complex RoPE, q/k (B, T, H, D),
      freqs_cis complex64 (B or 1, T, D/2) or its real view (..., D/2, 2)
- swiglu(a, b) -> silu(a) * b
- swiglu_gate_up(gate_up) -> silu(gate) * up,  gate, up = gate_up.chunk(2, dim=-1)   (..., 2I) -> (..., I)
- geglu(a, b, approximate="tanh") -> gelu(a, approximate) * b
- gated_down_proj(a, b, weight, bias=None, activation="silu", residual=None) -> (f(a) * b) @ weight.T
      + bias (+ residual, summed in the product), keeping only a, b, weight for the backward (f: "silu",
      "gelu_tanh", "gelu")
- gated_mlp(x, gate_weight, up_weight, down_weight, activation="silu", residual=None) -> the bias-free
      gated MLP down(f(x @ Wg.T) * (x @ Wu.T)) (+ residual) as one op: gated_down_proj's saving, and
      the two input projections' gradients summed in the second product
- linear_projections(x, weights, biases=None) -> (F.linear(x, weights[0], biases[0]), ...): several
      projections of one input (attention's q/k/v), their input gradients summed in the products
- cross_entropy(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
      lse_square_scale=0.0, softcap=None, logit_scale=1.0, reduction="mean", return_z_loss=False,
      in_place=False, return_token_accuracy=False) -> loss  or (loss, z_loss)
      return_token_accuracy=True appends the token accuracy (fp32 scalar): (loss[, z_loss], accuracy)
- fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
      label_smoothing=0.0, lse_square_scale=0.0, softcap=None, logit_scale=1.0, reduction="mean",
      return_z_loss=False, num_items_in_batch=None, return_token_accuracy=False)
      -> loss  or (loss, z_loss), the accuracy appended as for cross_entropy
- kl_div(input, target, reduction="batchmean", log_target=False, eps=1e-10) -> loss   torch kl_div
- jsd(student_logprobs, teacher_logprobs, label=None, beta=0.5, ignore_index=-100) -> loss
- fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, label=None, beta=0.5,
      ignore_index=-100, temperature=1.0) -> loss      jsd of log_softmax(input @ weight.T / temperature)
      of student and teacher, without the (N, V) logits; the teacher gets no gradient
- tvd(p, q, reduction="batchmean", label=None, ignore_index=-100) -> loss
- dyt(x, alpha, weight, bias=None) -> weight * tanh(alpha * x) + bias
- relu_squared(x) -> relu(x)^2
- softmax(x, dim=-1), sparsemax(x, dim=-1) -> y
- group_norm(x, num_groups, weight=None, bias=None, eps=1e-5) -> y          x (N, C, *)
- poly_norm(x, weight, bias, eps=1e-6) -> w0 norm(x^3) + w1 norm(x^2) + w2 norm(x) + b
- modulated_rms_norm(x, weight, scale, shift=None, eps=1e-6, offset=0.0, casting_mode="llama")
      -> rms_norm(x, weight) * (1 + scale) + shift   (adaLN / AdaRMSNorm); weight may be None; scale and
      shift (H,), (B, H) or (B, 1, ..., H) shared by B groups of consecutive rows, or x's shape
- fused_moe(hidden, router_logits, gate_up_weight, down_weight, top_k, normalize_topk=True) -> out
      softmax top-k routing + SwiGLU experts; hidden (N, H), router_logits (N, E),
      gate_up_weight (E, 2I, H), down_weight (E, H, I) (transformers' 3-D experts layout)
- fused_moe_experts(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight) -> out
      the experts alone, as transformers' `*Experts.forward`; index E means "no expert"
- multi_token_attention(scores, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, sparse=False) -> out
      causal softmax (sparse: sparsemax) of scores (B, C, L, L), conv2d over the map, output zeroed
      above the diagonal
"""

from liger_kernels.ops.cross_entropy import cross_entropy
from liger_kernels.ops.fused_add_rms_norm import fused_add_rms_norm, rms_norm_with_residual
from liger_kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_kernels.ops.fused_linear_jsd import fused_linear_jsd
from liger_kernels.ops.gated_down_proj import gated_down_proj
from liger_kernels.ops.gated_mlp import gated_mlp
from liger_kernels.ops.linear_projections import linear_projections
from liger_kernels.ops.glu import geglu, swiglu, swiglu_gate_up
from liger_kernels.ops.layer_norm import layer_norm
from liger_kernels.ops.llama4_rope import llama4_rope
from liger_kernels.ops.mrope import mrope
from liger_kernels.ops.rms_norm import rms_norm
from liger_kernels.ops.rope import rope
from liger_kernels.ops.dyt import dyt
from liger_kernels.ops.group_norm import group_norm
from liger_kernels.ops.jsd import jsd
from liger_kernels.ops.kl_div import kl_div
from liger_kernels.ops.poly_norm import poly_norm
from liger_kernels.ops.modulated_rms_norm import modulated_rms_norm
from liger_kernels.ops.relu_squared import relu_squared
from liger_kernels.ops.softmax import softmax
from liger_kernels.ops.sparsemax import sparsemax
from liger_kernels.ops.tvd import tvd
from liger_kernels.ops.fused_moe import fused_moe, fused_moe_experts
from liger_kernels.ops.multi_token_attention import multi_token_attention

__all__ = [
    "cross_entropy",
    "fused_add_rms_norm",
    "rms_norm_with_residual",
    "fused_linear_cross_entropy",
    "fused_linear_jsd",
    "gated_down_proj",
    "gated_mlp",
    "linear_projections",
    "geglu",
    "layer_norm",
    "llama4_rope",
    "mrope",
    "rms_norm",
    "rope",
    "swiglu",
    "swiglu_gate_up",
    "dyt",
    "group_norm",
    "jsd",
    "kl_div",
    "poly_norm",
    "modulated_rms_norm",
    "relu_squared",
    "softmax",
    "sparsemax",
    "tvd",
    "fused_moe",
    "fused_moe_experts",
    "multi_token_attention",
]
