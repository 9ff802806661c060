"""Hugging Face Trainer adapter: the stock `transformers.Trainer` runs liger-plugins' kernels.

Two ways in, pick one.

1. The Trainer's own flag, after one call (transformers >= 5.2: the hook point below is the same in the
   5.2, 5.3, 5.8, 5.17 and 5.24 sources; tests run on 5.24; 5.0/5.1 inline the call, use the callback)::

       import liger_plugins.hf
       liger_plugins.hf.enable()
       args = TrainingArguments(..., use_liger_kernel=True, liger_kernel_config={"rope": True, "swiglu": False})
       Trainer(model=model, args=args, ...).train()

   `enable()` replaces the function the Trainer calls for `use_liger_kernel=True`
   (`transformers.integrations.liger.apply_liger_kernel`, bound by name in `transformers.trainer`) with
   `apply_liger_kernel` below, which maps `liger_kernel_config` onto `liger_plugins.patching.apply_liger`.
   The Trainer calls it at the start of `train()` (5.2 called it in `__init__`), after `model_init`
   (if any) has built the model and before `accelerate.prepare` wraps it (DDP, FSDP, DeepSpeed): the
   patch is instance level, on the model the Trainer holds (a PEFT model's base model). Like the stock
   flag, `evaluate()` alone does not patch; use the callback for that. `disable()` puts the Trainer's
   original back.

   When the `liger-kernel` package is installed too, ours wins: after `enable()` the Trainer never
   imports `liger_kernel`. Without `enable()`, the flag keeps its stock meaning (the `liger-kernel`
   package, or an ImportError when it is missing).

2. A callback, without the flag::

       Trainer(model=model, args=args, callbacks=[liger_plugins.hf.LigerCallback()])

   It patches in `on_init_end`: the end of `Trainer.__init__`, where the Trainer has only moved the
   model to its device; wrapping happens later, in `train()` (`_prepare_for_training`, before
   `on_train_begin`) and `evaluation_loop`. So `evaluate()`-only runs are patched too, and a bad
   configuration fails when the Trainer is built. See `LigerCallback` for metrics logging.

`liger_kernel_config` keys are Liger-Kernel's: rope, rms_norm, swiglu, geglu (the same gated-MLP
kernel switch as swiglu: the architecture's activation picks swiglu or geglu), layer_norm,
cross_entropy, fused_linear_cross_entropy; ours too: fused_moe, causal_sdpa_under_compile,
fused_add_rms_norm, qkv_projections (see liger_plugins.patching), and adamw (the optimizer, not a
patch: with `enable()`, the Trainer's torch AdamW becomes liger_kernels.optim.AdamW, the numbers of
torch's foreach step in one pass; see `_optimizer_choice`). Values must be booleans. Any other key
raises ValueError naming it (Liger-Kernel silently drops unknown keys; a typo should not silently train without a
kernel). A model that cannot be patched (unsupported architecture, not a transformers model) raises
ValueError naming it, before any training step.

What the Trainer does with `use_liger_kernel` besides patching, and what the patched model does with
it: with `prediction_loss_only`, its prediction step adds `skip_logits=True` to the inputs; under
`torch.no_grad()` the patched causal LM runs its original forward (real logits and loss), which
ignores that key. Gradient accumulation: the Trainer passes `num_items_in_batch` to the model's
forward, and the fused loss divides its summed loss by it, exactly as transformers' own loss does.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

import torch
from transformers import PreTrainedModel, TrainerCallback

from liger_plugins.patching import PatchSummary, apply_liger

logger = logging.getLogger(__name__)

# liger_kernel_config key (Liger-Kernel's names) -> keyword of liger_plugins.patching.apply_liger.
CONFIG_KEYS = {
    "rope": "rope",
    "rms_norm": "rms_norm",
    "swiglu": "swiglu",
    "geglu": "swiglu",
    "layer_norm": "layer_norm",
    "cross_entropy": "cross_entropy",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "fused_moe": "fused_moe",  # ours only, off by default: MoE experts on the fused grouped-GEMM kernel
    "causal_sdpa_under_compile": "causal_sdpa_under_compile",  # ours only: see liger_plugins.patching
    "fused_add_rms_norm": "fused_add_rms_norm",  # ours only: see liger_plugins.patching
    "qkv_projections": "qkv_projections",  # ours only: see liger_plugins.patching
}
# liger_kernel_config keys that choose the optimizer rather than a patch (ours only): "adamw" makes the
# Trainer's torch AdamW liger_kernels.optim.AdamW, "adamw_in_backward" that AdamW stepping each parameter
# inside backward (see `_optimizer_choice`).
OPTIMIZER_KEYS = ("adamw", "adamw_in_backward")

# (owner, attribute, the value `enable()` replaced): the Trainer's `apply_liger_kernel` names and its
# optimizer choice.
_REPLACED: list[tuple[object, str, object]] = []


def liger_kwargs(kernel_config: Mapping | None, what: str = "liger_kernel_config",
                 optimizer_keys: bool = False) -> dict[str, bool]:
    """`apply_liger` keyword arguments for a Liger-Kernel style config; ValueError/TypeError naming a
    bad key or value. None means the defaults. `optimizer_keys`: also accept (and leave out) the
    OPTIMIZER_KEYS, which only the Trainer's `liger_kernel_config` can act on."""
    if kernel_config is None:
        return {}
    if not isinstance(kernel_config, Mapping):
        raise TypeError(f"{what} must be a dict of kernel name -> bool, got {type(kernel_config).__name__}")
    kwargs: dict[str, bool] = {}
    accepted = (*CONFIG_KEYS, *OPTIMIZER_KEYS) if optimizer_keys else tuple(CONFIG_KEYS)
    for key, value in kernel_config.items():
        if key not in accepted:
            where = " (the optimizer: only in the Trainer's liger_kernel_config)" if key in OPTIMIZER_KEYS else ""
            raise ValueError(f"{what} has unknown key {key!r}{where}; liger-plugins accepts: {', '.join(accepted)}")
        if not isinstance(value, bool):
            raise TypeError(f"{what}[{key!r}] must be True or False, got {value!r}")
        if key in OPTIMIZER_KEYS:
            continue
        name = CONFIG_KEYS[key]
        if kwargs.get(name, value) != value:
            raise ValueError(f"{what} sets 'swiglu' and 'geglu' differently; both switch the gated-MLP kernel")
        kwargs[name] = value
    return kwargs


