"""Running a list of onnx-ir passes: which ones changed the model, and which one failed.

onnx-ir's own `PassManager` says only "an error occurred at step 0"; this one raises
`GraphPassError` naming the failing pass (its precondition or its body) and reports the
passes that modified the model, so an export can say what was applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir


class GraphPassError(RuntimeError):
    """A graph pass failed; `pass_name` names it, the cause is chained (`__cause__`)."""

    def __init__(self, pass_name: str, cause: BaseException):
        super().__init__(f"graph pass {pass_name} failed: {cause}")
        self.pass_name = pass_name


def pass_name(graph_pass: ir.passes.PassBase) -> str:
    """The name a report or an error uses for `graph_pass`: its class name."""
    return type(graph_pass).__name__


@dataclass
class PassesApplied:
    """What `GraphPassManager` did: the resulting model, the passes run and those that changed it (in order).

    results: each pass's own `PassResult` by pass name (some carry more, e.g. rewrite counts).
    """

    model: ir.Model
    ran: list[str] = field(default_factory=list)
    modified_by: list[str] = field(default_factory=list)
    results: dict[str, ir.passes.PassResult] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.modified_by)


class GraphPassManager:
    """Runs `passes` in order, once each, on an `ir.Model`.

    Each pass checks its own preconditions (`requires`) before it runs; a failing
    precondition or pass body raises `GraphPassError` naming that pass. Functional
    passes hand the next pass their new model.
    """

    def __init__(self, passes: Sequence[ir.passes.PassBase]):
        self.passes = list(passes)

    def __call__(self, model: ir.Model) -> PassesApplied:
        applied = PassesApplied(model)
        for graph_pass in self.passes:
            name = pass_name(graph_pass)
            try:
                result = graph_pass(applied.model)
            except ir.passes.PreconditionError as error:
                # onnx-ir wraps a plain exception from requires(); report the reason, not the wrapper
                raise GraphPassError(name, error.__cause__ or error) from error
            except Exception as error:
                raise GraphPassError(name, error) from error
            applied.model = result.model
            applied.ran.append(name)
            applied.results[name] = result
            if result.modified:
                applied.modified_by.append(name)
        return applied


__all__ = ["GraphPassError", "GraphPassManager", "PassesApplied", "pass_name"]
