"""The store: SQL schema, queries and migrations. Only this package writes SQL."""

from otaplane.store.database import Database

__all__ = ["Database"]
