"""Package exports loaded on first use (PEP 562), for the packages whose ``__init__`` must stay
light: ``client`` (its ``contract`` imports without numpy or tritonclient), ``runtime`` (a
Triton backend importing ``runtime.request`` must not load the pipeline) and ``retriever`` (the
served retriever imports ``index`` alone, not the builder). Standard library only."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """``(__getattr__, __dir__, __all__)`` for ``package`` whose names live in its submodules:
    ``exports`` maps a submodule to the names it provides; a name's submodule is imported the
    first time the name is read, and the value cached in the package."""
    where = {name: module for module, names in exports.items() for name in names}
    names = sorted(where)
    space = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        space[name] = value
        return value

    def __dir__():
        return sorted(set(space) | set(names))

    return __getattr__, __dir__, names
