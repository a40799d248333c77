"""Command-line options made from the fields of :class:`~curvscope.settings.AnalysisOptions`.

Each analysis setting is declared once, as a field with its help, range and
choices; this module turns the fields a command names into click options
(with types that refuse bad values at parse time) and the parsed values back
into an :class:`AnalysisOptions`.
"""
from __future__ import annotations

from dataclasses import MISSING, Field, fields
from typing import Any, Callable

import click
from click.core import ParameterSource

from curvscope.cli.types import FiniteFloat, JsonObject, MemorySize, count
from curvscope.settings import AnalysisOptions, option_name

FIELDS: dict[str, Field] = {f.name: f for f in fields(AnalysisOptions)}


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    factory = f.default_factory
    assert callable(factory), f"field {f.name!r} has neither a default nor a default factory"
    return factory()


def _size_text(nbytes: int) -> str:
    for unit, size in (("T", 1024 ** 4), ("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
        if nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


def _option(f: Field) -> Callable[[Callable], Callable]:
    meta, default, flag = f.metadata, _default(f), option_name(f)
    kind = meta["type"]
    show: bool | str = default is not None
    if kind == "flag":
        return click.option(flag, f.name, is_flag=True, help=meta["help"])
    if kind == "toggle":
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, show_default=True, help=meta["help"])
    if kind == "memory":
        show = _size_text(default)
    types: dict[str, Any] = {
        "count": count(int(meta["low"])), "number": FiniteFloat(meta["low"], meta["high"], meta["open_low"]),
        "choice": click.Choice(meta["choices"]), "json": JsonObject(), "memory": MemorySize(), "text": None}
    multiple = isinstance(default, tuple)
    return click.option(flag, f.name, type=types[kind], default=list(default) if multiple else default,
                        multiple=multiple, show_default=", ".join(map(_shown, default)) if multiple else show,
                        help=meta["help"])


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def analysis_options(*names: str) -> Callable[[Callable], Callable]:
    """A decorator adding the options of the named AnalysisOptions fields (all of them when none is named)."""
    chosen = [FIELDS[n] for n in names] if names else list(FIELDS.values())

    def decorate(command: Callable) -> Callable:
        for f in reversed(chosen):
            command = _option(f)(command)
        return command
    return decorate


def user_gave(name: str) -> bool:
    """Whether the user gave the current command's parameter `name` (on the command line or through the
    environment) rather than leaving it at its default."""
    source = click.get_current_context().get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def given(params: dict[str, Any]) -> list[str]:
    """The analysis settings among a command's `params` that its user gave (:func:`user_gave`)."""
    return [name for name in params if name in FIELDS and user_gave(name)]


def options_from(params: dict[str, Any], **overrides: Any) -> AnalysisOptions:
    """The AnalysisOptions of a command's parsed `params` (other keys ignored), with `overrides` applied; a given
    option that the analysis would ignore is refused (:meth:`AnalysisOptions.refuse_ignored`)."""
    values = {name: tuple(v) if isinstance(v, (list, tuple)) else v for name, v in params.items() if name in FIELDS}
    options = AnalysisOptions(**{**values, **overrides})
    options.refuse_ignored(given(params))
    return options
