"""Policies looked up by name: importance criteria, partitioners, fill policies."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import PlanError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self.entries[name] = obj
            return obj
        return wrap

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> T:
        if name not in self.entries:
            raise PlanError(f"unknown {self.kind} '{name}'; choose from {', '.join(self.names())}")
        return self.entries[name]
