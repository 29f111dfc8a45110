"""Masks: zero chosen output channels at every position.

A mask is data, a list of :class:`~achilles.model.units.Unit`. :class:`ChannelMasker` applies one
mask **per batch row**, so several candidate masks (prefixes of a ranking, say) are
evaluated in one batched forward pass; its boolean tensors are updated in place between
passes, and its hooks are registered once.

Masking uses ``masked_fill(…, 0)``, not multiplication, so a channel that is ``inf`` or
``nan`` becomes exactly 0, as in the reference implementation.

:func:`weight_edits` is the weight-editing equivalent of a mask (zero a ``Linear``/``Conv1D``
output row and its bias, an input column, a norm gain), planned on any model, meta-device
included; :func:`zero_weights_` applies it in place (the export and the tests' oracle).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from achilles.errors import AchillesError
from achilles.model.adapters import NORM_GAIN_OFFSET
from achilles.model.derive import get_adapter
from achilles.model.hooks import hooked, split_site
from achilles.model.units import Unit, UnitPool


@dataclass(frozen=True)
class PrefixIndex:
    """A ranking grouped by site: ``sites[module] = (ranks, channels)`` as long tensors."""

    sites: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, pool: UnitPool, ranking: Sequence[Unit]) -> PrefixIndex:
        grouped: dict[str, tuple[list[int], list[int]]] = {}
        for rank, u in enumerate(ranking):
            if u.module not in pool.by_module:
                raise AchillesError(f"cannot mask {u.module!r}: it is not in the unit pool")
            ranks, chans = grouped.setdefault(u.module, ([], []))
            ranks.append(rank)
            chans.append(u.channel)
        return cls({m: (torch.tensor(r), torch.tensor(c)) for m, (r, c) in grouped.items()})


def site_device(model: torch.nn.Module, module: str) -> torch.device:
    """The device a site's output is computed on.

    The site's module, else its closest parent, that holds weights (a parameter-free site such
    as ``mlp.act_fn`` runs where its block's weights are): the execution device of its
    accelerate hook when it has one (device maps, offloading), else its weights' device.
    """
    path, _ = split_site(module)
    parts = path.split(".")
    for k in range(len(parts), -1, -1):
        for m in model.get_submodule(".".join(parts[:k])).modules():
            execution = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
            if execution is not None:
                return torch.device(execution)
            p = next(m.parameters(recurse=False), None)
            if p is not None and p.device.type != "meta":
                return p.device
    return torch.device("cpu")


def _to_device(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A long tensor on ``device``; to a GPU through pinned memory, without blocking the host."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class ChannelMasker:
    """Per-row channel masks over the sites of a pool, applied by forward hooks.

    Each :meth:`set_rows` / :meth:`set_prefixes` call builds one boolean ``[R, width]`` mask
    per site it touches, where ``R`` is the number of masks of *that* call, directly on the
    site's device (only index tensors, proportional to the units in use, are copied), so the
    hooks never copy or allocate a mask during the forward pass.

    Args:
        model: the model to mask.
        pool: the unit pool; only its sites can be masked.
        rows: the most masks (batch rows) one call may set; a call with a single mask
            applies it to every row of a batch of any size.
    """

    def __init__(self, model: torch.nn.Module, pool: UnitPool, rows: int = 1) -> None:
        self.model = model
        self.pool = pool
        self.rows = rows
        self.active_rows = 0
        # site module -> bool [active_rows, width] on the site's device, True = zeroed
        self._masks: dict[str, torch.Tensor] = {}
        self._devices: dict[str, torch.device] = {}
        # the last PrefixIndex used, with its (ranks, channels) on each site's device
        self._index_cache: tuple[PrefixIndex, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None
        self._index_cache = None

    def _device(self, module: str) -> torch.device:
        dev = self._devices.get(module)
        if dev is None:
            dev = self._devices[module] = site_device(self.model, module)
        return dev

    def _width(self, module: str) -> int:
        return self.pool.sites[self.pool.by_module[module]].width

    def _reset(self, n: int) -> None:
        if n > self.rows:
            raise ValueError(f"{n} masks for a masker with {self.rows} rows")
        self._masks.clear()
        self.active_rows = n

    def set_rows(self, masks: Sequence[Sequence[Unit]]) -> None:
        """Install ``masks[r]`` as row ``r``'s mask (no other row is masked)."""
        self._reset(len(masks))
        by_site = self.pool.by_module
        pairs: dict[str, tuple[list[int], list[int]]] = {}
        for r, units in enumerate(masks):
            for u in units:
                if u.module not in by_site:
                    raise AchillesError(f"cannot mask {u.module!r}: it is not in the unit pool")
                rows, chans = pairs.setdefault(u.module, ([], []))
                rows.append(r)
                chans.append(u.channel)
        for module, (rows, chans) in pairs.items():
            dev = self._device(module)
            t = torch.zeros(len(masks), self._width(module), dtype=torch.bool, device=dev)
            t[_to_device(rows, dev), _to_device(chans, dev)] = True
            self._masks[module] = t

    def set_prefixes(self, index: PrefixIndex, sizes: Sequence[int]) -> None:
        """Row ``r`` masks the first ``sizes[r]`` units of the ranking ``index`` was built on.

        One comparison and one indexed write per site, on the site's device, so a long scan
        over the prefixes of a large ranking spends no per-unit Python time; the ranking's
        index tensors go to each device once per index.
        """
        self._reset(len(sizes))
        if not sizes:
            return
        if self._index_cache is None or self._index_cache[0] is not index:
            self._index_cache = (index, {
                m: (_to_device(r, self._device(m)), _to_device(c, self._device(m)))
                for m, (r, c) in index.sites.items()
            })
        on_device = self._index_cache[1]
        largest = max(sizes)
        n_by_dev: dict[torch.device, torch.Tensor] = {}
        for module, (ranks, _) in index.sites.items():
            if int(ranks[0]) >= largest:  # ranks ascend: no prefix reaches this site
                continue
            dev = self._device(module)
            n = n_by_dev.get(dev)
            if n is None:
                n = n_by_dev[dev] = _to_device(list(sizes), dev).unsqueeze(1)  # [R, 1]
            r_dev, c_dev = on_device[module]
            t = torch.zeros(len(sizes), self._width(module), dtype=torch.bool, device=dev)
            t[:, c_dev] = r_dev.unsqueeze(0) < n  # [R, k]: k-th ranked unit of the site in row r
            self._masks[module] = t

    def clear(self) -> None:
        self.set_rows([])

    def mask_bytes(self) -> int:
        """Bytes held by the installed masks (all devices)."""
        return sum(t.numel() * t.element_size() for t in self._masks.values())

    def _hook_for(self, module: str):  # noqa: ANN202 - closure
        def fn(out: torch.Tensor) -> torch.Tensor | None:
            mask = self._masks.get(module)
            if mask is None:
                return None
            b, r = out.shape[0], mask.shape[0]
            if r != b and r != 1:
                raise ValueError(f"a batch of {b} rows under {r} masks at {module}")
            # out [b, T, C]; mask [b or 1, C] -> broadcast over positions
            return out.masked_fill(mask.unsqueeze(1), 0)

        return fn

    @contextmanager
    def installed(self, modules: Sequence[str] | None = None) -> Iterator[ChannelMasker]:
        """Register masking hooks for the duration of the block.

        Args:
            modules: the sites that may be masked inside the block (default: every pool
                site). Restricting them saves one Python call per unused site per forward.
        """
        names = [s.module for s in self.pool.sites] if modules is None else list(modules)
        with hooked(self.model, {m: self._hook_for(m) for m in names}):
            yield self


