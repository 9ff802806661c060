"""A gated MLP's output projection that does not keep its input: y = (f(a) * b) @ W.T + bias.

With `residual` (a pre-norm decoder layer's `residual + mlp(x)`), y = residual + (f(a) * b) @ W.T:
cuBLAS adds the residual in the product's epilogue (`addmm`, fp32 sum, one rounding), instead of a
separate add kernel reading both and writing y; its gradient is dy itself.

In a Llama-style MLP, `down_proj(act(gate) * up)` keeps three (tokens x intermediate) tensors for the
backward: a = gate and b = up (for the activation's gradient) and c = f(a) * b (for the weight
gradient of down_proj). They are the largest activations of a decoder layer. This op keeps a, b and
W only and recomputes c in the backward: the glu backward kernel of `glu.py`, which reads a and b
anyway, also writes c (one more write of c). A third less MLP activation memory, e.g. 4 GiB on the
ANCHORS.md 1.2 B Llama at 8 x 2048 tokens.

    backward:  dc = dy W;  (da, db, c = f(a) * b) = glu backward(dc, a, b), da over dc's buffer;
               dW = dy^T c;  dbias = sum(dy)

f is silu ("silu"), tanh-approximated gelu ("gelu_tanh") or exact gelu ("gelu"). The matrix products
are torch's (cuBLAS), in the inputs' dtype. Under autocast the inputs are cast as `F.linear` would.
On CPU (without the interpreter) and while saved-tensor hooks are active (non-reentrant activation
checkpointing keeps nothing of the layer anyway; measured on the H200, the recompute there only cost
time), it is the plain composition `F.linear(glu(a, b), W, bias)`. Under torch.compile it is one
custom op (`torch.ops.liger.gated_down_proj`) whose backward op recomputes c the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, from_rows
from liger_kernels.ops.glu import (
    _GELU_ERF,
    _GELU_TANH,
    _SILU,
    _check_glu_inputs,
    _glu_backward,
    _glu_backward_and_output,
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
    def forward(ctx, a, b, weight, bias, act: int, residual=None):
        """a, b: rows (M, I) with unit column stride; residual: None or rows (M, H); y (M, H)."""
        y = _forward_rows(a, b, weight, bias, act, residual)
        ctx.save_for_backward(a, b, weight)
        ctx.act = act
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b, weight = ctx.saved_tensors
        need_a, need_b, need_w, need_bias, _, need_residual = ctx.needs_input_grad
        grad_a, grad_b, grad_w, grad_bias = _backward(dy, a, b, weight, ctx.act, need_a or need_b, need_w,
                                                      need_bias and ctx.has_bias)
        return grad_a, grad_b, grad_w, grad_bias, None, dy if need_residual else None


def _forward_rows(a, b, weight, bias, act: int, residual=None) -> torch.Tensor:
    """y (M, H) of rows a, b (M, I) (+ rows residual); c = f(a) * b is freed on return (recomputed by
    `_backward`)."""
    c = _glu_forward(a, b, act)
    if residual is None:
        return F.linear(c, weight, bias)
    if bias is None:
        return torch.addmm(residual, c, weight.t())
    return residual + F.linear(c, weight, bias)


def _backward(dy, a, b, weight, act: int, need_ab: bool, need_w: bool, need_bias: bool):
    """(da, db, dW, dbias) of rows a, b (M, I) and dy (..., H); None for what is not asked for."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    grad_w = grad_bias = grad_a = grad_b = None
    if need_bias:
        grad_bias = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    if need_ab and need_w:  # one pass recomputes c while it writes da (over dc) and db
        grad_a, grad_b, c = _glu_backward_and_output(dy2.matmul(weight), a, b, act)
        grad_w = dy2.t().mm(c)
    elif need_ab:
        grad_a, grad_b = _glu_backward(dy2.matmul(weight), a, b, act)
    elif need_w:
        grad_w = dy2.t().mm(_glu_forward(a, b, act))
    return grad_a, grad_b, grad_w, grad_bias


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


