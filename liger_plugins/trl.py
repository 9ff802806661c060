"""TRL adapter: TRL's preference and RL trainers compute their loss with `liger_kernels.losses`.

One line, either a subclass or an existing trainer:

    from liger_plugins.trl import LigerDPOTrainer          # drop-in for trl.DPOTrainer
    trainer = LigerDPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., processing_class=tok)

    from liger_plugins import trl as liger_trl
    trainer = liger_trl.enable(trl.DPOTrainer(...))        # same, on a trainer already built

Covered (tests/plugins/test_trl.py passes with TRL 1.16.0 and with TRL 1.9.0, Axolotl 0.19's pin, both
on transformers 5.24):

- `trl.DPOTrainer`, `_compute_loss` -> `fused_linear_dpo_loss`: every loss type but "aot" and
  "aot_unpaired", and weighted combinations of them (`loss_weights`).
- `trl.KTOTrainer`, `_compute_loss` -> `fused_linear_kto_loss`: "kto", "apo_zero_unpaired".
- `trl.GRPOTrainer`, `_compute_loss` -> `fused_linear_grpo_loss`: "grpo", "bnpo", "dr_grpo", "dapo",
  "cispo", "sapo", "luspo", "vespo" (TRL 1.9's "luspo" only at sequence level without KL: it differs
  from 1.16's otherwise).
- `trl.experimental.orpo.ORPOTrainer`, `get_batch_loss_metrics` -> `fused_linear_orpo_loss`.
- `trl.experimental.cpo.CPOTrainer`, `get_batch_loss_metrics` -> `fused_linear_cpo_loss`: "sigmoid",
  "hinge", "ipo", "simpo" (SimPO), AlphaPO (`alpha`).

What stays TRL's: data collation and padding, the reference model (a separate model, the PEFT adapter
disabled or the "ref" adapter, precomputed reference log-probs), `num_items_in_batch` and gradient
accumulation scaling, and the logged metrics (same names, same aggregation across processes).
The loss runs inside the model's forward (an extra `liger_head=` keyword of the patched forward), so
DDP/FSDP/DeepSpeed see a normal forward; a ZeRO-3 `lm_head` is gathered with TRL's own helper and an
FSDP2 (DTensor) one with `full_tensor()`. Nothing here needs the `liger-kernel` package.

Configurations the fused losses do not cover fall back to TRL's own loss, with one warning each:
DPO `ld_alpha`, non-default `f_divergence_type`, `use_weighting`, "aot" losses; GRPO loss types other
than the eight above, `off_policy_mask_threshold`, `top_entropy_quantile < 1`, entropy bonus, vLLM
importance-sampling correction, `cast_lm_head_to_fp32`; MoE auxiliary losses; vision inputs;
encoder-decoders; prompt-learning PEFT or a PEFT adapter on `lm_head`; models with logit softcapping
or logit scaling.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings

import torch

from liger_kernels.losses import (
    DPO_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    chunked_logprobs,
    fused_linear_cpo_loss,
    fused_linear_dpo_loss,
    fused_linear_grpo_loss,
    fused_linear_kto_loss,
    fused_linear_orpo_loss,
)

TESTED_TRL_VERSIONS = ("1.9.0", "1.16.0")


@functools.cache
def _trl_1_16_or_later() -> bool:
    """GRPO changed in TRL 1.16: the token count of dapo/cispo/vespo is rescaled from the generation batch
    to one accumulation window (x grad-accumulation steps / steps_per_generation; 1.9 divides by the count
    as is), and luspo sums the masked tokens per sequence (1.9 averages over all B*T positions)."""
    import trl
    from packaging.version import Version

    return Version(trl.__version__) >= Version("1.16")
_HOOKED = "_liger_head_hooked"
_SCALING_ATTRS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "mm_token_type_ids",
                    "image_position_ids", "spatial_shapes", "num_tiles")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The model side: run the backbone, hand hidden states and the lm_head to a loss
# ----------------------------------------------------------------------------------------------------


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _causal_lm(model):
    """The module whose `forward` produces the logits (under PEFT, the wrapped transformers model)."""
    return model.get_base_model() if _is_peft(model) else model


def _gather_ctx(weight, bias):
    """TRL's ZeRO-3 gather of a directly accessed lm_head (a null context without ZeRO-3)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # older TRL: no ZeRO-3 support for direct access
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(weight, bias)


