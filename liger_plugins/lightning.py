"""Lightning adapter: `LigerCallback` patches the Hugging Face model(s) inside a LightningModule.

    import lightning.pytorch as pl
    from liger_plugins.lightning import LigerCallback

    trainer = pl.Trainer(callbacks=[LigerCallback(rope=True, swiglu=True)], strategy="ddp", ...)
    trainer.fit(module)

The models are found by walking the LightningModule's submodules for `transformers.PreTrainedModel`
instances (the outermost ones: a PEFT model's base model, not the base model's own inner model) and
patched at instance level with `liger_plugins.patching.apply_liger`; flags are the `liger_kernel_config`
keys (see `liger_plugins.hf.CONFIG_KEYS`), checked when the callback is built.

When, from Lightning's `Trainer._run` (lightning 2.6): `Callback.setup` -> `LightningModule.setup` ->
`LightningModule.configure_model` (no callback hook) -> `Strategy.setup` (moves and wraps the model:
DDP, FSDP, DeepSpeed) -> `on_fit_start`. So the callback patches:
- in its `setup`: models built in `__init__`;
- right after `LightningModule.setup` and `LightningModule.configure_model` return: models built there.
  For that, its `setup` wraps those two methods on the module instance (`functools.wraps`, so
  Lightning's `is_overridden` checks see the user's methods); its `teardown` removes the wrappers.
Either way, before the strategy wraps the model. Where `configure_model` itself shards the model
(`ModelParallelStrategy`: the user's `fully_shard`; DeepSpeed ZeRO-3: `zero.Init`), the callback
patches the sharded model, which is fine: instance patching only rebinds forwards, never touches
parameters, and the fused loss runs `lm_head` inside its own hooks (the gathered weight).

Once the module is set up (after `configure_model`), finding no Hugging Face model, or one that
cannot be patched, raises ValueError naming the module / the model's attribute path and type.

Checked on CPU in tests/plugins/test_lightning.py, training a tiny Llama and comparing with an
unpatched run: single-device; strategy="ddp" (2 processes, gloo; model built in `__init__` and in
`configure_model`); `ModelParallelStrategy` (2 processes, gloo; `configure_model` applies FSDP2
`fully_shard`, so the callback patches an already sharded model). Not verified here:
`FSDPStrategy` (FSDP1; Lightning requires a GPU for it) and `DeepSpeedStrategy` (GPU, not installed).
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import PreTrainedModel

from liger_plugins.hf import liger_kwargs
from liger_plugins.patching import PatchSummary, apply_liger

_WRAPPED_HOOKS = ("setup", "configure_model")


def find_hf_models(module: nn.Module) -> dict[str, PreTrainedModel]:
    """The outermost `PreTrainedModel`s inside `module`, by attribute path ("" for `module` itself)."""
    found: dict[str, PreTrainedModel] = {}
    for path, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(_is_inside(path, outer) for outer in found):
            found[path] = sub
    return found


def _is_inside(path: str, outer: str) -> bool:
    return outer == "" or path.startswith(outer + ".")


class LigerCallback(pl.Callback):
    """Patch the LightningModule's Hugging Face model(s) before the strategy wraps them.

    `LigerCallback(**kernels)`: `liger_kernel_config` keys as keyword flags (rope, rms_norm, swiglu /
    geglu, layer_norm, cross_entropy, fused_linear_cross_entropy); unset ones take `apply_liger`'s
    defaults. `summaries` maps each patched model's attribute path to what was patched.
    """

    def __init__(self, **kernels: bool):
        self.kernels = liger_kwargs(kernels, "LigerCallback flags")
        self.summaries: dict[str, PatchSummary] = {}
        self._models: dict[str, PreTrainedModel] = {}  # what was patched, by attribute path
        self._checkpoints = True  # whether the trainer saves checkpoints (set in setup)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._checkpoints = bool(trainer.checkpoint_callbacks)
        self._patch(pl_module, final=False)  # built in __init__
        builds_in_configure_model = is_overridden("configure_model", pl_module)
        self._patch_after(pl_module, "setup", final=not builds_in_configure_model)
        if builds_in_configure_model:
            self._patch_after(pl_module, "configure_model", final=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in _WRAPPED_HOOKS:
            if getattr(pl_module.__dict__.get(name), "_liger_wrapper", False):
                delattr(pl_module, name)

    def _patch_after(self, pl_module: pl.LightningModule, name: str, final: bool) -> None:
        original = getattr(pl_module, name)
        if getattr(original, "_liger_wrapper", False):  # left by a run that ended without teardown
            original = original.__wrapped__

        @functools.wraps(original)
        def hook(*args, **kwargs):
            result = original(*args, **kwargs)
            self._patch(pl_module, final)
            return result

        hook._liger_wrapper = True
        setattr(pl_module, name, hook)

    def _patch(self, pl_module: pl.LightningModule, final: bool) -> None:
        models = find_hf_models(pl_module)
        if final and not models:
            raise ValueError(
                f"LigerCallback found no transformers.PreTrainedModel inside {type(pl_module).__name__} "
                "(looked after __init__, setup and configure_model)"
            )
        for path, model in models.items():
            if self._models.get(path) is model:
                continue
            where = f"{type(pl_module).__name__}.{path}" if path else type(pl_module).__name__
            try:
                summary = apply_liger(model, **self.kernels)
            except ValueError as error:
                raise ValueError(f"LigerCallback cannot patch {where} ({type(model).__name__}): {error}") from error
            self.summaries[path] = summary
            self._models[path] = model
            rank_zero_info(f"LigerCallback patched {where}:\n{summary}")
            self._check_hparams(pl_module, model, where)

    def _check_hparams(self, pl_module: pl.LightningModule, model: PreTrainedModel, where: str) -> None:
        """save_hyperparameters() keeps __init__ arguments, a model passed in too, and every checkpoint
        pickles them: a patched model refuses to be pickled, so say so now, not at the first save."""
        for key, value in getattr(pl_module, "hparams", {}).items():
            if isinstance(value, nn.Module) and any(sub is model for sub in value.modules()):
                message = (
                    f"LigerCallback patched {where}, which {type(pl_module).__name__}.hparams[{key!r}] also "
                    "holds (save_hyperparameters() keeps __init__ arguments), so a checkpoint would pickle "
                    "the patched model whole, which it refuses: call "
                    f"self.save_hyperparameters(ignore=[{key!r}]) (Lightning recommends it for modules)"
                )
                if self._checkpoints:
                    raise ValueError(message)
                rank_zero_warn(message)
