"""The action table: one entry per RPC action, the single source for parsing and dispatch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from otaplane.openapi.params import Param, Str

if TYPE_CHECKING:
    from otaplane.services.container import Services
    from otaplane.services.tenancy import Tenant

Handler = Callable[["Services", "Tenant", dict[str, Any]], dict[str, Any]]

API_VERSION = "2018-01-20"
IOT_INSTANCE_ID = Param("IotInstanceId", Str(max_len=64))


@dataclass(frozen=True)
class Action:
    name: str
    handler: Handler
    params: tuple[Param, ...] = ()
    methods: frozenset[str] = field(default_factory=lambda: frozenset({"GET", "POST"}))
    # A short read (a few indexed SELECTs, no writes, no other I/O): on SQLite the gateway runs
    # it on the event loop instead of in a worker thread (the thread hop costs more than it).
    quick_read: bool = False
    all_params: tuple[Param, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all_params", (IOT_INSTANCE_ID, *self.params))


def action(name: str, *params: Param, methods: tuple[str, ...] = ("GET", "POST"), quick_read: bool = False):
    """Decorator that turns a handler into an `Action` (collected per module in ACTIONS)."""

    def wrap(handler: Handler) -> Action:
        return Action(name, handler, tuple(params), frozenset(methods), quick_read)

    return wrap


def build_table() -> dict[str, Action]:
    from otaplane.openapi.actions import ALL_ACTIONS

    table: dict[str, Action] = {}
    for entry in ALL_ACTIONS:
        if entry.name in table:
            raise RuntimeError(f"action {entry.name} is declared twice")
        table[entry.name] = entry
    return table
