"""Calling a transformers model with a KV cache, whichever keyword its version takes.

The installed transformers (5.25) takes the cache as the forward argument and output field `cache` and
warns on `past_key_values`, which 5.40 removes; this passes it under whichever name the model's forward
declares, so older releases within the package's pin keep working too.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The keyword `model.forward` takes its KV cache by: "cache", or "past_key_values" before the rename."""
    return _keyword_of(type(model))


@functools.cache
def _keyword_of(model_class: type) -> str:
    # once per class: a torch session asks at every decode step
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_with_cache(model: nn.Module, cache: Any, **inputs) -> tuple[Any, Any]:
    """`model(**inputs, use_cache=True)` with `cache` (None: a fresh one) as its KV cache; (output, new cache)."""
    out = model(**inputs, **{cache_keyword(model): cache}, use_cache=True)
    return out, (out.cache if "cache" in out else out.past_key_values)


__all__ = ["cache_keyword", "forward_with_cache"]
