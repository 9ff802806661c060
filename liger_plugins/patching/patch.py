"""Applying and reverting patches, at class level (a model type, before building) or on one built model.

Class level rebinds attributes of the modeling module's classes (`LlamaRMSNorm.forward`, ...), so every
model of that type built or used afterwards runs the kernels. Instance level rebinds the attributes on
the modules of one model (`module.forward = MethodType(...)`), after checking each module has the
layout the traits expect, and refuses (ValueError naming the module) before touching anything if not.

The rotary function is a module-level function of the modeling module (`apply_rotary_pos_emb`, or the
one the traits name), called by the attention by name: it can only be replaced for the whole module.
An instance-level patch therefore switches rope on for every model of that architecture in the process
until the last patch holding it (class level or instance) is reverted. The same holds for transformers'
`masking_utils._ignore_causal_mask_sdpa` (`causal_sdpa_under_compile`), shared by all architectures.

Every replaced attribute is recorded with its original, so `unpatch` restores exactly what was there.
Patching what is already patched is a no-op (reported as such in the summary).
"""

from __future__ import annotations

import copy
import sys
import types
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from liger_plugins.patching import forwards
from liger_plugins.patching.fused_forward import (
    base_model,
    computes_default_loss,
    make_causal_lm_forward,
    make_packed_sequence_check,
)
from liger_plugins.patching.registry import TRAITS, ArchitectureTraits

_MISSING = object()
_SHARED = object()  # a class attribute another model type patched, that this one relies on too

# model_type -> [(class, attribute, value in the class __dict__ before patching, or _MISSING, or _SHARED)]
_CLASS_PATCHES: dict[str, list[tuple[type, str, object]]] = {}
# (module name, function name) -> [original function, set of holders]
_FUNCTION_PATCHES: dict[tuple[str, str], list] = {}


@dataclass(frozen=True)
class KernelOptions:
    rope: bool = True
    rms_norm: bool = True
    swiglu: bool = True  # every gated MLP activation: swiglu, geglu (tanh or erf)
    cross_entropy: bool = False
    fused_linear_cross_entropy: bool = True
    layer_norm: bool = True
    fused_moe: bool = False  # whole MoE experts forwards on the fused MoE kernel (opt-in: see forwards.py)
    # under torch.compile, SDPA without a padding mask runs is_causal=True, not a materialized mask
    # (transformers' eager-mode decision, see forwards.make_causal_mask_decision)
    causal_sdpa_under_compile: bool = True
    # pre-norm decoder layers: their residual joins run in the RMSNorm kernels (forwards.make_decoder_layer_forward);
    # None: the value of rms_norm (those norms are RMSNorms: a config without the RMSNorm kernel gets none)
    fused_add_rms_norm: bool | None = None
    # the attention's q/k/v projections as one op: their input gradients summed in the products
    # (forwards.make_attention_forward)
    qkv_projections: bool = True

    def __post_init__(self):
        if self.fused_add_rms_norm is None:
            object.__setattr__(self, "fused_add_rms_norm", self.rms_norm)
        if self.cross_entropy and self.fused_linear_cross_entropy:
            raise ValueError(
                "cross_entropy=True and fused_linear_cross_entropy=True are exclusive: the fused loss "
                "already computes the cross-entropy (pass fused_linear_cross_entropy=False to patch the "
                "loss on materialized logits instead)"
            )


