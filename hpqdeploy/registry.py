"""Name -> plug-in class, filled by a decorator in each plug-in module, so adding a meter or runner is one file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, what: str, package: str, skip: tuple[str, ...] = ("base",),
                 modules: tuple[str, ...] | None = None):
        """Plug-ins are every module of `package` but `skip`, or exactly `modules` where the package also holds
        modules that are not plug-ins."""
        self.what, self.package, self.skip, self.modules = what, package, skip, modules
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            cls.name = name
            self._classes[name] = cls
            return cls

        return deco

    def _import_all(self) -> None:
        names = self.modules
        if names is None:
            pkg = importlib.import_module(self.package)
            names = tuple(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in self.skip)
        for name in names:
            importlib.import_module(f"{self.package}.{name}")

    def names(self) -> list[str]:
        self._import_all()
        return sorted(self._classes)

    def get(self, name: str, *args):
        """An instance of the plug-in registered as `name`; KeyError naming the known ones otherwise."""
        self._import_all()
        if name not in self._classes:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._classes))}")
        return self._classes[name](*args)