@contextmanager
def masked(model: torch.nn.Module, pool: UnitPool, units: Sequence[Unit]) -> Iterator[None]:
    """Run the block with ``units`` zeroed at every position of every batch row."""
    masker = ChannelMasker(model, pool, rows=1)
    masker.set_rows([units])
    with masker.installed():
        yield


@dataclass(frozen=True)
class WeightEdit:
    """One exact weight edit of a mask: set slice ``index`` of ``param`` along ``dim`` to ``value``.

    ``param`` is the dotted parameter name (``model.layers.1.mlp.down_proj.weight``); ``dim``
    is 0 for a row (or an entry of a 1-D parameter) and 1 for a column.
    """

    param: str
    dim: int
    index: int
    value: float
    unit: Unit

    def to_dict(self) -> dict[str, object]:
        return {"param": self.param, "dim": self.dim, "index": self.index, "value": self.value,
                "unit": self.unit.to_dict()}


def _is_conv1d(mod: torch.nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def _act_reader(model: torch.nn.Module, path: str) -> str | None:
    """The down projection reading the parameter-free ``mlp.act`` module at ``path``, if any."""
    adapter = get_adapter(model)
    prefix = adapter.layers + "."
    if not path.startswith(prefix) or "mlp.down" not in adapter.components:
        return None
    li, _, rel = path[len(prefix):].partition(".")
    if rel != adapter.components.get("mlp.act"):
        return None
    return f"{prefix}{li}.{split_site(adapter.components['mlp.down'])[0]}"


def _unit_edits(model: torch.nn.Module, u: Unit) -> list[WeightEdit] | str:
    """The exact weight edits zeroing ``u``'s channel, or why there are none."""
    path, is_input = split_site(u.module)
    mod = model.get_submodule(path)
    params = dict(mod.named_parameters(recurse=False))
    w, b = params.get("weight"), params.get("bias")
    c = u.channel

    def edit(name: str, dim: int, value: float = 0.0) -> WeightEdit:
        return WeightEdit(f"{path}.{name}", dim, c, value, u)

    if is_input:  # an input channel: zero the weight column that reads it
        if isinstance(mod, torch.nn.Linear):
            return [edit("weight", 1)]
        if _is_conv1d(mod):
            return [edit("weight", 0)]
        return f"the input of a {type(mod).__name__} is read by no single weight column"
    if isinstance(mod, torch.nn.Linear) or _is_conv1d(mod):
        edits = [edit("weight", 0 if isinstance(mod, torch.nn.Linear) else 1)]
        return edits + ([edit("bias", 0)] if b is not None else [])
    if w is not None and w.dim() == 1:  # a norm: output channel c is (o + w_c) * x_hat_c (+ b_c)
        offset = NORM_GAIN_OFFSET.get(type(mod).__name__)
        if offset is None:
            return (f"{type(mod).__name__} is a norm whose gain form is not known (add it to "
                    "achilles.model.adapters.NORM_GAIN_OFFSET)")
        return [edit("weight", 0, -offset)] + ([edit("bias", 0)] if b is not None else [])
    if not params:  # parameter-free (mlp.act): act_c = 0 <=> the down projection skips input c
        reader = _act_reader(model, path)
        if reader is None:
            return f"{type(mod).__name__} has no weights and no known down projection reads it"
        return _unit_edits(model, Unit(f"{reader}:input", c, u.layer, u.component))
    return f"no exact weight edit for a {type(mod).__name__}"


def weight_edits(model: torch.nn.Module, units: Sequence[Unit]) -> list[WeightEdit]:
    """The weight edits that reproduce the hook mask of ``units`` exactly (for finite inputs).

    Per site: a ``Linear``/``Conv1D`` output channel is its weight row (column for ``Conv1D``)
    and bias entry set to 0; a ``path:input`` channel is the weight column reading it; a norm
    channel is its gain set to ``-offset`` (0, or -1 for Gemma's ``1 + w``) and its bias to 0;
    ``mlp.act`` is the down projection's input column. Works on a meta-device model (nothing
    is read). Raises :class:`AchillesError` naming every unit with no exact edit and why,
    including weights shared between modules (tied embeddings, shared layers) and
    non-floating (already quantized) weights.
    """
    edits: list[WeightEdit] = []
    problems: list[str] = []
    for u in units:
        got = _unit_edits(model, u)
        if isinstance(got, str):
            problems.append(f"{u} ({u.module}): {got}")
        else:
            edits += got
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for e in edits:
        p = model.get_parameter(e.param)
        shared = [n for n in names_of.get(id(p), []) if n != e.param]
        if shared:
            problems.append(f"{e.unit} ({e.param}): the weight is shared with {shared[0]}; "
                            "an edit would change both")
        elif not p.dtype.is_floating_point:
            problems.append(f"{e.unit} ({e.param}): {p.dtype} weights are already quantized")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AchillesError(
            "no exact weight edit for " + "; ".join(dict.fromkeys(problems[:3])) + more
            + ": use hook masking (achilles ppl --mask) for these units"
        )
    return edits


def zero_weights_(model: torch.nn.Module, units: Sequence[Unit]) -> dict[str, torch.Tensor]:
    """Apply :func:`weight_edits` of ``units`` in place; the edited model equals the hook mask.

    Returns the saved original values of every edited parameter; pass them to
    :func:`restore_weights_` to undo.
    """
    edits = weight_edits(model, units)
    for e in edits:
        if model.get_parameter(e.param).device.type == "meta":
            raise AchillesError(
                f"cannot edit the weights of {e.unit.module!r}: they are offloaded (on 'meta'); "
                "load the model without CPU/disk offloading to edit weights"
            )
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for e in edits:
            p = model.get_parameter(e.param)
            if e.param not in saved:
                saved[e.param] = p.detach().clone()
            p.narrow(e.dim, e.index, 1).fill_(e.value)
    return saved


def restore_weights_(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Undo :func:`zero_weights_`."""
    with torch.no_grad():
        for key, value in saved.items():
            model.get_parameter(key).copy_(value)


def zero_weight_entry_(model: torch.nn.Module, unit: Unit, input_channel: int) -> dict[str, torch.Tensor]:
    """Zero the one weight linking ``input_channel`` to ``unit``'s output channel, in place.

    ``Linear`` weights are ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``. Returns what
    :func:`restore_weights_` needs to undo it (the one saved value).
    """
    module = model.get_submodule(unit.module)
    param = f"{unit.module}.weight"
    weight = model.get_parameter(param)
    if weight.device.type == "meta":
        raise AchillesError(
            f"cannot edit the weights of {unit.module!r}: they are offloaded (on 'meta'); "
            "load the model without CPU/disk offloading to edit weights"
        )
    index = (unit.channel, input_channel) if isinstance(module, torch.nn.Linear) else (
        input_channel, unit.channel)
    with torch.no_grad():
        saved = {param: weight.detach().clone()}
        weight[index] = 0
    return saved


@contextmanager
def set_channels(
    model: torch.nn.Module, values: Mapping[Unit, float | torch.Tensor]
) -> Iterator[None]:
    """Run the block with each unit's output channel replaced by a fixed value.

    ``values[unit]`` is a scalar (the same at every position and batch row) or a tensor
    broadcastable to ``[batch, T]``. Mean-ablation sets a channel to its mean over the
    positions of a clean pass; an empty mapping registers no hook (the clean model).
    """
    by_module: dict[str, list[tuple[int, float | torch.Tensor]]] = {}
    for u, v in values.items():
        by_module.setdefault(u.module, []).append((u.channel, v))

    def make(pairs: list[tuple[int, float | torch.Tensor]]):  # noqa: ANN202 - closure
        def fn(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for c, v in pairs:
                val = v.to(device=out.device, dtype=out.dtype) if isinstance(v, torch.Tensor) else v
                out[..., c] = val
            return out

        return fn

    with hooked(model, {m: make(p) for m, p in by_module.items()}):
        yield
