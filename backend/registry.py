"""Registries: implementations register under a lowercase name; configs pick them by name.

One class serves the generators, the geometry estimators and the Gaussian rasterizers. Heavy
implementations (diffusers, gsplat) live in modules named up front and imported only when their name
is asked for, so listing the names costs nothing.

Example::

    >>> SHAPES: Registry[type] = Registry("shape")
    >>> @SHAPES.register("disk")
    ... class Disk: ...
    >>> SHAPES.get("disk") is Disk, SHAPES.names()
    (True, ['disk'])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> class table. ``get`` of an unknown name fails with the list of known names.

    Args:
        kind: what the entries are, for error messages ("generator").
        modules: name -> module that registers it when imported (loaded on first ``get``). A module
            of the package that is not named here is never imported, so its name is unknown.
    """

    def __init__(self, kind: str, modules: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._modules = dict(modules or {})
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        if name != name.lower() or not name:
            raise ValueError(f"{self.kind} names are lowercase and non-empty; got {name!r}")

        def deco(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``, importing its module first where one is named."""
        if name not in self._items and name in self._modules:
            module = self._modules[name]
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name is None or err.name.partition(".")[0] == module.partition(".")[0]:
                    raise  # a module of the same package: the project's own bug, not a missing package
                raise ValueError(f"{self.kind} {name!r} needs {err.name}, which is not installed here") from err
            if name not in self._items:
                raise ValueError(f"{self.kind} {name!r}: its module {module} registers no {self.kind} of that name")
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}") from None

    def make(self, name: str, *args: Any, **kwargs: Any) -> T:
        """An instance of the class registered under ``name`` (arguments go to its constructor)."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """Every name a config may ask for, whether or not its module is imported yet."""
        return sorted(set(self._items) | set(self._modules))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._modules
