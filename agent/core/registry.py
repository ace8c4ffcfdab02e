"""A tiny plug-in registry keyed by name, shared by runtimes, converters and compression steps."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """A plug-in name that nothing registered; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown plug-in"


class Registry(Generic[T]):
    """Plug-ins of one kind, registered by a unique name through a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated class or function under `name`."""

        def wrap(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} plug-in {name!r} is registered twice")
            self._items[name] = item
            return item

        return wrap

    def get(self, name: str) -> T:
        """Return the plug-in called `name`, or raise UnknownPluginError naming the known ones."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownPluginError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> List[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
