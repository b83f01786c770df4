"""A griffe extension for the Python API page: the docstrings use Sphinx roles
(``:meth:`start```, ``:class:`~pkg.mod.Name```), which Markdown would show raw.
Each becomes inline code (``~`` keeps only the last name, as Sphinx does)."""

import re
from typing import Any

from griffe import Extension

ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|exc|data|mod|obj):`(~?)([^`]+)`")


def plain(text: str) -> str:
    return ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class SphinxRoles(Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
