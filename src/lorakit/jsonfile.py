"""JSON files lorakit writes: strict JSON (no NaN / Infinity); callers write them with ``atomic.write_atomic``.

Python's ``json`` writes ``NaN`` and ``Infinity`` for non-finite floats, which jq, JavaScript and most
dashboards reject.  A skipped NaN step's loss is written as ``null`` instead, and
:func:`nan_for_null` turns it back into ``nan`` when lorakit reads its own files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any



def finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (non-finite floats become null); kwargs as for ``json.dumps``."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def nan_for_null(records: Iterable[dict[str, Any]]) -> None:
    """In place: the null values of metric records (as :func:`dumps` wrote NaN / inf) become ``nan``."""
    for record in records:
        for key, value in record.items():
            if value is None:
                record[key] = math.nan
