"""Generated documentation is current."""

from pathlib import Path

from e2ip.train.config_doc import render_config_doc

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_doc_is_generated_from_the_schema():
    text = (DOCS / "configuration.md").read_text()
    assert text == render_config_doc(), "run: python docs/make_config_doc.py"
    for key in ("data.n_test", "training.recalibrate", "training.init_from", "training.ema_decay"):
        assert f"`{key}`" in text
