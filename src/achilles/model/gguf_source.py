"""GGUF checkpoints in: a ``.gguf`` file, dequantized once, cached as a safetensors folder.

``--model x.gguf`` (or a folder with ``--gguf-file x.gguf``, or a registry name such as
``smollm2``) is read through transformers' GGUF path, which dequantizes every tensor to
torch. That costs tens of seconds, so it is done once per file: the float32 model, its
config and tokenizer are saved as an ordinary Hugging Face folder under the user's cache
(``$ACHILLES_CACHE``, else ``$XDG_CACHE_HOME/achilles``, else ``~/.cache/achilles``), in
``gguf/<sha256 of the file>/``. The folder is written whole in a temporary folder and renamed
into place, so a crash or Ctrl-C never leaves a half-written cache entry, and two processes
dequantizing the same file at once both end with the same complete entry.

Before any of that, :func:`read_header` parses the file's header (pure ``struct``, well
under a second: the ``gguf`` package's reader takes ~10 s here because it wraps each of the
49,152 vocabulary strings in a numpy view), so a truncated file, a file that is not GGUF, or
an architecture transformers cannot dequantize is refused in one line before long work.
The preflight skeleton (config and tokenizer, no weights) comes from the cache when it is
warm, else from the GGUF metadata through transformers, without dequantizing.

Provenance: :func:`GGUFSource.provenance` (file hash, size, architecture, the count of
tensors per quantization type) is recorded in ``env["gguf"]`` of every result file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from achilles.errors import AchillesError
from achilles.model.checks import GGUF_MAGIC, check_loading_info, model_path_problem
from achilles.model.named_models import is_named, named_model_path
from achilles.results.files import _created_parents, _remove_empty, _umask, write_json
from achilles.results.guard import clean_stale, remove_made, temp_dir

CACHE_COMMAND = "gguf-cache"

logger = logging.getLogger(__name__)

CACHE_ENV = "ACHILLES_CACHE"
PROVENANCE_FILE = "achilles-gguf.json"
"""Written last into a cache entry: what the folder was dequantized from."""
CACHE_DTYPE = "float32"


def cache_root() -> Path:
    """``$ACHILLES_CACHE``, else ``$XDG_CACHE_HOME/achilles``, else ``~/.cache/achilles``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "achilles"
    return Path.home() / ".cache" / "achilles"


# ---------------------------------------------------------------------------- header


@dataclass(frozen=True)
class GGUFHeader:
    """What the header of a GGUF file says: format version, architecture, tensors."""

    version: int
    architecture: str
    name: str | None
    tensor_types: dict[str, int]
    """Number of tensors per GGML type (``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``)."""
    type_elements: dict[str, int]
    """Number of weights per GGML type."""
    needed_bytes: int
    """The file size the tensor table implies (a shorter file is truncated)."""

    @property
    def quantization(self) -> str:
        """The type holding most weights (``Q4_1``): what the file is "quantized as"."""
        return max(self.type_elements.items(), key=lambda kv: (kv[1], kv[0]))[0]


def _gguf_constants() -> Any:
    try:
        import gguf
    except ImportError:
        raise AchillesError(
            "reading a GGUF file needs the gguf package: pip install gguf (or run make setup)"
        ) from None
    return gguf