@dataclass
class PatchSummary:
    """What a call to `apply_liger` patched; `str()` gives a readable report."""

    target: str
    level: str  # "class" or "instance"
    model_type: str
    patched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"liger patching of {self.target} ({self.level} level, model type {self.model_type!r}):"]
        lines += [f"  patched  {item}" for item in self.patched] or ["  patched  nothing"]
        lines += [f"  skipped  {item}" for item in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- class


def patch_classes(traits: ArchitectureTraits, options: KernelOptions) -> PatchSummary:
    summary = PatchSummary(f"model type {traits.model_type!r}", "class", traits.model_type)
    records = _CLASS_PATCHES.setdefault(traits.model_type, [])

    def rebind(owner: type, attr: str, make, what: str, wrap=lambda fn: fn):
        current = owner.__dict__.get(attr, _MISSING)
        if forwards.is_liger(current):
            # Patched for another model type (Llava patches Pixtral's classes): this one relies on it too.
            if not any(o is owner and a == attr for o, a, _ in records):
                records.append((owner, attr, _SHARED))
            summary.skipped.append(f"{what}: already patched")
            return
        records.append((owner, attr, current))
        setattr(owner, attr, wrap(make(getattr(owner, attr, None))))
        summary.patched.append(what)

    for kind, role, name, attr, make in _module_patch_plan(traits, options):
        cls = traits.cls(name)
        if not hasattr(cls, attr):
            summary.skipped.append(f"{kind}: {name} (this transformers version has no {attr} hook)")
            continue
        mismatch = _class_mismatch(role, cls)
        if mismatch:
            summary.skipped.append(f"{kind}: {name}: {mismatch} (kept the original)")
            continue
        rebind(cls, attr, make, f"{kind}: {name}.{attr}")
    if traits.torch_layer_norm and options.layer_norm:
        summary.skipped.append(
            "layer_norm: torch.nn.LayerNorm (vision tower): patched on a built model only (class level "
            "would patch every LayerNorm in the process)"
        )
    for sub in traits.sub_configs:
        summary.skipped.append(
            f"{sub}: that sub-model's architecture is known only from a built model's config: patch the "
            "built model, or its model type too"
        )
    if traits.causal_lm is None:
        if options.fused_linear_cross_entropy or options.cross_entropy:
            summary.skipped.append(_NO_HEAD.format(traits.model_type))
    else:
        causal_lm = traits.cls(traits.causal_lm)
        if options.fused_linear_cross_entropy:
            if computes_default_loss(causal_lm.forward):
                rebind(causal_lm, "forward", lambda orig: make_causal_lm_forward(traits, orig),
                       f"fused_linear_cross_entropy: {traits.causal_lm}.forward")
                _patch_packed_sequence_check(("class", traits.model_type), summary, traits.model_type)
            else:
                summary.skipped.append(_OWN_LOSS.format(traits.causal_lm))
        if options.cross_entropy:
            rebind(causal_lm, "_loss_function", lambda orig: forwards.causal_lm_cross_entropy,
                   f"cross_entropy: {traits.causal_lm}.loss_function", wrap=staticmethod)
    if options.rope:
        _patch_rope(traits, ("class", traits.model_type), summary)
    if options.causal_sdpa_under_compile:
        _patch_causal_mask_decision(("class", traits.model_type), summary, traits.model_type)
    return summary


def unpatch_classes(model_type: str) -> None:
    for owner, attr, original in reversed(_CLASS_PATCHES.pop(model_type, [])):
        if original is _SHARED or _hand_over(owner, attr, original):
            continue
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    _release_functions(("class", model_type))


def _hand_over(owner: type, attr: str, original) -> bool:
    """Give the patch of `owner.attr` to another model type that relies on it, if one does: that one
    restores `original` when it is unpatched in turn."""
    for records in _CLASS_PATCHES.values():
        for i, (o, a, kept) in enumerate(records):
            if o is owner and a == attr and kept is _SHARED:
                records[i] = (o, a, original)
                return True
    return False


def unpatch_all_classes() -> None:
    holders = {h[1] for entry in _FUNCTION_PATCHES.values() for h in entry[1] if h[0] == "class"}
    for model_type in set(_CLASS_PATCHES) | holders:
        unpatch_classes(model_type)


# ------------------------------------------------------------------------------------------- instance


def patch_instance(model: nn.Module, traits: ArchitectureTraits, options: KernelOptions) -> PatchSummary:
    summary = PatchSummary(f"{type(model).__name__} instance", "instance", traits.model_type)
    parts = [traits] + _sub_model_traits(model, traits, summary)
    # (kind, role, class, attribute, factory, the traits it comes from)
    plan = [(kind, role, part.cls(name), attr, make, part)
            for part in parts for kind, role, name, attr, make in _module_patch_plan(part, options)]
    if traits.torch_layer_norm and options.layer_norm:
        plan.append(("layer_norm", "torch_layer_norm", nn.LayerNorm, "forward",
                     forwards.make_layer_norm_forward, traits))
    is_causal_lm = traits.causal_lm is not None and isinstance(model, traits.cls(traits.causal_lm))

    # 1. Decide and validate everything before changing anything.
    todo = []  # (module, attr, replacement, label)
    already = Counter()
    for path, module in model.named_modules():
        for kind, role, cls, attr, make, part in plan:
            if not isinstance(module, cls):
                continue
            if role == "torch_layer_norm" and not _plain_layer_norm(module):
                continue  # a subclass, no affine weight, or a multi-dimensional normalized shape
            label = f"{kind}: {cls.__name__}.{attr}"
            if not hasattr(cls, attr):
                _skip(summary, f"{kind}: {cls.__name__} (this transformers version has no {attr} hook)")
                continue
            if forwards.is_liger(getattr(module, attr)):
                already[label] += 1
                continue
            if attr in module.__dict__:
                summary.skipped.append(
                    f"{label} at {path or 'model'}: its {attr} is already overridden on the instance "
                    "(e.g. accelerate hooks); patch before dispatching the model"
                )
                continue
            if role == "norm" and getattr(module, "with_scale", True) is False:
                continue  # a weightless norm (Gemma 4's with_scale=False): keeps its own forward
            reason = _check_module(role, module, part)
            if reason is not None:
                raise ValueError(
                    f"refusing to patch module {path!r} ({type(module).__name__}) of a "
                    f"{traits.model_type!r} model: {reason}"
                )
            if role == "norm" and len(_shape(module.weight)) != 1:
                continue  # per-head norm weight: keeps its own forward
            unsupported = _unsupported(role, module, part)
            if unsupported:
                _skip(summary, f"{label}: {unsupported} (kept the original)")
                continue
            todo.append((module, attr, make(getattr(type(module), attr)), label))

    loss_todo = []
    if is_causal_lm:
        _check_causal_lm(model, traits)
        loss_todo = _causal_lm_plan(model, traits, options, summary, already)
        todo += loss_todo
    elif options.fused_linear_cross_entropy or options.cross_entropy:
        summary.skipped.append(_NO_HEAD.format(traits.model_type) if traits.causal_lm is None
                               else f"loss: the model is not a {traits.causal_lm}")

    # 2. Apply.
    records = model.__dict__.setdefault("_liger_patches", _PatchRecords())
    counts = Counter()
    for module, attr, replacement, label in todo:
        bound = replacement if attr == "_loss_function" else types.MethodType(replacement, module)
        setattr(module, attr, bound)
        records.append((module, attr))
        counts[label] += 1
    summary.patched += [f"{label} ({n} module{'s' * (n > 1)})" for label, n in counts.items()]
    summary.skipped += [f"{label}: already patched ({n} module{'s' * (n > 1)})"
                        for label, n in already.items()]
    if options.rope:
        for part in parts:
            _patch_rope(part, ("instance", id(model)), summary)
    if options.causal_sdpa_under_compile:
        _patch_causal_mask_decision(("instance", id(model)), summary, traits.model_type)
    if any(attr == "forward" for _, attr, _, _ in loss_todo):  # the fused loss forward
        _patch_packed_sequence_check(("instance", id(model)), summary, traits.model_type)
    return summary


class _PatchRecords(list):
    """A model's instance patches, [(module, attribute)], kept in the model's __dict__. The patched
    methods are closures bound to the modules: a pickled model would not load (its methods are looked
    up by name then). So pickling the model stops here, at save time, with the fix in the message;
    copy.deepcopy (e.g. TRL's reference model) copies the patches as usual."""

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "this model is patched by liger-plugins at instance level and cannot be pickled whole (a "
            "pickled copy would not load): save model.state_dict() or use save_pretrained(), or call "
            "liger_plugins.patching.unpatch(model) before pickling it"
        )

    def __deepcopy__(self, memo):
        return _PatchRecords(copy.deepcopy(list(self), memo))


