"""Tiny real transformers models built from configs/tiny/*.json, and their inputs."""

import json
from pathlib import Path

import torch
from tolerances import assert_model_close
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from liger_plugins.patching import get_traits

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny"
ARCHITECTURES = sorted(p.stem for p in TINY.glob("*.json"))

hf_logging.set_verbosity_error()  # the tiny vocabularies make transformers warn about token ids


def tiny_config(model_type: str, **overrides):
    spec = json.loads((TINY / f"{model_type}.json").read_text())
    assert spec.pop("model_type") == model_type
    spec.update(overrides)
    return AutoConfig.for_model(model_type, **spec)


def batch(vocab_size: int, batch_size: int = 2, seq: int = 8, seed: int = 1):
    """input_ids and labels (a few ignored positions), tokens >= 3 (0-2 are pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def kernel_patches(summary) -> list[str]:
    """The summary's patched items that put a kernel in, without the shared module-level mask functions
    (the causal-mask decision, the packed-sequence check: reported once per process, by the first patch
    that installs them)."""
    return [item for item in summary.patched if "transformers.masking_utils." not in item]


def expected_kinds(model_type: str) -> set[str]:
    """The kernel flags whose patches apply_liger must report for `model_type`, from its traits."""
    traits = get_traits(model_type)
    kinds = {"fused_linear_cross_entropy"}
    kinds |= {"rms_norm"} if traits.norms else set()
    kinds |= {"layer_norm"} if traits.layer_norms else set()
    kinds |= {"swiglu"} if traits.mlps or traits.experts else set()
    kinds |= {"rope"} if traits.rope else set()
    kinds |= {"fused_add_rms_norm"} if traits.decoder_layers else set()
    kinds |= {"qkv_projections"} if traits.attentions else set()
    return kinds


def loss_and_grads(model, ids, labels):
    """The training loss of (ids, labels) and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss, {n: p.grad for n, p in model.named_parameters()}


def assert_same_training(model, ids, labels, reference=None, expected=None):
    """model's loss and gradients equal (fp32 model tolerance) the reference model's, or `expected`
    (loss_and_grads computed before a class-level patch changed the reference's classes too)."""
    loss, grads = loss_and_grads(model, ids, labels)
    loss_ref, grads_ref = expected or loss_and_grads(reference, ids, labels)
    assert_model_close(loss, loss_ref, torch.float32, "loss")
    for name, grad in grads_ref.items():
        assert_model_close(grads[name], grad, torch.float32, name)
