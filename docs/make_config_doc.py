"""Regenerate docs/configuration.md from the config dataclasses and the registries."""

import dataclasses
import typing
from pathlib import Path

from e2ip.backbones import BACKBONES
from e2ip.heads import HEADS
from e2ip.train import config as C

INTRO = """# Configuration

One YAML file with the sections below; every key is optional (the defaults are shown). Unknown
keys, wrong types and missing files are one-line errors naming the key. Override any key on the
command line with `--set section.key=value` (the value is parsed as YAML), e.g.
`--set model.backbone=tensor_product --set head.damping=false --set ensemble.size=5`.

This page is generated from the code (`python docs/make_config_doc.py`).
"""


def section(lines, name, cls, prefix):
    lines.append(f"## `{name}`\n")
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__):
        lines.append(" ".join(doc.split()) + "\n")
    lines.append("| key | type | default |\n|---|---|---|")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "backbone_options":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"| `{prefix}{f.name}` | `{C._type_name(hints[f.name])}` | `{default!r}` |")
    lines.append("")


def main():
    lines = [INTRO]
    for name, cls in C._SECTIONS.items():
        section(lines, name, cls, f"{name}.")
    for bname, b in sorted(BACKBONES.items()):
        section(lines, f"model.{bname}", b.Hyperparameters, f"model.{bname}.")
    for hname, h in sorted(HEADS.items()):
        if dataclasses.fields(h.Hyperparameters):
            section(lines, f"head (model.head: {hname})", h.Hyperparameters, "head.")
    Path(__file__).with_name("configuration.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
