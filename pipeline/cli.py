"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import json
import math

from preprocess.errors import OneLineParser

__all__ = ["OneLineParser", "to_json"]


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


def to_json(obj) -> str:
    """One-line strict JSON (NaN/inf -> null, numpy/torch scalars -> Python numbers)."""
    return json.dumps(_plain(obj), allow_nan=False)
