"""Axolotl plugin: an Axolotl YAML config turns on liger-plugins' kernels.

    plugins:
      - liger_plugins.axolotl.LigerPlugin
    liger_rope: true
    liger_rms_norm: true
    liger_glu_activation: true
    liger_fused_linear_cross_entropy: true   # or liger_cross_entropy: true, not both
    liger_layer_norm: true                   # LayerNorm models (Cohere)

Written against Axolotl 0.19.0 (the newest release for Python 3.11) and the plugin API that 0.21 keeps:
`axolotl.integrations.base.BasePlugin`, its `get_input_args` schema mixin, and the model loader's
`pre_model_load` / `post_model_build` hooks. Needs no `liger-kernel` package.

Keys: the names of Axolotl's own Liger plugin, each a YAML boolean; unset or false leaves that kernel
off. liger_rope -> rope, liger_rms_norm -> rms_norm, liger_glu_activation -> the gated MLP kernel
(swiglu or geglu, picked by the model's activation), liger_layer_norm -> layer_norm,
liger_cross_entropy -> cross_entropy, liger_fused_linear_cross_entropy -> fused_linear_cross_entropy,
and one key of ours: liger_qkv_projections -> qkv_projections (the attention's q/k/v projections as
one op) (keywords of `liger_plugins.patching.apply_liger`). Also ours, the optimizer rather than a
patch: liger_adamw makes the trainer's torch AdamW liger_kernels.optim.AdamW (`post_trainer_create`).

Validation happens inside Axolotl's own (`load_cfg` -> `validate_config`), which merges `LigerPluginsArgs`
into its config schema:
- a value that is not true/false is rejected, naming the key;
- any other `liger_*` key is rejected, naming it and the closest accepted key. Axolotl ignores keys it does
  not know, so without this a typo (`liger_rms_nrom`) would silently train without the kernel. Keys only
  Axolotl's own Liger plugin has (liger_swiglu, liger_rms_norm_gated, liger_use_token_scaling,
  liger_kernel_impl) are rejected the same way;
- both cross-entropy keys together are rejected by Axolotl's own check;
- listing this plugin together with Axolotl's own `axolotl.integrations.liger.LigerPlugin` is rejected:
  both read the same keys and would patch the same model twice, with different kernels.

Hooks (Axolotl's `ModelLoader.load` calls them in this order):
- `pre_model_load(cfg)`: class level, `apply_liger(cfg.model_config_type, ...)`, before the model is built
  or its weights are read; an architecture liger-plugins does not support fails here with a ValueError
  listing the supported model types. Class-level patches stay for the rest of the process, as with
  Axolotl's own plugin (`liger_plugins.patching.unpatch()` undoes them).
- `post_model_build(cfg, model)`: instance level on the built model, before LoRA adapters are added and
  before the trainer and accelerate wrap it (DDP, FSDP, DeepSpeed). It checks each patched module has
  the layout the kernels read and catches what the class-level patch could not reach; where the class
  level already did everything, it reports that. The summary is logged at INFO.
- `post_model_load(cfg, model)`: after LoRA and Axolotl's own post-load patches, warns if a module of a
  patched class now runs a forward set on its instance. With `adapter: lora`, Axolotl auto-enables its
  LoRA kernels (`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`; CUDA only): `lora_mlp_kernel`
  replaces each MLP's forward with Axolotl's fused LoRA SwiGLU, so liger's SwiGLU runs there only with
  `lora_mlp_kernel: false` (its attention rewrite binds the rotary function when it runs, after the
  class-level patch, so liger's RoPE stays).

Which plugin handles the keys: this plugin acts on a config that lists it in `plugins:`. Axolotl keeps one
plugin manager per process and calls the hooks of every plugin it ever registered, so a plugin listed by
an earlier config stays inert for a config that does not list it. Axolotl >= 0.21 also loads plugins
registered under the `axolotl.plugins` entry-point group into every run; registered there, this plugin
also acts on configs that do not list it, unless they list Axolotl's own Liger plugin (which then
handles the keys alone).
"""

from __future__ import annotations

import difflib
import logging

from axolotl.integrations.base import BasePlugin, PluginManager
from pydantic import BaseModel, StrictBool, model_validator

from liger_plugins.hf import as_liger_adamw
from liger_plugins.patching import PatchSummary, apply_liger
from liger_plugins.patching.forwards import is_liger

