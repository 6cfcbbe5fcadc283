"""Canonical JSON: one exact byte string for each entry's content.

The hash chain and the signatures are computed over bytes, so the same logical
content must always serialise to the same bytes, on every machine and database.
We get that from ``json.dumps`` with sorted keys, no whitespace and UTF-8, after
converting values to plain JSON types with fixed rules:

* numpy scalars become Python ints/floats (their ``.item()``), tuples become lists;
* floats keep Python's shortest round-trip ``repr`` (deterministic);
* non-finite floats, which JSON cannot carry, become the strings ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"`` rather than being rejected, because a round
  whose loss diverged must still be recorded;
* anything else (bytes, arbitrary objects) is refused with the path of the
  offending value, so nothing is silently turned into a lossy ``str()``.

The stored text is what gets hashed; verification re-hashes the stored text, so
parsing and re-serialising are never needed to check an entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

from server.audit.errors import InvalidRecordError

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


def to_plain(value: Any, path: str = "value") -> JsonValue:
    """Convert ``value`` to plain JSON types following the module's rules."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "Infinity" if number > 0 else "-Infinity"
        return number
    if isinstance(value, Mapping):
        plain: dict[str, JsonValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRecordError(f"{path}: keys must be strings, got {key!r}")
            plain[key] = to_plain(item, f"{path}.{key}")
        return plain
    if isinstance(value, (list, tuple)):
        return [to_plain(item, f"{path}[{index}]") for index, item in enumerate(value)]
    # numpy scalars that are not registered as numbers (numpy.bool_), 0-d arrays.
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return to_plain(value.item(), path)
    raise InvalidRecordError(f"{path}: cannot record a value of type {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """Serialise ``value`` to its canonical JSON text."""
    text = json.dumps(
        to_plain(value),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates cannot be stored or hashed
        raise InvalidRecordError(f"text that is not valid Unicode: {exc.reason}") from None
    return text


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of bytes, or of a string's UTF-8 encoding."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()
