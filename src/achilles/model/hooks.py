"""The only module that registers PyTorch hooks.

A site name is a module's dotted path (its **output** is hooked) or that path followed by
``:input`` (its first tensor **input** is hooked, through a forward pre-hook): the input of
``mlp.down_proj`` is the classic MLP neuron, ``act(gate) · up`` in gated MLPs, which no module
outputs on its own.

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


INPUT_SUFFIX = ":input"


def split_site(name: str) -> tuple[str, bool]:
    """``"a.b:input"`` -> ``("a.b", True)``; ``"a.b"`` -> ``("a.b", False)``."""
    if name.endswith(INPUT_SUFFIX):
        return name[: -len(INPUT_SUFFIX)], True
    return name, False


def _resolve(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Module]:
    """Site name -> module, or an error naming the sites that do not exist (nothing registered)."""
    modules = dict(model.named_modules())
    out, missing = {}, []
    for n in names:
        m = modules.get(split_site(n)[0])
        if m is None:
            missing.append(n)
        else:
            out[n] = m
    if missing:
        raise AchillesError(f"model has no module(s) {', '.join(missing[:5])}")
    return out


def _wrap_input(name: str, fn: OutputFn) -> Callable[..., object]:
    """A forward pre-hook calling ``fn`` on the first tensor input (and replacing it)."""

    def hook(_module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        if args and isinstance(args[0], torch.Tensor):
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                new = fn(v)
                return None if new is None else (args, {**kwargs, k: new})
        raise AchillesError(f"site {name!r} has no tensor input; it cannot be a unit site")

    return hook


def _register(module: torch.nn.Module, name: str, fn: OutputFn) -> torch.utils.hooks.RemovableHandle:
    if split_site(name)[1]:
        return module.register_forward_pre_hook(_wrap_input(name, fn), with_kwargs=True)
    return module.register_forward_hook(_wrap(name, fn))


@contextmanager
def hooked(model: torch.nn.Module, fns: Mapping[str, OutputFn]) -> Iterator[None]:
    """Run the block with ``fns[name](tensor)`` hooked on each site (module output, or input
    for ``path:input`` sites); a returned tensor replaces the original."""
    modules = _resolve(model, fns)
    handles = []
    try:
        for name, fn in fns.items():
            handles.append(_register(modules[name], name, fn))
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
    ``Linear``/``Conv1D``/norm transforms. A ``path:input`` site is an identity on that
    tensor: its function gets it as both input and output. The functions only observe; the
    forward pass is unchanged. Hooks are removed on exit, even if the block raises.
    """
    modules = _resolve(model, fns)
    handles = []
    try:
        for name, fn in fns.items():
            if split_site(name)[1]:
                observe = (lambda f: lambda x: f(x, x))(fn)  # noqa: E731 - bind fn now
                handles.append(_register(modules[name], name, observe))
                continue
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


@contextmanager
def around_forward(
    modules: Iterable[torch.nn.Module],
    before: Callable[[torch.nn.Module], None],
    after: Callable[[torch.nn.Module], None],
) -> Iterator[None]:
    """Run the block with ``before(m)`` called just before and ``after(m)`` just after each
    forward of each module ``m`` (``after`` also when the forward raises).

    Used to change a module's state only while it runs (the float32 re-check upcasts one
    decoder layer at a time). Hooks are removed on exit, even if the block raises.
    """
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(lambda mod, _args: before(mod)))
            handles.append(
                m.register_forward_hook(lambda mod, _args, _out: after(mod), always_call=True)
            )
        yield
    finally:
        for h in handles:
            h.remove()


ObjectFn = Callable[[object], None]


@contextmanager
def observed_outputs(model: torch.nn.Module, fns: Mapping[str, ObjectFn]) -> Iterator[None]:
    """Run the block with ``fns[name](output)`` called after each named module's forward.

    Unlike :func:`hooked`, the output may be any object (attention modules return a tuple
    ``(attn_output, attn_weights)``); the functions only observe it. Hooks are removed on
    exit, even if the block raises.
    """
    modules = _resolve(model, fns)
    handles = []
    try:
        for name, fn in fns.items():
            hook = (lambda f: lambda _m, _i, out: f(out))(fn)  # noqa: E731 - bind fn now
            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
