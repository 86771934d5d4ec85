"""Command-line flags made from a config dataclass, so that each default lives once: in the
dataclass that owns it (``RenderOptions``, ``HNSWParams``), not copied into a command.

``add_dataclass_flags(parser, cls, help)`` adds ``--field-name`` for each field named in
``help`` (in that order), with the field's default, its type (``int``, ``float``, ``str``,
optional ones included; a ``bool`` defaulting to False is a switch) and the given help text,
or the field's ``metadata["help"]`` when the text is None. ``dataclass_from_args(cls, args)``
builds the dataclass back from the parsed flags. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence

_TYPES = (int, float, str)


def _flag_type(hint) -> type:
    """``int``, ``float`` or ``str`` from a field's type, ``X | None`` included."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            hint = args[0]
    if hint is bool or hint in _TYPES:
        return hint
    raise TypeError(f"no command-line flag for a field of type {hint!r}")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default to give its flag")


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                        help: Mapping[str, str | None],
                        choices: Mapping[str, Sequence] | None = None) -> None:
    """Add ``--name`` (underscores as dashes) for each field of dataclass ``cls`` named in
    ``help``; ``choices`` restricts some of them to listed values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name, text in help.items():
        f = fields[name]  # KeyError: not a field of cls
        text = text if text is not None else f.metadata.get("help")
        if not text:
            raise ValueError(f"flag for {cls.__name__}.{name} has no help text")
        kind, default = _flag_type(hints[name]), _default(f)
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            if default is not False:
                raise ValueError(f"{cls.__name__}.{name}: a switch must default to False")
            parser.add_argument(flag, dest=name, action="store_true", help=text)
            continue
        kw = {"choices": list(choices[name])} if choices and name in choices else {}
        parser.add_argument(flag, dest=name, type=kind, default=default, help=text, **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace, **override):
    """``cls(**fields)`` from the parsed ``args`` (the fields it has flags for) and
    ``override`` (keyword values that win, e.g. a converted unit)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
          if f.init and hasattr(args, f.name)}
    kw.update(override)
    return cls(**kw)
