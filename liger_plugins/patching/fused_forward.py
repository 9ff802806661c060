"""One causal-LM forward for every supported `*ForCausalLM`: base model -> lm_head, with the loss fused.

When is the loss fused? When `labels` are given and autograd is recording (`torch.is_grad_enabled()`),
and the model uses transformers' default causal-LM loss. Then the logits are never materialized:
the final hidden states (sliced by `logits_to_keep`) go straight into
`liger_kernels.functional.fused_linear_cross_entropy` with the lm_head weight, the architecture's
softcap / logit scale, `ignore_index` and `num_items_in_batch` (gradient accumulation: summed loss
divided by the item count), and the returned output has `logits=None`. Where the caller passes neither
`use_cache` nor `position_ids` (eager mode), the base model then runs with `use_cache=False` (a loss
needs no KV cache; building one copies every layer's keys and values), so the output's cache is None;
see `_skip_kv_cache` for why only there.

Everything else -- no labels, evaluation under `torch.no_grad()` (HF Trainer's prediction step, so
metrics and `prediction_loss_only` see real logits), a custom `loss_function` -- runs the model's
original forward unchanged, so generation and evaluation are exactly as before.

Vision-language `*ForConditionalGeneration` heads are served the same way: their text settings come
from `config.get_text_config()`, the output keeps their own class (image outputs, rope deltas), and the
loss is fused only where this transformers version's forward computes it with `self.loss_function` (its
softcap and router-loss default read from the same source).

The lm_head weight is read at call time. An lm_head that is not a plain `nn.Linear` (a PEFT LoRA layer
or `modules_to_save` wrapper, an accelerate-hooked forward) is called as a module and its logits go
through the cross-entropy kernel instead (materialized, but correct). An `nn.Linear` lm_head that
carries forward hooks (FSDP2 `fully_shard` on lm_head, DeepSpeed ZeRO-3 partitioning) is run inside
its own hooks, so the weight the fused loss reads is the gathered one, never the raw shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import types
import typing

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput

from liger_kernels import functional as LF
from liger_kernels.ops.fused_linear_cross_entropy import chunk_rows
from liger_plugins.patching.forwards import divide_by_items, mark, shift_targets
from liger_plugins.patching.registry import ArchitectureTraits

try:  # transformers >= 5.2x: int, 1-D positions, 2-D positions or a boolean mask
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # older 5.x: int (keep the last n; 0 keeps all) or a 1-D tensor of positions

    def slice_logits_to_keep(hidden_states, logits_to_keep):
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]


_DEFAULT_LOSS = LOSS_MAPPING["ForCausalLM"]

# Logits bytes per chunk of the model's fused loss: 4x the op's own default (128 MiB), which is sized
# for the op alone (<= 1.2 GB beyond its inputs at hidden 4096). Inside a training step the loss runs
# next to GBs of saved activations, and longer chunks make its GEMMs efficient: each chunk's
# dW += g.T @ x reads and writes all of dW, and the dX product of a short chunk needs split-K. On the
# 1.2 B Llama of ANCHORS.md (H100): 62.7k tok/s at 512 MiB vs 60.1k at 128 MiB, both at 24.98 GiB
# peak (the loss is not at the step's peak); 1 GiB chunks raised the peak (25.32 GiB) and ran slower.
MODEL_LOSS_CHUNK_BYTES = 512 * 2**20


def _output_fields(cls) -> frozenset:
    # Read when the forward is built: torch.compile cannot trace dataclasses.fields.
    return frozenset(f.name for f in dataclasses.fields(cls))


def _annotated_output_class(original):
    """The output class `original` says it returns (`-> tuple | Gemma3CausalLMOutputWithPast`), if it
    names exactly one with loss and logits; vision-language heads return their own (image outputs...)."""
    try:
        hint = inspect.signature(original, eval_str=True).return_annotation
    except (NameError, TypeError, ValueError):  # an annotation that does not resolve
        return None
    classes = [a for a in typing.get_args(hint) or (hint,) if isinstance(a, type) and issubclass(a, ModelOutput)]
    if len(classes) == 1 and {"loss", "logits"} <= _output_fields(classes[0]):
        return classes[0]
    return None


def computes_default_loss(forward) -> bool:
    """Whether a head's forward computes its loss with `self.loss_function` (what the fused loss
    replaces), read from its source. Gemma3ForConditionalGeneration of transformers < 5.2x computes its
    own loss, over the positions the attention mask keeps: the fused forward must not replace it."""
    return _source_mentions(forward, "self.loss_function")


def _source_mentions(forward, text: str) -> bool:
    forward = getattr(forward, "__liger_original__", forward)
    try:
        source = inspect.getsource(inspect.unwrap(forward))
    except (OSError, TypeError):  # no source to read: assume it does
        return True
    return text in source


def _text_setting(model, name: str):
    """An MoE setting: on the model (Mixtral keeps num_experts... there), else in its text config
    (Qwen3-VL-MoE keeps them in config.text_config)."""
    return getattr(model, name) if hasattr(model, name) else getattr(model.config.get_text_config(), name)


def make_causal_lm_forward(traits: ArchitectureTraits, original):
    """The fused forward replacing `original` (the causal-LM class's own, unbound, forward)."""
    # Positional arguments are mapped to names once, so the call path is plain dict work
    # (torch.compile traces it without graph breaks).
    signature = inspect.signature(original)
    params = list(signature.parameters.values())[1:]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    aux_loss_fn = traits.modeling_module().load_balancing_loss_func if traits.moe else None
    if traits.softcap_config and not _source_mentions(original, traits.softcap_config):
        # This transformers version's forward applies no softcap (PaliGemma before 5.2x).
        traits = dataclasses.replace(traits, softcap_config=None)
    # Whether an unset `output_router_logits` means the config's value (else False: the Qwen3-VL-MoE and
    # GLM-4.5V heads of transformers < 5.2x add the router loss only when it is passed).
    router_default_from_config = _source_mentions(original, "config.output_router_logits")
    output_class = _annotated_output_class(original)
    output_fields = _output_fields(output_class) if output_class else None

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
        if aux_loss_fn is not None and kwargs.get("output_router_logits") is None:
            kwargs["output_router_logits"] = (
                router_default_from_config and self.config.get_text_config().output_router_logits
            )
        return _fused_loss_forward(self, traits, aux_loss_fn, kwargs, output_class, output_fields)

    # Same signature as the original: HF Trainer keeps only the dataset columns that forward names.
    forward.__signature__ = signature
    forward.__doc__ = original.__doc__
    return mark(forward, original, "causal_lm_forward")


def _fused_loss_forward(self, traits: ArchitectureTraits, aux_loss_fn, kwargs: dict, output_class, output_fields):
    labels = kwargs.pop("labels")
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)

    # Like the original: every remaining argument goes to the base model (it ignores the loss kwargs).
    decoder = base_model(self)
    own_positions = contextlib.nullcontext()
    if _skip_kv_cache(decoder, kwargs):
        kwargs["use_cache"] = False
        # Left out: models with sub-configs (vision-language wrappers), whose decoders may derive
        # positions from the image layout. The others make 0..T-1 in every row when given none.
        if not traits.sub_configs:
            own_positions = _positions_are_the_models_own()
    with own_positions:
        outputs = decoder(**kwargs)
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
    if output_class is None:
        # MoE models return MoeCausalLMOutputWithPast (router_logits), with or without an aux loss.
        moe_output = aux_loss_fn is not None or hasattr(outputs, "router_logits")
        output_class = MoeCausalLMOutputWithPast if moe_output else CausalLMOutputWithPast
        output_fields = _DEFAULT_OUTPUT_FIELDS[output_class]
    if aux_loss_fn is not None:
        fields["aux_loss"] = None
        if kwargs["output_router_logits"]:
            aux_loss = aux_loss_fn(
                outputs.router_logits,
                _text_setting(self, "num_experts"),
                _text_setting(self, "num_experts_per_tok"),
                kwargs.get("attention_mask"),
            )
            fields["aux_loss"] = aux_loss
            fields["loss"] = loss + _text_setting(self, "router_aux_loss_coef") * aux_loss.to(loss.device)
    # The base model's other outputs (cache, hidden_states, attentions, router_logits) by name, so the
    # cache field is right whichever name this transformers version gives it.
    for name, value in outputs.items():
        if name in output_fields and name not in fields and name != "last_hidden_state":
            fields[name] = value
    output = output_class(**fields)
    if return_dict:
        return output
    # As the original's to_tuple() (None fields left out), except that the logits keep their place as
    # None: `loss, logits = outputs[:2]` and the cache at outputs[2] (use_cache=True) still line up.
    # (HF's output classes put loss, then an MoE aux_loss, before the logits.)
    values = output.to_tuple()
    before_logits = sum(1 for name in ("loss", "aux_loss") if fields.get(name) is not None)
    return values[:before_logits] + (None,) + values[before_logits:]


