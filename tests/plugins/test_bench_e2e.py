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


def test_liger_adamw_setup_gives_the_foreach_numbers(reference_dispatch):
    """ours_adamw differs from ours only in the optimizer, whose step equals torch's: same losses."""
    from liger_kernels.ops import adamw

    ours = bench_e2e.run_one("tiny", "ours", batch=2, seq=32, steps=3, warmup=0)
    calls = []
    original = adamw.launch_adamw_
    with pytest.MonkeyPatch.context() as mp:  # the kernel (interpreter) must run, not torch's step
        mp.setattr(_utils, "INTERPRET", True)
        mp.setattr("liger_kernels.optim.launch_adamw_", lambda *a, **k: calls.append(1) or original(*a, **k))
        fused = bench_e2e.run_one("tiny", "ours_adamw", batch=2, seq=32, steps=3, warmup=0)
    assert calls and len(fused["losses"]) == 3
    for a, b in zip(ours["losses"], fused["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_adamw_in_backward_setup_gives_the_same_losses(reference_dispatch):
    """ours_adamw_in_backward steps each parameter inside backward: in this loop (no clipping or
    accumulation) the same updates as ours_adamw, so the same losses."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_utils, "INTERPRET", True)
        after = bench_e2e.run_one("tiny", "ours_adamw", batch=2, seq=32, steps=3, warmup=0)
        inside = bench_e2e.run_one("tiny", "ours_adamw_in_backward", batch=2, seq=32, steps=3, warmup=0)
    assert after["losses"] == inside["losses"] and len(set(inside["losses"])) == 3


def test_unknown_setup_is_refused():
    with pytest.raises(SystemExit):
        bench_e2e.main(["--setups", "hf_eager,nonsense", "--families", "tiny"])


def test_rounds_alternate_order_and_take_the_median(monkeypatch, tmp_path):
    order = []
    step_ms = {"hf_eager": iter([300.0, 310.0, 290.0]), "ours": iter([250.0, 270.0, 260.0])}

    def fake_run(family, setup, batch, seq, steps, warmup):  # stands in for the subprocess
        order.append(setup)
        ms = next(step_ms[setup])
        return dict(family=family, setup=setup, batch=batch, seq=seq, step_ms=ms,
                    tokens_per_s=batch * seq / (ms / 1e3), peak_gib=ms / 100, losses=[1.0])

    monkeypatch.setattr(bench_e2e, "_run_subprocess", fake_run)
    results = bench_e2e.run_all(["tiny"], ["hf_eager", "ours"], 2, 32, 2, 1, str(tmp_path), rounds=3)
    assert order == ["hf_eager", "ours", "ours", "hf_eager", "hf_eager", "ours"]
    by_setup = {r["setup"]: r for r in results}
    assert by_setup["hf_eager"]["step_ms"] == 300.0 and by_setup["ours"]["step_ms"] == 260.0
    assert by_setup["ours"]["tokens_per_s"] == pytest.approx(64 / 0.26)
    assert by_setup["hf_eager"]["peak_gib"] == 3.1 and len(by_setup["ours"]["rounds_tokens_per_s"]) == 3
    assert (tmp_path / "e2e.json").exists()