# Axolotl's logging config shows INFO only for loggers named "axolotl.*"; the patch summaries belong there.
logger = logging.getLogger("axolotl.integrations.liger_plugins")

# Axolotl config key -> keyword of liger_plugins.patching.apply_liger.
CONFIG_KEYS = {
    "liger_rope": "rope",
    "liger_rms_norm": "rms_norm",
    "liger_glu_activation": "swiglu",
    "liger_layer_norm": "layer_norm",
    "liger_cross_entropy": "cross_entropy",
    "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "liger_qkv_projections": "qkv_projections",  # ours only: the attention's q/k/v projections as one op
}
# Ours only, the optimizer rather than a patch: the trainer's torch AdamW becomes liger_kernels.optim.AdamW.
ADAMW_KEY = "liger_adamw"

# Keys only Axolotl's own Liger plugin reads, with what to do instead.
AXOLOTL_LIGER_ONLY_KEYS = {
    "liger_swiglu": "it is Axolotl's deprecated name for liger_glu_activation; use that",
    "liger_rms_norm_gated": "it is a kernel of Axolotl's own Liger plugin (liger-kernel), not of liger-plugins",
    "liger_use_token_scaling": "it is an option of Axolotl's own Liger plugin (liger-kernel), not of liger-plugins",
    "liger_kernel_impl": "it selects a liger-kernel backend (Axolotl's own Liger plugin), not used by liger-plugins",
}


