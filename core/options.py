"""Option declarations: how a plugin says what it accepts, and how the core checks a recipe."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, make_dataclass
from typing import Any

_MISSING = object()


class OptionError(ValueError):
    """A problem with one option, found by a plugin's ``check_options``."""

    def __init__(self, option: str | None, message: str):
        """``option`` None: the problem is the plugin's as a whole (a missing extra)."""
        super().__init__(message)
        self.option = option


class OptionType:
    """Converts a YAML value to what the plugin gets, or raises ValueError(what was expected)."""

    name = "any"

    def convert(self, value: Any) -> Any:
        return value


class Str(OptionType):
    name = "string"

    def __init__(self, pattern: str | None = None, hint: str | None = None):
        self.pattern = re.compile(pattern) if pattern else None
        self.hint = hint

    def convert(self, value):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError("expected a string")
        value = str(value)
        if self.pattern and not self.pattern.fullmatch(value):
            raise ValueError(f"expected {self.hint or 'a string matching ' + self.pattern.pattern}")
        return value


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _quoted_number(value, kind):
    """A number written in quotes (``shard_size: '1000'``, as YAML from a spreadsheet or
    a template gives it) is that number; any other text stays text (and is refused)."""
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if (_INTEGER if kind is int else _DECIMAL).fullmatch(text):
            return kind(text)
    return value


class Int(OptionType):
    name = "integer"

    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max

    def convert(self, value):
        value = _quoted_number(value, int)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer{_range_hint(self.min, self.max)}")
        _check_range(value, self.min, self.max)
        return value


class Float(OptionType):
    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None):
        self.min, self.max = min, max

    def convert(self, value):
        value = _quoted_number(value, float)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number{_range_hint(self.min, self.max)}")
        _check_range(value, self.min, self.max)
        return float(value)


class Bool(OptionType):
    name = "boolean"

    def convert(self, value):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value


class Choice(OptionType):
    def __init__(self, *choices: str):
        self.choices = choices
        self.name = "one of " + ", ".join(choices)

    def convert(self, value):
        if value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        return value


class ListOf(OptionType):
    """A YAML list; a comma-separated string is accepted too, as Flickr writes its own lists."""

    def __init__(self, item: OptionType):
        self.item = item
        self.name = f"list of {item.name}"

    def convert(self, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif not isinstance(value, list):
            value = [value]
        converted = []
        for index, item in enumerate(value):
            try:
                converted.append(self.item.convert(item))
            except ValueError as exc:
                raise ValueError(f"item {index}: {exc}") from None
        return converted


class MapOf(OptionType):
    """A YAML mapping of string keys to values of one type."""

    def __init__(self, value: OptionType):
        self.value = value
        self.name = f"mapping of key: {value.name}"

    def convert(self, value):
        if not isinstance(value, dict):
            raise ValueError(f"expected a {self.name}")
        converted = {}
        for key, item in value.items():
            try:
                converted[str(key)] = self.value.convert(item)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return converted


class Size(OptionType):
    """A byte count: an integer, or a string such as ``25MB`` or ``512 KiB``."""

    name = "size (e.g. 25MB)"
    _units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
              "kib": 2**10, "mib": 2**20, "gib": 2**30}

    def convert(self, value):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in self._units or isinstance(value, bool):
            raise ValueError("expected a size such as 25MB, 512KiB or a number of bytes")
        return int(float(match.group(1)) * self._units[match.group(2).lower()])


class Date(OptionType):
    """A date or date-time; naive values are taken as UTC."""

    name = "date (YYYY-MM-DD or ISO 8601)"

    def convert(self, value):
        if isinstance(value, dt.datetime):
            moment = value
        elif isinstance(value, dt.date):
            moment = dt.datetime(value.year, value.month, value.day)
        elif isinstance(value, str):
            try:
                moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                raise ValueError("expected a date such as 2019-05-31 or 2019-05-31T12:00:00") from None
        else:
            raise ValueError("expected a date such as 2019-05-31")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        return moment