def unpatch_instance(model: nn.Module) -> None:
    for module, attr in reversed(model.__dict__.pop("_liger_patches", [])):
        if forwards.is_liger(module.__dict__.get(attr)):
            delattr(module, attr)
    _release_functions(("instance", id(model)))


def _sub_model_traits(model: nn.Module, traits: ArchitectureTraits, summary: PatchSummary):
    """Traits of the registered architectures of the model's sub-configs (Llava's language model)."""
    parts = []
    for sub in traits.sub_configs:
        model_type = getattr(getattr(model.config, sub, None), "model_type", None)
        if model_type in TRAITS:
            parts.append(TRAITS[model_type])
        else:
            summary.skipped.append(f"{sub}: model type {model_type!r} is not supported (keeps its forwards)")
    return parts


def _causal_lm_plan(model, traits, options, summary, already):
    if options.fused_linear_cross_entropy:
        label = f"fused_linear_cross_entropy: {traits.causal_lm}.forward"
        if forwards.is_liger(model.forward):
            already[label] += 1
        elif not computes_default_loss(type(model).forward):
            summary.skipped.append(_OWN_LOSS.format(traits.causal_lm))
        elif "forward" in model.__dict__:
            summary.skipped.append(f"{label}: forward already overridden on the instance")
        else:
            return [(model, "forward", make_causal_lm_forward(traits, type(model).forward), label)]
    if options.cross_entropy:
        label = f"cross_entropy: {traits.causal_lm}.loss_function"
        current = getattr(model, "_loss_function", None)
        if forwards.is_liger(current):
            already[label] += 1
        elif current is not None:
            summary.skipped.append(f"{label}: the model has a custom loss_function")
        else:
            return [(model, "_loss_function", forwards.causal_lm_cross_entropy, label)]
    return []


