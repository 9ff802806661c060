"""Shared plumbing for every op: dispatch (Triton vs torch reference), input checks, launch sizes.

One place for each of these concepts so that every op behaves the same way:
- CUDA tensors run Triton; CPU tensors run the torch reference, unless the Triton interpreter is forced
  with ``TRITON_INTERPRET=1`` (set before triton is imported), which is how the tests run kernels on CPU.
- Bad input raises ``ValueError``/``TypeError`` naming the argument, before any kernel launches.
- ``LIGER_POISON_OUTPUTS=1`` (read at import) makes every kernel output start as NaN, so tests catch
  unwritten elements.
- Kernels launch on their inputs' GPU (``on_input_device``), whichever GPU is current.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from liger_kernels._library import compiling

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest row a single-program-per-row kernel keeps in registers (elements). Wider rows are refused
# with a clear error rather than compiled into a kernel that spills or fails.
MAX_FUSED_SIZE = 65536


def on_input_device(fn):
    """Decorator for the functions that launch kernels: run `fn` with the GPU of its first tensor
    argument as the current CUDA device. Triton launches on the current device, not the tensors' one,
    so a model spread over GPUs (`device_map="auto"`, pipeline stages) would otherwise launch every
    layer's kernels on GPU 0 (an illegal address or a wrong result). Backward passes need nothing:
    autograd runs each node with its inputs' device current. While Dynamo traces, the ops are custom
    op nodes, launched by the compiled graph."""

    @functools.wraps(fn)
    def run_on_input_device(*args, **kwargs):
        if not compiling():
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None and first.is_cuda and first.device.index != torch.cuda.current_device():
                with torch.cuda.device(first.device):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run_on_input_device


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run for these tensors (all on CUDA, or interpreter forced)."""
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors if t is not None)


# Read once: new_output runs several times per op call, and an environment lookup per call is
# measurable host time on small ops. `poisoned_outputs()` switches it on for a block (bench selfcheck).
_POISON = os.environ.get("LIGER_POISON_OUTPUTS", "0") == "1"


def poison_enabled() -> bool:
    return _POISON


@contextlib.contextmanager
def poisoned_outputs():
    """Outputs start as NaN inside the block (unwritten elements show up), whatever the environment."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. Filled with NaN in poison mode (tests), else left uninitialized."""
    if poison_enabled() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return new_output(t.shape, dtype or t.dtype, t.device)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported dtypes are float32, bfloat16 and float16"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_last_dim(name: str, t: torch.Tensor, expected: int, what: str) -> None:
    if t.shape[-1] != expected:
        raise ValueError(
            f"{name} has last dimension {t.shape[-1]} but {what} is {expected}"
        )


def check_row_size(name: str, n: int, limit: int = MAX_FUSED_SIZE) -> None:
    if n > limit:
        raise ValueError(
            f"{name} has a row of {n} elements; this kernel supports at most {limit}. "
            "Use the torch reference (CPU tensors) or split the row."
        )
    if n < 1:
        raise ValueError(f"{name} has an empty last dimension")


def row_launch_config(n: int) -> tuple[int, int]:
    """Block size (next power of two of the row) and warps for a one-program-per-row kernel."""
    import triton

    block = triton.next_power_of_2(n)
    if block >= 32768:
        warps = 32
    elif block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids; plain integer math (`triton.cdiv` is a wrapped constexpr function
    in recent Triton, microseconds per call on the launch path)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    # get_device_properties costs microseconds of host time; a launch path asks on every call.
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_programs_for_rows(n_rows: int, device: torch.device, programs_per_sm: int = 4) -> int:
    """Persistent-kernel grid: `programs_per_sm` programs per SM (rows are strided across them).

    Ask for no more programs than fit on an SM at once (registers): extra ones only run as a second
    wave and add partial rows to reduce. Off CUDA (the interpreter) 4 programs, so that the tests
    exercise the loop over row tiles.
    """
    if device.type == "cuda":
        return max(1, min(n_rows, sm_count(device) * programs_per_sm))
    return max(1, min(n_rows, 4))
