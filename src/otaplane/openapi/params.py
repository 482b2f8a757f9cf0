"""Typed parsing of RPC parameters, shared by every action.

Each action declares its parameters as `Param`s; `parse_params` turns the raw string map into
checked Python values or raises the right catalogue error, so garbage never reaches a handler.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otaplane import errors
from otaplane.errors import ApiError, ErrorSpec


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ParamType:
    """Parses one raw string; raises ValueError with a human reason."""

    def parse(self, raw: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Str(ParamType):
    min_len: int = 0
    max_len: int | None = None
    pattern: str | None = None
    pattern_hint: str = ""

    def parse(self, raw: str) -> str:
        if len(raw) < self.min_len:
            raise ValueError(f"must be at least {self.min_len} characters")
        if self.max_len is not None and len(raw) > self.max_len:
            raise ValueError(f"must be at most {self.max_len} characters")
        if self.pattern is not None and not re.fullmatch(self.pattern, raw):
            raise ValueError(self.pattern_hint or f"must match {self.pattern}")
        return raw


@dataclass(frozen=True)
class Int(ParamType):
    min: int | None = None
    max: int | None = None
    choices: tuple[int, ...] | None = None

    def parse(self, raw: str) -> int:
        text = raw.strip()
        # [0-9], not \d: \d also matches other scripts' digits ('١', '７'), which int() accepts.
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", text):
            raise ValueError("must be an integer")
        value = int(text)
        if not _INT64_MIN <= value <= _INT64_MAX:  # every integer column is at most a BIGINT
            raise ValueError("is out of range")
        if self.choices is not None and value not in self.choices:
            raise ValueError("must be one of " + ", ".join(map(str, self.choices)))
        if self.min is not None and value < self.min:
            raise ValueError(f"must be >= {self.min}")
        if self.max is not None and value > self.max:
            raise ValueError(f"must be <= {self.max}")
        return value


@dataclass(frozen=True)
class Bool(ParamType):
    def parse(self, raw: str) -> bool:
        # The Tea SDK sends Python's str(True) = "True": accept any case.
        lowered = raw.strip().lower()
        if lowered == "true":
            return True
        if lowered == "false":
            return False
        raise ValueError("must be true or false")


@dataclass(frozen=True)
class Enum(ParamType):
    choices: tuple[str, ...]
    case_insensitive: bool = True

    def parse(self, raw: str) -> str:
        for choice in self.choices:
            if raw == choice or (self.case_insensitive and raw.lower() == choice.lower()):
                return choice
        raise ValueError("must be one of " + ", ".join(self.choices))


@dataclass(frozen=True)
class ListOf(ParamType):
    """Flattened list `Name.1=a&Name.2=b` (values ordered by N)."""

    item: ParamType
    max_items: int | None = None
    unique: bool = False

    def parse(self, raw: str) -> Any:  # lists are parsed from several keys, see parse_params
        raise TypeError("ListOf is parsed by parse_params")


@dataclass(frozen=True)
class StructList(ParamType):
    """Flattened list of objects `Name.1.Key=a&Name.1.Value=b`."""

    fields: Mapping[str, ParamType]
    required_fields: tuple[str, ...] = ()
    max_items: int | None = None

    def parse(self, raw: str) -> Any:
        raise TypeError("StructList is parsed by parse_params")


@dataclass(frozen=True)
class Param:
    name: str
    type: ParamType = field(default_factory=Str)
    required: bool = False
    default: Any = None
    aliases: tuple[str, ...] = ()
    # A business error to answer instead of the gateway's InvalidParameter (e.g. bad ProductName).
    invalid_error: ErrorSpec | None = None


def _invalid(param: Param, reason: str) -> ApiError:
    if param.invalid_error is not None:
        return param.invalid_error(name=param.name, reason=reason)
    return errors.invalid(param.name, reason)


_INDEX = re.compile(r"\.([0-9]{1,6})(?:\.([A-Za-z0-9_]+))?")


def _collect_indexed(name: str, raw: Mapping[str, str]) -> dict[int, dict[str | None, str]]:
    """All `name.N` and `name.N.Field` entries, grouped by N."""
    found: dict[int, dict[str | None, str]] = {}
    prefix = name + "."
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue
        match = _INDEX.fullmatch(key, len(name))
        if match is None:
            continue
        index = int(match.group(1))
        found.setdefault(index, {})[match.group(2)] = value
    return found


def _parse_list(param: Param, spec: ListOf, raw: Mapping[str, str]) -> list[Any] | None:
    entries = _collect_indexed(param.name, raw)
    values: list[Any] = []
    for index in sorted(entries):
        if None not in entries[index]:
            raise _invalid(param, f"{param.name}.{index} has no value")
        text = entries[index][None]
        try:
            values.append(spec.item.parse(text))
        except ValueError as exc:
            raise _invalid(param, f"{param.name}.{index} {exc}") from None
    if not values:
        return None
    if spec.max_items is not None and len(values) > spec.max_items:
        raise _invalid(param, f"at most {spec.max_items} items are allowed")
    if spec.unique and len(set(values)) != len(values):
        raise _invalid(param, "items must be unique")
    return values


def _parse_struct_list(param: Param, spec: StructList, raw: Mapping[str, str]) -> list[dict] | None:
    entries = _collect_indexed(param.name, raw)
    items: list[dict[str, Any]] = []
    for index in sorted(entries):
        item: dict[str, Any] = {}
        for field_name, text in entries[index].items():
            if field_name not in spec.fields:
                continue  # unknown sub-fields are ignored, like unknown parameters
            try:
                item[field_name] = spec.fields[field_name].parse(text)
            except ValueError as exc:
                raise _invalid(param, f"{param.name}.{index}.{field_name} {exc}") from None
        for required in spec.required_fields:
            if item.get(required) in (None, ""):
                raise errors.missing(f"{param.name}.{index}.{required}")
        items.append(item)
    if not items:
        return None
    if spec.max_items is not None and len(items) > spec.max_items:
        raise _invalid(param, f"at most {spec.max_items} items are allowed")
    return items


def parse_params(specs: tuple[Param, ...], raw: Mapping[str, str]) -> dict[str, Any]:
    """Checked values for every declared parameter (absent optional ones get their default)."""
    values: dict[str, Any] = {}
    for param in specs:
        if isinstance(param.type, ListOf):
            value = _parse_list(param, param.type, raw)
        elif isinstance(param.type, StructList):
            value = _parse_struct_list(param, param.type, raw)
        else:
            text = raw.get(param.name)
            for alias in param.aliases:
                if not text:
                    text = raw.get(alias)
            # An empty value is no value: both Python SDKs send a field set to "" as `Name=`, while the
            # Go SDK never sends one, so on the platform "" cannot mean more than "not given". A
            # required parameter is then Missing<Name>; an optional one gets its default.
            if not text:
                value = None
            else:
                try:
                    value = param.type.parse(text)
                except ValueError as exc:
                    raise _invalid(param, str(exc)) from None
        if value is None:
            if param.required:
                raise errors.missing(param.name)
            value = param.default
        values[param.name] = value
    return values
