"""Render docs/configuration.md from the configuration dataclasses and the registries.

Each key's description is the Sphinx-style attribute comment (``#: ...``, one or more lines)
directly above the field in its dataclass; :func:`missing_descriptions` lists the keys without one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Iterator

from e2ip.backbones import BACKBONES
from e2ip.heads import HEADS
from e2ip.train.config.checks import type_name
from e2ip.train.config.schema import SECTIONS

INTRO = """# Configuration

One YAML file with the sections below; every key is optional (the defaults are shown). Unknown
keys, wrong types and missing files are one-line errors naming the key. Override any key on the
command line with `--set section.key=value` (the value is parsed as YAML), e.g.
`--set model.backbone=tensor_product --set head.damping=false --set ensemble.size=5`.

This page is generated from the code (`python docs/make_config_doc.py`); a test fails when it
is out of date.
"""

#: fields that are not keys of their own (model.backbone_options holds the `model.<backbone>` sections)
_NOT_KEYS = frozenset({"backbone_options"})


@functools.cache
def _own_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comments directly above the annotated assignments in `cls`'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a class made at run time)
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = []
        i = node.lineno - 2  # the line above the field (lineno is 1-based)
        while i >= 0 and lines[i].strip().startswith("#:"):
            parts.append(lines[i].strip()[2:].strip())
            i -= 1
        text = " ".join(p for p in reversed(parts) if p)
        if text:
            out[node.target.id] = text
    return out


def field_descriptions(cls: type) -> dict[str, str]:
    """{field name: description} from the ``#:`` comments above a dataclass's fields (base classes
    included; a field without a comment is left out)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return {f.name: out[f.name] for f in dataclasses.fields(cls) if f.name in out}


def _sections() -> Iterator[tuple[str, type, str]]:
    """(title, dataclass, key prefix) of every section of the page, in order."""
    for name, cls in SECTIONS.items():
        yield name, cls, f"{name}."
    for bname, b in sorted(BACKBONES.items()):
        yield f"model.{bname}", b.Hyperparameters, f"model.{bname}."
    for hname, h in sorted(HEADS.items()):
        if dataclasses.fields(h.Hyperparameters):
            yield f"head (model.head: {hname})", h.Hyperparameters, "head."


def _keys(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS]


def missing_descriptions() -> list[str]:
    """The keys (e.g. 'data.batch_size', 'model.painn.num_features', 'head.tau0') without a
    ``#:`` description in their dataclass."""
    missing = []
    for _, cls, prefix in _sections():
        described = field_descriptions(cls)
        missing += [prefix + f.name for f in _keys(cls) if f.name not in described]
    return missing


def _cell(text: str) -> str:
    """A markdown table cell: one line, pipes escaped (also inside code spans)."""
    return " ".join(text.split()).replace("|", "\\|")


def _section(lines: list[str], name: str, cls, prefix: str) -> None:
    lines.append(f"## `{name}`\n")
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__):
        lines.append(" ".join(doc.split()) + "\n")
    lines.append("| key | type | default | description |\n|---|---|---|---|")
    hints = typing.get_type_hints(cls)
    described = field_descriptions(cls)
    for f in _keys(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        cells = (f"`{prefix}{f.name}`", f"`{type_name(hints[f.name])}`", f"`{default!r}`",
                 described.get(f.name, ""))
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    lines.append("")


def render_config_doc() -> str:
    """The markdown text of docs/configuration.md."""
    lines = [INTRO]
    for name, cls, prefix in _sections():
        _section(lines, name, cls, prefix)
    return "\n".join(lines)
