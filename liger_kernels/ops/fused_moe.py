"""Fused MoE experts: softmax top-k routing, then SwiGLU experts as Triton grouped GEMMs.

Weights use the layout of transformers' 3-D experts (Qwen3-MoE, Mixtral, ... `*Experts` modules):
    gate_up_weight (E, 2I, H): rows [0, I) are the gate projection, rows [I, 2I) the up projection
    down_weight    (E, H, I)
    out[n] = sum_k w[n, k] * down[e] @ (silu(gate[e] @ x[n]) * (up[e] @ x[n])),   e = top_k_index[n, k]
An index equal to E means "no expert" (transformers uses it for experts of other ranks): it adds nothing.

Pipeline (forward): the N*K (token, slot) pairs are sorted by expert on the device (no host sync), so
each expert owns a contiguous run of "sorted rows"; a tile table lists (expert, first row) per BLOCK_M
rows. One grouped GEMM kernel serves four products; each program computes one [BLOCK_M, BLOCK_N]
tile of one expert, gathering token rows by index where needed:
    gate_up pre-activations  gu = x[tok] @ gate_up[e].T                  (saved for backward)
    expert outputs           y  = swiglu(gu) @ down[e].T                 SwiGLU in the A-operand prologue
    backward                 dgu = swiglu'(gu, w * dout[tok] @ down[e])   SwiGLU backward in the epilogue,
                                                                          with the routing-weight gradient
                             dx_rows = dgu @ gate_up[e]
A gather kernel then sums each token's top-k rows (weighted forward, unweighted for dx): deterministic,
no atomics. The weight gradients are a second grouped kernel, one program per (expert, output tile),
reducing over that expert's rows. Products run on tl.dot with fp32 accumulation (IEEE for fp32
inputs, never TF32); activations are rounded to the input dtype before each product, as the
per-expert torch loop does.

Memory: the forward saves gu (N*K, 2I) in the input dtype plus the routing tensors; the backward
recomputes silu(gate) * up from gu.

Under torch.compile the experts are one graph node (`torch.ops.liger.fused_moe_experts` and its
backward, see liger_kernels/_library.py); the routing plan stays inside them (the backward op
rebuilds it from top_k_index), so the data-dependent sort never reaches Dynamo.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels import _library, _utils
from liger_kernels._utils import check_float, check_same_device, new_output, on_input_device, use_triton

# Epilogues of the grouped GEMM kernel.
_PLAIN, _SWIGLU_BACKWARD = 0, 1


@triton.jit
def _silu_and_grad(g):
    sig = tl.sigmoid(g)
    return g * sig, sig * (1.0 + g * (1.0 - sig))


@triton.jit
def _round_to(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """fp32 x rounded to `dtype` to nearest even. The interpreter truncates fp32 -> bf16 (GPUs round):
    with EMULATE_RTNE the rounding bias is added to the bits first, so tests see the GPU's numbers."""
    if EMULATE_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    tok_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    offsets_ptr,
    gu_ptr,
    rw_ptr,
    dw_part_ptr,
    n_experts,
    n_k,
    n_n,
    a_stride,
    w_stride_e,
    w_stride_k,
    w_stride_n,
    out_stride,
    gu_stride,
    GATHER_A: tl.constexpr,
    SWIGLU_A: tl.constexpr,
    EPILOGUE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rows, cols] = A[rows] @ W[e] for one tile of sorted rows, all routed to expert e.

    W[e]'s element (k, n) is at w_ptr + e*w_stride_e + k*w_stride_k + n*w_stride_n, so a (E, N, K)
    weight is read transposed in place. A's row r is a_ptr[tok[r]] with GATHER_A (token rows of x or
    dout), else a_ptr[r]; with SWIGLU_A it is silu(gu[r, :K]) * gu[r, K:] (a_ptr is gu, width 2K).
    EPILOGUE _SWIGLU_BACKWARD: the product is d(swiglu output) before the routing weight; writes
    dgate, dup into out[rows, cols], out[rows, n_n + cols] and the routing-weight partial
    sum(product * swiglu(gu)) of this column tile into dw_part[rows, pid(1)].
    """
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= n_experts:  # the tile table is sized for the worst case; unused tiles hold e == E
        return
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)
    if GATHER_A:
        a_rows = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        a_rows = rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_n
    w_base = w_ptr + e.to(tl.int64) * w_stride_e + cols[None, :].to(tl.int64) * w_stride_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_k
        a_mask = row_mask[:, None] & k_mask[None, :]
        a_offs = a_rows[:, None] * a_stride + ks[None, :]
        if SWIGLU_A:
            g = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
            u = tl.load(a_ptr + a_offs + n_k, mask=a_mask, other=0.0).to(tl.float32)
            silu, _ = _silu_and_grad(g)
            a = _round_to(silu * u, a_ptr.dtype.element_ty, UPCAST)
        else:
            a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
        w = tl.load(w_base + ks[:, None] * w_stride_k, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot multiplies 16-bit bit patterns; fp32 products are exact
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc=acc, input_precision=PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    if EPILOGUE == 1:
        gu_offs = rows[:, None] * gu_stride + cols[None, :]
        g = tl.load(gu_ptr + gu_offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + gu_offs + n_n, mask=mask, other=0.0).to(tl.float32)
        silu, dsilu = _silu_and_grad(g)
        dw_part = tl.sum(acc * silu * u, axis=1)
        tl.store(dw_part_ptr + rows * tl.num_programs(1) + tl.program_id(1), dw_part, mask=row_mask)
        dh = acc * tl.load(rw_ptr + rows, mask=row_mask, other=0.0)[:, None]
        out_offs = rows[:, None] * out_stride + cols[None, :]
        tl.store(out_ptr + out_offs, _round_to(dh * u * dsilu, out_ptr.dtype.element_ty, UPCAST), mask=mask)
        tl.store(out_ptr + out_offs + n_n, _round_to(dh * silu, out_ptr.dtype.element_ty, UPCAST), mask=mask)
    else:
        out = _round_to(acc, out_ptr.dtype.element_ty, UPCAST)
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], out, mask=mask)


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    tok_ptr,
    offsets_ptr,
    rw_ptr,
    n_p,
    n_q,
    a_stride,
    b_stride,
    GATHER_A: tl.constexpr,
    SCALE_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SWIGLU_B: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[e] (P, Q) = A[rows_e].T @ B[rows_e] over expert e's sorted rows (zeros if it has none).

    A's row r is a_ptr[tok[r]] with GATHER_A, else a_ptr[r], times the routing weight rw[r] with
    SCALE_A. B likewise with GATHER_B; with SWIGLU_B B's row is silu(b[r, :Q]) * b[r, Q:].
    """
    e = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = ps < n_p
    q_mask = qs < n_q
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < end
        rs = rs.to(tl.int64)
        tok = rs
        if GATHER_A or GATHER_B:
            tok = tl.load(tok_ptr + rs, mask=r_mask, other=0).to(tl.int64)
        a_rows = rs
        if GATHER_A:
            a_rows = tok
        b_rows = rs
        if GATHER_B:
            b_rows = tok
        # A tile transposed: [BLOCK_P, BLOCK_R]
        a = tl.load(a_ptr + a_rows[None, :] * a_stride + ps[:, None], mask=p_mask[:, None] & r_mask[None, :], other=0.0)
        if SCALE_A:
            scale = tl.load(rw_ptr + rs, mask=r_mask, other=0.0)
            a = _round_to(a.to(tl.float32) * scale[None, :], a_ptr.dtype.element_ty, UPCAST)
        b_offs = b_rows[:, None] * b_stride + qs[None, :]
        b_mask = r_mask[:, None] & q_mask[None, :]
        if SWIGLU_B:
            g = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0).to(tl.float32)
            u = tl.load(b_ptr + b_offs + n_q, mask=b_mask, other=0.0).to(tl.float32)
            silu, _ = _silu_and_grad(g)
            b = _round_to(silu * u, b_ptr.dtype.element_ty, UPCAST)
        else:
            b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc=acc, input_precision=PRECISION)
    out = out_ptr + e.to(tl.int64) * n_p * n_q + ps[:, None].to(tl.int64) * n_q + qs[None, :]
    tl.store(out, _round_to(acc, out_ptr.dtype.element_ty, UPCAST), mask=p_mask[:, None] & q_mask[None, :])


