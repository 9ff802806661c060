"""`nn.Module` wrappers over the functional API. Parameters are ordinary `nn.Parameter`s, so these
modules shard and checkpoint like their PyTorch counterparts; "Norm" stays in the norm class names
(accelerate's FSDP2 auto-wrap groups modules by that)."""

from __future__ import annotations

import math

import torch
from torch import nn

from liger_kernels import functional as F


class LigerRMSNorm(nn.Module):
    """RMSNorm: y = x / rms(x) * (offset + weight). `offset=1.0, casting_mode="gemma"` gives Gemma's norm."""

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False, init=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), float(init)))
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode
        self.in_place = in_place

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.variance_epsilon, self.offset, self.casting_mode, self.in_place)

    def extra_repr(self):
        return (
            f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}, "
            f"casting_mode={self.casting_mode}"
        )


class LigerFusedAddRMSNorm(LigerRMSNorm):
    """Residual add + RMSNorm in one kernel: forward(x, residual) -> (normed, x + residual)."""

    def forward(self, x, residual):
        return F.fused_add_rms_norm(
            x, residual, self.weight, self.variance_epsilon, self.offset, self.casting_mode, self.in_place
        )


class LigerModulatedRMSNorm(nn.Module):
    """Modulated RMSNorm (adaLN / AdaRMSNorm): forward(x, scale, shift=None) ->
    rms_norm(x, weight) * (1 + scale) + shift, scale and shift from the conditioning ((H,), (B, H),
    (B, 1, H) or x's shape). `elementwise_affine=False`: no weight (offset must then be 0)."""

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="llama", elementwise_affine=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode

    def forward(self, x, scale, shift=None):
        return F.modulated_rms_norm(
            x, self.weight, scale, shift, self.variance_epsilon, self.offset, self.casting_mode
        )

    def extra_repr(self):
        weight = "no weight" if self.weight is None else f"{tuple(self.weight.shape)}"
        return f"{weight}, eps={self.variance_epsilon}, offset={self.offset}, casting_mode={self.casting_mode}"


class LigerLayerNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class LigerSwiGLUMLP(nn.Module):
    """Llama-style MLP: down(silu(gate(x)) * up(x)), the gating fused in one kernel."""

    def __init__(self, hidden_size, intermediate_size, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))


class LigerFusedGateUpSwiGLUMLP(nn.Module):
    """Phi-3 / GLM-4-style MLP: one gate_up_proj (H -> 2I), down(silu(gate) * up) with the gating fused."""

    def __init__(self, hidden_size, intermediate_size, bias=False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.swiglu_gate_up(self.gate_up_proj(x)))


