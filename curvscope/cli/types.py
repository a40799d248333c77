"""Option types that refuse bad values before any work: finite numbers, bounded integers, sizes, JSON.

click's own ``FloatRange`` lets NaN through (every comparison with NaN is
false), and a plain ``int`` option accepts numbers that overflow torch's seed or
HDF5's int64 attributes only after the whole analysis. These types check at
parse time, so a bad value is a usage error (exit 2) naming the option.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import click

from curvscope.curvature.defaults import INT64_MAX

_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


class FiniteFloat(click.ParamType):
    """A finite float in [low, high] (bounds optional; `open_low` excludes `low`)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, open_low: bool = False) -> None:
        self.low, self.high, self.open_low = low, high, open_low

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number.", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        too_low = self.low is not None and (number <= self.low if self.open_low else number < self.low)
        if too_low or (self.high is not None and number > self.high):
            self.fail(f"{value!r} is not in {self._range()}.", param, ctx)
        return number

    def _range(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.open_low or self.low is None else '['}{low}, {high}{')' if self.high is None else ']'}"


class Count(click.IntRange):
    """A whole number in [low, 2⁶³ − 1]: what an int64 attribute of the results file can hold."""

    def _describe_range(self) -> str:
        return f"x>={self.min}"


def count(low: int = 1) -> click.IntRange:
    """A whole number of at least `low` that an int64 attribute of the results file can hold."""
    return Count(min=low, max=INT64_MAX)


class MemorySize(click.ParamType):
    """A size in bytes written as 512M, 2G, 1.5GiB or 1000000."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        return parse_memory(str(value), lambda message: self.fail(message, param, ctx))


def parse_memory(text: str, fail: Any = None) -> int:
    """Bytes in a size such as '512M', '2G', '1.5GiB' or '1000000'; `fail(message)` (or ValueError) otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()]) if match else -1
    if not 0 < size <= INT64_MAX:
        message = f"cannot read the memory size {text!r}: write e.g. 512M, 2G or 1.5GiB."
        if fail is None:
            raise ValueError(message)
        fail(message)
    return size


class JsonObject(click.ParamType):
    """A JSON object (dict) given as text, such as '{"in_channels": 1}'."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value, parse_constant=lambda name: self.fail(
                f"{name} is not a JSON value: write numbers as finite decimals.", param, ctx))
        except json.JSONDecodeError as exc:
            self.fail(f"must be a JSON object, e.g. '{{\"in_channels\": 1}}': {exc}.", param, ctx)
        if not isinstance(parsed, dict):
            self.fail(f"must be a JSON object, not {value!r}.", param, ctx)
        return parsed
