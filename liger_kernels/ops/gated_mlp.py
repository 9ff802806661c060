"""The whole gated MLP as one op: y = down(f(x @ Wg.T) * (x @ Wu.T)) (+ residual).

`gated_down_proj` already keeps only gate, up and W_down for the down projection's backward. Owning
the two input projections too removes the one elementwise pass left around them: autograd sums the
input gradients of gate_proj and up_proj with an add kernel (read two, write one, tokens x hidden);
here the second product accumulates into the first (`addmm_`, in cuBLAS's epilogue):

    forward:   g = x Wg^T;  u = x Wu^T;  y = gated_down_proj(g, u, Wd, residual)   (saves x, g, u)
    backward:  (dg, du, dWd, dresidual) as gated_down_proj;  dWg = dg^T x;  dWu = du^T x;
               dx = dg Wg;  dx += du Wu

Bias-free projections only (the Llama family); the matrix products are torch's (cuBLAS), in the
inputs' dtype. Where this op does not run its Function -- CPU without the interpreter, saved-tensor
hooks (checkpointing), autocast, torch.compile (which fuses the add itself) -- it is the composition
`gated_down_proj(F.linear(x, Wg), F.linear(x, Wu), Wd, residual=residual)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.gated_down_proj import (
    ACTIVATIONS,
    _backward,
    _forward_rows,
    _saved_tensor_hooks_active,
    gated_down_proj,
    gated_down_proj_reference,
)


class GatedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight, act: int, residual=None):
        """x: rows (M, H) with unit column stride; residual None or rows (M, H_out); y (M, H_out)."""
        gate, up = x.mm(gate_weight.t()), x.mm(up_weight.t())
        ctx.save_for_backward(x, gate, up, gate_weight, up_weight, down_weight)
        ctx.act = act
        return _forward_rows(gate, up, down_weight, None, act, residual)

    @staticmethod
    def backward(ctx, dy):
        x, gate, up, gate_weight, up_weight, down_weight = ctx.saved_tensors
        need_x, need_wg, need_wu, need_wd, _, need_residual = ctx.needs_input_grad
        need_gate_up = need_x or need_wg or need_wu
        grad_gate, grad_up, grad_wd, _ = _backward(dy, gate, up, down_weight, ctx.act, need_gate_up, need_wd, False)
        grad_x = grad_wg = grad_wu = None
        if need_x:
            grad_x = grad_gate.mm(gate_weight).addmm_(grad_up, up_weight)
        if need_wg:
            grad_wg = grad_gate.t().mm(x)
        if need_wu:
            grad_wu = grad_up.t().mm(x)
        return grad_x, grad_wg, grad_wu, grad_wd, None, dy if need_residual else None


def gated_mlp_reference(x, gate_weight, up_weight, down_weight, activation: str = "silu", residual=None):
    """Torch specification: the Llama MLP, down_proj(act(gate_proj(x)) * up_proj(x)) (+ residual)."""
    out = gated_down_proj_reference(F.linear(x, gate_weight), F.linear(x, up_weight), down_weight, None, activation)
    return out if residual is None else residual + out


@on_input_device
def gated_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    activation: str = "silu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """down(f(x @ gate_weight.T) * (x @ up_weight.T)) (+ residual) for x (..., H), gate_weight and
    up_weight (I, H), down_weight (H_out, I), residual (..., H_out); no f(gate) * up saved, and the
    input gradient of both input projections summed in the second product."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    for name, t in (("x", x), ("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight)):
        check_float(name, t)
    check_same_device(x=x, gate_weight=gate_weight, up_weight=up_weight, down_weight=down_weight, residual=residual)
    hidden = x.shape[-1]
    if gate_weight.dim() != 2 or gate_weight.shape[1] != hidden or up_weight.shape != gate_weight.shape:
        raise ValueError(f"gate_weight and up_weight must both be (intermediate, {hidden}) for x of width "
                         f"{hidden}, got {tuple(gate_weight.shape)} and {tuple(up_weight.shape)}")
    if down_weight.dim() != 2 or down_weight.shape[1] != gate_weight.shape[0]:
        raise ValueError(f"down_weight must be (out_features, {gate_weight.shape[0]}), got {tuple(down_weight.shape)}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], down_weight.shape[0]):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], down_weight.shape[0])}, got "
                         f"{tuple(residual.shape)}")
    same_dtype = x.dtype == gate_weight.dtype == up_weight.dtype == down_weight.dtype and (
        residual is None or residual.dtype == x.dtype)
    # (compiling first: Dynamo cannot trace the saved-tensor-hooks query)
    if (_library.compiling() or not use_triton(x) or not same_dtype or torch.is_autocast_enabled(x.device.type)
            or _saved_tensor_hooks_active()):
        return gated_down_proj(F.linear(x, gate_weight), F.linear(x, up_weight), down_weight, None, activation,
                               residual)
    residual_rows = None if residual is None else residual.reshape(-1, residual.shape[-1])
    y = GatedMLPFunction.apply(as_rows(x), gate_weight, up_weight, down_weight, ACTIVATIONS[activation],
                               residual_rows)
    return from_rows(y, x)
