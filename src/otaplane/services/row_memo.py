"""Immutable objects built from database rows, reused while a row reads the same."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RowMemo(Generic[T]):
    """`memo.get(row)`: the object `build(row)` made when a row with exactly these column values
    was seen before, else a new one. For objects that are a function of their row alone (a
    Product, its secret decrypted; a Firmware): a polled read (QueryProduct, QueryOTAFirmware)
    then costs a lookup instead of a build. A changed row is a miss; a full memo starts over."""

    def __init__(self, build: Callable[[Mapping[str, Any]], T], max_entries: int = 1024):
        self._build = build
        self._max_entries = max_entries
        self._built: dict[tuple, T] = {}

    def get(self, row: Mapping[str, Any]) -> T:
        key = tuple(row.values())
        built = self._built.get(key)
        if built is None:
            if len(self._built) >= self._max_entries:
                self._built.clear()
            built = self._built[key] = self._build(row)
        return built
