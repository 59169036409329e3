"""Name -> plug-in class, filled by a decorator in each plug-in module, so adding a meter or runner is one file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, what: str, package: str, skip: tuple[str, ...] = ("base",)):
        self.what, self.package, self.skip = what, package, skip
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            cls.name = name
            self._classes[name] = cls
            return cls

        return deco

    def _import_all(self) -> None:
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name not in self.skip:
                importlib.import_module(f"{self.package}.{mod.name}")

    def names(self) -> list[str]:
        self._import_all()
        return sorted(self._classes)

    def get(self, name: str, *args):
        """An instance of the plug-in registered as `name`; KeyError naming the known ones otherwise."""
        self._import_all()
        if name not in self._classes:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._classes))}")
        return self._classes[name](*args)
