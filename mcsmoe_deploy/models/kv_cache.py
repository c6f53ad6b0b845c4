"""Calling a transformers model with a KV cache, whichever keyword its version takes.

transformers 5.25 renamed the forward argument and output field `past_key_values` to `cache` (the old
name warns, and goes in 5.40); the versions this package supports (>= 5.23) include both spellings.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The keyword `model.forward` takes its KV cache by: "cache" or, before transformers 5.25, "past_key_values"."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def forward_with_cache(model: nn.Module, cache: Any, **inputs) -> tuple[Any, Any]:
    """`model(**inputs, use_cache=True)` with `cache` (None: a fresh one) as its KV cache; (output, new cache)."""
    out = model(**inputs, **{cache_keyword(model): cache}, use_cache=True)
    return out, (out.cache if "cache" in out else out.past_key_values)


__all__ = ["cache_keyword", "forward_with_cache"]
