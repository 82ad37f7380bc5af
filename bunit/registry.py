"""A name -> object registry filled by a class decorator: the shape of every extension point that is not a method.

Unit-layer execution backends (:mod:`bunit.backends`) and the runtimes of the timing pass
(:mod:`harness.measure.runtimes`) are registries of this kind: a class is registered under a name by
``@registry.register(name)``, one instance of it is kept, a second class under the same name is refused. Names
keep their registration order, which is the order in which they are listed (in ``allowed: ...`` messages, in the
default candidates of the autotuner). :class:`NameView` is a live, read-only sequence of the registered names
(optionally those that pass a filter), for module constants such as ``BACKENDS`` that must still list a thing
registered after they were imported.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, Sequence, TypeVar

__all__ = ["Registry", "NameView"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Registered instances by name, in registration order.

    Args:
        kind: what is registered (``backend``, ``runtime``), for messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: set ``cls.name = name`` and keep one instance of ``cls``; raises on a duplicate name."""

        def wrap(cls: type) -> type:
            if name in self._items:
                owner = type(self._items[name]).__module__
                raise ValueError(f"{self.kind} {name!r} is already registered (by {owner})")
            cls.name = name
            self._items[name] = cls()
            return cls

        return wrap

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's or a plugin's registration); raises ``KeyError`` if it is not registered."""
        del self._items[name]

    def get(self, name: str) -> T:
        """The instance registered as ``name``; raises ``KeyError`` if there is none."""
        return self._items[name]

    def find(self, name: str) -> T | None:
        """The instance registered as ``name``, or None."""
        return self._items.get(name)

    def names(self, keep: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        """Registered names in registration order, those whose instance passes ``keep`` when one is given."""
        return tuple(n for n, item in self._items.items() if keep is None or keep(item))

    def items(self) -> tuple[T, ...]:
        """Registered instances in registration order."""
        return tuple(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items


class NameView(Sequence[str]):
    """The names of ``registry`` that pass ``keep``, read afresh on every use (iteration, ``in``, ``len``).

    Compares equal to the tuple of those names and prints as it.
    """

    def __init__(self, registry: Registry, keep: Callable | None = None):
        self._registry, self._keep = registry, keep

    def _names(self) -> tuple[str, ...]:
        return self._registry.names(self._keep)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, index):
        return self._names()[index]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, NameView)) else other)

    __hash__ = None  # a live view has no fixed hash

    def __repr__(self) -> str:
        return repr(self._names())
