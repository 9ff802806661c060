"""Test set-up: kernels run under the Triton interpreter on CPU unless LIGER_TEST_DEVICE=cuda.

The environment must be set before triton is imported anywhere, hence at the top of conftest.
"""

import os

DEVICE = os.environ.get("LIGER_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["LIGER_POISON_OUTPUTS"] = "1"  # outputs start as NaN: unwritten elements fail the tests

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Axolotl pins its own transformers/trl versions, so its tests run in .venv-axolotl (`make test` runs them
# there); in an environment without axolotl the file is not collected (not skipped).
if importlib.util.find_spec("axolotl") is None:
    collect_ignore = ["plugins/test_axolotl.py"]

# fp32 parity is checked against IEEE fp32: cuDNN convolutions (multi-token attention) otherwise run in
# TF32 by default on the GPU. The ops follow torch's flag, as torch's own conv2d does.
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA at real sizes: on CPU they are deselected (they run with `make gpu-test`)."""
    if DEVICE == "cuda":
        return
    kept = [item for item in items if "gpu" not in item.keywords]
    deselected = [item for item in items if "gpu" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
