"""Several linear maps of one input as one op: (x W_1^T + b_1, ..., x W_n^T + b_n).

The attention's q/k/v projections read the same normed hidden states. Autograd sums their three input
gradients with two add kernels (each reads two tokens x hidden tensors and writes one); here each
product after the first accumulates into the first (`addmm_`, in cuBLAS's epilogue):

    forward:   y_i = x W_i^T (+ b_i)                                  (saves x and the weights)
    backward:  dW_i = dy_i^T x;  db_i = sum_rows(dy_i);  dx = dy_1 W_1;  dx += dy_i W_i  (i > 1)

Each output is exactly F.linear's (the same cuBLAS call); the input gradient rounds the sum once
instead of after every term. Outputs that get no gradient are skipped. Where this op does not run its
Function -- CPU without the interpreter, saved-tensor hooks (checkpointing), autocast, torch.compile
(which sees the composition and fuses the adds itself), mixed dtypes -- it is `F.linear` per weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.gated_down_proj import _saved_tensor_hooks_active


class LinearProjectionsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n: int, *weights_and_biases):
        """x: rows (M, H) with unit column stride; then n weights (N_i, H), then n biases (or None)."""
        weights, biases = weights_and_biases[:n], weights_and_biases[n:]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its products are skipped
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = [b is not None for b in biases]
        return tuple(x.mm(w.t()) if b is None else torch.addmm(b, x, w.t()) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        n = len(weights)
        need_x, need = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]  # (x, n, weights..., biases...)
        grad_x = None
        grad_weights, grad_biases = [None] * n, [None] * n
        for i, (dy, w) in enumerate(zip(grads, weights)):
            if dy is None:
                continue
            if need_x:
                grad_x = dy.mm(w) if grad_x is None else grad_x.addmm_(dy, w)
            if need[i]:
                grad_weights[i] = dy.t().mm(x)
            if ctx.has_bias[i] and need[n + i]:
                grad_biases[i] = dy.sum(0)
        if need_x and grad_x is None:  # no output was used
            grad_x = torch.zeros_like(x)
        return grad_x, None, *grad_weights, *grad_biases


def linear_projections_reference(x, weights, biases=None):
    """Torch specification: F.linear of x with each weight (and bias)."""
    biases = [None] * len(weights) if biases is None else biases
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))


@on_input_device
def linear_projections(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """(F.linear(x, weights[0], biases[0]), ...) for x (..., H) and weights (N_i, H), biases (N_i,) or
    None each; the input gradients of all the products summed in the products themselves."""
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    if not weights:
        raise ValueError("linear_projections needs at least one weight")
    if len(biases) != len(weights):
        raise ValueError(f"linear_projections: {len(biases)} biases for {len(weights)} weights")
    check_float("x", x)
    hidden = x.shape[-1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_float(f"weights[{i}]", w)
        check_same_device(x=x, weight=w, bias=b)
        if w.dim() != 2 or w.shape[1] != hidden:
            raise ValueError(f"weights[{i}] must be (out_features, {hidden}) for x of width {hidden}, "
                             f"got {tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{i}] must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    same_dtype = all(t is None or t.dtype == x.dtype for t in weights + biases)
    # (compiling first: Dynamo cannot trace the saved-tensor-hooks query)
    if (_library.compiling() or not use_triton(x) or not same_dtype or torch.is_autocast_enabled(x.device.type)
            or _saved_tensor_hooks_active()):
        return linear_projections_reference(x, weights, biases)
    outputs = LinearProjectionsFunction.apply(as_rows(x), len(weights), *weights, *biases)
    return tuple(from_rows(y, x) for y in outputs)