_DEFAULT_OUTPUT_FIELDS = {cls: _output_fields(cls) for cls in (CausalLMOutputWithPast, MoeCausalLMOutputWithPast)}


_TAKES_USE_CACHE: dict[type, bool] = {}


def _skip_kv_cache(decoder: nn.Module, kwargs: dict) -> bool:
    """Whether the loss path may run the base model with use_cache=False where the caller left it unset.

    A training loss needs no KV cache, and building one copies every layer's keys and values
    (transformers' DynamicLayer.update concatenates onto an empty tensor): 32 copies, 3.6 ms of the
    1.2 B Llama step on the H100 (docs/e2e/h100_run9). Without a cache, transformers looks for packed
    sequences in `position_ids` when no attention_mask is given, so this is done only where that
    changes nothing: no position_ids passed (the model's own are 0..T-1, never packed; eager mode
    checks that with one host sync at mask creation) and not under torch.compile (where the check
    cannot run and transformers would materialize a mask instead of SDPA's is_causal).
    """
    if "use_cache" in kwargs or kwargs.get("position_ids") is not None or torch.compiler.is_compiling():
        return False
    cls = type(decoder)
    if cls not in _TAKES_USE_CACHE:
        _TAKES_USE_CACHE[cls] = "use_cache" in inspect.signature(cls.forward).parameters
    return _TAKES_USE_CACHE[cls]


