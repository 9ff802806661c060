"""The README's support table is the one rendered from the registries (liger_plugins/support.py)."""

import liger_kernels.functional as functional
from liger_plugins import support
from liger_plugins.patching.registry import SUPPORTED_MODEL_TYPES, TRAITS


def test_table_lists_every_op_and_architecture():
    table = support.render_support_table()
    for op in functional.__all__:
        assert f"| `{op}` | `{op}(" in table, op
    for model_type in SUPPORTED_MODEL_TYPES:
        head = TRAITS[model_type].causal_lm
        assert f"| `{model_type}` | " + (f"`{head}`" if head else support.NO_HEAD) in table, model_type


def test_readme_section_is_current():
    section = support.readme_section(support.README.read_text())
    assert section is not None, (
        f"README.md has no {support.START} ... {support.END} section; "
        "run `python -m liger_plugins.support --write-readme`"
    )
    assert section == support.render_support_table().strip(), (
        "README.md's support table is stale; run `python -m liger_plugins.support --write-readme`"
    )


def test_write_readme_replaces_only_the_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{support.START}\nold table\n{support.END}\n\n## after\n")
    support.write_readme(readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith(f"{support.END}\n\n## after\n")
    assert support.readme_section(text) == support.render_support_table().strip()
    support.write_readme(readme)  # idempotent
    assert readme.read_text() == text


def test_write_readme_appends_a_section_when_missing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    support.write_readme(readme)
    assert support.readme_section(readme.read_text()) == support.render_support_table().strip()