class BBox(OptionType):
    """``min_lon,min_lat,max_lon,max_lat`` in degrees, as Flickr's ``bbox`` parameter."""

    name = "bbox (min_lon,min_lat,max_lon,max_lat)"

    def convert(self, value):
        parts = value.split(",") if isinstance(value, str) else value
        try:
            if not isinstance(parts, (list, tuple)) or len(parts) != 4:
                raise ValueError
            numbers = [float(p) for p in parts]
        except (TypeError, ValueError):
            raise ValueError("expected four numbers min_lon,min_lat,max_lon,max_lat") from None
        min_lon, min_lat, max_lon, max_lat = numbers
        for lon in (min_lon, max_lon):
            if not -180 <= lon <= 180:
                raise ValueError(f"longitude {lon:g} is outside -180..180")
        for lat in (min_lat, max_lat):
            if not -90 <= lat <= 90:
                raise ValueError(f"latitude {lat:g} is outside -90..90")
        if min_lon >= max_lon:
            raise ValueError(f"min_lon {min_lon:g} must be less than max_lon {max_lon:g}")
        if min_lat >= max_lat:
            raise ValueError(f"min_lat {min_lat:g} must be less than max_lat {max_lat:g}")
        return tuple(numbers)


class Secret(OptionType):
    """A secret: written in a recipe only as a ``${NAME}`` reference, resolved from the
    environment or the credentials file. The plugin receives a :class:`SecretValue`."""

    name = "secret reference (${NAME})"


class SecretValue:
    """Holds a secret without letting it slip into reprs, logs or JSON."""

    __slots__ = ("_value", "reference")

    def __init__(self, value: str, reference: str):
        self._value = value
        self.reference = reference

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"<secret {self.reference}>"

    __str__ = __repr__

    def __eq__(self, other):
        return isinstance(other, SecretValue) and other._value == self._value

    def __hash__(self):
        return hash(self._value)


class Thresholds(OptionType):
    """``{term: ">=0.6", other: "<0.3"}``: a comparison per key."""

    name = "mapping of key: comparison (e.g. \">=0.6\")"
    _pattern = re.compile(r"\s*(>=|<=|>|<|==)\s*([0-9]*\.?[0-9]+)\s*")

    def convert(self, value):
        if not isinstance(value, dict) or not value:
            raise ValueError('expected a mapping such as {monkey: ">=0.6", cage: "<0.3"}')
        result = {}
        for key, expression in value.items():
            match = self._pattern.fullmatch(str(expression))
            if match is None:
                raise ValueError(f"{key}: expected a comparison such as >=0.6 or <0.3, "
                                 f"got {expression!r}")
            result[str(key)] = (match.group(1), float(match.group(2)))
        return result

    @staticmethod
    def holds(comparison: tuple[str, float], value: float) -> bool:
        operator, bound = comparison
        return {">=": value >= bound, "<=": value <= bound, ">": value > bound,
                "<": value < bound, "==": value == bound}[operator]


class Path(Str):
    """A file-system path; relative paths are resolved against the recipe's folder.
    ``exists``: "file" or "dir" when the recipe is wrong without one there."""

    name = "path"

    def __init__(self, exists: str | None = None):
        super().__init__()
        self.exists = exists


@dataclass(frozen=True)
class Option:
    """One option a plugin accepts."""

    name: str
    type: OptionType = field(default_factory=OptionType)
    default: Any = None
    required: bool = False
    help: str = ""
    check: Callable[[Any], None] | None = None  # extra cross-value check; raises ValueError

    def describe(self) -> str:
        bits = [self.type.name]
        if self.required:
            bits.append("required")
        elif self.default is not None:
            bits.append(f"default {self.default!r}")
        return f"{self.name} ({', '.join(bits)}): {self.help}"


def settings_class(name: str, options: Sequence[Option], *extra: tuple, module: str, doc: str,
                   namespace: dict[str, Any] | None = None) -> type:
    """A frozen dataclass with one field per option, its default the option's default as
    the recipe would read it: declaring an option is all it takes to add a setting, and
    settings built in code (``export --recheck-opt-outs``) get the same defaults as a run.
    ``extra``: more fields, as ``make_dataclass`` takes them; ``module``: where the class
    is to be found by name (pickling for worker processes and Dask)."""
    fields = [(option.name, Any, field(default=None if option.default is None
                                       else option.type.convert(option.default)))
              for option in options]
    cls = make_dataclass(name, [*fields, *extra], frozen=True, namespace=namespace)
    cls.__module__ = module
    cls.__doc__ = doc
    return cls


def _range_hint(low, high) -> str:
    if low is not None and high is not None:
        return f" between {low} and {high}"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def _check_range(value, low, high) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{value} is out of range: expected a value{_range_hint(low, high)}")
