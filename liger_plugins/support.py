"""The README's support table, generated from the registries so that it cannot drift.

- Ops: every public function of `liger_kernels.functional` (its `__all__`), with its signature and
  the first line of its docstring.
- Architectures: every entry of `liger_plugins.patching.registry.TRAITS`, with what `apply_liger`
  swaps in for it (read from its traits, never from an installed transformers, so the table is the
  same in every environment).

    python -m liger_plugins.support                  # print the table
    python -m liger_plugins.support --write-readme   # rewrite the README section in place

The README section is the text between `START` and `END` (tests/test_support.py checks it is current).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

START = "<!-- support-table:start -->"
NO_HEAD = "— (vision encoder: no language-model head)"
END = "<!-- support-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def _ops_table() -> list[str]:
    import liger_kernels.functional as functional

    lines = ["| op | signature | computes |", "|---|---|---|"]
    for name in sorted(functional.__all__):
        fn = getattr(functional, name)
        summary = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        lines.append(f"| `{name}` | `{name}({_parameters(fn)})` | {_cell(summary)} |")
    return lines


def _cell(text: str) -> str:
    """Free text in a table cell: escape the column separator and the emphasis marker."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _parameters(fn) -> str:
    """The parameter list without annotations: `x, weight, eps=1e-06, *, chunk_size=None`."""
    parts, keyword_only = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(parts)


def _norm_flavour(spec) -> str:
    """How a norm class computes, where it differs from Llama's RMSNorm."""
    notes = []
    if spec.offset:
        notes.append(f"offset {spec.offset:g}")
    if spec.casting_mode != "llama":
        notes.append(f"{spec.casting_mode} casting")
    return f" ({', '.join(notes)})" if notes else ""


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in names) or "—"


def _architectures_table() -> list[str]:
    from liger_plugins.patching.registry import SUPPORTED_MODEL_TYPES, TRAITS

    columns = ["model_type", "causal LM (fused linear cross-entropy)", "RoPE", "RMSNorm", "LayerNorm",
               "gated MLP", "MoE experts", "kept as is"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for model_type in SUPPORTED_MODEL_TYPES:
        t = TRAITS[model_type]
        notes = (("final logit softcap", t.softcap_config), ("logit scale", t.logit_scale), ("router aux loss", t.moe))
        loss_notes = [note for note, on in notes if on]
        causal_lm = (f"`{t.causal_lm}`" + (f" ({', '.join(loss_notes)})" if loss_notes else "")
                     if t.causal_lm else NO_HEAD)
        rope = " or ".join(f"`{r.function}`" + (f" ({r.kernel})" if r.kernel != "rope" else "")
                           for r in t.rope) or "— (no kernel fits)"
        if t.sub_configs:  # a wrapper: its language model is patched as its own architecture
            rope = f"the {', '.join(t.sub_configs)} architecture's (built model)"
        norms = ", ".join(f"`{name}`{_norm_flavour(spec)}" for name, spec in t.norms.items()) or "—"
        if t.decoder_layers:
            norms += f"; residual joins in the norm kernels: {_names(t.decoder_layers)}"
        if t.attentions:
            norms += f"; q/k/v projections as one op: {_names(t.attentions)}"
        mlps = ", ".join(f"`{name}`" + (" (fused gate_up)" if spec.layout == "fused" else "")
                         for name, spec in t.mlps.items()) or "—"
        layer_norms = [f"`{name}`" + (f" (weight + {offset:g})" if offset else "")
                       for name, offset in t.layer_norms.items()]
        if t.torch_layer_norm:
            layer_norms.append("`torch.nn.LayerNorm` (vision tower; built model)")
        layer_norms = ", ".join(layer_norms) or "—"
        lines.append(
            f"| `{model_type}` | {causal_lm} | {rope} | {norms} | {layer_norms} | {mlps} | "
            f"{_names(t.experts)} | {_cell('; '.join(t.unpatched)) or '—'} |"
        )
    return lines


def render_support_table() -> str:
    """The Markdown of the README's support section (ops, then architectures), without the markers."""
    lines = [
        "### Ops",
        "",
        "Each op: Triton forward and backward kernels, a torch reference (its specification and CPU path),",
        "`liger_kernels.functional.<op>` and parity tests against float64 math.",
        "",
        *_ops_table(),
        "",
        "### Architectures",
        "",
        "What `apply_liger(model_type_or_model)` swaps in, per Hugging Face `model_type`. Vision-language",
        "models: \"built model\" marks what only an instance patch (`apply_liger(model)`) can reach; a",
        "wrapper (Llava, PaliGemma, InternVL, SmolVLM) patches its language model as that model's own",
        "architecture (`text_config.model_type`). RoPE: the module-level function replaced (and its kernel",
        "where not `rope`); \"or\": the first one the installed transformers defines. MoE experts: their",
        "gate activation (`swiglu` flag); with `fused_moe=True` (opt-in) their whole forward runs the fused",
        "MoE kernel. \"Residual joins in the norm kernels\": pre-norm decoder layers whose residual adds run in",
        "the RMSNorm kernels (`fused_add_rms_norm` flag). \"q/k/v projections as one op\": attentions whose",
        "three input projections run as one op summing their input gradients (`qkv_projections` flag).",
        "",
        *_architectures_table(),
    ]
    return "\n".join(lines)


def readme_section(text: str) -> str | None:
    """The text between the markers (stripped), or None when the README has no such section."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write_readme(path: Path = README) -> None:
    """Replace the README section with the current table; without markers, append a section."""
    text = path.read_text()
    block = f"{START}\n{render_support_table()}\n{END}"
    if readme_section(text) is None:
        text = text.rstrip("\n") + f"\n\n## Support\n\n{block}\n"
    else:
        before, rest = text.split(START, 1)
        text = before + block + rest.split(END, 1)[1]
    path.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-readme", action="store_true", help=f"rewrite the section of {README}")
    args = parser.parse_args(argv)
    if args.write_readme:
        write_readme()
    else:
        print(render_support_table())


if __name__ == "__main__":
    main()
