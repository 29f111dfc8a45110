"""The only module that registers PyTorch hooks.

Hooks are global state on a model, so every hook lives inside a context manager that
removes it in ``finally`` (even when the forward pass raises). Names that do not resolve to a
module raise before anything is registered.

A hook function receives the module's output tensor and returns either ``None`` (observe
only) or a replacement tensor (intervene).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from achilles.errors import AchillesError

OutputFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _wrap(name: str, fn: OutputFn) -> Callable[..., torch.Tensor | None]:
    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise AchillesError(
                f"module {name!r} returns {type(output).__name__}, not a tensor; "
                "it cannot be a unit site"
            )
        return fn(output)

    return hook


@contextmanager
def hooked(model: torch.nn.Module, fns: Mapping[str, OutputFn]) -> Iterator[None]:
    """Run the block with ``fns[name](output)`` hooked on each named module's output."""
    modules = dict(model.named_modules())
    missing = [n for n in fns if n not in modules]
    if missing:
        raise AchillesError(f"model has no module(s) {', '.join(missing[:5])}")
    handles = []
    try:
        for name, fn in fns.items():
            handles.append(modules[name].register_forward_hook(_wrap(name, fn)))
        yield
    finally:
        for h in handles:
            h.remove()
