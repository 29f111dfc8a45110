"""Masks: zero chosen output channels at every position.

A mask is data, a list of :class:`~achilles.units.Unit`. :class:`ChannelMasker` applies one
mask **per batch row**, so several candidate masks (prefixes of a ranking, say) are
evaluated in one batched forward pass; its boolean tensors are updated in place between
passes, and its hooks are registered once.

Masking uses ``masked_fill(…, 0)``, not multiplication, so a channel that is ``inf`` or
``nan`` becomes exactly 0, as in the reference implementation.

:func:`zero_weights_` is the weight-editing equivalent for ``Linear``/``Conv1D`` outputs (zero
the output row and its bias), used as an oracle in tests and to export a lesioned model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from achilles.errors import AchillesError
from achilles.hooks import hooked, split_site
from achilles.units import Unit, UnitPool


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


class ChannelMasker:
    """Per-row channel masks over the sites of a pool, applied by forward hooks.

    Args:
        model: the model to mask.
        pool: the unit pool; only its sites can be masked.
        rows: number of masks (batch rows) held; a batch of ``rows`` sequences gets one mask
            each, and a batch of any size gets row 0's mask when ``rows == 1``.
    """

    def __init__(self, model: torch.nn.Module, pool: UnitPool, rows: int = 1) -> None:
        self.model = model
        self.pool = pool
        self.rows = rows
        # site module -> bool [rows, width], True = zeroed (host copy; device copies cached)
        self._masks: dict[str, torch.Tensor] = {}
        self._device_masks: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._active: set[str] = set()

    def set_rows(self, masks: Sequence[Sequence[Unit]]) -> None:
        """Install ``masks[r]`` as row ``r``'s mask (rows beyond ``len(masks)`` are cleared)."""
        if len(masks) > self.rows:
            raise ValueError(f"{len(masks)} masks for a masker with {self.rows} rows")
        for m in self._masks.values():
            m.zero_()
        self._active.clear()
        self._device_masks.clear()
        by_site = self.pool.by_module
        for r, units in enumerate(masks):
            for u in units:
                i = by_site.get(u.module)
                if i is None:
                    raise AchillesError(f"cannot mask {u.module!r}: it is not in the unit pool")
                t = self._masks.get(u.module)
                if t is None:
                    t = torch.zeros(self.rows, self.pool.sites[i].width, dtype=torch.bool)
                    self._masks[u.module] = t
                t[r, u.channel] = True
                self._active.add(u.module)

    def set_prefixes(self, index: PrefixIndex, sizes: Sequence[int]) -> None:
        """Row ``r`` masks the first ``sizes[r]`` units of the ranking ``index`` was built on.

        One comparison and one indexed write per site, so a long scan over the prefixes of a
        large ranking spends no per-unit Python time.
        """
        if len(sizes) > self.rows:
            raise ValueError(f"{len(sizes)} masks for a masker with {self.rows} rows")
        for m in self._masks.values():
            m.zero_()
        self._active.clear()
        self._device_masks.clear()
        if not sizes:
            return
        n = torch.tensor(list(sizes)).unsqueeze(1)  # [R, 1]
        row_ids = torch.arange(len(sizes)).unsqueeze(1)  # [R, 1]
        for module, (ranks, chans) in index.sites.items():
            on = ranks.unsqueeze(0) < n  # [R, k]: the site's k-th ranked unit is in row r's prefix
            if not bool(on.any()):
                continue
            t = self._masks.get(module)
            if t is None:
                width = self.pool.sites[self.pool.by_module[module]].width
                t = torch.zeros(self.rows, width, dtype=torch.bool)
                self._masks[module] = t
            t[row_ids.expand_as(on)[on], chans.expand_as(on)[on]] = True
            self._active.add(module)

    def clear(self) -> None:
        self.set_rows([])

    def _hook_for(self, module: str):  # noqa: ANN202 - closure
        def fn(out: torch.Tensor) -> torch.Tensor | None:
            if module not in self._active:
                return None
            key = (module, out.device)
            mask = self._device_masks.get(key)
            if mask is None:
                mask = self._masks[module].to(out.device)
                self._device_masks[key] = mask
            b = out.shape[0]
            if self.rows == 1:
                m = mask[:1]
            elif b == self.rows:
                m = mask
            else:
                m = mask[:b]
            # out [b, T, C]; mask [b or 1, C] -> broadcast over positions
            return out.masked_fill(m.unsqueeze(1), 0)

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


def zero_weights_(model: torch.nn.Module, units: Sequence[Unit]) -> dict[str, torch.Tensor]:
    """Zero the weights producing each unit's output channel, in place.

    Supported for ``nn.Linear`` (row ``c`` of ``weight`` and ``bias[c]``) and transformers'
    ``Conv1D`` (column ``c`` of its ``[in, out]`` weight and ``bias[c]``). Returns the saved
    original values; pass them to :func:`restore_weights_` to undo.
    """
    saved: dict[str, torch.Tensor] = {}
    for u in units:
        path, is_input = split_site(u.module)
        mod = model.get_submodule(path)
        params = dict(mod.named_parameters(recurse=False))
        if any(p.device.type == "meta" for p in params.values()):
            raise AchillesError(
                f"cannot edit the weights of {u.module!r}: they are offloaded (on 'meta'); "
                "load the model without CPU/disk offloading to edit weights"
            )
        for pname, p in params.items():
            key = f"{path}.{pname}"
            if key not in saved:
                saved[key] = p.detach().clone()
        with torch.no_grad():
            if is_input:  # an input channel: zero the weight column that reads it
                if isinstance(mod, torch.nn.Linear):
                    mod.weight[:, u.channel].zero_()
                elif type(mod).__name__ == "Conv1D":
                    mod.weight[u.channel].zero_()
                else:
                    raise AchillesError(f"cannot zero the input weights of {u.module!r}")
                continue
            if isinstance(mod, torch.nn.Linear):
                mod.weight[u.channel].zero_()
            elif type(mod).__name__ == "Conv1D":
                mod.weight[:, u.channel].zero_()
            else:
                raise AchillesError(
                    f"cannot zero weights of {u.module!r} ({type(mod).__name__}); use hook masking"
                )
            if getattr(mod, "bias", None) is not None:
                mod.bias[u.channel] = 0
    return saved


def restore_weights_(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Undo :func:`zero_weights_`."""
    with torch.no_grad():
        for key, value in saved.items():
            model.get_parameter(key).copy_(value)


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
