"""`liger-plugins demo` (the main job, `make demo`): both runs train to the same losses, the report files
are written, the configs ship with the package, and missing packages are named before any training."""

import importlib.util
import json
from pathlib import Path

import pytest

from liger_plugins import demo

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_plain_and_patched_to_the_same_losses(tmp_path):
    assert demo.main(["--steps", "3", "--batch", "2", "--seq", "32", "--cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    baseline, ours = report["results"]
    assert (baseline["run"], ours["run"]) == ("baseline", "liger-plugins")
    assert len(baseline["losses"]) == len(ours["losses"]) == 3
    assert report["max_loss_diff"] == max(abs(a - b) for a, b in zip(baseline["losses"], ours["losses"]))
    assert report["max_loss_diff"] < 1e-4
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_demo_configs_ship_in_the_package():
    # The defaults are package data (a wheel has no configs/ folder); configs/demo/ links to the same files.
    for name in ("llama_cpu", "llama_gpu"):
        shipped = demo.DATA_DIR / f"demo_{name}.json"
        assert json.loads(shipped.read_text())["model_type"] == "llama"
        assert (REPO / "configs" / "demo" / f"{name}.json").resolve() == shipped.resolve()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"data/*.json"' in pyproject and '"data/*.txt"' in pyproject


def test_demo_names_missing_packages_before_training(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(demo, "train_once", lambda *a: pytest.fail("trained before checking its packages"))
    with pytest.raises(SystemExit):
        demo.main(["--steps", "1", "--cpu", "--out", str(tmp_path)])
    assert "the demo needs matplotlib: pip install 'liger-plugins[demo]'" in capsys.readouterr().err