def install_head_hook(model) -> None:
    """Let `model(..., liger_head=fn)` run only the backbone and return `fn(hidden_states, weight, bias)`,
    with the full lm_head weight/bias. Without `liger_head`, the forward is untouched (generation too).
    Idempotent; wraps whatever forward the instance has (TRL's fused-head forward included)."""
    lm = _causal_lm(model)
    if getattr(lm, _HOOKED, False):
        return
    previous = lm.forward

    @functools.wraps(type(lm).forward)  # `generate` checks model kwargs against this signature
    def forward(self, *args, liger_head=None, **kwargs):
        if liger_head is None:
            return previous(*args, **kwargs)
        for key in ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        with _gather_ctx(head.weight, head.bias):
            return liger_head(hidden.to(weight.device), weight, bias)

    lm.forward = types.MethodType(forward, lm)
    setattr(lm, _HOOKED, True)


def _model_fallback_reason(model) -> str | None:
    lm = _causal_lm(model)
    if getattr(lm.config, "is_encoder_decoder", False):
        return "encoder-decoder models"
    config = lm.config.get_text_config()
    for attr in _SCALING_ATTRS:
        value = getattr(config, attr, None)
        if value is not None and value != 1.0:
            return f"models with `{attr}` (logit softcapping / scaling)"
    if _is_peft(model):
        if any(getattr(c, "is_prompt_learning", False) for c in model.peft_config.values()):
            return "prompt-learning PEFT methods"
        if hasattr(lm.get_output_embeddings(), "base_layer"):
            return "a PEFT adapter on lm_head"
    return None


_warned: set[str] = set()


def _fallback(trainer, reason: str) -> None:
    key = f"{type(trainer).__name__}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"liger_plugins.trl: {key} is not covered by the fused losses; using TRL's loss", stacklevel=3)


def _no_checkpointing(trainer):
    """TRL's context for no-grad forwards: gradient checkpointing off (it only warns without grads)."""
    from trl.models.utils import disable_gradient_checkpointing

    return disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs)


def _reference_model_call(trainer, model_kwargs, head):
    """`head` on the reference model's hidden states, without gradient: TRL's reference (a separate
    model, or the policy with its adapter disabled / switched to the "ref" adapter)."""
    from trl.trainer.utils import use_adapter

    with torch.no_grad(), _no_checkpointing(trainer):
        if trainer.ref_model is None and _is_peft(trainer.accelerator.unwrap_model(trainer.model)):
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return trainer.model(**model_kwargs, liger_head=head)
        return trainer.ref_model(**model_kwargs, liger_head=head)


def _sequence_logps_head(target):
    """A head returning summed per-sequence log-probs of `target` (aligned with hidden[:, :-1])."""

    def head(hidden, weight, bias):
        return chunked_logprobs(hidden[:, :-1], weight, target, bias)["logps"].sum(-1)

    return head


def _masked_total(trainer, values, mask):
    """(sum over processes of values*mask, of mask), as TRL aggregates token metrics."""
    gather = trainer.accelerator.gather_for_metrics
    return gather((values * mask).sum()).sum().item(), gather(mask.sum()).sum().item()


# ----------------------------------------------------------------------------------------------------
# Trainer mixins
# ----------------------------------------------------------------------------------------------------