@triton.jit
def _combine_kernel(
    rows_ptr,
    pos_ptr,
    idx_ptr,
    rw_ptr,
    out_ptr,
    n_experts,
    n_h,
    TOP_K: tl.constexpr,
    WEIGHTED: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[n, cols] = sum_k rw[n, k] * rows[pos[n, k], cols] (rw = 1 unless WEIGHTED), in fp32;
    slots whose expert index is E ("no expert") add nothing."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_h
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        width = tl.where(tl.load(idx_ptr + n * TOP_K + k) < n_experts, n_h, 0)  # 0: no expert
        row = tl.load(pos_ptr + n * TOP_K + k).to(tl.int64)
        y = tl.load(rows_ptr + row * n_h + cols, mask=cols < width, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(rw_ptr + n * TOP_K + k)
        acc += y
    tl.store(out_ptr + n * n_h + cols, _round_to(acc, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)


# ---- launch helpers ---------------------------------------------------------------------------------


def _gemm_config(n_pairs: int, n_experts: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMM. BLOCK_M follows the
    mean rows per expert (decode-sized batches waste less of a tile); no device sync needed."""
    if _utils.INTERPRET:  # small tiles: the tests' tiny shapes still cover several tiles per expert
        return 16, 32, 32, 4, 1
    block_m = min(64, max(16, triton.next_power_of_2(max(1, n_pairs // max(1, n_experts)))))
    return block_m, 128, 64, 4 if block_m <= 32 else 8, 3


def _weight_grad_config():
    if _utils.INTERPRET:
        return 32, 32, 16, 4, 1
    return 128, 128, 32, 8, 3


def _precision(dtype: torch.dtype) -> str:
    # fp32 products must not round to TF32; 16-bit MMAs ignore the setting ("tf32", the default). The
    # interpreter upcasts 16-bit operands to fp32 (UPCAST), which "tf32" would then round.
    return "ieee" if dtype == torch.float32 or _utils.INTERPRET else "tf32"


class _Plan:
    """Routing layout on the device: sorted rows grouped by expert and the tile table."""

    def __init__(self, top_k_index: torch.Tensor, n_experts: int, block_m: int):
        n_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted row -> flat slot n * K + k
        self.tok = (order // top_k).to(torch.int32)  # sorted row -> token
        self.pos = torch.empty_like(order)  # flat slot -> sorted row
        self.pos[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts]  # index E: no expert
        self.offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=flat.device)
        self.offsets[1:] = torch.cumsum(counts, 0)
        tiles = (counts + block_m - 1) // block_m
        tiles_end = torch.cumsum(tiles, 0)
        # Upper bound of sum(ceil(count_e / BLOCK_M)) known on the host: the grid size needs no sync.
        self.n_tiles = _utils.cdiv(flat.numel(), block_m) + n_experts
        t = torch.arange(self.n_tiles, device=flat.device)
        expert = torch.searchsorted(tiles_end, t, right=True)  # E past the last real tile
        safe = expert.clamp(max=n_experts - 1)
        self.tile_expert = expert.to(torch.int32)
        self.tile_row = (self.offsets[safe] + (t - (tiles_end[safe] - tiles[safe])) * block_m).to(torch.int32)
        self.order = order


def _grouped_gemm(a, w, w_strides, n_k, n_n, plan, cfg, *, out, gather_a=False, swiglu_a=False,
                  gu=None, rw=None, dw_part=None):
    block_m, block_n, block_k, num_warps, num_stages = cfg
    grid = (plan.n_tiles, _utils.cdiv(n_n, block_n))
    epilogue = _SWIGLU_BACKWARD if gu is not None else _PLAIN
    _grouped_gemm_kernel[grid](
        a, w, out, plan.tok, plan.tile_expert, plan.tile_row, plan.offsets,
        gu if gu is not None else a, rw if rw is not None else a, dw_part if dw_part is not None else out,
        w.shape[0], n_k, n_n, a.stride(0), *w_strides, out.stride(0), gu.stride(0) if gu is not None else 0,
        GATHER_A=gather_a, SWIGLU_A=swiglu_a, EPILOGUE=epilogue, UPCAST=_utils.INTERPRET,
        PRECISION=_precision(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _grouped_weight_grad(a, b, n_p, n_q, plan, n_experts, dtype, *, gather_a=False, rw=None,
                         gather_b=False, swiglu_b=False):
    block_p, block_q, block_r, num_warps, num_stages = _weight_grad_config()
    out = new_output((n_experts, n_p, n_q), dtype, a.device)
    grid = (n_experts, _utils.cdiv(n_p, block_p), _utils.cdiv(n_q, block_q))
    _grouped_weight_grad_kernel[grid](
        a, b, out, plan.tok, plan.offsets, rw if rw is not None else a, n_p, n_q, a.stride(0), b.stride(0),
        GATHER_A=gather_a, SCALE_A=rw is not None, GATHER_B=gather_b, SWIGLU_B=swiglu_b,
        UPCAST=_utils.INTERPRET, PRECISION=_precision(a.dtype), BLOCK_P=block_p, BLOCK_Q=block_q,
        BLOCK_R=block_r, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _combine(rows, plan, top_k_index, weights, n_tokens, n_h, dtype):
    out = new_output((n_tokens, n_h), dtype, rows.device)
    block = min(1024, triton.next_power_of_2(n_h))
    _combine_kernel[(n_tokens, _utils.cdiv(n_h, block))](
        rows, plan.pos, top_k_index, weights if weights is not None else rows, out,
        plan.offsets.numel() - 1, n_h, TOP_K=top_k_index.shape[1], WEIGHTED=weights is not None,
        EMULATE_RTNE=_utils.INTERPRET, BLOCK=block, num_warps=4,
    )
    return out


def _moe_forward(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight):
    """(out, gu, plan, sorted routing weights in fp32)."""
    n_tokens, n_h = hidden.shape
    n_experts, two_i, _ = gate_up_weight.shape
    n_i = two_i // 2
    cfg = _gemm_config(top_k_index.numel(), n_experts)
    plan = _Plan(top_k_index, n_experts, cfg[0])
    n_rows = top_k_index.numel()
    gu = _grouped_gemm(
        hidden, gate_up_weight, (gate_up_weight.stride(0), 1, n_h), n_h, two_i, plan, cfg,
        out=new_output((n_rows, two_i), hidden.dtype, hidden.device), gather_a=True,
    )
    y = _grouped_gemm(
        gu, down_weight, (down_weight.stride(0), 1, n_i), n_i, n_h, plan, cfg,
        out=new_output((n_rows, n_h), hidden.dtype, hidden.device), swiglu_a=True,
    )
    weights = top_k_weights.float().contiguous()
    out = _combine(y, plan, top_k_index, weights, n_tokens, n_h, hidden.dtype)
    return out, gu, plan, cfg, weights


class FusedMoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up_weight, down_weight):
        out, gu, plan, cfg, weights = _moe_forward(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight)
        ctx.save_for_backward(hidden, top_k_index, weights, gate_up_weight, down_weight, gu)
        ctx.plan, ctx.cfg, ctx.weights_dtype = plan, cfg, top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        hidden, top_k_index, weights, gate_up_weight, down_weight, gu = ctx.saved_tensors
        d_hidden, d_weights, d_gate_up, d_down = _moe_backward(
            dout, hidden, top_k_index, weights, gate_up_weight, down_weight, gu, ctx.plan, ctx.cfg,
            ctx.weights_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3],
            ctx.needs_input_grad[4],
        )
        return d_hidden, None, d_weights, d_gate_up, d_down


def _moe_backward(dout, hidden, top_k_index, weights, gate_up_weight, down_weight, gu, plan, cfg, weights_dtype,
                  compute_dh, compute_dweights, compute_dgu, compute_ddown):
    """(d_hidden, d_weights, d_gate_up, d_down), None for those not asked for. `weights`: the routing
    weights in fp32."""
    n_tokens, n_h = hidden.shape
    n_experts, two_i, _ = gate_up_weight.shape
    n_i = two_i // 2
    n_rows = top_k_index.numel()
    dout = dout.contiguous()
    sorted_w = weights.reshape(-1)[plan.order]
    dw_part = new_output((n_rows, _utils.cdiv(n_i, cfg[1])), torch.float32, hidden.device)
    # dgu = swiglu backward of (w * dout[tok] @ down[e]); down[e] (H, I) read as (k=H, n=I).
    dgu = _grouped_gemm(
        dout, down_weight, (down_weight.stride(0), n_i, 1), n_h, n_i, plan, cfg,
        out=new_output((n_rows, two_i), hidden.dtype, hidden.device), gather_a=True,
        gu=gu, rw=sorted_w, dw_part=dw_part,
    )
    d_hidden = d_weights = d_gate_up = d_down = None
    if compute_dh:
        dx_rows = _grouped_gemm(
            dgu, gate_up_weight, (gate_up_weight.stride(0), n_h, 1), two_i, n_h, plan, cfg,
            out=new_output((n_rows, n_h), hidden.dtype, hidden.device),
        )
        d_hidden = _combine(dx_rows, plan, top_k_index, None, n_tokens, n_h, hidden.dtype)
    if compute_dweights:
        # Rows of "no expert" slots are never written; their gradient is zero.
        dw = dw_part.sum(1)[plan.pos].view(top_k_index.shape)
        d_weights = torch.where(top_k_index < n_experts, dw, 0.0).to(weights_dtype)
    if compute_dgu:
        d_gate_up = _grouped_weight_grad(
            dgu, hidden, two_i, n_h, plan, n_experts, gate_up_weight.dtype, gather_b=True
        )
    if compute_ddown:
        d_down = _grouped_weight_grad(
            dout, gu, n_h, n_i, plan, n_experts, down_weight.dtype, gather_a=True, rw=sorted_w,
            swiglu_b=True,
        )
    return d_hidden, d_weights, d_gate_up, d_down


# ---- torch reference (the specification) ------------------------------------------------------------


def moe_routing(router_logits: torch.Tensor, top_k: int, normalize_topk: bool = True):
    """(top_k_weights (N, K), top_k_index (N, K)): softmax over experts in fp32 (fp64 for fp64
    logits), top-k, renormalized to sum to one when `normalize_topk` (Mixtral, Qwen3-MoE's
    norm_topk_prob). The weights stay in fp32, as Mixtral's router returns them."""
    probs = torch.softmax(router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if normalize_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


def fused_moe_experts_reference(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight):
    """The per-expert loop of transformers' `*Experts.forward`, in fp32 (fp64 for fp64 inputs)."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    x = hidden.to(compute)
    out = torch.zeros_like(x)
    for e in range(gate_up_weight.shape[0]):
        token, slot = torch.where(top_k_index == e)
        gate, up = torch.nn.functional.linear(x[token], gate_up_weight[e].to(compute)).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_weight[e].to(compute))
        out = out.index_add(0, token, y * top_k_weights[token, slot, None].to(compute))
    return out.to(hidden.dtype)


def fused_moe_reference(hidden, router_logits, gate_up_weight, down_weight, top_k, normalize_topk=True):
    weights, index = moe_routing(router_logits, top_k, normalize_topk)
    return fused_moe_experts_reference(hidden, index, weights, gate_up_weight, down_weight)


# ---- public functions --------------------------------------------------------------------------------


def _check_experts(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight):
    check_float("hidden", hidden)
    check_float("gate_up_weight", gate_up_weight)
    check_float("down_weight", down_weight)
    check_float("top_k_weights", top_k_weights)
    check_same_device(hidden=hidden, top_k_index=top_k_index, top_k_weights=top_k_weights,
                      gate_up_weight=gate_up_weight, down_weight=down_weight)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (tokens, hidden_size), got shape {tuple(hidden.shape)}")
    if gate_up_weight.dim() != 3 or gate_up_weight.shape[1] % 2:
        raise ValueError(
            f"gate_up_weight must be (num_experts, 2 * intermediate, hidden_size), got {tuple(gate_up_weight.shape)}"
        )
    n_experts, two_i, n_h = gate_up_weight.shape
    if n_h != hidden.shape[1]:
        raise ValueError(f"gate_up_weight has hidden size {n_h} but hidden has {hidden.shape[1]}")
    if tuple(down_weight.shape) != (n_experts, n_h, two_i // 2):
        raise ValueError(
            f"down_weight must be (num_experts, hidden_size, intermediate) = {(n_experts, n_h, two_i // 2)}, "
            f"got {tuple(down_weight.shape)}"
        )
    if not (hidden.dtype == gate_up_weight.dtype == down_weight.dtype):
        raise TypeError(
            f"hidden ({hidden.dtype}), gate_up_weight ({gate_up_weight.dtype}) and down_weight "
            f"({down_weight.dtype}) must have the same dtype"
        )
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dtype.is_floating_point or top_k_index.is_complex() \
            or top_k_index.dtype == torch.bool:
        raise TypeError("top_k_index must be an integer tensor of expert indices")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"top_k_index must be (tokens, top_k) with {hidden.shape[0]} tokens, got {tuple(top_k_index.shape)}"
        )
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights {tuple(top_k_weights.shape)} must have top_k_index's shape {tuple(top_k_index.shape)}"
        )
    if top_k_index.numel() == 0:
        return
    bad = (top_k_index < 0) | (top_k_index > n_experts)
    message = f"top_k_index values must be in [0, {n_experts}] ({n_experts} = no expert)"
    if top_k_index.is_cuda or _library.compiling():  # a host check would sync every call (or break the graph)
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(f"{message}; got {top_k_index[bad][:5].tolist()}")


@on_input_device
def fused_moe_experts(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight):
    """SwiGLU experts of transformers' `*Experts.forward(hidden_states, top_k_index, top_k_weights)`:
    hidden (N, H), top_k_index (N, K) in [0, E] (E: no expert), top_k_weights (N, K),
    gate_up_weight (E, 2I, H), down_weight (E, H, I) -> (N, H) in hidden's dtype."""
    _check_experts(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight)
    if _library.compiling() and top_k_index.numel():  # one graph node under torch.compile
        return _fused_moe_experts_op(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight)[0]
    if not use_triton(hidden, gate_up_weight, down_weight) or top_k_index.numel() == 0:
        return fused_moe_experts_reference(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight)
    return FusedMoEExpertsFunction.apply(
        hidden.contiguous(), top_k_index.contiguous(), top_k_weights, gate_up_weight.contiguous(),
        down_weight.contiguous(),
    )


@on_input_device
def fused_moe(hidden, router_logits, gate_up_weight, down_weight, top_k, normalize_topk=True):
    """Mixture-of-experts SwiGLU MLP: softmax top-k routing of `router_logits` (N, E), then the
    experts (see `fused_moe_experts`). Gradients flow to hidden, router_logits and both weights."""
    check_float("router_logits", router_logits)
    if router_logits.dim() != 2 or router_logits.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"router_logits must be (tokens, num_experts) with {hidden.shape[0]} tokens, "
            f"got {tuple(router_logits.shape)}"
        )
    n_experts = gate_up_weight.shape[0] if gate_up_weight.dim() == 3 else -1
    if router_logits.shape[1] != n_experts:
        raise ValueError(f"router_logits has {router_logits.shape[1]} experts but gate_up_weight has {n_experts}")
    if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be an integer in [1, {n_experts}], got {top_k!r}")
    weights, index = moe_routing(router_logits, top_k, normalize_topk)
    return fused_moe_experts(hidden, index, weights, gate_up_weight, down_weight)


# ---- torch.library ops: what torch.compile records (see liger_kernels/_library.py) ---------------
# The routing plan (argsort/bincount on the device) stays inside the ops: the forward's outputs have
# static shapes, and the backward recomputes the plan from top_k_index (a few small device ops)
# instead of saving it. The forward's second output is gu (N*K, 2I), saved for the backward; the
# reference path (whose gradients come from autograd through the reference) returns zeros there.


def _fused_moe_experts_fake(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight):
    return hidden.new_empty(hidden.shape), hidden.new_empty((top_k_index.numel(), gate_up_weight.shape[1]))


@_library.custom_op("fused_moe_experts", _fused_moe_experts_fake)
def _fused_moe_experts_op(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, gu)."""
    if not use_triton(hidden, gate_up_weight, down_weight):
        out = fused_moe_experts_reference(hidden, top_k_index, top_k_weights, gate_up_weight, down_weight)
        return out.contiguous(), hidden.new_zeros((top_k_index.numel(), gate_up_weight.shape[1]))
    out, gu, _, _, _ = _moe_forward(
        hidden.contiguous(), top_k_index.contiguous(), top_k_weights, gate_up_weight.contiguous(),
        down_weight.contiguous(),
    )
    return out, gu


def _fused_moe_experts_backward_fake(dout, hidden, top_k_index, top_k_weights, gate_up_weight, down_weight, gu,
                                     compute_dh, compute_dweights, compute_dgu, compute_ddown):
    return (
        _library.fake_grad(hidden, compute_dh),
        _library.fake_grad(top_k_weights, compute_dweights),
        gate_up_weight.new_empty(gate_up_weight.shape) if compute_dgu else _library.absent(hidden),
        down_weight.new_empty(down_weight.shape) if compute_ddown else _library.absent(hidden),
    )


@_library.custom_op("fused_moe_experts_backward", _fused_moe_experts_backward_fake)
def _fused_moe_experts_backward_op(
    dout: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gu: torch.Tensor,
    compute_dh: bool,
    compute_dweights: bool,
    compute_dgu: bool,
    compute_ddown: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_top_k_weights, d_gate_up, d_down); placeholders for the gradients not asked for."""
    if not use_triton(hidden, gate_up_weight, down_weight):
        grads = _library.reference_vjp(
            lambda x, w, gate_up, down: fused_moe_experts_reference(x, top_k_index, w, gate_up, down),
            (hidden, top_k_weights, gate_up_weight, down_weight), dout,
        )
        grads = [g.contiguous() if needed else None
                 for g, needed in zip(grads, (compute_dh, compute_dweights, compute_dgu, compute_ddown))]
    else:
        hidden, top_k_index = hidden.contiguous(), top_k_index.contiguous()
        gate_up_weight, down_weight = gate_up_weight.contiguous(), down_weight.contiguous()
        n_experts = gate_up_weight.shape[0]
        cfg = _gemm_config(top_k_index.numel(), n_experts)
        plan = _Plan(top_k_index, n_experts, cfg[0])
        grads = _moe_backward(
            dout, hidden, top_k_index, top_k_weights.float().contiguous(), gate_up_weight, down_weight, gu, plan,
            cfg, top_k_weights.dtype, compute_dh, compute_dweights, compute_dgu, compute_ddown,
        )
    d_hidden, d_weights, d_gate_up, d_down = grads
    return (
        d_hidden if d_hidden is not None else _library.absent(hidden),
        d_weights if d_weights is not None else _library.absent(top_k_weights),
        d_gate_up if d_gate_up is not None else _library.absent(hidden),
        d_down if d_down is not None else _library.absent(hidden),
    )


def _fused_moe_experts_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _fused_moe_experts_grad(ctx, dout, _dgu):
    needs = ctx.needs_input_grad
    d_hidden, d_weights, d_gate_up, d_down = _fused_moe_experts_backward_op(
        dout, *ctx.saved_tensors, needs[0], needs[2], needs[3], needs[4]
    )
    return (
        d_hidden if needs[0] else None,
        None,
        d_weights if needs[2] else None,
        d_gate_up if needs[3] else None,
        d_down if needs[4] else None,
    )


_fused_moe_experts_op.register_autograd(_fused_moe_experts_grad, setup_context=_fused_moe_experts_setup)