class _Reader:
    """Sequential little-endian reads with one error for running past the end."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise AchillesError(
                f"{self.path} is truncated: its header ends after {self.f.tell()} bytes "
                "(download or copy it again)"
            )
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > 1 << 30:
            raise AchillesError(f"{self.path} is not a valid GGUF file (a {n}-byte string)")
        return self.take(n).decode("utf-8", errors="replace")


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _value(r: _Reader, vtype: int) -> Any:
    if vtype in _SCALAR:
        return r.unpack(_SCALAR[vtype])
    if vtype == 8:
        return r.string()
    if vtype == 9:
        itype, n = r.unpack("I"), r.unpack("Q")
        if itype in _SCALAR:  # skip the bytes, keep nothing: vocabularies are large
            r.take(n * struct.calcsize("<" + _SCALAR[itype]))
            return None
        for _ in range(n):
            _value(r, itype)
        return None
    raise AchillesError(f"{r.path} is not a valid GGUF file (unknown value type {vtype})")


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header and tensor table of a GGUF file; one-line errors for bad files."""
    path = Path(path)
    gguf = _gguf_constants()
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(4) != GGUF_MAGIC:
            raise AchillesError(f"{path} is not a GGUF file (no GGUF magic bytes at its start)")
        version = r.unpack("I")
        if version not in (2, 3):
            raise AchillesError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            fields[key] = _value(r, r.unpack("I"))
        types: Counter[str] = Counter()
        elements: Counter[str] = Counter()
        end = 0
        for _ in range(n_tensors):
            r.string()
            dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
            ttype, offset = r.unpack("I"), r.unpack("Q")
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise AchillesError(
                    f"{path}: tensor type {ttype} is unknown to the installed gguf package "
                    "(upgrade it: pip install -U gguf)"
                ) from None
            n = 1
            for d in dims:
                n *= d
            types[qtype.name] += 1
            elements[qtype.name] += n
            end = max(end, offset + n // block * size)
        align = int(fields.get("general.alignment") or 32)
        data_start = -(-f.tell() // align) * align
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not n_tensors:
        raise AchillesError(f"{path} is not a model GGUF (no general.architecture or no tensors)")
    return GGUFHeader(
        version=version, architecture=arch, name=fields.get("general.name"),
        tensor_types=dict(types.most_common()), type_elements=dict(elements),
        needed_bytes=data_start + end,
    )


def _check_readable(path: Path, header: GGUFHeader) -> None:
    """Refuse a truncated file, or an architecture this transformers cannot dequantize."""
    size = path.stat().st_size
    if size < header.needed_bytes:
        raise AchillesError(
            f"{path} is truncated: its tensors need {header.needed_bytes:,} bytes, the file has "
            f"{size:,} (download or copy it again)"
        )
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    def norm(s: str) -> str:
        return s.replace("-", "").replace("_", "")

    known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if norm(header.architecture) not in {norm(a) for a in known}:
        raise AchillesError(
            f"{path}: transformers {transformers.__version__} cannot dequantize GGUF architecture "
            f"{header.architecture!r} (it reads {', '.join(known)}): "
            "convert the model to a Hugging Face folder, or upgrade transformers"
        )


# ---------------------------------------------------------------------------- source


@dataclass(frozen=True)
class GGUFSource:
    """A checked GGUF file and its content hash (the cache key)."""

    path: Path
    sha256: str
    size: int
    header: GGUFHeader

    @property
    def cache_dir(self) -> Path:
        return cache_root() / "gguf" / self.sha256

    @property
    def cached(self) -> bool:
        return (self.cache_dir / PROVENANCE_FILE).is_file()

    @property
    def quantization(self) -> str:
        return self.header.quantization

    def provenance(self) -> dict[str, Any]:
        """What results record about the weights' origin (``env["gguf"]``)."""
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "size": self.size,
            "architecture": self.header.architecture,
            "name": self.header.name,
            "quantization": self.quantization,
            "tensor_types": self.header.tensor_types,
            "dequantized_to": CACHE_DTYPE,
            "cache": str(self.cache_dir),
        }


def describe_gguf(provenance: dict[str, Any] | None) -> str | None:
    """``weights dequantized from Q4_1 (GGUF) ...`` for a report, or None for a plain checkpoint."""
    if not provenance:
        return None
    types = ", ".join(f"{k} ×{v}" for k, v in provenance.get("tensor_types", {}).items())
    return (f"weights dequantized from {provenance.get('quantization')} (GGUF) to "
            f"{provenance.get('dequantized_to')}: {Path(str(provenance.get('file'))).name}, "
            f"sha256 {str(provenance.get('sha256'))[:16]}…, tensors {types}")


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of the file (remembered per path, size and mtime within the process)."""
    from tqdm.auto import tqdm

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f, tqdm(total=st.st_size, unit="B", unit_scale=True,
                                         desc="hash GGUF", delay=2, leave=False) as bar:
            while chunk := f.read(1 << 24):
                h.update(chunk)
                bar.update(len(chunk))
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def gguf_path(model: str, gguf_file: str | None) -> Path | None:
    """The GGUF file a ``--model`` / ``--gguf-file`` pair names, or None for a plain checkpoint."""

    problem = model_path_problem(model, gguf_file)
    if problem is not None:
        raise AchillesError(problem)
    if gguf_file is not None:
        return Path(model).expanduser() / gguf_file
    if is_named(model):
        return named_model_path(model)
    local = Path(model).expanduser()
    return local if local.is_file() else None


def open_gguf(path: Path) -> GGUFSource:
    """Check the file (header, size, architecture) and hash it."""
    header = read_header(path)
    _check_readable(path, header)
    return GGUFSource(path=path.resolve(), sha256=file_sha256(path), size=path.stat().st_size,
                      header=header)


def source_of(spec: Any) -> GGUFSource | None:
    """The checked GGUF behind a :class:`~achilles.config.ModelSpec`, or None."""
    path = gguf_path(spec.model, getattr(spec, "gguf_file", None))
    return None if path is None else open_gguf(path)


# ---------------------------------------------------------------------------- metadata, weights

_METADATA: dict[str, tuple[Any, Any]] = {}


def _read_error(src: GGUFSource, e: BaseException) -> AchillesError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return AchillesError(f"could not read GGUF {src.path}: {first}")


def gguf_metadata(src: GGUFSource) -> tuple[Any, Any]:
    """(config, tokenizer) of the model, without dequantizing: from the cache entry when
    there is one, else from the GGUF metadata (remembered within the process)."""
    from transformers import AutoConfig, AutoTokenizer

    if src.cached:
        return (AutoConfig.from_pretrained(src.cache_dir),
                AutoTokenizer.from_pretrained(src.cache_dir))
    if src.sha256 not in _METADATA:
        logger.info("reading the config and tokenizer from GGUF metadata (%s); the first load "
                    "dequantizes the weights once and caches them in %s", src.path.name,
                    src.cache_dir)
        folder, name = str(src.path.parent), src.path.name
        try:
            with quiet_transformers():  # its guesses about missing fields: the error says it
                config = AutoConfig.from_pretrained(folder, gguf_file=name)
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            raise _read_error(src, e) from None
        _METADATA[src.sha256] = (config, tokenizer)
    return _METADATA[src.sha256]


def dequantized(src: GGUFSource) -> Path:
    """The cache folder of ``src``: dequantized to float32 on the first call, then reused.

    The entry is built in a temporary folder beside it and renamed into place whole; on any
    failure the temporary folder is removed and nothing is cached.
    """
    if src.cached:
        logger.info("loading %s from the GGUF cache %s", src.path.name, src.cache_dir)
        return src.cache_dir
    from transformers import AutoModelForCausalLM  # lazily: transformers takes seconds to import

    config, tokenizer = gguf_metadata(src)
    logger.info("dequantizing %s (%s) to %s, once: cached in %s", src.path.name,
                src.quantization, CACHE_DTYPE, src.cache_dir)
    parent = src.cache_dir.parent
    created = _created_parents(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(parent, f".{src.sha256[:16]}.", CACHE_COMMAND)  # what a killed run left
    except OSError as e:
        raise AchillesError(
            f"cannot write the GGUF cache {parent}: {e.strerror or e} (set {CACHE_ENV} to a "
            "writable folder)"
        ) from None
    try:
        with temp_dir(parent, f".{src.sha256[:16]}.", CACHE_COMMAND) as tmp:
            try:
                with quiet_transformers():
                    # output_loading_info=True: (model, info), which its annotation omits
                    model, info = cast("tuple[Any, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(
                        str(src.path.parent), gguf_file=src.path.name, config=config,
                        dtype=torch.float32, output_loading_info=True,
                    ))
            except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
                raise _read_error(src, e) from None
            check_loading_info(str(src.path), info)  # a weight it lacks would be random, not zero
            model.hf_quantizer = None  # the weights are plain float32 now: save them as such
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)  # atomic: temp dir, renamed below
            tokenizer.save_pretrained(tmp)  # atomic: temp dir, renamed below
            del model
            write_json(tmp / PROVENANCE_FILE, src.provenance())
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
            try:
                tmp.replace(src.cache_dir)
            except OSError:
                if not src.cached:  # not a concurrent writer that finished first
                    raise
                remove_made(tmp, CACHE_COMMAND)  # the other writer's entry is the same
    except OSError as e:
        raise AchillesError(
            f"cannot write the GGUF cache {src.cache_dir}: {e.strerror or e} (free some space, "
            f"or set {CACHE_ENV} to another folder)"
        ) from None
    finally:
        if not src.cached:
            _remove_empty(created)  # the cache folders this call made, if left empty
    return src.cache_dir


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own logging at error level for the block (its load-report tables)."""
    import transformers

    before = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(before)