class _LigerMixin:
    """Installs the hook on the policy and reference models once the TRL trainer is built."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._liger_setup()

    def _liger_setup(self):
        import trl

        if trl.__version__ not in TESTED_TRL_VERSIONS:
            warnings.warn(
                f"liger_plugins.trl was tested with TRL {', '.join(TESTED_TRL_VERSIONS)}; found {trl.__version__}",
                stacklevel=3,
            )
        install_head_hook(self.model)
        if getattr(self, "ref_model", None) is not None:
            install_head_hook(self.accelerator.unwrap_model(self.ref_model))

    def _liger_common_fallback(self, model, inputs) -> str | None:
        if getattr(self, "aux_loss_enabled", False):
            return "MoE auxiliary losses"
        if getattr(self, "_is_vision_dataset", False) or any(k in inputs for k in _MULTIMODAL_KEYS):
            return "vision inputs"
        return _model_fallback_reason(self.accelerator.unwrap_model(model))


class _DPOMixin(_LigerMixin):
    """DPOTrainer._compute_loss with `fused_linear_dpo_loss` (TRL 1.16 metrics)."""

    _NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")

    def _liger_fallback_reason(self, model, inputs):
        if self.ld_alpha is not None:
            return "`ld_alpha`"
        if self.f_divergence_type != "reverse_kl":
            return f"`f_divergence_type={self.f_divergence_type!r}`"
        if self.use_weighting:
            return "`use_weighting` (WPO)"
        if any(lt not in DPO_LOSS_TYPES for lt in self.loss_types):
            return f"loss types {[lt for lt in self.loss_types if lt not in DPO_LOSS_TYPES]}"
        return self._liger_common_fallback(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        reason = self._liger_fallback_reason(model, inputs)
        if reason:
            _fallback(self, reason)
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in self._NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        target = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = _reference_model_call(self, model_kwargs, _sequence_logps_head(target)).chunk(2)

        def head(hidden, weight, bias):
            return fused_linear_dpo_loss(
                hidden[:, :-1], weight, target, bias,
                ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                loss_type=self.loss_types, loss_weights=self.loss_weights, beta=self.beta,
                label_smoothing=self.label_smoothing, discopop_tau=self.args.discopop_tau,
            )  # fmt: skip

        out = model(**model_kwargs, liger_head=head)
        self._liger_log(mode, inputs, out.metrics, target != -100)
        if return_outputs:
            warnings.warn("`return_outputs=True` recomputes the logits with an extra forward pass", stacklevel=2)
            with torch.no_grad():
                return out.loss, model(**model_kwargs)
        return out.loss

    def _liger_log(self, mode, inputs, m, mask):
        """The metrics TRL 1.16's DPOTrainer logs, from the fused loss's per-token outputs."""
        metrics, gather = self._metrics[mode], self.accelerator.gather
        total, count = _masked_total(self, m["per_token_entropy"], mask)
        metrics["entropy"].append(total / count if count > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)  # TRL < 1.16 has no TP correction
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.chunk(2)
        chosen_logits, rejected_logits = m["per_token_mean_logits"].chunk(2)
        total, count = _masked_total(self, chosen_logits, chosen_mask)
        metrics["logits/chosen"].append(total / count if count > 0 else 0.0)
        total, count = _masked_total(self, rejected_logits, rejected_mask)
        metrics["logits/rejected"].append(total / count if count > 0 else 0.0)
        total, count = _masked_total(self, m["per_token_is_top1"].chunk(2)[0].float(), chosen_mask)
        metrics["mean_token_accuracy"].append(total / count if count > 0 else 0.0)
        metrics["rewards/chosen"].append(gather(m["chosen_rewards"]).mean().item())
        metrics["rewards/rejected"].append(gather(m["rejected_rewards"]).mean().item())
        metrics["rewards/accuracies"].append(gather(m["reward_accuracies"]).mean().item())
        metrics["rewards/margins"].append(gather(m["reward_margins"]).mean().item())
        metrics["logps/chosen"].append(gather(m["chosen_logps"]).mean().item())
        metrics["logps/rejected"].append(gather(m["rejected_logps"]).mean().item())


class _KTOMixin(_LigerMixin):
    """KTOTrainer._compute_loss with `fused_linear_kto_loss` (TRL 1.16 metrics)."""

    _NON_MODEL_KEYS = (
        "completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
        "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps",
    )  # fmt: skip

    def _compute_loss(self, model, inputs, return_outputs):
        reason = self._liger_common_fallback(model, inputs)
        if reason:
            _fallback(self, reason)
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=device)
        model_kwargs = {k: v for k, v in batch.items() if k not in self._NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        target = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
        if self.calculate_KL:
            kl_kwargs = {"input_ids": batch["KL_input_ids"], "attention_mask": batch["KL_attention_mask"]}
            kl_kwargs["use_cache"] = False
            kl_target = batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, -100)[:, 1:]
            with torch.no_grad():
                kl_logps = model(**kl_kwargs, liger_head=_sequence_logps_head(kl_target))
        if self.precompute_ref_logps:
            ref_logps = batch["ref_logps"]
            ref_kl_logps = batch["ref_KL_logps"] if self.calculate_KL else None
        else:
            ref_logps = _reference_model_call(self, model_kwargs, _sequence_logps_head(target))
            if self.calculate_KL:
                ref_kl_logps = _reference_model_call(self, kl_kwargs, _sequence_logps_head(kl_target))
        if self.calculate_KL:
            kl = self.accelerator.gather_for_metrics((kl_logps - ref_kl_logps).mean().detach()).mean().clamp(min=0)
        else:
            kl = torch.zeros((), device=device)

        def head(hidden, weight, bias):
            return fused_linear_kto_loss(
                hidden[:, :-1], weight, target, desirable, bias, ref_logps=ref_logps, kl=kl,
                loss_type=self.loss_type, beta=self.beta, desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight,
            )  # fmt: skip

        out = model(**model_kwargs, liger_head=head)
        self._liger_log(mode, batch, out.metrics, target != -100, desirable, kl)
        if return_outputs:
            warnings.warn("`return_outputs=True` recomputes the logits with an extra forward pass", stacklevel=2)
            with torch.no_grad():
                return out.loss, model(**model_kwargs)
        return out.loss

    def _liger_log(self, mode, batch, m, mask, desirable, kl):
        """The metrics TRL 1.16's KTOTrainer logs."""
        metrics, gather = self._metrics[mode], self.accelerator.gather_for_metrics
        metrics["kl"].append(kl.item())
        total, count = _masked_total(self, m["per_token_entropy"], mask)
        metrics["entropy"].append(total / count if count > 0 else 0.0)
        if mode == "train":
            tokens = gather(batch["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)  # TRL < 1.16 has no TP correction
        metrics["num_tokens"] = [self._total_train_tokens]
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            total, count = _masked_total(self, m["per_token_mean_logits"], mask & rows[:, None])
            if count > 0:
                metrics[f"logits/{name}"].append(total / count)
        n_chosen = gather(desirable.sum()).sum().item()
        n_rejected = gather((~desirable).sum()).sum().item()
        for name, rows, n in (("chosen", desirable, n_chosen), ("rejected", ~desirable, n_rejected)):
            if n > 0:
                metrics[f"rewards/{name}"].append(gather(m["rewards"][rows].nansum()).nansum().item() / n)
                metrics[f"logps/{name}"].append(gather(m["logps"][rows].nansum()).nansum().item() / n)
        if n_chosen > 0 and n_rejected > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])