# ------------------------------------------------------------------------------------------- helpers


def _module_patch_plan(traits: ArchitectureTraits, options: KernelOptions):
    """(kernel flag, module role, class name, attribute, factory of the replacement from the
    original) for the enabled kernels."""
    plan = []
    if options.rms_norm:
        for name, spec in traits.norms.items():
            make = lambda orig, spec=spec: forwards.make_rms_norm_forward(spec, orig)  # noqa: E731
            plan.append(("rms_norm", "norm", name, "forward", make))
    if options.layer_norm:
        for name, offset in traits.layer_norms.items():
            make = lambda orig, offset=offset: forwards.make_layer_norm_forward(orig, offset)  # noqa: E731
            plan.append(("layer_norm", "norm", name, "forward", make))
    if options.swiglu:
        for name, spec in traits.mlps.items():
            make = lambda orig, spec=spec: forwards.make_mlp_forward(spec, orig)  # noqa: E731
            plan.append(("swiglu", "mlp", name, "forward", make))
        plan += [("swiglu", "experts", n, "_apply_gate", forwards.make_apply_gate) for n in traits.experts]
    if options.fused_moe:
        plan += [("fused_moe", "fused_experts", n, "forward", forwards.make_experts_forward) for n in traits.experts]
    if options.fused_add_rms_norm:
        make = lambda orig: forwards.make_decoder_layer_forward(traits, orig)  # noqa: E731
        plan += [("fused_add_rms_norm", "decoder_layer", n, "forward", make) for n in traits.decoder_layers]
    if options.qkv_projections:
        plan += [("qkv_projections", "attention", n, "forward", forwards.make_attention_forward)
                 for n in traits.attentions]
    return plan


def _class_mismatch(role: str, cls: type) -> str | None:
    """Why this transformers version's class does not compute what the replacement re-implements."""
    if role == "decoder_layer" and not forwards.is_liger(cls.__dict__.get("forward")):
        return forwards.prenorm_layer_mismatch(cls)
    if role == "attention" and not forwards.is_liger(cls.__dict__.get("forward")):
        return forwards.attention_projections_mismatch(cls)
    return None


