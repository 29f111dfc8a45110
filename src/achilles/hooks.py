"""The only module that registers PyTorch hooks.

Hooks are global state on a model, so every hook lives inside a context manager that
removes it in ``finally`` (even when the forward pass raises). Names that do not resolve to a
module raise before anything is registered.

A hook function receives the module's output tensor and returns either ``None`` (observe
only) or a replacement tensor (intervene). Methods that also need a module's *input* (Wanda
scores weights by the norm of what they multiply) use :func:`observed_io`, observe only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from achilles.errors import AchillesError

OutputFn = Callable[[torch.Tensor], "torch.Tensor | None"]
InputOutputFn = Callable[[torch.Tensor, torch.Tensor], None]


def _wrap(name: str, fn: OutputFn) -> Callable[..., torch.Tensor | None]:
    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise AchillesError(
                f"module {name!r} returns {type(output).__name__}, not a tensor; "
                "it cannot be a unit site"
            )
        return fn(output)

    return hook


def _resolve(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Module]:
    """The named modules, or an error naming the ones that do not exist (nothing registered)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise AchillesError(f"model has no module(s) {', '.join(missing[:5])}")
    return modules


@contextmanager
def hooked(model: torch.nn.Module, fns: Mapping[str, OutputFn]) -> Iterator[None]:
    """Run the block with ``fns[name](output)`` hooked on each named module's output."""
    modules = _resolve(model, fns)
    handles = []
    try:
        for name, fn in fns.items():
            handles.append(modules[name].register_forward_hook(_wrap(name, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def _first_tensor(args: tuple[object, ...], kwargs: Mapping[str, object]) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _wrap_io(name: str, fn: InputOutputFn) -> Callable[..., None]:
    def hook(
        _module: torch.nn.Module,
        args: tuple[object, ...],
        kwargs: dict[str, object],
        output: object,
    ) -> None:
        x = _first_tensor(args, kwargs)
        if x is None or not isinstance(output, torch.Tensor):
            raise AchillesError(
                f"module {name!r} does not map a tensor to a tensor; it cannot be a unit site"
            )
        fn(x, output)  # observe only: the output is never replaced

    return hook


@contextmanager
def observed_io(model: torch.nn.Module, fns: Mapping[str, InputOutputFn]) -> Iterator[None]:
    """Run the block with ``fns[name](input, output)`` called after each named module's forward.

    ``input`` is the module's first tensor argument (positional or keyword), the one a
    ``Linear``/``Conv1D``/norm transforms. The functions only observe; the forward pass is
    unchanged. Hooks are removed on exit, even if the block raises.
    """
    modules = _resolve(model, fns)
    handles = []
    try:
        for name, fn in fns.items():
            hook = _wrap_io(name, fn)
            handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recorded(
    model: torch.nn.Module, names: Iterable[str]
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(first input, output)`` of each named module during the block.

    Yields a dict filled by the forward passes run inside the block: ``name -> (input,
    output)``, detached float32 CPU copies of the **last** call of each module. Meant for a
    few modules (the analyses of a critical set), not a whole pool.
    """
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str) -> InputOutputFn:
        def fn(x: torch.Tensor, out: torch.Tensor) -> None:
            store[name] = (x.detach().float().cpu(), out.detach().float().cpu())

        return fn

    with observed_io(model, {n: keep(n) for n in names}):
        yield store
