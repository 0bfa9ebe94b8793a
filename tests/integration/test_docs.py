"""Generated documentation is current, and every configuration key is described."""

import ast
import importlib
import importlib.util
import re
import textwrap
from dataclasses import dataclass

from e2ip.train.config import doc
from e2ip.train.config.doc import field_descriptions, missing_descriptions, render_config_doc
from tests.support import REPO

DOCS = REPO / "docs"


def test_configuration_doc_is_generated_from_the_schema():
    text = (DOCS / "configuration.md").read_text()
    assert text == render_config_doc(), "run: python docs/make_config_doc.py"
    for key in ("data.n_test", "training.recalibrate", "training.init_from", "training.ema_decay"):
        assert f"`{key}`" in text
    assert "| key | type | default | description |" in text


def test_every_configuration_key_has_a_description():
    missing = missing_descriptions()
    assert not missing, f"add a '#: ...' comment above these fields: {', '.join(missing)}"


@dataclass
class _Toy:
    """A toy section."""

    #: Documented on
    #: two lines (Å).
    described: int = 1
    undescribed: float = 0.5
    # a plain comment is not a description
    plain: str = "x"

    #: Separated by a blank line from `detached`, so not its description.

    detached: bool = False


def test_descriptions_are_read_from_attribute_comments():
    assert field_descriptions(_Toy) == {"described": "Documented on two lines (Å)."}


def test_a_key_without_a_description_is_reported(monkeypatch):
    monkeypatch.setattr(doc, "SECTIONS", {"toy": _Toy})
    missing = missing_descriptions()
    assert "toy.described" not in missing
    assert {"toy.undescribed", "toy.plain", "toy.detached"} <= set(missing)


def _python_blocks(path):
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_e2ip_import_in_the_docs_resolves():
    """The import lines of the docs' Python examples name modules and names that exist."""
    pages = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]
    checked, missing = 0, []
    for page in pages:
        for block in _python_blocks(page):
            for node in ast.walk(ast.parse(textwrap.dedent(block))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("e2ip"):
                    module = importlib.import_module(node.module)
                    missing += [f"{page.name}: {node.module}.{alias.name}" for alias in node.names
                                if not hasattr(module, alias.name)]
                    checked += 1
    assert not missing, missing
    assert checked > 5
