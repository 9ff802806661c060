"""torch.library registration of the ops, so that torch.compile sees each kernel as one graph node.

Every op file registers its forward (and, where it has one, its backward) as a custom op in the
"liger" namespace (`torch.ops.liger.<name>`) with a fake implementation (output shapes, dtypes and
strides from the input metadata, which is all Dynamo and AOTAutograd need, symbolic sizes included)
and its autograd formula (`register_autograd`). Dynamo then records one node per kernel instead of
tracing into Python launch code, so a patched model compiles without graph breaks and without
specializing on the sequence length.

When the ops are used: the public functions call them only while Dynamo traces
(`torch.compiler.is_compiling()`). Eager calls keep the ops' `torch.autograd.Function`s: a custom
op costs several times more Python dispatch per call in eager mode, and only the eager path honours
the in-place options (a custom op may not return an alias of its input; under compile Inductor plans
the memory and the in-place options are ignored).

Dispatch inside an op is the eager one: Triton for CUDA tensors (or under the interpreter), else the
torch reference. Outputs never depend on the path (same shapes and dtypes), so the fake
implementation needs no device logic. The reference path gets its gradients from autograd through
the reference itself (`reference_vjp`), so a compiled CPU model computes exactly what the eager
reference path computes.

Data-dependent work stays inside an op, where Dynamo does not see it: fused MoE sorts the tokens
by expert on the device (argsort, bincount), and its outputs still have static shapes; its backward
op rebuilds that routing plan from top_k_index rather than receiving Python objects (what an op
saves for its backward must be tensors). Intermediates a backward needs (multi-token attention's
normalized map, MoE's gate/up pre-activations) are extra outputs of the forward op.

Ops that compute gradients in their forward pass (the cross-entropy losses) return them as extra
outputs; their backward multiplies them by the incoming gradient with plain torch ops, which
Inductor fuses.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

NAMESPACE = "liger"


def compiling() -> bool:
    """True while Dynamo traces: the public functions then call the custom ops."""
    return torch.compiler.is_compiling()


def custom_op(name: str, fake: Callable):
    """Decorator: register a type-annotated function as `torch.ops.liger.<name>` for every device,
    with `fake` (same arguments) as its fake implementation. The function must return new tensors,
    never an input or a view of one."""

    def register(fn):
        from liger_kernels._utils import on_input_device  # _utils imports this module

        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        # A compiled graph calls the op with whatever GPU is current, and Triton launches there: on
        # CUDA the op runs with its first tensor input's GPU current, as the eager entry points do.
        op.register_kernel("cuda", on_input_device(fn))
        return op

    return register


def absent(like: torch.Tensor) -> torch.Tensor:
    """Placeholder output for a gradient the caller did not ask for (custom ops cannot return None)."""
    return like.new_empty(0)


def fake_grad(like: torch.Tensor, needed: bool) -> torch.Tensor:
    """A backward op's fake output for the gradient of `like`: its shape if asked for, else `absent`."""
    return like.new_empty(like.shape) if needed else absent(like)


# The dispatch keys lifted by _recording_autograd.
_AUTOGRAD_KEYS = tuple(
    getattr(torch._C.DispatchKey, name)
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")
)


@contextlib.contextmanager
def _recording_autograd():
    """Let autograd record inside a custom op's implementation.

    The dispatcher runs an implementation with the autograd keys excluded (and, inside compiled
    code, functorch's too), so neither torch.autograd nor torch.func can differentiate there. This
    lifts the autograd exclusion for the block; everything else stays excluded. Private dispatcher
    API, used only on the reference path (CPU tensors without the interpreter): never on CUDA.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def reference_vjp(fn: Callable, primals: Sequence[torch.Tensor], cotangents):
    """Gradients of `fn(*primals)` w.r.t. `primals` for the given output gradient(s): the backward
    of a torch reference, evaluated inside a custom op."""
    with _recording_autograd():
        leaves = [p.detach().requires_grad_() for p in primals]
        return torch.autograd.grad(fn(*leaves), leaves, cotangents)


def reference_value_and_grads(fn: Callable, primals: Sequence[torch.Tensor], cotangent=None):
    """(outputs of `fn(*primals)`, gradients of its first output w.r.t. `primals`). `fn` returns a
    tuple whose first element is differentiated (with `cotangent`, default ones, cast and reshaped to
    that output); the others are returned as they are. For losses whose gradients are computed in
    the forward pass."""
    with _recording_autograd():
        leaves = [p.detach().requires_grad_() for p in primals]
        outputs = fn(*leaves)
        first = outputs[0]
        if cotangent is None:
            cotangent = torch.ones_like(first)
        grads = torch.autograd.grad(first, leaves, cotangent.to(first.dtype).reshape(first.shape))
    return tuple(o.detach() for o in outputs), grads
