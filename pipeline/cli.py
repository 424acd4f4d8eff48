"""Small helpers shared by the command-line entry points: argument parsing, JSON out, JSONL in."""

from __future__ import annotations

import json
import math
from pathlib import Path

from preprocess.errors import OneLineParser

__all__ = ["OneLineParser", "to_json", "read_jsonl"]


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


def read_jsonl(path) -> list[tuple[str, dict]]:
    """(line, record) of every JSON line of ``path`` (metrics.jsonl, evaluations.jsonl);
    lines that are not JSON (a torn last line) are skipped; a missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append((line, json.loads(line)))
        except ValueError:
            continue
    return rows


def to_json(obj) -> str:
    """One-line strict JSON (NaN/inf -> null, numpy/torch scalars -> Python numbers)."""
    return json.dumps(_plain(obj), allow_nan=False)