class LigerGEGLUMLP(LigerSwiGLUMLP):
    """Gemma-style MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden_size, intermediate_size, bias=False, approximate="tanh"):
        super().__init__(hidden_size, intermediate_size, bias)
        self.approximate = approximate

    def forward(self, x):
        return self.down_proj(F.geglu(self.gate_proj(x), self.up_proj(x), self.approximate))


class LigerCrossEntropyLoss(nn.Module):
    """Drop-in for `nn.CrossEntropyLoss` with z-loss, softcap, logit scaling and token accuracy options."""

    def __init__(self, weight=None, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                 softcap=None, logit_scale=1.0, reduction="mean", return_z_loss=False, in_place=False,
                 return_token_accuracy=False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                            lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale,
                            reduction=reduction, return_z_loss=return_z_loss, in_place=in_place,
                            return_token_accuracy=return_token_accuracy)

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, self.weight, **self.options)


class LigerFusedLinearCrossEntropyLoss(nn.Module):
    """Loss of `lin_weight @ hidden + bias` against targets without materializing the logits."""

    def __init__(self, ce_weight=None, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                 softcap=None, logit_scale=1.0, reduction="mean", return_z_loss=False,
                 return_token_accuracy=False):
        super().__init__()
        self.register_buffer("ce_weight", ce_weight)
        self.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                            lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale,
                            reduction=reduction, return_z_loss=return_z_loss,
                            return_token_accuracy=return_token_accuracy)

    def forward(self, lin_weight, hidden, target, bias=None, num_items_in_batch=None):
        return F.fused_linear_cross_entropy(hidden, lin_weight, target, bias, self.ce_weight,
                                            num_items_in_batch=num_items_in_batch, **self.options)


class LigerKLDivLoss(nn.Module):
    """Drop-in for `nn.KLDivLoss`: forward(input_logprobs, target); gradients flow to both."""

    def __init__(self, reduction="batchmean", log_target=False, eps=1e-10):
        super().__init__()
        self.reduction, self.log_target, self.eps = reduction, log_target, eps

    def forward(self, input, target):
        return F.kl_div(input, target, self.reduction, self.log_target, self.eps)


class LigerJSD(nn.Module):
    """Generalized JSD of student and teacher log-probabilities, averaged over non-ignored rows."""

    def __init__(self, beta=0.5, ignore_index=-100):
        super().__init__()
        self.beta, self.ignore_index = beta, ignore_index

    def forward(self, student_logprobs, teacher_logprobs, label=None):
        return F.jsd(student_logprobs, teacher_logprobs, label, self.beta, self.ignore_index)


class LigerFusedLinearJSD(nn.Module):
    """Generalized JSD distillation loss fused with the student's and the teacher's final linear layers:
    forward(student_input, student_weight, teacher_input, teacher_weight, label=None) -> fp32 loss."""

    def __init__(self, beta=0.5, ignore_index=-100, temperature=1.0):
        super().__init__()
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, label=None):
        return F.fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, label,
                                  self.beta, self.ignore_index, self.temperature)


class LigerTVDLoss(nn.Module):
    """Total variation distance between probabilities p and q (rows of the last dimension)."""

    def __init__(self, reduction="batchmean", ignore_index=-100):
        super().__init__()
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, p, q, label=None):
        return F.tvd(p, q, self.reduction, label, self.ignore_index)


class LigerDyT(nn.Module):
    """Dynamic Tanh: weight * tanh(alpha * x) + bias, alpha a learnable scalar."""

    def __init__(self, hidden_size, init_alpha=0.5, bias=True):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(init_alpha)))
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x):
        return F.dyt(x, self.alpha, self.weight, self.bias)


class LigerReLUSquared(nn.Module):
    def forward(self, x):
        return F.relu_squared(x)


class LigerSoftmax(nn.Module):
    def __init__(self, dim=-1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.softmax(x, self.dim)


class LigerSparsemax(LigerSoftmax):
    def forward(self, x):
        return F.sparsemax(x, self.dim)


class LigerGroupNorm(nn.Module):
    """Drop-in for `nn.GroupNorm` (same parameters and initialization)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LigerPolyNorm(nn.Module):
    """PolyNorm: w0 * norm(x^3) + w1 * norm(x^2) + w2 * norm(x) + b, weights initialized to 1/3."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1.0 / 3))
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = eps

    def forward(self, x):
        return F.poly_norm(x, self.weight, self.bias, self.eps)


class LigerMultiTokenAttention(nn.Module):
    """Multi-token attention over attention scores (B, in_channels, L, L): causal softmax (sparsemax
    if `sparse`), a key-query conv2d, causal mask of the result. Conv2d's initialization (Kaiming
    uniform), zero bias."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
        sparse=False,
    ):
        super().__init__()
        self.sparse = sparse
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, scores):
        return F.multi_token_attention(
            scores, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.sparse
        )


class LigerFusedMoEExperts(nn.Module):
    """SwiGLU experts in transformers' layout (gate_up_proj (E, 2I, H), down_proj (E, H, I)):
    forward(hidden_states, top_k_index, top_k_weights), the signature of transformers' `*Experts`."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return F.fused_moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)
