"""Put liger_kernels into Hugging Face causal LMs with one call.

    from liger_plugins.patching import apply_liger, unpatch

    apply_liger("llama")                  # class level: every Llama model built from now on
    model = AutoModelForCausalLM.from_config(config)

    summary = apply_liger(model)          # or instance level: this built model (PEFT models too)
    print(summary)
    unpatch(model)                        # restore the original forwards

    model = AutoLigerKernelForCausalLM.from_pretrained(path, rope=True, swiglu=False)

Kernels (keyword flags of `apply_liger` and `AutoLigerKernelForCausalLM`):
- rope: the rotary embedding, module-level function of the modeling module (`apply_rotary_pos_emb`
  rotate-half; Qwen2-VL's `apply_multimodal_rotary_pos_emb` M-RoPE where transformers has it; Llama 4's
  complex `apply_rotary_emb`); see patch.py on why an instance-level patch of it applies to the whole
  modeling module.
- rms_norm: every RMSNorm class with its offset / casting mode / in-place policy.
- swiglu: gated MLPs and MoE expert gates: silu -> swiglu, gelu (tanh or erf) -> geglu.
- fused_linear_cross_entropy: the causal LM's forward computes the training loss from the hidden states
  without materializing logits (see fused_forward.py for exactly when).
- cross_entropy: instead of the fused loss, the loss on materialized logits runs the CE kernel
  (exclusive with fused_linear_cross_entropy).
- layer_norm: LayerNorm classes (Cohere).
- fused_moe (off by default): MoE experts' whole forward on the fused MoE kernel (grouped GEMMs, no
  per-expert Python loop) where they are SiLU-gated in transformers' default 3-D layout; the others
  keep their forward. Off by default until it is benchmarked against transformers' grouped_mm experts.
- causal_sdpa_under_compile: under torch.compile, SDPA attention with no padding mask runs with
  is_causal=True instead of a materialized causal mask, as transformers already decides in eager mode
  (see forwards.make_causal_mask_decision); module level, for every architecture, like rope.
- fused_add_rms_norm (default: the value of rms_norm): in pre-norm decoder layers (Llama, Mistral,
  Qwen2/3, Gemma...; registry `decoder_layers`), `residual + attention output` and
  post_attention_layernorm run as one kernel each way, and the layer input's two gradients are added in
  input_layernorm's backward kernel (the same values; two bf16 adds and their gradient adds fewer).
- qkv_projections: the attention's `self.q_proj(hidden_states)`, `self.k_proj(...)`, `self.v_proj(...)`
  calls (registry `attentions`) run as one op (liger_kernels.functional.linear_projections): the same
  outputs, the input gradients of the three summed in the products instead of two add kernels; only
  those calls of the attention's own forward are rewritten (forwards.make_attention_forward).

Supported model types: `SUPPORTED_MODEL_TYPES`; anything else raises ValueError listing them.
Patch before wrapping the model (FSDP, DeepSpeed, accelerate device maps): class level before
building, instance level after building.
"""

from __future__ import annotations

import logging

from torch import nn

from liger_plugins.patching import patch
from liger_plugins.patching.auto import AutoLigerKernelForCausalLM
from liger_plugins.patching.patch import KernelOptions, PatchSummary
from liger_plugins.patching.registry import SUPPORTED_MODEL_TYPES, TRAITS, ArchitectureTraits, get_traits

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TRAITS",
    "ArchitectureTraits",
    "AutoLigerKernelForCausalLM",
    "PatchSummary",
    "apply_liger",
    "get_traits",
    "revert_liger",
    "unpatch",
]

logger = logging.getLogger("liger_plugins.patching")


def apply_liger(
    model_or_model_type: str | nn.Module,
    *,
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    layer_norm: bool = True,
    fused_moe: bool = False,
    causal_sdpa_under_compile: bool = True,
    fused_add_rms_norm: bool | None = None,
    qkv_projections: bool = True,
    verbose: bool = False,
) -> PatchSummary:
    """Patch a model type (str: class level) or a built model (instance level; a PEFT model is
    unwrapped to its base model). Returns what was patched; logged on "liger_plugins.patching"
    (INFO with verbose=True, else DEBUG). Idempotent: what is already patched stays as it is."""
    options = KernelOptions(rope, rms_norm, swiglu, cross_entropy, fused_linear_cross_entropy, layer_norm, fused_moe,
                            causal_sdpa_under_compile, fused_add_rms_norm, qkv_projections)
    if isinstance(model_or_model_type, str):
        summary = patch.patch_classes(get_traits(model_or_model_type), options)
    elif isinstance(model_or_model_type, nn.Module):
        model = _unwrap(model_or_model_type)
        summary = patch.patch_instance(model, get_traits(_model_type(model)), options)
    else:
        raise TypeError(
            "apply_liger takes a model type (str) or a model (nn.Module), got "
            f"{type(model_or_model_type).__name__}"
        )
    logger.log(logging.INFO if verbose else logging.DEBUG, "%s", summary)
    return summary


def unpatch(model_or_model_type: str | nn.Module | None = None) -> None:
    """Undo `apply_liger`: for a model type, its class-level patches; for a model, the patches applied
    to that instance; with no argument, every class-level patch."""
    if model_or_model_type is None:
        patch.unpatch_all_classes()
    elif isinstance(model_or_model_type, str):
        patch.unpatch_classes(get_traits(model_or_model_type).model_type)
    else:
        model = _unwrap(model_or_model_type)
        patch.unpatch_instance(model)


revert_liger = unpatch


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT's PeftModel keeps the transformers model behind get_base_model().
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"{type(model).__name__} has no config.model_type; apply_liger patches Hugging Face "
            f"transformers models of types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type
