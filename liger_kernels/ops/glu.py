"""Gated activations: swiglu(a, b) = silu(a) * b and geglu(a, b) = gelu(a) * b.

One forward and one backward kernel, both parametrized by a constexpr activation. The forward saves
only a and b; the backward recomputes the activation and its derivative from a (no saved activation):
    c = f(a) * b,   da = dc * b * f'(a),   db = dc * f(a)
Math in fp32, outputs in the input dtype. Inputs are seen as rows of width I (the last dimension) with
any row stride, so the halves of a fused gate/up projection (`chunk(2, dim=-1)`) are read in place.
The grid is 2-D (row blocks x column blocks, `_tiles.py`), so any width works.

`swiglu_gate_up(gate_up)` is swiglu on the two halves of one fused projection (Phi-3, GLM-4:
`gate, up = gate_up.chunk(2, dim=-1)`): the same kernels read the halves in place, and its backward
writes d_gate and d_up into the two halves of one (..., 2I) gradient, so no concatenation follows.

Memory: the backward allocates new da and db. It never writes into a or b (saved tensors the caller
may still hold) nor into dc (autograd may hand the same gradient tensor to several consumers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels import _library
from liger_kernels._utils import check_float, check_same_device, new_output, on_input_device, use_triton
from liger_kernels.ops._tiles import as_rows, tile_config, tile_offsets

# Values of the kernels' constexpr ACT (branches of `_activation`).
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2
_GELU_ACTIVATIONS = {"tanh": _GELU_TANH, "none": _GELU_ERF}


# (elements per tile, most warps) of the glu kernels' 2-D tile grid (ops/_tiles.py); read at every
# call (scripts/glu_tile_sweep.py times others on a GPU).
GLU_TILES = (8192, 16)  # H100 sweep (docs/bench/glu_tiles_h100.json): 98% -> 101% of copy bandwidth


@triton.jit
def _activation(a, ACT: tl.constexpr):
    """(f(a), f'(a)) in fp32; the forward kernel drops f'(a), which the compiler then never computes."""
    if ACT == 0:  # silu
        sig = tl.sigmoid(a)
        f = a * sig
        df = sig * (1.0 + a * (1.0 - sig))
    elif ACT == 1:  # gelu, tanh approximation; 0.7978845608028654 = sqrt(2 / pi)
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: tanh without overflow for large |u|
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(u < 0, -th, th)
        f = 0.5 * a * (1.0 + th)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        df = 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * du
    else:  # gelu, exact; 0.7071067811865476 = 1 / sqrt(2), 0.3989422804014327 = 1 / sqrt(2 pi)
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        f = a * cdf
        df = cdf + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    return f, df


@triton.jit
def _glu_forward_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_stride,
    b_stride,
    c_stride,
    n_rows,
    n_cols,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    a = tl.load(a_ptr + rows * a_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows * b_stride + cols, mask=mask, other=0.0).to(tl.float32)
    f, _ = _activation(a, ACT)
    tl.store(c_ptr + rows * c_stride + cols, (f * b).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(
    dc_ptr,
    a_ptr,
    b_ptr,
    da_ptr,
    db_ptr,
    c_ptr,
    dc_stride,
    a_stride,
    b_stride,
    out_stride,
    n_rows,
    n_cols,
    ACT: tl.constexpr,
    WRITE_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # da may be dc's own buffer: each element is read before it is written, by the same program.
    rows, cols, mask = tile_offsets(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dc = tl.load(dc_ptr + rows * dc_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rows * a_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows * b_stride + cols, mask=mask, other=0.0).to(tl.float32)
    f, df = _activation(a, ACT)
    out = rows * out_stride + cols
    tl.store(da_ptr + out, (dc * b * df).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + out, (dc * f).to(db_ptr.dtype.element_ty), mask=mask)
    if WRITE_C:  # the forward's f(a) * b again, while a and b are in registers anyway
        tl.store(c_ptr + out, (f * b).to(c_ptr.dtype.element_ty), mask=mask)


def _glu_forward(a: torch.Tensor, b: torch.Tensor, act: int, out_shape=None) -> torch.Tensor:
    """f(a) * b, a new contiguous tensor shaped `out_shape` (default a's shape). Allocated in that shape
    (the kernel writes through a 2-D view of it), not viewed into it: autograd Functions return it, and
    a view made inside one could not be modified in place."""
    a2, b2 = as_rows(a), as_rows(b)
    n_rows, n_cols = a2.shape
    out = new_output(a.shape if out_shape is None else out_shape, a.dtype, a.device)
    c = out.view(n_rows, n_cols)
    if c.numel():
        grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols, *GLU_TILES)
        _glu_forward_kernel[grid](
            a2,
            b2,
            c,
            a2.stride(0),
            b2.stride(0),
            n_cols,
            n_rows,
            n_cols,
            ACT=act,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return out


def _launch_glu_backward(dc2, a2, b2, da2, db2, act: int, c2=None) -> None:
    """Write the gradients of (M, I) rows into da2, db2 (and f(a) * b into c2 if given): (M, I) with unit
    column stride and one row stride. da2 may be dc2 itself."""
    n_rows, n_cols = a2.shape
    if n_rows * n_cols == 0:
        return
    grid, block_m, block_n, num_warps = tile_config(n_rows, n_cols, *GLU_TILES)
    _glu_backward_kernel[grid](
        dc2,
        a2,
        b2,
        da2,
        db2,
        da2 if c2 is None else c2,
        dc2.stride(0),
        a2.stride(0),
        b2.stride(0),
        da2.stride(0),
        n_rows,
        n_cols,
        ACT=act,
        WRITE_C=c2 is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )


def _glu_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, act: int):
    a2 = as_rows(a)
    da = new_output(a2.shape, a.dtype, a.device)
    db = new_output(a2.shape, b.dtype, b.device)
    _launch_glu_backward(as_rows(dc), a2, as_rows(b), da, db, act)
    return da.view(a.shape), db.view(b.shape)


def _glu_backward_and_output(dc2: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, act: int):
    """(da, db, c = f(a) * b) of (M, I) rows in one pass; da is written over dc2, which must be a
    contiguous tensor of the caller's own (nothing else may read it afterwards)."""
    db = new_output(a2.shape, b2.dtype, b2.device)
    c = new_output(a2.shape, a2.dtype, a2.device)
    _launch_glu_backward(dc2, a2, b2, dc2, db, act, c2=c)
    return dc2, db, c


class GLUFunction(torch.autograd.Function):
    """(a, b) -> f(a) * b for the constexpr activation `act`; saves a and b only."""

    @staticmethod
    def forward(ctx, a, b, act: int):
        ctx.save_for_backward(a, b)
        ctx.act = act
        return _glu_forward(a, b, act)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        da, db = _glu_backward(dc, a, b, ctx.act)
        return da, db, None


def _swiglu_gate_up_forward(gate_up: torch.Tensor) -> torch.Tensor:
    rows = as_rows(gate_up)
    width = rows.shape[1] // 2
    return _glu_forward(rows[:, :width], rows[:, width:], _SILU, (*gate_up.shape[:-1], width))


def _swiglu_gate_up_backward(dc: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d_gate_up: (d_gate, d_up) written into the two halves of one new tensor shaped like gate_up."""
    rows = as_rows(gate_up)
    width = rows.shape[1] // 2
    d_rows = new_output(rows.shape, gate_up.dtype, gate_up.device)
    _launch_glu_backward(
        as_rows(dc), rows[:, :width], rows[:, width:], d_rows[:, :width], d_rows[:, width:], _SILU
    )
    return d_rows.view(gate_up.shape)


class SwiGLUGateUpFunction(torch.autograd.Function):
    """gate_up (..., 2I) -> silu(gate) * up (..., I); saves gate_up only."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _swiglu_gate_up_forward(gate_up)

    @staticmethod
    def backward(ctx, dc):
        (gate_up,) = ctx.saved_tensors
        return _swiglu_gate_up_backward(dc, gate_up)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Torch specification of swiglu: silu(a) * b in fp32 (fp64 for fp64 inputs), input dtype out."""
    compute = torch.promote_types(a.dtype, torch.float32)
    return (torch.nn.functional.silu(a.to(compute)) * b.to(compute)).to(a.dtype)


def geglu_reference(a: torch.Tensor, b: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Torch specification of geglu: gelu(a, approximate) * b in fp32 (fp64 for fp64 inputs)."""
    compute = torch.promote_types(a.dtype, torch.float32)
    gate = torch.nn.functional.gelu(a.to(compute), approximate=approximate)
    return (gate * b.to(compute)).to(a.dtype)


def _check_glu_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    check_float("a", a)
    check_float("b", b)
    check_same_device(a=a, b=b)
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    if a.dtype != b.dtype:
        raise TypeError(f"a ({a.dtype}) and b ({b.dtype}) must have the same dtype")
    if a.dim() == 0:
        raise ValueError("a and b must have at least one dimension (rows of width a.shape[-1])")


@on_input_device
def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (the LLaMA MLP gate: a = gate_proj(x), b = up_proj(x))."""
    _check_glu_inputs(a, b)
    if _library.compiling():  # one graph node under torch.compile
        return _glu_op(a, b, _SILU)
    if not use_triton(a, b):
        return swiglu_reference(a, b)
    return GLUFunction.apply(a, b, _SILU)


@on_input_device
def geglu(a: torch.Tensor, b: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(a, approximate) * b with approximate "tanh" (Gemma's gelu_pytorch_tanh) or "none" (erf)."""
    if approximate not in _GELU_ACTIVATIONS:
        raise ValueError(f'approximate must be "tanh" or "none", got {approximate!r}')
    _check_glu_inputs(a, b)
    if _library.compiling():  # one graph node under torch.compile
        return _glu_op(a, b, _GELU_ACTIVATIONS[approximate])
    if not use_triton(a, b):
        return geglu_reference(a, b, approximate)
    return GLUFunction.apply(a, b, _GELU_ACTIVATIONS[approximate])


def swiglu_gate_up_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch specification of swiglu_gate_up: silu(gate) * up, gate, up = gate_up.chunk(2, dim=-1)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)


@on_input_device
def swiglu_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up = gate_up.chunk(2, dim=-1): the MLP gate of Phi-3 and GLM-4, whose
    gate_up_proj computes both in one matrix product. (..., 2I) -> (..., I); the gradient is one (..., 2I)
    tensor."""
    check_float("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must have an even last dimension (gate and up halves), got shape {tuple(gate_up.shape)}"
        )
    if _library.compiling():  # one graph node under torch.compile
        return _swiglu_gate_up_op(gate_up)
    if not use_triton(gate_up):
        return swiglu_gate_up_reference(gate_up)
    return SwiGLUGateUpFunction.apply(gate_up)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------


def _glu_reference(a, b, act: int):
    if act == _SILU:
        return swiglu_reference(a, b)
    return geglu_reference(a, b, "tanh" if act == _GELU_TANH else "none")


@_library.custom_op("glu", lambda a, b, act: a.new_empty(a.shape))
def _glu_op(a: torch.Tensor, b: torch.Tensor, act: int) -> torch.Tensor:
    """f(a) * b for the activation code `act` (_SILU, _GELU_TANH, _GELU_ERF)."""
    if not use_triton(a, b):
        return _glu_reference(a, b, act).contiguous()
    return _glu_forward(a, b, act)


@_library.custom_op("glu_backward", lambda dc, a, b, act: (a.new_empty(a.shape), b.new_empty(b.shape)))
def _glu_backward_op(
    dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, act: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db)."""
    if not use_triton(a, b):
        da, db = _library.reference_vjp(lambda a, b: _glu_reference(a, b, act), (a, b), dc)
        return da.contiguous(), db.contiguous()
    return _glu_backward(dc, a, b, act)


def _glu_setup(ctx, inputs, output):
    a, b, ctx.act = inputs
    ctx.save_for_backward(a, b)


def _glu_grad(ctx, dc):
    a, b = ctx.saved_tensors
    return (*_glu_backward_op(dc, a, b, ctx.act), None)


_glu_op.register_autograd(_glu_grad, setup_context=_glu_setup)


@_library.custom_op(
    "swiglu_gate_up", lambda gate_up: gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
)
def _swiglu_gate_up_op(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the halves of gate_up."""
    if not use_triton(gate_up):
        return swiglu_gate_up_reference(gate_up).contiguous()
    return _swiglu_gate_up_forward(gate_up)


@_library.custom_op("swiglu_gate_up_backward", lambda dc, gate_up: gate_up.new_empty(gate_up.shape))
def _swiglu_gate_up_backward_op(dc: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d_gate_up."""
    if not use_triton(gate_up):
        (d_gate_up,) = _library.reference_vjp(swiglu_gate_up_reference, (gate_up,), dc)
        return d_gate_up.contiguous()
    return _swiglu_gate_up_backward(dc, gate_up)


def _swiglu_gate_up_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_gate_up_grad(ctx, dc):
    (gate_up,) = ctx.saved_tensors
    return _swiglu_gate_up_backward_op(dc, gate_up)


_swiglu_gate_up_op.register_autograd(_swiglu_gate_up_grad, setup_context=_swiglu_gate_up_setup)