class _GRPOMixin(_LigerMixin):
    """GRPOTrainer._compute_loss with `fused_linear_grpo_loss` (TRL 1.16 metrics)."""

    def _liger_fallback_reason(self, model, inputs):
        if self.loss_type not in GRPO_LOSS_TYPES:
            return f"`loss_type={self.loss_type!r}`"
        if self.loss_type == "luspo" and (self.importance_sampling_level != "sequence" or self.beta != 0.0):
            # TRL < 1.16 averages `per_token_loss * length` over all B*T positions, padding included,
            # whenever the per-token loss is (B, T); 1.16 sums the masked tokens per sequence (ours).
            if not _trl_1_16_or_later():
                return "`loss_type='luspo'` at token level or with KL on TRL < 1.16"
        if self.off_policy_mask_threshold is not None:
            return "`off_policy_mask_threshold`"
        if self.top_entropy_quantile < 1.0:
            return "`top_entropy_quantile < 1`"
        if self._entropy_bonus_enabled:
            return "the entropy bonus"
        if self.use_vllm and self.vllm_importance_sampling_correction:
            return "vLLM importance-sampling correction"
        if self.args.cast_lm_head_to_fp32:
            return "`cast_lm_head_to_fp32`"
        return self._liger_common_fallback(model, inputs)

    def _compute_loss(self, model, inputs):
        reason = self._liger_fallback_reason(model, inputs)
        if reason:
            _fallback(self, reason)
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n_keep = completion_ids.size(1)
        target = completion_ids.masked_fill(mask == 0, -100)
        old_logps = inputs.get("old_per_token_logps")
        ref_logps = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items = None
        token_sum = self.loss_type in ("dapo", "cispo", "vespo")  # normalized by a global token count
        if token_sum:
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train" and _trl_1_16_or_later():
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation

        extra = {}
        if self.loss_type == "sapo":
            extra = dict(sapo_temperature_pos=self.args.sapo_temperature_pos,
                         sapo_temperature_neg=self.args.sapo_temperature_neg)  # fmt: skip
        elif self.loss_type == "vespo":
            extra = dict(vespo_k_pos=self.args.vespo_k_pos, vespo_lambda_pos=self.args.vespo_lambda_pos,
                         vespo_k_neg=self.args.vespo_k_neg, vespo_lambda_neg=self.args.vespo_lambda_neg)  # fmt: skip

        def head(hidden, weight, bias):
            return fused_linear_grpo_loss(
                hidden[:, -n_keep - 1 : -1], weight, target, inputs["advantages"], bias,
                old_logps=old_logps, ref_logps=ref_logps, loss_type=self.loss_type, beta=self.beta,
                epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
                importance_sampling_level=self.importance_sampling_level,
                use_bias_correction_kl=self.args.use_bias_correction_kl,
                max_completion_length=self.max_completion_length, num_items_in_batch=num_items,
                temperature=self.temperature, **extra,
            )  # fmt: skip

        with self.accelerator.autocast():
            out = model(
                input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                attention_mask=torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
                liger_head=head,
            )
        loss = out.loss if token_sum else out.loss / accumulation
        self._liger_log(mode, out.metrics, mask.bool())
        return loss

    def _liger_log(self, mode, m, mask):
        """The metrics TRL 1.16's GRPOTrainer logs in `_compute_loss`."""
        from trl.trainer.utils import nanmax, nanmin

        def global_masked_mean(x):
            if x.shape[1] == 1:  # importance_sampling_level="sequence": one value per sequence
                local = torch.stack([x.float().sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x.float() * mask).sum(), mask.sum().float()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            metrics["kl"].append(global_masked_mean(m["per_token_kl"]))
        metrics["entropy"].append(global_masked_mean(m["per_token_entropy"]))
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_masked_mean(m["per_token_is_cispo_clipped"]))
            return
        if self.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(m["phi_seq"]))
            return
        if self.loss_type == "sapo":
            return
        low, high = m["per_token_is_low_clipped"], m["per_token_is_high_clipped"]
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(low | high))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(m["clip_ratio_low_per_seq"])).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(m["clip_ratio_high_per_seq"])).item())


