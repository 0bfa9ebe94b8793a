"""Render docs/configuration.md from the configuration dataclasses and the registries."""

from __future__ import annotations

import dataclasses
import typing

from ..backbones import BACKBONES
from ..heads import HEADS
from . import config as C

INTRO = """# Configuration

One YAML file with the sections below; every key is optional (the defaults are shown). Unknown
keys, wrong types and missing files are one-line errors naming the key. Override any key on the
command line with `--set section.key=value` (the value is parsed as YAML), e.g.
`--set model.backbone=tensor_product --set head.damping=false --set ensemble.size=5`.

This page is generated from the code (`python docs/make_config_doc.py`); a test fails when it
is out of date.
"""


def _section(lines: list[str], name: str, cls, prefix: str) -> None:
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


def render_config_doc() -> str:
    """The markdown text of docs/configuration.md."""
    lines = [INTRO]
    for name, cls in C._SECTIONS.items():
        _section(lines, name, cls, f"{name}.")
    for bname, b in sorted(BACKBONES.items()):
        _section(lines, f"model.{bname}", b.Hyperparameters, f"model.{bname}.")
    for hname, h in sorted(HEADS.items()):
        if dataclasses.fields(h.Hyperparameters):
            _section(lines, f"head (model.head: {hname})", h.Hyperparameters, "head.")
    return "\n".join(lines)
