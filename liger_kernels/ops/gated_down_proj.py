"""A gated MLP's output projection that does not keep its input: y = (f(a) * b) @ W.T + bias.

In a Llama-style MLP, `down_proj(act(gate) * up)` keeps three (tokens x intermediate) tensors for the
backward: a = gate and b = up (for the activation's gradient) and c = f(a) * b (for the weight
gradient of down_proj). They are the largest activations of a decoder layer. This op keeps a, b and
W only and recomputes c in the backward with the forward kernel of `glu.py` (one more read of a and b
and one write of c): a third less MLP activation memory, e.g. 4 GiB on the ANCHORS.md 1.2 B Llama at
8 x 2048 tokens, for about 1 % more step time.

    backward:  c = f(a) * b  (recomputed);  dW = dy^T c;  dbias = sum(dy);  dc = dy W;
               (da, db) = glu backward(dc, a, b)

f is silu ("silu"), tanh-approximated gelu ("gelu_tanh") or exact gelu ("gelu"). The matrix products
are torch's (cuBLAS), in the inputs' dtype. Under autocast the inputs are cast as `F.linear` would.
On CPU (without the interpreter), while torch.compile traces, and while saved-tensor hooks are active
(non-reentrant activation checkpointing keeps nothing of the layer anyway; measured on the H200, the
recompute there only cost time), it is the plain composition `F.linear(glu(a, b), W, bias)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, use_triton
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.glu import (
    _GELU_ERF,
    _GELU_TANH,
    _SILU,
    _check_glu_inputs,
    _glu_backward,
    _glu_forward,
    geglu,
    swiglu,
)

ACTIVATIONS = {"silu": _SILU, "gelu_tanh": _GELU_TANH, "gelu": _GELU_ERF}


def _saved_tensor_hooks_active() -> bool:
    """True inside torch.autograd.graph.saved_tensors_hooks (checkpointing, offloading to the CPU)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class GatedDownProjFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weight, bias, act: int):
        """a, b: rows (M, I) with unit column stride; y (M, H)."""
        y = F.linear(_glu_forward(a, b, act), weight, bias)  # c is freed here
        ctx.save_for_backward(a, b, weight)
        ctx.act = act
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b, weight = ctx.saved_tensors
        need_a, need_b, need_w, need_bias, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_w = grad_bias = grad_a = grad_b = None
        if need_w:
            c = _glu_forward(a, b, ctx.act)
            grad_w = dy2.t().mm(c.reshape(-1, c.shape[-1]))
            del c
        if need_bias and ctx.has_bias:
            grad_bias = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
        if need_a or need_b:
            dc = dy.matmul(weight)
            grad_a, grad_b = _glu_backward(dc, a, b, ctx.act)
        return grad_a, grad_b, grad_w, grad_bias, None


def gated_down_proj_reference(a, b, weight, bias=None, activation: str = "silu"):
    """Torch specification: the composition of the gated activation and the linear layer."""
    if activation == "silu":
        c = F.silu(a.float()) * b.float()
    else:
        c = F.gelu(a.float(), approximate="tanh" if activation == "gelu_tanh" else "none") * b.float()
    return F.linear(c.to(a.dtype), weight, bias)


def _glu(a, b, activation):
    if activation == "silu":
        return swiglu(a, b)
    return geglu(a, b, "tanh" if activation == "gelu_tanh" else "none")


def gated_down_proj(
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """(f(a) * b) @ weight.T + bias without saving f(a) * b. a, b (..., I); weight (H, I); bias (H,)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    _check_glu_inputs(a, b)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    check_same_device(a=a, weight=weight, bias=bias)
    if weight.dim() != 2 or weight.shape[1] != a.shape[-1]:
        raise ValueError(
            f"weight must be (out_features, {a.shape[-1]}) for inputs of width {a.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    device_type = a.device.type
    if _library.compiling() or not use_triton(a, b) or _saved_tensor_hooks_active():
        return F.linear(_glu(a, b, activation), weight, bias)
    if torch.is_autocast_enabled(device_type):  # cast as F.linear does under autocast, then run without it
        dtype = torch.get_autocast_dtype(device_type)
        a, b, weight = a.to(dtype), b.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _gated_down_proj(a, b, weight, bias, ACTIVATIONS[activation])
    if a.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"a is {a.dtype} but weight is {weight.dtype}: cast them (or run under torch.autocast)")
    return _gated_down_proj(a, b, weight, bias, ACTIVATIONS[activation])


def _gated_down_proj(a, b, weight, bias, act: int) -> torch.Tensor:
    # (F.linear of a 3-D input returns a view: the Function gets rows.)
    return from_rows(GatedDownProjFunction.apply(as_rows(a), as_rows(b), weight, bias, act), a)
