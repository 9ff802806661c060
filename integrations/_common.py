"""Shared pieces of the integration runs: tiny model configs, random data, probes, curve comparison.

Every run trains the same model from the same seed twice, without and with liger-plugins, and
compares the per-step loss (and, where the engine reports it, the global gradient norm). A wrong
lm_head gather, a wrongly sharded or double-counted gradient, or a patch that replaced a parameter
moves these curves apart within a few steps.

The probe also records what the fused loss actually received as lm_head weight (its class and shape),
so a run proves that the weight was the gathered full matrix, never a FSDP2 DTensor or a ZeRO-3 shard.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python integrations/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

# (atol, rtol) for the loss and the gradient norm, patched vs unpatched, same seed and engine.
# fp32: both runs do the same math up to summation order. bf16: both round every activation to bf16,
# in different places, and the difference compounds over the steps: loose, but a 2x gradient is not.
TOLERANCES = {
    "fp32": {"loss": (1e-4, 1e-4), "grad_norm": (1e-4, 1e-3)},
    "bf16": {"loss": (2e-2, 2e-2), "grad_norm": (2e-2, 1e-1)},
}
KERNELS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "cross_entropy")
# functions counted under another kernel's name: a gated MLP whose down_proj is a plain Linear runs
# gated_down_proj (the swiglu kernel and the projection, without saving act(gate) * up); a pre-norm
# decoder layer runs its two RMSNorms as rms_norm_with_residual and fused_add_rms_norm
COUNTED_AS = {
    "gated_down_proj": "swiglu",
    "gated_mlp": "swiglu",
    "fused_add_rms_norm": "rms_norm",
    "rms_norm_with_residual": "rms_norm",
}


def model_config(spec: str, attn: str = "sdpa"):
    """A transformers config from a JSON file (configs/tiny/llama.json) or a family name of
    liger_plugins.bench_e2e.FAMILIES ("llama": the ANCHORS.md Llama, about 1.2 B parameters)."""
    from transformers import AutoConfig

    if spec.endswith(".json"):
        values = json.loads((ROOT / spec if not os.path.isabs(spec) else Path(spec)).read_text())
    else:
        from liger_plugins.bench_e2e import FAMILIES

        values = dict(FAMILIES[spec])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._attn_implementation = attn
    return config


class TokenData(torch.utils.data.Dataset):
    """Random token rows; labels copy them with about 1/4 of the positions ignored (-100), so
    micro-batches hold different numbers of targets (exercises num_items_in_batch).
    With `varying_lengths`, rows are cut to random lengths (for padding-free packing by a collator)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 1, varying_lengths: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = self.ids.masked_fill(torch.rand(n, seq, generator=g) < 0.25, -100)
        self.lengths = torch.randint(seq // 4, seq + 1, (n,), generator=g) if varying_lengths else None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        n = int(self.lengths[i]) if self.lengths is not None else self.ids.shape[1]
        return {"input_ids": self.ids[i, :n].tolist() if self.lengths is not None else self.ids[i],
                "labels": self.labels[i, :n].tolist() if self.lengths is not None else self.labels[i]}


class KernelProbe:
    """Counts calls of liger_kernels.functional (the patched forwards look them up at call time) and
    records the lm_head weight each fused-loss call received."""

    def __init__(self):
        import liger_kernels.functional as LF

        self._LF = LF
        self.calls = dict.fromkeys(KERNELS, 0)
        self.weights: list[dict] = []
        self._originals = {name: getattr(LF, name) for name in (*KERNELS, *COUNTED_AS)}
        for name, original in self._originals.items():
            setattr(LF, name, self._spy(name, original))

    def _spy(self, name, original):
        def spy(*args, **kwargs):
            self.calls[COUNTED_AS.get(name, name)] += 1
            if name == "fused_linear_cross_entropy":
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                seen = {"class": type(weight).__name__, "shape": list(weight.shape), "dtype": str(weight.dtype)}
                if seen not in self.weights:
                    self.weights.append(seen)
            return original(*args, **kwargs)

        return spy

    def reset(self):
        self.calls = dict.fromkeys(KERNELS, 0)
        self.weights = []

    def close(self):
        for name, original in self._originals.items():
            setattr(self._LF, name, original)


def param_ids(model: torch.nn.Module) -> list[tuple[str, int]]:
    return [(name, id(p)) for name, p in model.named_parameters()]


def close(a: list[float], b: list[float], atol: float, rtol: float) -> tuple[bool, float]:
    """Elementwise |a - b| <= atol + rtol |b|; also the largest relative difference."""
    if len(a) != len(b) or not a:
        return False, float("inf")
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ok = bool(torch.all((ta - tb).abs() <= atol + rtol * tb.abs())) and bool(torch.isfinite(ta).all())
    return ok, float(((ta - tb).abs() / tb.abs().clamp_min(1e-12)).max())


def compare_runs(base: dict, ours: dict, precision: str) -> dict:
    """Curve comparison of two run records (lists under "loss" and maybe "grad_norm")."""
    result = {"ok": True}
    for key, (atol, rtol) in TOLERANCES[precision].items():
        if key not in base or key not in ours:
            continue
        ok, worst = close(ours[key], base[key], atol, rtol)
        result[f"{key}_max_rel_diff"] = worst
        result["ok"] &= ok
    return result


def check_gathered_weight(probe_weights: list[dict], vocab: int, hidden: int) -> str | None:
    """None if every fused-loss call saw a plain full (vocab, hidden) tensor, else what it saw."""
    for seen in probe_weights:
        if seen["class"] not in ("Tensor", "Parameter") or seen["shape"] != [vocab, hidden]:
            return f"fused loss got lm_head weight {seen}, expected a full ({vocab}, {hidden}) tensor"
    if not probe_weights:
        return "the fused loss was never called"
    return None


def write_summary(summary: dict, out: str | None) -> None:
    text = json.dumps(summary, indent=1, sort_keys=True)
    print("INTEGRATION_SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
