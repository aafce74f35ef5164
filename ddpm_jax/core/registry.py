"""Name -> implementation tables for the things people add: samplers, beta schedules,
networks and data sources.

Each table belongs to the module that uses it (`samplers.SAMPLERS`,
`schedules.BETA_SCHEDULES`, `models.MODELS`, `data_sources.DATA_SOURCES`). A new entry is
one file that calls `register`; the config then selects it by name. docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from ddpm_jax.core.errors import UserError

T = TypeVar("T")


def check_choice(field: str, value: object, choices: Iterable[str]) -> None:
    """Raises ValueError naming config `field` and its choices when `value` is not one of them."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"unknown {field}={value!r}; choose one of {', '.join(choices)}")


class Registry(Generic[T]):
    """Entries by name; `field` is the config field that selects one (for error messages)."""

    def __init__(self, field: str):
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """Registers `entry` under `name`; without `entry`, a decorator that registers its target."""
        def add(value: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.field} {name!r} is registered already; pass replace=True "
                                 "to override it")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Removes `name` (for tests that register a toy entry)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry registered as `name`; a ValueError listing the choices otherwise."""
        check_choice(self.field, name, self.names())
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