_OWN_LOSS = (
    "fused_linear_cross_entropy: {}.forward computes its own loss, not with transformers' loss_function "
    "(kept the original)"
)
_NO_HEAD = "loss: model type {!r} has no language-model head (a vision encoder): nothing to fuse"


def _plain_layer_norm(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm and module.weight is not None and len(module.normalized_shape) == 1


def _skip(summary: PatchSummary, message: str) -> None:
    if message not in summary.skipped:
        summary.skipped.append(message)


def _shape(param: nn.Parameter):
    """The parameter's logical shape: a DeepSpeed ZeRO-3 partitioned one (built under `zero.Init`)
    is an empty 1-D tensor whose real shape is `ds_shape`."""
    return getattr(param, "ds_shape", None) or param.shape


def _check_module(role: str, module: nn.Module, traits: ArchitectureTraits) -> str | None:
    """Why `module` does not have the layout its replacement forward reads, or None if it does."""
    if role == "torch_layer_norm":
        return None  # checked by _plain_layer_norm
    if role == "norm":
        weight = getattr(module, "weight", None)
        # 2-D: per-head weights (Cohere's q/k norms), which keep their own forward
        if not isinstance(weight, nn.Parameter) or len(_shape(weight)) not in (1, 2):
            return "expected a 1-D `weight` parameter"
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(eps, (int, float)):
            return "expected a float `variance_epsilon` or `eps` attribute"
        return None
    if role == "mlp":
        spec = _mlp_spec(module, traits)
        split = spec.layout == "split"
        names = ("gate_proj", "up_proj", "down_proj") if split else ("gate_up_proj", "down_proj")
        missing = [n for n in names if not isinstance(getattr(module, n, None), nn.Module)]
        if missing:
            return f"expected sub-modules {', '.join(names)}; missing {', '.join(missing)}"
        if not callable(getattr(module, spec.act_attr, None)):
            return f"expected an activation module `{spec.act_attr}`"
        out = getattr(module.gate_up_proj, "out_features", 0) if spec.layout == "fused" else 0
        if out % 2:
            return f"gate_up_proj has an odd out_features {out}; expected [gate; up] halves"
        return None
    if role == "decoder_layer":
        names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        missing = [n for n in names if not isinstance(getattr(module, n, None), nn.Module)]
        return f"expected sub-modules {', '.join(names)}; missing {', '.join(missing)}" if missing else None
    if role == "attention":
        missing = [n for n in ("q_proj", "k_proj", "v_proj") if not isinstance(getattr(module, n, None), nn.Module)]
        return f"expected sub-modules q_proj, k_proj, v_proj; missing {', '.join(missing)}" if missing else None
    if role in ("experts", "fused_experts"):
        weight = getattr(module, "gate_up_proj", None)
        if not isinstance(weight, nn.Parameter) or len(_shape(weight)) != 3 or _shape(weight)[1] % 2:
            return "expected a 3-D `gate_up_proj` parameter (experts, 2 * intermediate, hidden)"
        if not callable(getattr(module, "act_fn", None)):
            return "expected an activation module `act_fn`"
        return None
    raise AssertionError(role)


def _mlp_spec(module: nn.Module, traits: ArchitectureTraits):
    return next(spec for name, spec in traits.mlps.items() if isinstance(module, traits.cls(name)))


def _unsupported(role: str, module: nn.Module, traits: ArchitectureTraits) -> str | None:
    """Why the kernel does not compute this (well-formed) module, or None if it does."""
    if role == "fused_experts":
        return forwards.fused_experts_mismatch(module)
    if role in ("decoder_layer", "attention"):
        return _class_mismatch(role, type(module))
    if role == "mlp":
        act = getattr(module, _mlp_spec(module, traits).act_attr)
    elif role == "experts":
        act = module.act_fn
    else:
        return None
    return None if forwards.gated_kernel(act) is not None else f"activation {type(act).__name__} has no fused kernel"


def _check_causal_lm(model: nn.Module, traits: ArchitectureTraits) -> None:
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(base_model(model), nn.Module) or not isinstance(lm_head, nn.Module):
        raise ValueError(
            f"refusing to patch {type(model).__name__}: expected a base model attribute "
            f"{getattr(model, 'base_model_prefix', 'model')!r} (or `model`) and an `lm_head` module"
        )
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    weight = getattr(lm_head, "weight", None)
    if isinstance(lm_head, nn.Linear) and hidden is not None and _shape(weight)[1] != hidden:
        raise ValueError(
            f"refusing to patch {type(model).__name__}: lm_head weight {tuple(_shape(weight))} does not "
            f"take hidden_size {hidden}"
        )


def _patch_rope(traits: ArchitectureTraits, holder, summary: PatchSummary) -> None:
    if not traits.rope:
        if not traits.sub_configs:  # a wrapper's language model brings its own rotary
            summary.skipped.append("rope: no rotary kernel fits this architecture's rotary layout")
        return
    module = traits.modeling_module()
    # The first alternative this transformers version defines is the one its attention calls.
    spec = next((spec for spec in traits.rope if hasattr(module, spec.function)), None)
    if spec is None:
        names = " / ".join(spec.function for spec in traits.rope)
        summary.skipped.append(f"rope: {module.__name__} has no {names} (this transformers version has no hook)")
        return
    label = f"rope: {module.__name__}.{spec.function} (module level, {spec.kernel} kernel)"
    _patch_function(module, spec.function, forwards.ROTARY_FACTORIES[spec.kernel], holder, label, summary,
                    traits.model_type)


def _patch_causal_mask_decision(holder, summary: PatchSummary, model_type: str) -> None:
    from transformers import masking_utils

    name = "_ignore_causal_mask_sdpa"
    original = getattr(masking_utils, name, None)
    label = f"causal_sdpa_under_compile: transformers.masking_utils.{name} (module level)"
    if original is None or not forwards.takes_causal_mask_decision_arguments(original):
        summary.skipped.append(f"{label}: this transformers version has no such function of the expected arguments")
        return
    _patch_function(masking_utils, name, forwards.make_causal_mask_decision, holder, label, summary, model_type)


def _patch_packed_sequence_check(holder, summary: PatchSummary, model_type: str) -> None:
    from transformers import masking_utils

    name = "find_packed_sequence_indices"
    label = f"fused_linear_cross_entropy: transformers.masking_utils.{name} (module level, no sync for own positions)"
    if not callable(getattr(masking_utils, name, None)):
        summary.skipped.append(f"{label}: this transformers version has no such function")
        return
    _patch_function(masking_utils, name, make_packed_sequence_check, holder, label, summary, model_type)


def _patch_function(
    module: types.ModuleType, name: str, make, holder, label: str, summary: PatchSummary, model_type: str
) -> None:
    """Replace `module.name` by `make(original)` for `holder` (a model type's class patch or an instance
    of `model_type`), or only add the holder if already replaced."""
    key = (module.__name__, name)
    if key in _FUNCTION_PATCHES:
        holders = _FUNCTION_PATCHES[key][1]
        # An instance holds the function too unless its own model type's class patch does (as for its
        # modules); a shared function (masking_utils) held for another model type's classes is not its.
        if holder[0] == "class" or ("class", model_type) not in holders:
            holders.add(holder)
        summary.skipped.append(f"{label}: already patched")
        return
    original = getattr(module, name)
    _FUNCTION_PATCHES[key] = [original, {holder}]
    setattr(module, name, make(original))
    summary.patched.append(label)


def _release_functions(holder) -> None:
    """Drop `holder` from every module-level function patch; restore the functions no one holds."""
    for (module_name, name), (original, holders) in list(_FUNCTION_PATCHES.items()):
        holders.discard(holder)
        if not holders:
            setattr(sys.modules[module_name], name, original)
            del _FUNCTION_PATCHES[(module_name, name)]
