"""Fixtures for the patching tests: the `build` fixture, which unpatches everything when a test ends.

Class-level patches mutate global classes and instance-level rope patches a modeling module's
function: `build` unpatches every model it built and every class-level patch when the test ends, so
no test sees another's patches (xdist workers are separate processes anyway).
"""

import pytest
import torch
from patching_helpers import tiny_config
from transformers import AutoModelForCausalLM

from liger_plugins.patching import unpatch


@pytest.fixture
def build():
    """build(model_type, dtype=float32, seed=0, **config overrides) -> a fresh model; the same
    seed gives the same weights."""
    built = []

    def _build(model_type, dtype=torch.float32, seed=0, **overrides):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
        built.append(model)
        return model

    yield _build
    for model in built:
        unpatch(model)
    unpatch()
