"""Registries: names that users extend (objectives, rewards, advantage estimators), one pattern for all.

    ESTIMATORS = Registry("advantage estimator")

    @ESTIMATORS.register("mine")          # or ESTIMATORS.add("mine", fn)
    def mine(R, *, std_normalize, eps): ...

    ESTIMATORS["mine"]                    # the function; an unknown name is UnknownName (a ValueError) listing
                                          # the known ones
A name holds one thing: registering another thing under a taken name is an error (the same thing again is not;
``same`` says what counts as the same, e.g. an objective preset of the same function).
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from drpo.utils.errors import UserError

T = TypeVar("T")


class UnknownName(UserError, ValueError):
    """A name that is not in a registry; the message lists the known ones."""


class Registry(Generic[T]):
    """Names -> things of one ``kind`` (the word in messages: ``unknown <kind> 'x'; known: [...]``)."""

    def __init__(self, kind: str, hint: str = "", same: Callable[[T, T], bool] = lambda a, b: a is b) -> None:
        self.kind, self.hint, self.same = kind, hint, same  # hint: appended to the unknown-name message
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``; ValueError when ``name`` already holds another thing."""
        if name in self._items and not self.same(self._items[name], item):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda item: self.add(name, item)

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {sorted(self._items)}{self.hint}") from None

    def pop(self, name: str) -> T:
        """Remove ``name`` and return what it held (a test's own registration, say)."""
        return self._items.pop(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)
