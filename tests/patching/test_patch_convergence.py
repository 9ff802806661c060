"""Convergence: 30 AdamW steps of a tiny Llama on the shipped text sample (one token per byte),
patched vs unpatched, give the same loss curve.

The kernels run on their CPU dispatch (the torch references): 30 training steps under the Triton
interpreter would take minutes. What this test adds to the per-step parity tests (which run the
Triton kernels) is the whole training loop through the patched model: label shifting, loss
normalization and gradients that an optimizer follows for many steps.
"""

from pathlib import Path

import pytest
import torch

import liger_kernels._utils
from liger_plugins.patching import apply_liger
from patching_helpers import kernel_patches

SAMPLE = Path(__file__).resolve().parents[2] / "liger_plugins" / "data" / "sample.txt"
STEPS, BATCH, SEQ = 30, 4, 64


def _train(model, blocks):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(STEPS):
        ids = blocks[torch.randint(len(blocks), (BATCH,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.slow
def test_loss_curves_match(build, monkeypatch):
    monkeypatch.setattr(liger_kernels._utils, "INTERPRET", False)
    data = torch.tensor(list(SAMPLE.read_bytes()))
    blocks = data[: len(data) // SEQ * SEQ].view(-1, SEQ)
    assert len(blocks) >= 50

    reference, model = build("llama"), build("llama")
    summary = apply_liger(model)
    assert len(kernel_patches(summary)) == 6, str(summary)
    curve_ref, curve = _train(reference, blocks), _train(model, blocks)

    assert curve_ref[-5:].mean() < curve_ref[0] - 2.0  # it learns (from ~ln 320 = 5.8)
    torch.testing.assert_close(curve, curve_ref, rtol=1e-4, atol=0)
