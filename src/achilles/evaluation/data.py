"""Evaluation text: local ``.txt``/``.jsonl``/``.parquet`` files or named hub datasets.

A data SPEC is a path to a local file or one of the names in :data:`DATASETS`. Named
datasets are loaded with ``datasets.load_dataset`` exactly as a user with hub access would;
offline, the failure is one line naming the fix (pass a local file).

A :class:`Corpus` is a list of documents (rows):

* ``.txt``: paragraphs separated by blank lines; WikiText heading lines (``= Title =``)
  are dropped, as the reference evaluator's local-file reader does;
* ``.jsonl``: the ``text`` field of each line;
* ``.parquet``: the ``text`` column;
* ``wikitext-103``: the rows of ``wikitext``/``wikitext-103-raw-v1``, split ``test``;
* ``c4``: the ``text`` of ``allenai/c4``/``en`` validation documents, streamed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from achilles.errors import AchillesError
from achilles.results.inputs import input_file_problem

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

DATASETS: dict[str, dict[str, object]] = {
    "wikitext-103": {"path": "wikitext", "name": "wikitext-103-raw-v1", "split": "test"},
    "c4": {"path": "allenai/c4", "name": "en", "split": "validation", "streaming": True},
}
"""Named data SPECs -> ``datasets.load_dataset`` arguments."""

C4_DEFAULT_DOCUMENTS = 1000
"""Streaming C4 has no end worth reaching: without ``max_documents`` this many are read."""

_HEADING = re.compile(r"^\s*=+ .* =+\s*$")


@dataclass(frozen=True)
class Corpus:
    """Evaluation documents and where they came from."""

    name: str
    documents: list[str]

    def joined(self) -> str:
        """All documents as one text (blank-line separated, as in the HF perplexity guide)."""
        return "\n\n".join(self.documents)


def _fix_hint() -> str:
    return "pass a local .txt/.jsonl/.parquet to --data"


def _read_txt(path: Path) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
        elif not _HEADING.match(line):
            current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AchillesError(f"{path} line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise AchillesError(
                    f"{path} line {i} has no string field 'text': each line must be "
                    '{"text": "..."}'
                )
            docs.append(row["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise AchillesError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
    if "text" not in schema.names:
        raise AchillesError(
            f"{path} has no 'text' column (columns: {', '.join(schema.names)}): "
            "rename the text column to 'text'"
        )
    return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()
            if t is not None]


def _load_named(name: str, max_documents: int | None) -> list[str]:
    kwargs = dict(DATASETS[name])
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise AchillesError(f"the datasets package is missing: pip install datasets, or {_fix_hint()}") from None
    _check_hub(name, streaming=bool(kwargs.get("streaming")), offline=bool(datasets.config.HF_HUB_OFFLINE))
    try:
        ds = datasets.load_dataset(**kwargs)
        if kwargs.get("streaming"):
            limit = max_documents if max_documents is not None else C4_DEFAULT_DOCUMENTS
            if max_documents is None:
                logger.info("%s is streamed: reading its first %d documents", name, limit)
            docs = [row["text"] for _, row in zip(range(limit), ds, strict=False)]
        else:
            docs = list(ds["text"])
    except AchillesError:
        raise
    except Exception as e:  # noqa: BLE001 - hub/network/cache errors have many types
        logger.debug("load_dataset(%s) failed: %r", kwargs, e)
        raise AchillesError(f"could not download {name} (offline?): {_fix_hint()}") from None
    return docs


def _check_hub(name: str, *, streaming: bool, offline: bool) -> None:
    """Refuse at once a named dataset that cannot be fetched, instead of after the hub
    client's retries (half a minute of warnings): a streamed one (C4) offline or with the hub
    unreachable, a downloaded one (WikiText) with the hub unreachable while offline mode,
    which reads the local cache, is off."""
    from achilles.model.loading import _hub_reachable

    if streaming and offline:
        raise AchillesError(
            f"--data {name} is streamed from the Hugging Face hub, and offline mode is on "
            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): {_fix_hint()}"
        )
    if not offline and not _hub_reachable():
        cache = "" if streaming else ", or set HF_DATASETS_OFFLINE=1 to read a cached copy"
        raise AchillesError(
            f"--data {name} comes from the Hugging Face hub, which is not reachable: "
            f"{_fix_hint()}{cache}"
        )


def load_corpus(spec: str, *, max_documents: int | None = None) -> Corpus:
    """Load the documents named by ``spec`` (a local file or a name in :data:`DATASETS`).

    ``max_documents`` only bounds how much of a streamed dataset is read; callers apply
    their own sample limits after filtering.
    """
    path = Path(spec).expanduser()
    if spec in DATASETS and not path.exists():
        docs = _load_named(spec, max_documents)
    elif path.exists():
        problem = input_file_problem(path, "--data", "data file")
        if problem is not None:
            raise AchillesError(problem)
        suffix = path.suffix.lower()
        if suffix in (".txt", ".jsonl"):
            try:
                docs = _read_txt(path) if suffix == ".txt" else _read_jsonl(path)
            except UnicodeDecodeError as e:
                raise AchillesError(f"--data {spec} is not UTF-8 text (byte {e.start}): convert it") from None
        elif suffix == ".parquet":
            docs = _read_parquet(path)
        else:
            raise AchillesError(
                f"--data {spec}: unsupported file type {suffix or '(none)'}; use "
                f"{'/'.join(LOCAL_SUFFIXES)} or one of {', '.join(DATASETS)}"
            )
    else:
        raise AchillesError(
            f"--data {spec}: no such file and not a known dataset ({', '.join(DATASETS)}); "
            f"{_fix_hint()}"
        )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise AchillesError(f"--data {spec} holds no text: {_fix_hint()} with some text in it")
    logger.info("loaded %d documents from %s", len(docs), spec)
    return Corpus(name=spec, documents=docs)
