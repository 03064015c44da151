"""Tiny name -> builder registries, one per slot (backbone, pixel decoder, ...).

A registry maps a config ``kind`` string to a callable.  Unknown kinds fail with the list of
valid choices, so a typo in an override is caught before anything is built.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    def __init__(self, slot: str):
        self.slot = slot
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.slot}: kind {name!r} registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(
                f"unknown {self.slot} kind {name!r}; valid choices: {sorted(self._items)}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


BACKBONES: Registry = Registry("backbone")
PIXEL_DECODERS: Registry = Registry("pixel_decoder")
