"""Row tiles shared by the elementwise-style ops (glu, kl_div, jsd, tvd, dyt, relu_squared).

A tensor (..., N) is seen as rows (M, N) with unit column stride and any row stride. A 2-D grid of
programs covers it in [BLOCK_M, BLOCK_N] tiles of about `_TILE_ELEMENTS` elements: one slice of a
wide row, or several narrow rows packed together, so every program moves a few KiB whatever the
shape and no width is too wide.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_kernels._utils import new_output

_TILE_ELEMENTS = 2048


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; a view whenever the layout allows (no copy).

    A 2-D tensor with unit column stride is returned as is (no torch op: this runs on every call).
    """
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def from_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rows y (M, N') an autograd Function computed from `as_rows(x)`, back in x's leading shape
    (..., N'). Done outside the Function: a view made inside one could not be modified in place."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def tile_config(n_rows: int, n_cols: int, tile_elements: int = _TILE_ELEMENTS, max_warps: int = 8):
    """(grid, BLOCK_M, BLOCK_N, num_warps) of a 2-D tile grid over an (n_rows, n_cols) tensor, tiles of
    about `tile_elements` (a power of two)."""
    block_n = min(triton.next_power_of_2(n_cols), tile_elements)
    block_m = max(1, min(tile_elements // block_n, triton.next_power_of_2(n_rows)))
    num_warps = max(1, min(max_warps, block_m * block_n // 256))
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    return grid, block_m, block_n, num_warps


@triton.jit
def tile_offsets(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices [BLOCK_M, 1] (int64: element offsets may pass 2**31), columns [1, BLOCK_N] and
    the element mask of this program's tile."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def store_partial(partial_ptr, value):
    """Store this program's fp32 partial sum at its flat grid index (no atomics: the caller sums)."""
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), value)


def new_partials(grid, device) -> torch.Tensor:
    """One fp32 slot per program of a 2-D grid (poisoned in tests: every program must write its slot)."""
    return new_output((grid[0] * grid[1],), torch.float32, device)
