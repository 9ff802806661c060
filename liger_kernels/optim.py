"""Optimizers: torch's, with steps fused into one pass (ops/adamw.py) and the same numbers.

    from liger_kernels.optim import AdamW
    optimizer = AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

`AdamW` is a torch.optim.AdamW (same constructor, state layout, state_dict, hooks, LR schedulers):
a checkpoint of either loads into the other. Its step gives the parameters and states that torch's
default (foreach) AdamW step gives, in one kernel per tensor instead of eight list operations,
and without their temporary list of the parameters' size (the step's peak memory drops by that much).
Tensors under SMALL_TENSOR_ELEMENTS on CUDA take torch's foreach step itself, in one call (see there).
Options the kernel does not cover (amsgrad, maximize, capturable, differentiable, tensor lr or betas,
sparse or complex gradients, CPU parameters outside the interpreter) run torch's own step instead,
for the whole step, so the numbers never depend on which path ran.

Sharded parameters (DTensors: FSDP2, tensor parallelism) are stepped on their local shards: the step
is elementwise, so each rank updates its shard exactly as torch's step on the DTensor does. That needs
the gradient and the states laid out like the parameter (same mesh and placements, none `Partial`,
i.e. no reduction pending); otherwise torch's step runs.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor
from torch.optim import adam as torch_adam

from liger_kernels._utils import use_triton
from liger_kernels.ops.adamw import ADAMW_DTYPES, launch_adamw_

# torch's AdamW group options the fused step implements only at these values
_GROUP_DEFAULTS_REQUIRED = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, any other tensor itself: what the kernel reads and writes in place."""
    return t.to_local() if isinstance(t, DTensor) else t


def _same_layout(t: torch.Tensor, p: torch.Tensor) -> bool:
    """t (a gradient or state) is sharded like the parameter p, so their local shards match element
    for element; a Partial placement (a pending reduction) never does."""
    if not isinstance(p, DTensor) and not isinstance(t, DTensor):
        return True
    return (isinstance(p, DTensor) and isinstance(t, DTensor) and t.device_mesh == p.device_mesh
            and t.placements == p.placements and not any(pl.is_partial() for pl in p.placements))


# Tensors under this many elements take torch's foreach step instead of the kernel, all in one call, on
# CUDA (where the kernel equals that step bit for bit): a launch per tensor costs ~30 us of host time,
# more than a small tensor's whole update on the GPU, and models can carry hundreds of small tensors
# (norm weights, LoRA adapters). Their temporaries are small by definition.
SMALL_TENSOR_ELEMENTS = 1 << 20


def _takes_torch_step(local: torch.Tensor) -> bool:
    return local.is_cuda and local.numel() < SMALL_TENSOR_ELEMENTS and _TORCH_ADAM_DECOUPLED


def _torch_adam_has_decoupled_weight_decay() -> bool:
    try:
        return "decoupled_weight_decay" in inspect.signature(torch_adam.adam).parameters
    except (AttributeError, TypeError, ValueError):
        return False


_TORCH_ADAM_DECOUPLED = _torch_adam_has_decoupled_weight_decay()


def _split(items, predicate):
    """(the items for which predicate holds, the others), each in order."""
    yes, no = [], []
    for item in items:
        (yes if predicate(item) else no).append(item)
    return yes, no


def _unhooked(step):
    """`step` without the wrapper torch.optim puts around a class's step once an instance of it exists
    (step hooks, profiling): our step is wrapped already, so the parent's, called from it, must not run
    the hooks a second time."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


def _scalar_dtype() -> torch.dtype:
    # torch keeps AdamW's step count in a CPU tensor of this dtype (float64 under a float64 default)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW with a one-pass step and the numbers of torch's default step (module doc)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        # `foreach` only chooses torch's path where torch's step runs (module doc)
        if fused:
            raise ValueError("liger_kernels.optim.AdamW is already one pass, with the numbers of torch's "
                             "foreach step; torch's fused=True kernel rounds differently: for that one, "
                             "use torch.optim.AdamW(..., fused=True)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable,
                         differentiable=differentiable)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            plan = self._fused_plan()
            if plan is None:
                _unhooked(torch.optim.AdamW.step)(self)
                return loss
            for group, params in plan:
                self._fused_group_step(group, params)
        return loss

    def _fused_plan(self):
        """[(group, parameters with a gradient)] when the fused kernel covers every group, else None."""
        plan = []
        for group in self.param_groups:
            if any(group.get(k, v) != v for k, v in _GROUP_DEFAULTS_REQUIRED.items()):
                return None
            beta1, beta2 = group["betas"]
            if any(isinstance(x, torch.Tensor) for x in (group["lr"], beta1, beta2, group["weight_decay"])):
                return None
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if not _same_layout(param.grad, param):
                    return None
                p, g = _local(param), _local(param.grad)
                # everything launch_adamw_ needs and does not check
                if (p.dtype not in ADAMW_DTYPES or g.dtype != p.dtype or g.shape != p.shape
                        or g.is_sparse or p.is_sparse or not use_triton(p) or g.device != p.device
                        or not p.is_contiguous() or not g.is_contiguous()):
                    return None
                state = self.state.get(param)
                if state and not all(_same_layout(state[k], param) and _local(state[k]).dtype == p.dtype
                                     and _local(state[k]).is_contiguous() and _local(state[k]).device == p.device
                                     and _local(state[k]).shape == p.shape
                                     for k in ("exp_avg", "exp_avg_sq")):
                    return None
            plan.append((group, params))
        return plan

    def _fused_group_step(self, group, params) -> None:
        for p in params:
            state = self.state[p]
            if len(state) == 0:  # as torch initializes it (Adam._init_group)
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        small, params = _split(params, lambda p: _takes_torch_step(_local(p)))
        if small:  # torch's foreach step, which also counts their steps
            states = [self.state[p] for p in small]
            torch_adam.adam(
                [_local(p) for p in small], [_local(p.grad) for p in small],
                [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states], [],
                [s["step"] for s in states], foreach=True, decoupled_weight_decay=True, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=False)
        steps = [self.state[p]["step"] for p in params]
        if steps:
            torch._foreach_add_(steps, 1.0)
        # batches of one (device, dtype, step count): the step count sets the bias corrections
        batches = defaultdict(list)
        for p, step in zip(params, steps):
            batches[(_local(p).device, p.dtype, float(step))].append(p)
        for (_, _, step), batch in batches.items():
            launch_adamw_([_local(p) for p in batch], [_local(p.grad) for p in batch],
                          [_local(self.state[p]["exp_avg"]) for p in batch],
                          [_local(self.state[p]["exp_avg_sq"]) for p in batch],
                          step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"])