# True while a text decoder runs from the loss path with no cache and no position_ids passed: the
# positions are the ones the decoder makes itself, 0..T-1 in every row, so never packed sequences.
_OWN_POSITIONS = contextvars.ContextVar("liger_own_positions", default=False)


@contextlib.contextmanager
def _positions_are_the_models_own():
    token = _OWN_POSITIONS.set(True)
    try:
        yield
    finally:
        _OWN_POSITIONS.reset(token)


def make_packed_sequence_check(original):
    """transformers' `masking_utils.find_packed_sequence_indices`, which looks for packed sequences in
    `position_ids` when a mask is built with neither a padding mask nor a cache, and syncs the host
    with the GPU to decide (`.all()`). With the KV cache off (`_skip_kv_cache`) that runs on every
    training step; where the positions are the decoder's own 0..T-1 the answer is known, "not packed"
    (None), and it is given without the sync: ~0.8-1.2 ms per step of GPU idle on the H200
    (docs/e2e/h200_run1/profile.json, the gap after the check and the host still level with the GPU
    after it). Everywhere else the original decides."""

    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        # Never while Dynamo traces (it cannot read a ContextVar; the flag is never set then anyway,
        # see _skip_kv_cache): the original, which skips its sync under tracing itself.
        if not torch.compiler.is_compiling() and _OWN_POSITIONS.get():
            return None
        return original(position_ids, *args, **kwargs)

    return mark(find_packed_sequence_indices, original, "find_packed_sequence_indices")


def base_model(model: nn.Module) -> nn.Module | None:
    """The decoder a causal LM's forward calls: `model.<base_model_prefix>`, else `model.model`
    (Llama4ForCausalLM declares the prefix "language_model" but keeps its decoder in `self.model`)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return base if isinstance(base, nn.Module) else getattr(model, "model", None)


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
        softcap=getattr(model.config.get_text_config(), traits.softcap_config, None) if traits.softcap_config else None,
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
    rows = chunk_rows(hidden.shape[0], weight.shape[0], hidden.element_size(), MODEL_LOSS_CHUNK_BYTES)
    return LF.fused_linear_cross_entropy(hidden, weight, targets, bias=lm_head.bias, chunk_size=rows, **options)


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
