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

`AdamW(..., step_in_backward=True)` steps each parameter inside `loss.backward()`, as soon as autograd
has accumulated its gradient (a post-accumulate-grad hook), and drops that gradient at once: the
same numbers as backward followed by `step()` (bit for bit in the CPU tests, under the interpreter;
on the GPU a training step's backward is itself not deterministic, docs/perf_notes.md session 12),
without ever holding all gradients at once. It saves memory where the peak holds every gradient
(the step after backward), not speed (H100: no faster end to end). `step()` then steps only parameters whose
gradients arrived another way, and `zero_grad()` has nothing left to clear. It is only right where
nothing reads or changes a gradient between backward and the step: no gradient clipping (it would
see no gradients), no gradient accumulation over several backward passes (each one steps), no loss
scaler, each parameter's gradient accumulated once per backward (not reentrant checkpointing of a
shared parameter: it would step twice, undetected), and one process (DDP / FSDP reduce gradients
after autograd accumulates them: refused). One such optimizer per parameter; its hooks stay on the
parameters until `remove_backward_hooks()` or until the optimizer is collected.
"""

from __future__ import annotations

import inspect
import weakref
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor
from torch.optim import adam as torch_adam
from torch.optim.optimizer import _default_to_fused_or_foreach

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
                 fused: bool | None = None, step_in_backward: bool = False):
        # `foreach` only chooses torch's path where torch's step runs (module doc)
        if fused:
            raise ValueError("liger_kernels.optim.AdamW is already one pass, with the numbers of torch's "
                             "foreach step; torch's fused=True kernel rounds differently: for that one, "
                             "use torch.optim.AdamW(..., fused=True)")
        # read by add_param_group, which torch's constructor calls for each group
        self._step_in_backward = step_in_backward
        self._backward_hooks = []
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable,
                         differentiable=differentiable)
        # the hooks live on the parameters: removed with the optimizer (they hold no reference to it)
        weakref.finalize(self, _remove_hooks, self._backward_hooks)

    def add_param_group(self, param_group) -> None:
        if getattr(self, "_step_in_backward", False):  # refused before the group is added
            _check_group_steps_in_backward({**self.defaults, **param_group})
        super().add_param_group(param_group)
        if getattr(self, "_step_in_backward", False):
            self._hook_backward(len(self.param_groups) - 1)

    def __getstate__(self):
        return {**super().__getstate__(), "step_in_backward": getattr(self, "_step_in_backward", False)}

    def __setstate__(self, state):
        """A copy (pickle, deepcopy) steps in backward as the original did, on its own parameters.
        torch's load_state_dict calls this too, on this optimizer: its hooks stay as they are."""
        state = dict(state)
        step_in_backward = state.pop("step_in_backward", False)
        super().__setstate__(state)
        if hasattr(self, "_backward_hooks"):  # load_state_dict
            return
        self._step_in_backward, self._backward_hooks = step_in_backward, []
        weakref.finalize(self, _remove_hooks, self._backward_hooks)
        if step_in_backward:
            for index in range(len(self.param_groups)):
                self._hook_backward(index)

    def _hook_backward(self, index: int) -> None:
        """Step each parameter of group `index` when autograd has accumulated its gradient (module doc).
        The hook finds the group by its index when it runs: load_state_dict replaces the group dicts
        (accelerate's optimizer wrapper does, and LR schedulers then set the new ones' lr)."""
        _refuse_several_processes()
        optimizer = weakref.ref(self)

        def step_in_backward(param):
            owner = optimizer()
            if owner is not None and param.grad is not None:
                owner._step_now(owner.param_groups[index], param)

        for param in self.param_groups[index]["params"]:
            if not param.requires_grad:
                continue
            other = _STEPPED_BY.get(id(param))
            if other is not None and other[0]() is param and other[1]() not in (None, self):
                raise ValueError("AdamW(step_in_backward=True): another such optimizer steps this parameter in "
                                 "backward already; call its remove_backward_hooks() (or drop it) first")
            _STEPPED_BY[id(param)] = (weakref.ref(param), optimizer)
            self._backward_hooks.append(param.register_post_accumulate_grad_hook(step_in_backward))

    def _step_now(self, group, param) -> None:
        """One parameter's step from its post-accumulate-grad hook, then its gradient dropped."""
        _refuse_several_processes()
        with torch.no_grad():
            if self._fusable(param):
                self._fused_group_step(group, [param])
            else:
                self._torch_group_step(group, [param])
        param.grad = None

    def remove_backward_hooks(self) -> None:
        """Back to stepping in `step()` only (for AdamW(step_in_backward=True))."""
        _remove_hooks(self._backward_hooks)
        for group in self.param_groups:
            for param in group["params"]:
                entry = _STEPPED_BY.get(id(param))
                if entry is not None and entry[1]() is self:
                    del _STEPPED_BY[id(param)]
        self._step_in_backward = False

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
            if _options_the_kernel_lacks(group):
                return None
            params = [p for p in group["params"] if p.grad is not None]
            if not all(self._fusable(param) for param in params):
                return None
            plan.append((group, params))
        return plan

    def _fusable(self, param) -> bool:
        """The kernel can step `param` (with its gradient): everything launch_adamw_ needs and does not
        check, of the parameter, its gradient and its states (if any yet)."""
        if not _same_layout(param.grad, param):
            return False
        p, g = _local(param), _local(param.grad)
        if (p.dtype not in ADAMW_DTYPES or g.dtype != p.dtype or g.shape != p.shape
                or g.is_sparse or p.is_sparse or not use_triton(p) or g.device != p.device
                or not p.is_contiguous() or not g.is_contiguous()):
            return False
        state = self.state.get(param)
        return not state or all(_same_layout(state[k], param) and _local(state[k]).dtype == p.dtype
                                and _local(state[k]).is_contiguous() and _local(state[k]).device == p.device
                                and _local(state[k]).shape == p.shape
                                for k in ("exp_avg", "exp_avg_sq"))

    def _torch_group_step(self, group, params) -> None:
        """torch's AdamW step of `params` (of one group without amsgrad / maximize), foreach or single-tensor
        as torch's step would choose: for a parameter the kernel cannot step, inside backward."""
        self._init_states(params)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        foreach = group["foreach"]
        if foreach is None:  # torch's default choice
            _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        tensors = (params, [p.grad for p in params], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states])
        options = dict(foreach=foreach, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                       weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        if _TORCH_ADAM_DECOUPLED:
            torch_adam.adam(*tensors, decoupled_weight_decay=True, **options)
        else:  # torch before 2.7: AdamW's own functional step
            from torch.optim import adamw as torch_adamw

            torch_adamw.adamw(*tensors, **options)

    def _init_states(self, params) -> None:
        for p in params:
            state = self.state[p]
            if len(state) == 0:  # as torch initializes it (Adam._init_group)
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _fused_group_step(self, group, params) -> None:
        self._init_states(params)
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


# id(parameter) -> (weakref to it, weakref to the AdamW(step_in_backward=True) that steps it in backward):
# one such optimizer per parameter (a second one's hook would find the gradient gone).
_STEPPED_BY: dict = {}


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _options_the_kernel_lacks(group) -> dict:
    """The group's options that only torch's step implements, by name (empty: the kernel covers it)."""
    unsupported = {k: group.get(k) for k, v in _GROUP_DEFAULTS_REQUIRED.items() if group.get(k, v) != v}
    if any(isinstance(x, torch.Tensor) for x in (group["lr"], *group["betas"], group["weight_decay"])):
        unsupported["tensor lr, betas or weight_decay"] = True
    return unsupported


def _check_group_steps_in_backward(group) -> None:
    unsupported = _options_the_kernel_lacks(group)
    if unsupported:
        raise ValueError(f"AdamW(step_in_backward=True) steps with the one-pass kernel only; these group "
                         f"options need torch's step after backward: {unsupported}")


def _refuse_several_processes() -> None:
    """Inside backward a gradient is this process's own: DDP and FSDP reduce it over the ranks later."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            raise RuntimeError(
                f"AdamW(step_in_backward=True) with {world} processes: each gradient is stepped when autograd "
                "has accumulated it, before DDP / FSDP reduce it over the ranks. Use step_in_backward=False "
                "(the step after backward) in distributed training")
