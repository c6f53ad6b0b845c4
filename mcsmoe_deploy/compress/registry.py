"""Named strategies: one registry per kind of choice a recipe makes (grouping, weighting, similarity, low rank).

A recipe names a strategy; the pipeline looks the name up here, so adding a method is one
registered function and no branch to edit anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import ParameterError

Strategy = TypeVar("Strategy")


class Registry(dict, Generic[Strategy]):
    """name -> strategy for the recipe field `parameter`; `register(name)` decorates a new one."""

    def __init__(self, parameter: str):
        super().__init__()
        self.parameter = parameter

    def register(self, name: str) -> Callable[[Strategy], Strategy]:
        """Decorator that files the decorated strategy under `name` (a second one under the same name is a bug)."""

        def add(strategy: Strategy) -> Strategy:
            if name in self:
                raise ValueError(f"{self.parameter} {name!r} is registered twice")
            self[name] = strategy
            return strategy

        return add

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self)

    def lookup(self, name: str) -> Strategy:
        """The strategy called `name`; ParameterError naming the choices if there is none."""
        if name not in self:
            raise ParameterError(self.parameter, f"must be one of {', '.join(self)}, not {name!r}")
        return self[name]
