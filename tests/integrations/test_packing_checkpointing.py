"""Padding-free packed batches and activation checkpointing with a patched tiny Llama (in process).

Packed: DataCollatorWithFlattening puts several sequences in one row with position_ids restarting at
0 per sequence (transformers turns that into a block-diagonal causal mask for sdpa/eager, and into
varlen calls for flash_attention_2). The patched model must give, per sequence, the same logits as each
sequence run alone, and the same summed loss and parameter gradients (RoPE positions and the fused
loss both see the sequence boundaries). Checked against the unpatched model run per sequence.
Kernels run through the Triton interpreter on CPU (conftest), the real kernels with
LIGER_TEST_DEVICE=cuda; flash_attention_2 only where the flash-attn package imports (and on CUDA).
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.utils import is_flash_attn_2_available  # noqa: E402

from liger_plugins.patching import apply_liger, unpatch  # noqa: E402
from liger_plugins.patching.forwards import is_liger  # noqa: E402
from tests.tolerances import REDUCTION_TOLERANCES, assert_model_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (5, 11, 16)  # tokens per packed sequence


def tiny_llama(device, attn="sdpa"):
    values = json.loads((ROOT / "configs/tiny/llama.json").read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    # transformers (5.24) looks for packed sequences in position_ids only when no KV cache exists; with
    # config.use_cache=True even a training forward builds one, and sdpa/eager then attend across the
    # packed sequences (patched or not). Padding-free training needs use_cache=False.
    model.config.use_cache = False
    return model.to(device)


@pytest.fixture
def models(device):
    made = []

    def make(attn="sdpa", patched=False):
        model = tiny_llama(device, attn)
        if patched:
            apply_liger(model)
        made.append(model)
        return model

    yield make
    for model in made:
        unpatch(model)
    assert not is_liger(modeling_llama.apply_rotary_pos_emb)


def sequences(vocab):
    g = torch.Generator().manual_seed(3)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.masked_fill(torch.rand(n, generator=g) < 0.25, -100)
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def n_targets(seqs):
    return sum(sum(label != -100 for label in s["labels"][1:]) for s in seqs)


def per_sequence(model, seqs, device):
    """Logits of each sequence alone, and the summed loss + gradients over the sequences."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([s["input_ids"]], device=device)).logits[0] for s in seqs]
    total = n_targets(seqs)
    loss = 0
    for s in seqs:
        loss = loss + model(input_ids=torch.tensor([s["input_ids"]], device=device),
                            labels=torch.tensor([s["labels"]], device=device), num_items_in_batch=total).loss
    loss.backward()
    return torch.cat(logits), loss.detach(), grads(model)


def packed(model, seqs, device):
    batch = {k: v.to(device) for k, v in DataCollatorWithFlattening()(seqs).items()}
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    loss = model(**batch, num_items_in_batch=n_targets(seqs)).loss
    loss.backward()
    return logits, loss.detach(), grads(model)


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def assert_same(actual, expected, what):
    logits, loss, grad = actual
    ref_logits, ref_loss, ref_grad = expected
    assert_model_close(logits, ref_logits, torch.float32, f"{what}: logits")
    atol, rtol = REDUCTION_TOLERANCES[torch.float32]
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol, msg=lambda m: f"{what}: loss: {m}")
    for name, g in ref_grad.items():
        assert_model_close(grad[name], g, torch.float32, f"{what}: grad {name}")


ATTENTION = ["sdpa", pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    not is_flash_attn_2_available(), reason="flash-attn is not importable here"))]


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_batch_matches_sequences_run_alone(models, device, attn):
    if attn == "flash_attention_2" and device != "cuda":
        pytest.skip("flash_attention_2 needs CUDA")
    seqs = sequences(320)
    reference = per_sequence(models(attn), seqs, device)  # unpatched, one sequence at a time
    model = models(attn, patched=True)
    assert_same(packed(model, seqs, device), reference, f"patched, packed, {attn}")


def test_gradient_checkpointing_gives_the_same_gradients(models, device):
    """gradient_checkpointing_enable() re-runs the patched layers (norms, rotary, MLP) in backward."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 320, (2, 24), generator=g).to(device)
    labels = ids.masked_fill(torch.rand(2, 24, generator=g).to(device) < 0.25, -100)

    def run(model):
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), grads(model)

    reference = run(models())  # unpatched, no checkpointing
    patched = models(patched=True)
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert patched.is_gradient_checkpointing and is_liger(patched.model.layers[0].mlp.forward)
    loss, grad = run(patched)
    atol, rtol = REDUCTION_TOLERANCES[torch.float32]
    torch.testing.assert_close(loss, reference[0], atol=atol, rtol=rtol)
    for name, expected in reference[1].items():
        assert_model_close(grad[name], expected, torch.float32, f"grad {name}")
