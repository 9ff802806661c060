"""Fixtures shared by the framework-plugin tests (HF Trainer, Lightning, Axolotl)."""

import pytest

import liger_kernels._utils as kernel_utils
import liger_kernels.functional as LF
from integrations._common import COUNTED_AS  # functional-API entries counted as another kernel


@pytest.fixture
def reference(monkeypatch):
    """CPU tensors run the kernels' torch reference instead of the Triton interpreter."""
    monkeypatch.setattr(kernel_utils, "INTERPRET", False)


@pytest.fixture
def spy_kernels(monkeypatch):
    """install(names, record): every call of a liger functional-API kernel in `names` (or of one counted
    as it) first runs record(name, kwargs). The patched forwards look the API up at call time."""

    def install(names, record):
        for name in (*names, *(alias for alias, kernel in COUNTED_AS.items() if kernel in names)):

            def spy(*args, _original=getattr(LF, name), _name=COUNTED_AS.get(name, name), **kwargs):
                record(_name, kwargs)
                return _original(*args, **kwargs)

            monkeypatch.setattr(LF, name, spy)

    return install
