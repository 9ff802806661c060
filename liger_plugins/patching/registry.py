"""Architecture traits: what to swap in each supported Hugging Face causal LM, as data, not model code.

Each `ArchitectureTraits` names the classes of one modeling module (`transformers.models.<x>.modeling_<x>`)
and how they compute, read from the module's source for transformers 5.x:

- norms: RMSNorm classes with their flavour. `offset` is 1.0 for Gemma's `x * (1 + w)`; `casting_mode`
  "llama" normalizes in fp32, casts to the input dtype, then multiplies by the weight
  (`w * x.to(dtype)`), "gemma" does everything in fp32 and casts at the end (`(x * w).to(dtype)`;
  Olmo2 is "gemma" with offset 0). `in_place` lets the kernel's backward overwrite the incoming
  gradient; it is off where some instance of the class feeds its output straight into a residual
  add (Gemma2/3 and Olmo2/3 post-norms, GLM4's post-sublayer norms), because autograd hands that same
  gradient tensor to the residual branch too.
- layer_norms: LayerNorm classes (weight, optional bias), e.g. Cohere's.
- mlps: gated MLP classes and their layout: "split" (gate_proj, up_proj, down_proj) or "fused"
  (Phi3/GLM4 gate_up_proj whose first half is the gate), and the attribute holding the activation.
  The activation decides the kernel at call time (silu -> swiglu, gelu tanh -> geglu tanh,
  gelu erf -> geglu none); any other activation runs the original forward.
- experts: MoE expert classes with 3-D `gate_up_proj` weights; their `_apply_gate(gate_up_out)` hook
  (used by transformers' grouped_mm/batched_mm expert implementations) gets the fused activation.
- rope: name of the module-level rotate-half function the attention calls, or None where the model's
  rotary layout is not rotate-half (GLM4 and Cohere interleave pairs).
- causal_lm: the `*ForCausalLM` class; its logit post-processing: `softcap_config` (config attribute
  of the final tanh softcap) and `logit_scale` (a function of the model giving the multiplier applied
  to the logits: Granite divides by `config.logits_scaling`, Cohere multiplies by `model.logit_scale`).
- moe: the causal LM adds the router load-balancing loss (`load_balancing_loss_func` of the module).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable


@dataclass(frozen=True)
class NormSpec:
    offset: float = 0.0
    casting_mode: str = "llama"
    in_place: bool = True


@dataclass(frozen=True)
class MLPSpec:
    layout: str = "split"  # "split": gate_proj/up_proj/down_proj; "fused": gate_up_proj/down_proj
    act_attr: str = "act_fn"


@dataclass(frozen=True)
class ArchitectureTraits:
    model_type: str
    module: str
    causal_lm: str
    norms: dict[str, NormSpec] = field(default_factory=dict)
    layer_norms: tuple[str, ...] = ()
    mlps: dict[str, MLPSpec] = field(default_factory=dict)
    experts: tuple[str, ...] = ()
    rope: str | None = "apply_rotary_pos_emb"
    softcap_config: str | None = None
    logit_scale: Callable | None = None
    moe: bool = False

    def modeling_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def cls(self, name: str) -> type:
        module = self.modeling_module()
        if not hasattr(module, name):
            raise ValueError(
                f"{self.module} has no class {name}: this transformers version does not match the "
                f"{self.model_type!r} traits of liger_plugins.patching"
            )
        return getattr(module, name)


def _granite_scale(model) -> float:
    return 1.0 / model.config.logits_scaling


def _cohere_scale(model) -> float:
    return float(model.logit_scale)


_LLAMA = NormSpec()
_LLAMA_NOT_IN_PLACE = NormSpec(in_place=False)
_GEMMA = NormSpec(offset=1.0, casting_mode="gemma")
_GEMMA_NOT_IN_PLACE = NormSpec(offset=1.0, casting_mode="gemma", in_place=False)
_OLMO2 = NormSpec(offset=0.0, casting_mode="gemma", in_place=False)
_SPLIT = MLPSpec()
_FUSED = MLPSpec(layout="fused", act_attr="activation_fn")


def _modeling(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


def _dense(model_type: str, prefix: str, norm: NormSpec = _LLAMA, module: str | None = None, **extra):
    """Traits of a dense model whose classes follow the `<Prefix>RMSNorm / <Prefix>MLP` naming."""
    return ArchitectureTraits(
        model_type=model_type,
        module=_modeling(module or model_type),
        causal_lm=f"{prefix}ForCausalLM",
        norms={f"{prefix}RMSNorm": norm},
        mlps={f"{prefix}MLP": extra.pop("mlp", _SPLIT)},
        **extra,
    )


TRAITS: dict[str, ArchitectureTraits] = {
    t.model_type: t
    for t in [
        _dense("llama", "Llama"),
        _dense("mistral", "Mistral"),
        _dense("ministral", "Ministral"),
        _dense("qwen2", "Qwen2"),
        _dense("qwen3", "Qwen3"),  # the same class also serves as q_norm/k_norm over head_dim
        _dense("smollm3", "SmolLM3"),
        _dense("gemma", "Gemma", _GEMMA),
        _dense("gemma2", "Gemma2", _GEMMA_NOT_IN_PLACE, softcap_config="final_logit_softcapping"),
        _dense("gemma3_text", "Gemma3", _GEMMA_NOT_IN_PLACE, module="gemma3",
               softcap_config="final_logit_softcapping"),
        _dense("phi3", "Phi3", mlp=_FUSED),  # partial rotary handled by the rope wrapper
        _dense("granite", "Granite", logit_scale=_granite_scale),
        _dense("olmo2", "Olmo2", _OLMO2),
        _dense("olmo3", "Olmo3", _OLMO2),
        _dense("glm4", "Glm4", _LLAMA_NOT_IN_PLACE, mlp=_FUSED, rope=None),  # interleaved rotary
        ArchitectureTraits(
            model_type="mixtral",
            module=_modeling("mixtral"),
            causal_lm="MixtralForCausalLM",
            norms={"MixtralRMSNorm": _LLAMA},
            experts=("MixtralExperts",),
            moe=True,
        ),
        ArchitectureTraits(
            model_type="qwen3_moe",
            module=_modeling("qwen3_moe"),
            causal_lm="Qwen3MoeForCausalLM",
            norms={"Qwen3MoeRMSNorm": _LLAMA},
            mlps={"Qwen3MoeMLP": _SPLIT},  # dense layers (mlp_only_layers)
            experts=("Qwen3MoeExperts",),
            moe=True,
        ),
        ArchitectureTraits(
            model_type="cohere",
            module=_modeling("cohere"),
            causal_lm="CohereForCausalLM",
            layer_norms=("CohereLayerNorm",),  # per-head q/k norms (2-D weight) keep their forward
            mlps={"CohereMLP": _SPLIT},
            rope=None,  # interleaved rotary
            logit_scale=_cohere_scale,
        ),
    ]
}

SUPPORTED_MODEL_TYPES = tuple(sorted(TRAITS))


def get_traits(model_type: str) -> ArchitectureTraits:
    """Traits of `model_type`; ValueError listing the supported types for anything else."""
    try:
        return TRAITS[model_type]
    except KeyError:
        raise ValueError(
            f"model type {model_type!r} is not supported by liger_plugins.patching; supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None