@on_input_device
def gated_down_proj(
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "silu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """(f(a) * b) @ weight.T + bias without saving f(a) * b. a, b (..., I); weight (H, I); bias (H,).
    With residual (..., H): residual + that, the sum in the product's epilogue where it can be."""
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
    compiling = _library.compiling()  # one graph node, which recomputes c in its backward op
    autocast = torch.is_autocast_enabled(device_type)
    if residual is not None:
        check_float("residual", residual)
        check_same_device(a=a, residual=residual)
        if tuple(residual.shape) != (*a.shape[:-1], weight.shape[0]):
            raise ValueError(f"residual must have shape {(*a.shape[:-1], weight.shape[0])}, got "
                             f"{tuple(residual.shape)}")
        if residual.dtype != weight.dtype or autocast or compiling:
            # other dtypes promote in the sum; torch.compile fuses the add into its own kernels
            return residual + gated_down_proj(a, b, weight, bias, activation)
    if not compiling and (not use_triton(a, b) or _saved_tensor_hooks_active()):
        out = F.linear(_glu(a, b, activation), weight, bias)
        return out if residual is None else residual + out
    if autocast:  # cast as F.linear does under autocast, then run without it
        dtype = torch.get_autocast_dtype(device_type)
        a, b, weight = a.to(dtype), b.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _gated_down_proj(a, b, weight, bias, ACTIVATIONS[activation], compiling)
    if a.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"a is {a.dtype} but weight is {weight.dtype}: cast them (or run under torch.autocast)")
    return _gated_down_proj(a, b, weight, bias, ACTIVATIONS[activation], compiling, residual)


def _gated_down_proj(a, b, weight, bias, act: int, compiling: bool, residual=None) -> torch.Tensor:
    if compiling:
        return _gated_down_proj_op(a, b, weight, bias, act)
    # (F.linear of a 3-D input returns a view: the Function gets rows.)
    residual_rows = None if residual is None else residual.reshape(-1, residual.shape[-1])
    return from_rows(GatedDownProjFunction.apply(as_rows(a), as_rows(b), weight, bias, act, residual_rows), a)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------
# Under torch.compile the composition F.linear(glu(a, b), W) would let AOTAutograd save c = f(a) * b
# for the weight gradient (measured: 3.75 GiB more at the peak of the 1.2 B Llama step, H100 run 8);
# as one op whose backward op recomputes c, only a, b and W are saved, as in eager mode.

_ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}


@_library.custom_op(
    "gated_down_proj", lambda a, b, weight, bias, act: a.new_empty(*a.shape[:-1], weight.shape[0])
)
def _gated_down_proj_op(
    a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: int
) -> torch.Tensor:
    """(f(a) * b) @ weight.T + bias for the activation code `act`."""
    if not use_triton(a, b):
        return gated_down_proj_reference(a, b, weight, bias, _ACTIVATION_NAMES[act]).contiguous()
    return _forward_rows(as_rows(a), as_rows(b), weight, bias, act).reshape(*a.shape[:-1], weight.shape[0])


def _fake_backward(dy, a, b, weight, act, need_ab, need_w, need_bias):
    bias_like = weight.new_empty(weight.shape[0])
    return (_library.fake_grad(a, need_ab), _library.fake_grad(b, need_ab), _library.fake_grad(weight, need_w),
            _library.fake_grad(bias_like, need_bias))


@_library.custom_op("gated_down_proj_backward", _fake_backward)
def _gated_down_proj_backward_op(
    dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, act: int,
    need_ab: bool, need_w: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db, dweight, dbias), placeholders for those not asked for (bias: when there is none)."""
    if not use_triton(a, b):
        primals = (a, b, weight, weight.new_zeros(weight.shape[0]))
        da, db, dw, dbias = _library.reference_vjp(
            lambda a, b, w, bias: gated_down_proj_reference(a, b, w, bias, _ACTIVATION_NAMES[act]), primals, dy
        )
    else:
        da, db, dw, dbias = _backward(dy, as_rows(a), as_rows(b), weight, act, need_ab, need_w, need_bias)
    grads, needed = (da, db, dw, dbias), (need_ab, need_ab, need_w, need_bias)
    shapes = (a.shape, b.shape, weight.shape, (weight.shape[0],))
    return tuple(g.reshape(shape).contiguous() if need else _library.absent(weight)
                 for g, need, shape in zip(grads, needed, shapes))


def _gated_down_proj_setup(ctx, inputs, output):
    a, b, weight, bias, ctx.act = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(a, b, weight)


def _gated_down_proj_grad(ctx, dy):
    a, b, weight = ctx.saved_tensors
    need_a, need_b, need_w, need_bias, _ = ctx.needs_input_grad
    need_ab, need_bias = need_a or need_b, need_bias and ctx.has_bias
    da, db, dw, dbias = _gated_down_proj_backward_op(dy, a, b, weight, ctx.act, need_ab, need_w, need_bias)
    return (da if need_ab else None, db if need_ab else None, dw if need_w else None, dbias if need_bias else None,
            None)


_gated_down_proj_op.register_autograd(_gated_down_proj_grad, setup_context=_gated_down_proj_setup)