def apply_liger_kernel(model: torch.nn.Module, kernel_config: Mapping | None) -> PatchSummary:
    """Drop-in for `transformers.integrations.liger.apply_liger_kernel(model, kernel_config)`, on
    liger-plugins: patches `model` (a PEFT model's base model) in place, at instance level."""
    kwargs = liger_kwargs(kernel_config, optimizer_keys=True)
    hooked = any(name == "get_optimizer_cls_and_kwargs" for _, name, _ in _REPLACED)
    if _wants_liger_adamw(kernel_config) and not hooked:
        raise ValueError(
            "liger_kernel_config adamw=True: this transformers' Trainer has no get_optimizer_cls_and_kwargs "
            "staticmethod for liger_plugins.hf.enable() to hook; pass "
            "Trainer(optimizer_cls_and_kwargs=(liger_kernels.optim.AdamW, {...})) instead")
    summary = _patch(model, kwargs, "use_liger_kernel")
    logger.info("%s", summary)
    return summary


def _patch(model: torch.nn.Module, kwargs: dict[str, bool], who: str) -> PatchSummary:
    try:
        return apply_liger(model, **kwargs)
    except ValueError as error:  # unsupported architecture, not a transformers model, unexpected layout
        raise ValueError(f"{who}: cannot patch {type(model).__name__}: {error}") from error


def enable() -> None:
    """Make the stock Trainer's `use_liger_kernel=True` apply liger-plugins (see the module docstring).
    Idempotent; process-wide until `disable()`."""
    if _REPLACED:
        return
    try:
        import transformers.integrations.liger as hf_liger
        import transformers.trainer as hf_trainer
    except ImportError as error:
        raise ImportError(
            "liger_plugins.hf.enable() needs transformers >= 5.2 (transformers.integrations.liger); with an "
            "older transformers use liger_plugins.hf.LigerCallback instead of use_liger_kernel"
        ) from error
    if not callable(getattr(hf_trainer, "apply_liger_kernel", None)):
        raise RuntimeError(
            "this transformers' Trainer does not call transformers.integrations.liger.apply_liger_kernel, so "
            "liger_plugins.hf.enable() cannot hook use_liger_kernel; use liger_plugins.hf.LigerCallback"
        )
    # The Trainer calls the name bound in its own module; `transformers.integrations` (a lazy module)
    # may also hold it once someone imported it from there.
    for module in (hf_liger, hf_trainer, sys.modules.get("transformers.integrations")):
        if module is not None and "apply_liger_kernel" in vars(module):
            _REPLACED.append((module, "apply_liger_kernel", vars(module)["apply_liger_kernel"]))
            module.apply_liger_kernel = apply_liger_kernel
    trainer = hf_trainer.Trainer
    if isinstance(vars(trainer).get("get_optimizer_cls_and_kwargs"), staticmethod):  # as in 5.2 to 5.25
        original = vars(trainer)["get_optimizer_cls_and_kwargs"]
        _REPLACED.append((trainer, "get_optimizer_cls_and_kwargs", original))
        trainer.get_optimizer_cls_and_kwargs = staticmethod(_optimizer_choice(original.__func__))