class LigerPluginsArgs(BaseModel):
    """Config keys of `LigerPlugin`, merged into Axolotl's config schema."""

    liger_rope: StrictBool | None = None
    liger_rms_norm: StrictBool | None = None
    liger_glu_activation: StrictBool | None = None
    liger_layer_norm: StrictBool | None = None
    liger_cross_entropy: StrictBool | None = None
    liger_fused_linear_cross_entropy: StrictBool | None = None
    liger_qkv_projections: StrictBool | None = None
    liger_adamw: StrictBool | None = None

    @model_validator(mode="before")
    @classmethod
    def check_liger_keys(cls, data):
        if not isinstance(data, dict) or not _in_charge(data.get("plugins")):
            return data
        if _listed_axolotl_liger(data.get("plugins")):
            raise ValueError(
                "plugins lists both liger_plugins.axolotl.LigerPlugin and Axolotl's own Liger plugin "
                "(axolotl.integrations.liger.LigerPlugin); both read the liger_* keys and would patch the "
                "model twice: list only one of them"
            )
        if data.get(ADAMW_KEY) and data.get("optimizer") not in (None, "adamw_torch", "adamw_torch_fused"):
            raise ValueError(
                f"liger_adamw: true replaces torch's AdamW (optimizer: adamw_torch or adamw_torch_fused); "
                f"optimizer: {data.get('optimizer')!r} is another one: drop liger_adamw or change the optimizer")
        for key in data:
            if key.startswith("liger_") and key not in CONFIG_KEYS and key != ADAMW_KEY:
                close = difflib.get_close_matches(key, [*CONFIG_KEYS, ADAMW_KEY], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                if key in AXOLOTL_LIGER_ONLY_KEYS:
                    hint = f" ({AXOLOTL_LIGER_ONLY_KEYS[key]})"
                raise ValueError(
                    f"unknown config key {key!r}{hint}: liger_plugins.axolotl.LigerPlugin accepts "
                    f"{', '.join([*CONFIG_KEYS, ADAMW_KEY])}"
                )
        return data


class LigerPlugin(BasePlugin):
    """Patches the model Axolotl loads with liger-plugins' kernels (see the module docstring)."""

    def get_input_args(self) -> str:
        return f"{__name__}.LigerPluginsArgs"

    def pre_model_load(self, cfg) -> PatchSummary | None:
        """Class level, before Axolotl builds the model."""
        kwargs = _kwargs(cfg)
        if kwargs is None:
            if _lists_this_plugin(cfg.get("plugins")) and not cfg.get(ADAMW_KEY):
                logger.warning("liger_plugins.axolotl.LigerPlugin is listed, but no liger_* key is true")
            return None
        summary = apply_liger(cfg.model_config_type, **kwargs)
        logger.info("%s", summary)
        return summary

    def post_model_build(self, cfg, model) -> PatchSummary | None:
        """Instance level, on the built model before adapters and before the trainer wraps it."""
        kwargs = _kwargs(cfg)
        if kwargs is None:
            return None
        summary = apply_liger(model, **kwargs)
        logger.info("%s", summary)
        return summary

    def post_trainer_create(self, cfg, trainer) -> None:
        """`liger_adamw: true`: the trainer's torch AdamW (`optimizer: adamw_torch` or `adamw_torch_fused`)
        becomes liger_kernels.optim.AdamW (the numbers of torch's foreach step, in one pass). Only the
        class changes: the trainer's own `get_optimizer_cls_and_kwargs` is wrapped on the instance, so
        its create_optimizer builds the same parameter groups and hyperparameters as without the key
        (handing the class over as `optimizer_cls_and_kwargs` instead would send Axolotl down its
        custom-optimizer path, with other groups). Refused: an optimizer chosen already, or another one."""
        if not (_in_charge(cfg.get("plugins")) and cfg.get(ADAMW_KEY)):
            return
        if trainer.optimizer is not None or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
            raise ValueError("liger_adamw: true, but this trainer's optimizer is chosen already (a custom "
                             "optimizer or optimizer_cls_and_kwargs): drop liger_adamw")
        choose = trainer.get_optimizer_cls_and_kwargs

        def get_optimizer_cls_and_kwargs(args, model=None):
            return as_liger_adamw(*choose(args, model), "liger_adamw: true", "this run's optimizer", logger)

        trainer.get_optimizer_cls_and_kwargs = get_optimizer_cls_and_kwargs

    def post_model_load(self, cfg, model) -> list[str] | None:
        """After adapters and Axolotl's post-load patches: warn about modules whose class runs a liger
        forward but whose instance now has another one (Axolotl's LoRA kernels, auto-enabled for
        `adapter: lora`, replace the MLP forward with their own fused LoRA SwiGLU). Returns their names."""
        if _kwargs(cfg) is None:
            return None
        replaced = sorted({
            type(module).__name__
            for module in model.modules()
            if is_liger(getattr(type(module), "forward", None)) and not is_liger(module.forward)
        })
        if replaced:
            logger.warning(
                "liger_plugins: after loading, %s modules run a forward set on the instance instead of the "
                "liger kernel (with adapter: lora, Axolotl's lora_mlp_kernel replaces the MLP forward; set "
                "lora_mlp_kernel: false to keep liger's SwiGLU there)", ", ".join(replaced),
            )
        return replaced


def _kwargs(cfg) -> dict[str, bool] | None:
    """`apply_liger` keywords for a validated config; None if this plugin does not handle it or no key
    is true."""
    if not _in_charge(cfg.get("plugins")):
        return None
    kwargs = {name: bool(cfg.get(key)) for key, name in CONFIG_KEYS.items()}
    return kwargs if any(kwargs.values()) else None


def _listed(plugin_names) -> list[BasePlugin]:
    """The plugin objects the plugin manager holds for the names a config lists (Axolotl >= 0.21 also
    accepts "module:Class" and keys its plugins by "module.Class")."""
    plugins = PluginManager.get_instance().plugins
    keys = (name.replace(":", ".") for name in plugin_names or ())
    return [plugins[key] for key in keys if key in plugins]


def _listed_axolotl_liger(plugin_names) -> bool:
    return any(
        type(plugin).__module__.startswith("axolotl.integrations.liger") and type(plugin).__name__ == "LigerPlugin"
        for plugin in _listed(plugin_names)
    )


def _lists_this_plugin(plugin_names) -> bool:
    return any(isinstance(plugin, LigerPlugin) for plugin in _listed(plugin_names))


def _in_charge(plugin_names) -> bool:
    """Whether this plugin handles the liger_* keys of a config listing `plugin_names` (module docstring)."""
    if _lists_this_plugin(plugin_names):
        return True
    if _listed_axolotl_liger(plugin_names):
        return False
    return _registered_by_entry_point()


def _registered_by_entry_point() -> bool:
    """Axolotl >= 0.21 loads `axolotl.plugins` entry points into every run (`get_builtin_plugins`);
    older releases load only the plugins a config lists."""
    from axolotl.integrations import base

    get_builtin_plugins = getattr(base, "get_builtin_plugins", None)
    if get_builtin_plugins is None:
        return False
    plugins = PluginManager.get_instance().plugins
    return any(isinstance(plugins.get(name), LigerPlugin) for name in get_builtin_plugins())
