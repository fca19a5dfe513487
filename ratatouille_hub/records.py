"""The JSON form of the typed records the API returns, for `--format json` (docs/json.md is its schema).

One rule for every record, so a script can rely on it: a dataclass becomes an object of its fields (a
record that is also a file, such as `Results`, as its file holds it: its own `to_dict`), a tuple a list, a
path a string, and a float that JSON cannot hold (an infinite ratio-error) null. dataclasses.asdict alone
would keep paths and infinities, which json.dumps then writes as no JSON parser reads them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import PurePath


def to_jsonable(value):
    """`value` as plain JSON data: objects, lists, strings, numbers, booleans and null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):  # a record with a file of its own: the same schema as that file
            return to_jsonable(value.to_dict())
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(record) -> str:
    """`record` as one JSON document (strict: no NaN or Infinity), keys in the record's field order. Every
    character outside ASCII is escaped: strings from strangers' repos and datasets reach a terminal inert."""
    return json.dumps(to_jsonable(record), indent=2, allow_nan=False)
