"""Griffe extension for the API reference: lightwatch's docstrings as mkdocstrings renders them best.

- lightwatch's docstrings title their doctests ``Example:`` (singular); griffe's Google parser knows only
  ``Examples:`` and would render the section as an admonition, with the ``>>>`` lines as nested quotes.
- Sphinx roles (``:class:`~lightwatch.metrics.Moments```) mean nothing to Markdown: they become code spans
  (``Moments``), the way Sphinx would show them.
"""
from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


def _role(match: "re.Match[str]") -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class ExampleSections(Extension):
    """Rename ``Example:`` section titles to ``Examples:`` and Sphinx roles to code spans, before parsing."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:", obj.docstring.value))
