"""One causal-LM forward for every supported `*ForCausalLM`: base model -> lm_head, with the loss fused.

When is the loss fused? When `labels` are given and autograd is recording (`torch.is_grad_enabled()`),
and the model uses transformers' default causal-LM loss. Then the logits are never materialized:
the final hidden states (sliced by `logits_to_keep`) go straight into
`liger_kernels.functional.fused_linear_cross_entropy` with the lm_head weight, the architecture's
softcap / logit scale, `ignore_index` and `num_items_in_batch` (gradient accumulation: summed loss
divided by the item count), and the returned output has `logits=None`.

Everything else -- no labels, evaluation under `torch.no_grad()` (HF Trainer's prediction step, so
metrics and `prediction_loss_only` see real logits), a custom `loss_function` -- runs the model's
original forward unchanged, so generation and evaluation are exactly as before.

The lm_head weight is read at call time. An lm_head that is not a plain `nn.Linear` (a PEFT LoRA layer
or `modules_to_save` wrapper, an accelerate-hooked forward) is called as a module and its logits go
through the cross-entropy kernel instead (materialized, but correct). An `nn.Linear` lm_head that
carries forward hooks (FSDP2 `fully_shard` on lm_head, DeepSpeed ZeRO-3 partitioning) is run inside
its own hooks, so the weight the fused loss reads is the gathered one, never the raw shard.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from liger_kernels import functional as LF
from liger_plugins.patching.forwards import divide_by_items, mark, shift_targets
from liger_plugins.patching.registry import ArchitectureTraits

try:  # transformers >= 5.2x: int, 1-D positions, 2-D positions or a boolean mask
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # older 5.x: int (keep the last n; 0 keeps all) or a 1-D tensor of positions

    def slice_logits_to_keep(hidden_states, logits_to_keep):
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]


_DEFAULT_LOSS = LOSS_MAPPING["ForCausalLM"]
# Field names of the output classes, read once here: torch.compile cannot trace dataclasses.fields.
_OUTPUT_FIELDS = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in (CausalLMOutputWithPast, MoeCausalLMOutputWithPast)
}


def make_causal_lm_forward(traits: ArchitectureTraits, original):
    """The fused forward replacing `original` (the causal-LM class's own, unbound, forward)."""
    # Positional arguments are mapped to names once, so the call path is plain dict work
    # (torch.compile traces it without graph breaks).
    signature = inspect.signature(original)
    params = list(signature.parameters.values())[1:]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    aux_loss_fn = traits.modeling_module().load_balancing_loss_func if traits.moe else None

    def forward(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"forward() takes at most {len(positional)} positional arguments")
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        fused = (
            kwargs.get("labels") is not None
            and torch.is_grad_enabled()
            and self.loss_function is _DEFAULT_LOSS
        )
        if not fused:
            return original(self, **kwargs)
        return _fused_loss_forward(self, traits, aux_loss_fn, kwargs)

    # Same signature as the original: HF Trainer keeps only the dataset columns that forward names.
    forward.__signature__ = signature
    forward.__doc__ = original.__doc__
    return mark(forward, original, "causal_lm_forward")


def _fused_loss_forward(self, traits: ArchitectureTraits, aux_loss_fn, kwargs: dict):
    labels = kwargs.pop("labels")
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if aux_loss_fn is not None and kwargs.get("output_router_logits") is None:
        kwargs["output_router_logits"] = self.config.output_router_logits

    # Like the original: every remaining argument goes to the base model (it ignores the loss kwargs).
    outputs = getattr(self, self.base_model_prefix)(**kwargs)
    hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = causal_lm_loss_from_hidden(
        self,
        traits,
        hidden_states,
        labels,
        shift_labels=kwargs.get("shift_labels"),
        ignore_index=kwargs.get("ignore_index", -100),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
    )

    fields = {"loss": loss, "logits": None}
    output_class = CausalLMOutputWithPast
    if aux_loss_fn is not None:
        output_class = MoeCausalLMOutputWithPast
        fields["aux_loss"] = None
        if kwargs["output_router_logits"]:
            aux_loss = aux_loss_fn(
                outputs.router_logits,
                self.num_experts,
                self.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )
            fields["aux_loss"] = aux_loss
            fields["loss"] = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    # The base model's other outputs (cache, hidden_states, attentions, router_logits) by name, so the
    # cache field is right whichever name this transformers version gives it.
    for name, value in outputs.items():
        if name in _OUTPUT_FIELDS[output_class] and name not in fields and name != "last_hidden_state":
            fields[name] = value
    output = output_class(**fields)
    return output if return_dict else output.to_tuple()


def causal_lm_loss_from_hidden(
    model, traits: ArchitectureTraits, hidden_states, labels, shift_labels=None, ignore_index=-100,
    num_items_in_batch=None,
):
    """Next-token cross-entropy of `model.lm_head(hidden_states)` (post-processed as the architecture
    does) against the shifted labels, without materializing the logits when lm_head is a plain Linear."""
    targets = shift_targets(labels, shift_labels, ignore_index)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if targets.numel() != hidden.shape[0]:
        raise ValueError(
            f"{hidden.shape[0]} positions of hidden states (after logits_to_keep) but {targets.numel()} "
            "shifted labels: labels must cover exactly the kept positions"
        )
    options = dict(
        ignore_index=ignore_index,
        softcap=getattr(model.config, traits.softcap_config, None) if traits.softcap_config else None,
        logit_scale=traits.logit_scale(model) if traits.logit_scale else 1.0,
        reduction="mean" if num_items_in_batch is None else "sum",
    )
    lm_head = model.lm_head
    if not _is_plain_linear(lm_head):
        loss = LF.cross_entropy(lm_head(hidden), targets, **options)
        return loss if num_items_in_batch is None else divide_by_items(loss, num_items_in_batch)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    options["num_items_in_batch"] = num_items_in_batch
    return _run_inside_hooks(lm_head, _fused_linear_loss, hidden, targets, options)


def _is_plain_linear(module: nn.Module) -> bool:
    # nn.Linear or a subclass that keeps its forward (FSDP2's FSDPLinear); not an instance-level
    # forward override (accelerate's device-map hooks wrap `module.forward` that way).
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "forward" not in module.__dict__
    )


def _fused_linear_loss(lm_head: nn.Linear, hidden, targets, options):
    weight = lm_head.weight
    if type(weight).__name__ == "DTensor":
        raise NotImplementedError(
            "fused linear cross-entropy got a DTensor lm_head weight (tensor parallelism); patch with "
            "fused_linear_cross_entropy=False for this model"
        )
    return LF.fused_linear_cross_entropy(hidden, weight, targets, bias=lm_head.bias, **options)


def _run_inside_hooks(module: nn.Module, fn, *args):
    """`fn(module, *args)`, run as `module`'s forward when the module has forward hooks, so that the
    hooks that gather a sharded weight (and release it, and arrange its backward) wrap the fused loss."""
    if not (module._forward_pre_hooks or module._forward_hooks):
        return fn(module, *args)
    module.forward = types.MethodType(fn, module)
    try:
        return module(*args)
    finally:
        del module.forward