class _PairedExperimentalMixin(_LigerMixin):
    """ORPO / CPO (trl.experimental): `get_batch_loss_metrics` with a fused loss."""

    def _liger_fallback_reason(self, model, batch):
        if self.is_encoder_decoder:
            return "encoder-decoder models"
        return self._liger_common_fallback(model, batch)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        reason = self._liger_fallback_reason(model, batch)
        if reason:
            _fallback(self, reason)
            return super().get_batch_loss_metrics(model, batch, train_eval)
        cat = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self._liger_padding_value(), device=self.accelerator.device
        )
        out = model(
            cat["concatenated_input_ids"],
            attention_mask=cat["concatenated_attention_mask"],
            use_cache=False,
            liger_head=self._liger_head(cat),
        )
        m = out.metrics
        gather = self.accelerator.gather_for_metrics
        chosen_logits, rejected_logits = m["per_token_mean_logits"].chunk(2)
        values = {
            "rewards/chosen": gather(m["chosen_rewards"]).mean(),
            "rewards/rejected": gather(m["rejected_rewards"]).mean(),
            "rewards/accuracies": gather(m["reward_accuracies"]).mean(),
            "rewards/margins": gather(m["reward_margins"]).mean(),
            "logps/rejected": gather(m["rejected_logps"]).mean(),
            "logps/chosen": gather(m["chosen_logps"]).mean(),
            # TRL averages the full logits tensor: every position, every vocabulary entry
            "logits/rejected": gather(rejected_logits.mean()).mean(),
            "logits/chosen": gather(chosen_logits.mean()).mean(),
            "nll_loss": gather(self._liger_nll(m)).mean(),
        }
        values.update(self._liger_extra_metrics(m))
        prefix = "eval_" if train_eval == "eval" else ""
        return out.loss, {f"{prefix}{k}": v.item() for k, v in values.items()}

    def _liger_extra_metrics(self, m):
        return {}