def _optimizer_choice(choose):
    """`Trainer.get_optimizer_cls_and_kwargs` after `enable()`: with `use_liger_kernel=True` and
    `liger_kernel_config={"adamw": True}`, the AdamW the Trainer would build from `optim="adamw_torch"`
    or `"adamw_torch_fused"` is `liger_kernels.optim.AdamW` instead: torch's default (foreach) AdamW
    step, bit for bit, in one pass (for `adamw_torch_fused`, the numbers are the foreach step's, not the
    fused kernel's). Any other `optim` with adamw=True is refused. `{"adamw_in_backward": True}`: the
    same AdamW with `step_in_backward=True` (each parameter stepped inside backward, its gradient dropped),
    only where the Trainer reads no gradient between backward and the step: refused with gradient
    clipping (`max_grad_norm` > 0, the Trainer's default 1.0), gradient accumulation or fp16's loss
    scaler (the Trainer then logs a grad_norm of 0: the gradients are gone by the time it looks).
    Subclasses that override the method (and `optimizer_cls_and_kwargs` / `optimizers` given to the
    Trainer) choose their own optimizer."""

    def get_optimizer_cls_and_kwargs(args, model=None):
        optimizer_cls, optimizer_kwargs = choose(args, model)
        if not (args.use_liger_kernel and _wants_liger_adamw(args.liger_kernel_config)):
            return optimizer_cls, optimizer_kwargs
        optim = getattr(args.optim, "value", args.optim)
        in_backward = args.liger_kernel_config.get("adamw_in_backward") is True
        setting = f"liger_kernel_config {'adamw_in_backward' if in_backward else 'adamw'}=True"
        optimizer_cls, optimizer_kwargs = as_liger_adamw(optimizer_cls, optimizer_kwargs, setting,
                                                         f"optim={optim!r}", logger)
        if in_backward:
            _check_step_in_backward(args)
            optimizer_kwargs["step_in_backward"] = True
        return optimizer_cls, optimizer_kwargs

    return get_optimizer_cls_and_kwargs


def _check_step_in_backward(args) -> None:
    """The Trainer settings under which stepping inside backward changes the training: refused."""
    problems = []
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        problems.append(f"max_grad_norm={args.max_grad_norm} clips the gradients after backward (set "
                        "max_grad_norm=0 to train without clipping)")
    if args.gradient_accumulation_steps != 1:
        problems.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps} sums gradients over "
                        "several backward passes")
    if args.fp16:
        problems.append("fp16 scales the loss and unscales the gradients after backward")
    if problems:
        raise ValueError("liger_kernel_config adamw_in_backward=True steps each parameter inside backward, so "
                         "nothing may read the gradients after it: " + "; ".join(problems)
                         + ". Or use adamw=True (the step after backward)")


def as_liger_adamw(optimizer_cls, optimizer_kwargs: dict, setting: str, chosen: str, log: logging.Logger):
    """(liger_kernels.optim.AdamW, its kwargs) in place of the torch AdamW a trainer chose (`optim`
    adamw_torch or adamw_torch_fused): the kwargs without `fused`, which ours refuses (it is one pass
    already; `foreach` stays: it picks torch's path where torch's step runs). Any other optimizer class
    raises ValueError naming `setting` (the user's switch) and `chosen` (what picked the class)."""
    if optimizer_cls is not torch.optim.AdamW:
        raise ValueError(
            f"{setting} replaces torch's AdamW (optim / optimizer adamw_torch or adamw_torch_fused); {chosen} "
            f"builds {getattr(optimizer_cls, '__name__', optimizer_cls)}: drop {setting} or change the optimizer")
    from liger_kernels.optim import AdamW

    log.info("liger-plugins: the optimizer is liger_kernels.optim.AdamW (torch's foreach AdamW numbers, one pass)")
    return AdamW, {k: v for k, v in optimizer_kwargs.items() if k != "fused"}


def _wants_liger_adamw(kernel_config) -> bool:
    return isinstance(kernel_config, Mapping) and any(kernel_config.get(k) is True for k in OPTIMIZER_KEYS)


def disable() -> None:
    """Undo `enable()`. Models already patched stay patched (`liger_plugins.patching.unpatch`)."""
    while _REPLACED:
        owner, name, original = _REPLACED.pop()
        setattr(owner, name, original)


def is_enabled() -> bool:
    return bool(_REPLACED)


def _find_hf_model(model: torch.nn.Module | None) -> PreTrainedModel | None:
    """The outermost transformers model inside `model` (itself, a PEFT model's base model, the module
    of a DDP / FSDP wrapper)."""
    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed import fsdp

    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)) if k)
    return any(isinstance(m, kinds) for m in model.modules())


