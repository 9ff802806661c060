"""The end-to-end benchmark's training loop, on CPU at the tiny size: plain vs patched give the same losses."""

import pytest

from liger_kernels import _utils
from liger_plugins import bench_e2e
from liger_plugins.patching import unpatch


@pytest.fixture
def reference_dispatch(monkeypatch):
    # CPU path of the kernels (their torch references): the interpreter is covered by tests/patching.
    monkeypatch.setattr(_utils, "INTERPRET", False)
    yield
    unpatch()


def test_tiny_setups_train_and_agree(reference_dispatch):
    plain = bench_e2e.run_one("tiny", "hf_eager", batch=2, seq=32, steps=2, warmup=1)
    ours = bench_e2e.run_one("tiny", "ours", batch=2, seq=32, steps=2, warmup=1)
    assert plain["device"] == "cpu" and plain["peak_gib"] is None
    assert len(ours["losses"]) == 2 and ours["tokens_per_s"] > 0
    for a, b in zip(plain["losses"], ours["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_unknown_setup_is_refused():
    with pytest.raises(SystemExit):
        bench_e2e.main(["--setups", "hf_eager,nonsense", "--families", "tiny"])
