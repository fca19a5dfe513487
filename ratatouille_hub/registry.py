"""Registries: each extension axis (merge methods, strategies, architectures, dataset sources) is a
name -> entry table filled by a decorator next to the entry's code.

CLI choices, config validation, results keys and card wording are read from the tables, so adding an
entry is one decorated function or class in one file. This module imports nothing heavy: `--help` and
config validation read the tables without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import RatatouilleError

T = TypeVar("T")


class UnknownEntryError(RatatouilleError, ValueError):
    """A name that no entry of the registry answers to."""


class Registry(Generic[T]):
    """Entries by name, in registration order (the order the CLI lists them in)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Drop an entry (tests register entries of their own and take them back)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntryError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()

    def names(self, where: Callable[[T], bool] = lambda entry: True) -> tuple[str, ...]:
        return tuple(name for name, entry in self._entries.items() if where(entry))
