"""Regenerate docs/configuration.md from the code (tests/integration/test_docs.py checks it is current)."""

from pathlib import Path

from e2ip.train.config.doc import render_config_doc

if __name__ == "__main__":
    Path(__file__).with_name("configuration.md").write_text(render_config_doc())
