"""The envelope every result file shares: schema version, kind, run id, config and env.

A result type subclasses :class:`Enveloped` (or :class:`Envelope` when it declares the
common fields itself), names its ``KIND`` and states only its own fields in
:meth:`Envelope.fields`; the envelope owns the common keys, the atomic save and the checked
read (:meth:`Envelope.read`: schema, kind, the envelope's own field types).

``run_id`` is the run a result belongs to. A command that starts from a model and a text
(``find``, ``compare``, ``sweep``, ...) starts a run with a fresh id; a command that works
on a run's set (``--mask RUN/identification.json``: explain, ppl, downstream, compress,
export, probe) belongs to that run and records its id (:func:`run_id_of`), or ``null`` when
the set's file records none (made before run ids: matched to a run by model).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from achilles.errors import AchillesError
from achilles.results.files import write_json
from achilles.results.schema import SCHEMA_VERSION, read_json, require_fields

RUN_ID = "run_id"


def new_run_id() -> str:
    """A fresh run id: every result file of one run carries it (``run_id``)."""
    return uuid.uuid4().hex[:16]


def envelope(kind: str, *, config: dict[str, Any] | None = None, env: dict[str, Any] | None = None,
             run_id: str | None = None) -> dict[str, Any]:
    """The common keys of a result file of ``kind`` (for results kept as plain dicts)."""
    return {"schema_version": SCHEMA_VERSION, "kind": kind, RUN_ID: run_id,
            "config": config if config is not None else {},
            "env": env if env is not None else {}}


def run_id_of(data: dict[str, Any] | None) -> str | None:
    """The run id a result file (or a mask's source record) names; ``None`` for one made
    before run ids, whose results are then matched to a run by model."""
    rid = (data or {}).get(RUN_ID)
    return rid if isinstance(rid, str) and rid else None


class Envelope:
    """Base of a typed result: subclasses are dataclasses with ``config``, ``env`` and
    ``run_id`` fields and implement :meth:`fields`."""

    KIND: ClassVar[str] = ""
    config: dict[str, Any]
    env: dict[str, Any]
    run_id: str | None

    def fields(self) -> dict[str, Any]:
        """The result's own keys (everything but the envelope's)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {**envelope(self.KIND, config=self.config, env=self.env, run_id=self.run_id),
                **self.fields()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result atomically (a crash leaves the old file or the new, never half)."""
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def read(cls, path: str | os.PathLike[str], fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """The file's JSON, checked: schema version, ``KIND``, the envelope's and ``fields``' types."""
        d = read_json(path, kind=cls.KIND)
        rid = d.get(RUN_ID)
        if rid is not None and (not isinstance(rid, str) or not rid):
            raise AchillesError(f"{path}: field {RUN_ID!r} must be a non-empty string, not {rid!r:.40}")
        if fields:
            require_fields(d, path, fields)
        return d


@dataclass(kw_only=True)
class Enveloped(Envelope):
    """An :class:`Envelope` whose common fields are keyword fields after the result's own:
    subclass it as a dataclass and declare only the result's fields. A new result gets a
    fresh run id unless it is given the run it belongs to."""

    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = field(default_factory=new_run_id)
