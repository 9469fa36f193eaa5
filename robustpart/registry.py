"""Policies looked up by name: importance criteria, partitioners, fill policies, compensation policies.

A built-in entry is declared by the path of the object that implements it ("package.module:name"), so the
names, their help and the CLI's choices are known without importing the implementation (and torch); the
object is imported when it is first looked up. `register` adds an entry from code (plug-ins, tests).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class _Lazy:
    """A built-in entry not imported yet: "package.module:attribute"."""

    def __init__(self, path: str):
        self.path = path

    def load(self):
        module, attribute = self.path.split(":")
        return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind                   # e.g. "importance criterion", for error messages
        self._entries: dict[str, T | str] = {}
        self._help: dict[str, str] = {}
        self._traits: dict[str, dict] = {}

    def declare(self, name: str, help: str = "", path: str | None = None, **traits) -> None:
        """A built-in entry implemented by `path` ("module:attribute"), imported on first use, or without
        `path` a plain choice (the entry is its name). `traits`: what callers must know without importing
        it (e.g. needs_data=True)."""
        self._entries[name] = name if path is None else _Lazy(path)
        self._help[name], self._traits[name] = help, traits

    def register(self, name: str, help: str = "", **traits) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self._entries[name] = obj
            self._help[name], self._traits[name] = help, traits
            return obj
        return wrap

    def trait(self, name: str, key: str, default=None):
        return self._traits.get(self.check(name), {}).get(key, default)

    def choices_help(self) -> str:
        """'a (what a does), b (what b does)' for a CLI option's help."""
        return ", ".join(f"{n} ({self._help[n]})" if self._help.get(n) else n for n in self.names())

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def check(self, name: str) -> str:
        """`name` if it is registered, else a ConfigError listing the choices (no import)."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose from {', '.join(self.names())}")
        return name

    def get(self, name: str) -> T:
        entry = self._entries[self.check(name)]
        if isinstance(entry, _Lazy):
            entry = self._entries[name] = entry.load()
        return entry
