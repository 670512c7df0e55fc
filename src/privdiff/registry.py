"""One registry pattern for every plug-in: training methods, membership attacks, split attacks and
defences. An entry is registered under its `name` (the CLI word); an unknown name is one line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from privdiff.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries (classes or instances) by their `name`, in registration order.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register
        ... class Plain:
        ...     name = "plain"
        >>> METHODS.get("plain") is Plain, METHODS.names()
        (True, ('plain',))
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Adds `entry` under `entry.name`; usable as a class decorator.

        Raises:
            ValueError: the name is taken (two plug-ins would answer to one CLI word).
        """
        name = entry.name
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry registered as `name`.

        Raises:
            ConfigError: no such entry (the message lists the known names).
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}' (choose from: {', '.join(self._entries)})") from None

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["Registry"]