class LigerCallback(TrainerCallback):
    """Patch the Trainer's model with liger-plugins' kernels, and log what it costs.

    `LigerCallback(**kernels)` takes `liger_kernel_config` keys as keyword flags (`rope=False`, ...);
    without any, it uses `TrainingArguments.liger_kernel_config` (None: the defaults). Do not also set
    `use_liger_kernel=True` unless `enable()` was called: the stock flag would then apply the
    `liger-kernel` package on top at `train()` (or fail without it); that combination raises at setup.

    When: `on_init_end` (end of `Trainer.__init__`, before any wrapping; the `model` passed there is
    the one given to the Trainer, a PEFT model included). With `model_init`, `train()` builds a fresh
    model after `on_init_end`; it is patched in `on_train_begin`, which runs after the Trainer wrapped
    it: fine for single-device and DDP (the wrapper calls the same module), refused for FSDP (use
    `enable()` + `use_liger_kernel=True` there, which patches before wrapping).

    Logging: what was patched goes to the `liger_plugins.hf` logger (INFO), and is kept in
    `self.summary`. With `log_metrics` (default: when the model is on CUDA), every training log also
    gets `tokens_per_second` (input tokens this process fed to training forwards since the previous
    log, per wall-clock second) and, on CUDA, `peak_memory_gib` (`torch.cuda.max_memory_allocated` since
    training began). They are added in `on_log`: the progress bar / printer and
    `trainer.state.log_history` show them; reporting integrations (`report_to`) run before user
    callbacks, so they do not.
    """

    def __init__(self, *, log_metrics: bool | None = None, **kernels: bool):
        self.kernels = liger_kwargs(kernels, "LigerCallback flags") if kernels else None
        self.log_metrics = log_metrics
        self.summary: PatchSummary | None = None
        self._patched: PreTrainedModel | None = None
        self._hook = None
        self._tokens = 0
        self._last_time = 0.0
        self._cuda_device = None

    def _patch(self, args, model: torch.nn.Module, is_main: bool) -> None:
        kwargs = self.kernels if self.kernels is not None else liger_kwargs(args.liger_kernel_config,
                                                                            optimizer_keys=True)
        self.summary = _patch(model, kwargs, "LigerCallback")
        self._patched = _find_hf_model(model)
        if is_main:
            logger.info("%s", self.summary)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if args.use_liger_kernel and not is_enabled():
            raise ValueError(
                "use_liger_kernel=True together with LigerCallback: without liger_plugins.hf.enable() the "
                "Trainer would apply the liger-kernel package at train() (or fail without it). Drop "
                "use_liger_kernel, or call liger_plugins.hf.enable() first"
            )
        if _wants_liger_adamw(args.liger_kernel_config) and not (is_enabled() and args.use_liger_kernel):
            raise ValueError(
                "adamw (or adamw_in_backward)=True: a callback cannot choose the Trainer's optimizer. Use "
                "liger_plugins.hf.enable() with use_liger_kernel=True and liger_kernel_config={'adamw': True}, or pass "
                "Trainer(optimizer_cls_and_kwargs=(liger_kernels.optim.AdamW, {...}))"
            )
        self._patch(args, model, state.is_local_process_zero)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        hf_model = _find_hf_model(model)
        if hf_model is not self._patched:  # model_init built a new model in train()
            if _is_sharded(model):
                raise RuntimeError(
                    "LigerCallback: model_init built a model that the Trainer sharded (FSDP) before any "
                    "callback could patch it; use liger_plugins.hf.enable() with use_liger_kernel=True"
                )
            self._patch(args, model, state.is_local_process_zero)
        param = next(hf_model.parameters(), None)
        on_cuda = param is not None and param.device.type == "cuda"
        metrics = self.log_metrics if self.log_metrics is not None else on_cuda
        if not metrics:
            return
        if on_cuda:
            self._cuda_device = param.device
            torch.cuda.reset_peak_memory_stats(param.device)
        if self._hook is not None:  # a train() that raised never reached on_train_end
            self._hook.remove()
        # On the model the Trainer calls (a PEFT wrapper calls its base model's forward directly).
        self._hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        self._tokens = 0
        self._last_time = time.perf_counter()

    def _count_tokens(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._tokens += ids.numel()
        elif kwargs.get("inputs_embeds") is not None:
            self._tokens += kwargs["inputs_embeds"].shape[:-1].numel()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._hook is None or logs is None or "loss" not in logs:
            return
        if self._cuda_device is not None:
            torch.cuda.synchronize(self._cuda_device)
        now = time.perf_counter()
        metrics = {"tokens_per_second": round(self._tokens / max(now - self._last_time, 1e-9), 2)}
        if self._cuda_device is not None:
            metrics["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self._cuda_device) / 2**30, 3)
        self._tokens, self._last_time = 0, now
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to log_history just before on_log: keep it in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._cuda_device = None
