"""Reading result files back: schema version, kind and field types checked in one line each."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from achilles.errors import AchillesError
from achilles.results.inputs import input_file_problem

SCHEMA_VERSION = 1


def read_json(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Read a result file written by :func:`write_json`, checking its ``kind`` and schema.

    Every way a file can be damaged (not UTF-8, not JSON, nested too deep, not an object,
    a ``schema_version`` that is not a known integer, ``config``/``pool``/``env`` not
    objects) is one :class:`AchillesError` line.
    """
    path = Path(path)
    problem = input_file_problem(path)
    if problem is not None:
        raise AchillesError(problem)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise AchillesError(f"{path} is not UTF-8 text: give an achilles result file") from None
    except json.JSONDecodeError as e:
        raise AchillesError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise AchillesError(f"{path} is nested too deeply to be an achilles result file") from None
    except OSError as e:
        raise AchillesError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise AchillesError(f"{path} is not an achilles result file (not a JSON object)")
    if kind is not None and data.get("kind") != kind:
        raise AchillesError(
            f"{path} is a {data.get('kind', 'unknown')!r} file, expected a {kind!r} file"
        )
    version = data.get("schema_version")
    if version is not None and (type(version) is not int or version < 1):
        raise AchillesError(f"{path} has schema_version {version!r}; expected an integer >= 1")
    if version is not None and version > SCHEMA_VERSION:
        raise AchillesError(
            f"{path} has schema_version {version}; this achilles reads up to {SCHEMA_VERSION}: upgrade achilles"
        )
    for key in ("config", "pool", "env"):
        if key in data and not isinstance(data[key], dict):
            raise AchillesError(f"{path}: field {key!r} must be an object, not {type(data[key]).__name__}")
    return data


def require_fields(data: dict[str, Any], path: str | os.PathLike[str], fields: dict[str, Any]) -> None:
    """Check that ``data`` has each field of ``fields`` with the given type(s), in one line.

    ``fields`` maps a name to a type or a tuple of types (``type(None)`` allows null);
    ``bool`` never passes for ``int``/``float``, and the strings ``"nan"``/``"inf"`` pass for
    ``float`` (see :func:`encode_float`).
    """
    for name, types_ in fields.items():
        if name not in data:
            raise AchillesError(f"{path} lacks the field {name!r}: it is damaged or not an achilles file")
        value = data[name]
        allowed = types_ if isinstance(types_, tuple) else (types_,)
        ok = any(_is_type(value, t) for t in allowed)
        if not ok:
            want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise AchillesError(
                f"{path}: field {name!r} must be {want}, not {type(value).__name__} ({value!r:.40})"
            )


def _is_type(value: Any, t: type) -> bool:
    if t is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in (
            "nan", "inf", "-inf")
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)