class _ORPOMixin(_PairedExperimentalMixin):
    def _liger_padding_value(self):
        return self.padding_value

    def _liger_head(self, cat):
        ids, attention = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        # TRL's ORPO: the NLL over prompt + completion, the odds ratio over the completion labels
        nll_target = torch.where(attention == 1, ids, -100)[:, 1:]
        target = cat["concatenated_labels"][:, 1:]

        def head(hidden, weight, bias):
            return fused_linear_orpo_loss(hidden[:, :-1], weight, target, bias, nll_target=nll_target, beta=self.beta)

        return head

    def _liger_nll(self, m):
        return m["nll_loss"]

    def _liger_extra_metrics(self, m):
        gather = self.accelerator.gather_for_metrics
        return {
            "log_odds_ratio": gather(m["log_odds_ratio"]).mean(),
            "log_odds_chosen": gather(m["log_odds_chosen"]).mean(),
        }


class _CPOMixin(_PairedExperimentalMixin):
    def _liger_padding_value(self):
        return self.pad_token_id

    def _liger_head(self, cat):
        labels = cat["concatenated_labels"]
        # every position of the sequence (TRL's logits metrics average them all), the last one unscored
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)

        def head(hidden, weight, bias):
            return fused_linear_cpo_loss(
                hidden, weight, target, bias, loss_type=self.loss_type, beta=self.beta,
                label_smoothing=self.label_smoothing, cpo_alpha=self.cpo_alpha,
                simpo_gamma=getattr(self, "simpo_gamma", 0.5), alpha=self.alpha,
            )  # fmt: skip

        return head

    def _liger_nll(self, m):
        return m["nll_loss"] if self.cpo_alpha != 0 else torch.zeros_like(m["nll_loss"])


# ----------------------------------------------------------------------------------------------------
# Public API: subclasses (built lazily, TRL is imported on first use) and enable()
# ----------------------------------------------------------------------------------------------------

_TRAINERS = {
    "LigerDPOTrainer": ("trl", "DPOTrainer", _DPOMixin),
    "LigerKTOTrainer": ("trl", "KTOTrainer", _KTOMixin),
    "LigerGRPOTrainer": ("trl", "GRPOTrainer", _GRPOMixin),
    "LigerORPOTrainer": ("trl.experimental.orpo", "ORPOTrainer", _ORPOMixin),
    "LigerCPOTrainer": ("trl.experimental.cpo", "CPOTrainer", _CPOMixin),
}
_built: dict[str, type] = {}


def _trainer_class(name: str) -> type:
    if name not in _built:
        import importlib

        module, base_name, mixin = _TRAINERS[name]
        base = getattr(importlib.import_module(module), base_name)
        doc = f"{base_name} computing its loss with liger_kernels' fused losses."
        _built[name] = type(name, (mixin, base), {"__module__": __name__, "__doc__": doc})
    return _built[name]


def __getattr__(name: str):
    if name in _TRAINERS:
        return _trainer_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable(trainer):
    """Switch an already built TRL trainer to the fused losses (in place; returns it)."""
    for name, (module, base_name, mixin) in _TRAINERS.items():
        if any(c.__name__ == base_name and c.__module__.startswith("trl") for c in type(trainer).__mro__):
            if isinstance(trainer, mixin):
                return trainer
            trainer.__class__ = type(f"Liger{type(trainer).__name__}", (mixin, type(trainer)), {"__module__": __name__})
            trainer._liger_setup()
            return trainer
    supported = ", ".join(base for _, base, _ in _TRAINERS.values())
    raise TypeError(f"enable() supports {supported}; got {type(trainer).__name__}")
