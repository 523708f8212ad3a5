"""Channel sparsity policy: UMM scores per group, floors, exact global selection of channels to remove, and
:class:`ChannelState`, the bookkeeping of which channels are alive, removed or physically shrunk away.

Structure (which slices are coupled) comes from :mod:`chase_timm.graph`; this module only decides *which*
channels go, following the paper: the globally lowest Unmasked Mean Magnitude first, never taking a group
below its floor floor(C·(1-S_c)·beta). Attention heads and residual streams are ranked in pools of their own
(``ChaseConfig.channel_budget``), each reaching S_c. With ``ChaseConfig.channel_cost`` the ranking is UMM per
FLOP (or second) a channel saves (:func:`per_cost`; the costs come from :mod:`chase_timm.cost` / ``latency``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ._timm import named_tensors
from .graph import ChannelGroup, reindex_groups
from .slim import meta_clone, width_plan

__all__ = ["group_floor", "class_step", "umm_scores", "per_cost", "select_channels", "resize_removals", "alive_positions",
           "tensor_keep_masks", "ChannelState"]


def group_floor(width: int, channel_sparsity: float, min_channel_ratio: float, round_to: int = 1) -> int:
    """Fewest channels a group may keep: floor(C·(1-S_c)·beta), at least one (and a multiple of ``round_to``)."""
    floor = max(1, int(width * (1.0 - channel_sparsity) * min_channel_ratio))
    if round_to > 1:
        floor = min(width, math.ceil(floor / round_to) * round_to)
    return floor


def class_step(round_to: int, unit: int) -> int:
    """Entries of ``unit`` channels a group keeps a multiple of so that its channels are a multiple of ``round_to``."""
    return round_to // math.gcd(round_to, unit)


def _index_tensor(index: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Group channel j -> positions along the slice dim, as a padded (width, k) tensor (-1 = padding)."""
    k = max(len(pos) for pos in index)
    rows = [list(pos) + [-1] * (k - len(pos)) for pos in index]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _per_channel_sum(values: torch.Tensor, index: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum a per-position vector over each group channel's positions."""
    idx = _index_tensor(index, values.device)
    padded = torch.cat([values, values.new_zeros(1)])
    return padded[idx].sum(dim=1)


def umm_scores(groups: Sequence[ChannelGroup], tensors: Mapping[str, torch.Tensor],
               keep: Mapping[str, torch.Tensor] | None = None, fanin: str = "original",
               base_shapes: Mapping[str, Sequence[int]] | None = None) -> Dict[str, torch.Tensor]:
    """Unmasked Mean Magnitude of every channel of every group (float64 on CPU).

    UMM_c = sum of |w| over the channel's producer rows (masked zeros included) / their fan-in. With several
    producers (depthwise convs, SE gates, residual streams) the L1 norms and the fan-ins are summed, so a
    single-producer group reduces to the paper's formula. ``fanin="alive"`` divides by the fan-in that is
    still unmasked in ``keep`` (elementwise channel masks) instead of the original one. ``base_shapes``: the
    tensors' shapes before the model was physically shrunk, which the original fan-in is measured on.
    """
    scores = {}
    for group in groups:
        l1 = torch.zeros(group.width, dtype=torch.float64)
        fan = torch.zeros(group.width, dtype=torch.float64)
        for piece in group.producers():
            weight = tensors[piece.tensor].detach()
            other_dims = [d for d in range(weight.ndim) if d != piece.dim]
            row_l1 = weight.abs().sum(dim=other_dims, dtype=torch.float64)
            if fanin == "alive" and keep is not None and piece.tensor in keep:
                row_fan = keep[piece.tensor].sum(dim=other_dims, dtype=torch.float64)
            else:  # "alive" without channel masks: nothing removed is left in the (shrunk) tensor
                shape = weight.shape if fanin == "alive" or base_shapes is None else base_shapes[piece.tensor]
                row_fan = torch.full_like(row_l1, math.prod(shape) / shape[piece.dim])
            l1 += _per_channel_sum(row_l1, piece.index).cpu()
            fan += _per_channel_sum(row_fan, piece.index).cpu()
        scores[group.name] = l1 / fan.clamp_min(1.0)
    return scores


def per_cost(scores: Mapping[str, torch.Tensor], costs: Mapping[str, float],
             units: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
    """Scores per unit of cost: each group's UMMs divided by what one of its budget channels saves (``costs``: per
    entry, so an attention head's cost is shared by its ``units`` channels). The lowest is the least magnitude lost
    per cost saved; the order inside a group is UMM's. A group saving nothing ranks last (its channels go only when
    no other is left); when no group saves anything, UMM alone."""
    units = units or {}
    per_channel = {n: costs[n] / units.get(n, 1) for n in scores}
    if not any(c > 0 for c in per_channel.values()):
        return dict(scores)
    return {n: s / per_channel[n] if per_channel[n] > 0 else torch.full_like(s, math.inf) for n, s in scores.items()}


def select_channels(scores: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor],
                    floors: Mapping[str, int], n_remove: int, generator: torch.Generator,
                    round_to: int = 1, units: Optional[Mapping[str, int]] = None,
                    heads: Collection[str] = ()) -> Dict[str, torch.Tensor]:
    """Choose alive channels with the globally lowest score until ``n_remove`` channels go, never below a floor.

    Water-filling: candidates are visited from the lowest score up (exact ties in random order from the shared
    generator) and skipped once their group sits at its floor, so a saturated group's share flows to the others.
    ``units``: channels one entry of a group stands for (an attention head: ``head_dim``; a class of tied channels:
    its size; default 1). A candidate of more than one channel is taken only while it lands nearer ``n_remove`` than
    leaving it out (at most half of it beyond), so the count ends on the nearest whole candidate and a smaller one
    later in the order can fill what a big one would overshoot. With ``round_to > 1`` each group but ``heads`` keeps
    a multiple of ``round_to`` channels: its candidates are runs of :func:`class_step` entries (its lowest-scored
    first, the first run bringing it to a multiple) ranked by their mean score. Returns removed indices per group.
    """
    units = units or {}
    names = [n for n in scores if bool(alive[n].any())]
    if n_remove <= 0 or not names:
        return {}
    cand_scores, cand_group, cand_index = [], [], []
    for gi, name in enumerate(names):
        idx = alive[name].nonzero().flatten()
        cand_scores.append(scores[name][idx])
        cand_group.append(torch.full_like(idx, gi))
        cand_index.append(idx)
    flat_scores = torch.cat(cand_scores)
    shuffle = torch.randperm(flat_scores.numel(), generator=generator)
    order = shuffle[torch.sort(flat_scores[shuffle], stable=True).indices]
    group_of, index_of = torch.cat(cand_group)[order], torch.cat(cand_index)[order]
    steps = [1 if round_to == 1 or n in heads else class_step(round_to, units.get(n, 1)) for n in names]
    if max(steps) == 1:  # single entries in score order: the paper's selection
        candidates = ((gi, (ci,)) for gi, ci in zip(group_of.tolist(), index_of.tolist()))
    else:
        candidates = _runs(flat_scores[order], group_of, index_of, steps)

    room = [int(alive[n].sum()) - floors[n] for n in names]
    unit = [units.get(n, 1) for n in names]
    chosen: Dict[int, list] = {gi: [] for gi in range(len(names))}
    need = n_remove
    for gi, picks in candidates:
        if need <= 0:
            break
        size = len(picks) * unit[gi]
        if room[gi] >= len(picks) and size <= 2 * need:
            chosen[gi].extend(picks)
            room[gi] -= len(picks)
            need -= size
    return {names[gi]: torch.tensor(sorted(p), dtype=torch.long) for gi, p in chosen.items() if p}


def _runs(scores: torch.Tensor, group_of: torch.Tensor, index_of: torch.Tensor,
          steps: Sequence[int]) -> List[tuple]:
    """(group, entries) runs: each group's entries (given in score order) cut into runs of its step, the first run
    bringing it to a multiple; ordered by mean score, kept non-decreasing within a group (a float mean of equal
    scores can round below its first run's), ties by the rank of the run's first entry."""
    runs = []
    for gi, step in enumerate(steps):
        rank = (group_of == gi).nonzero().flatten()
        values, entries, ranks = scores[rank].tolist(), index_of[rank].tolist(), rank.tolist()
        start = len(entries) % step
        bounds = ([0] if start else []) + list(range(start, len(entries), step))
        key = -math.inf
        for a, b in zip(bounds, bounds[1:] + [len(entries)]):
            key = max(key, sum(values[a:b]) / (b - a))
            runs.append((key, ranks[a], gi, entries[a:b]))
    runs.sort(key=lambda r: (r[0], r[1]))
    return [(gi, entries) for _, _, gi, entries in runs]


def resize_removals(scores: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor],
                    removed: Mapping[str, torch.Tensor], widths: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """``removed`` (indices per group) changed so that each group in ``widths`` keeps exactly that many alive
    channels, removing its lowest-scored ones (UMM order, as the global selection would); other groups as given."""
    out = {n: r for n, r in removed.items() if n not in widths}
    for name, width in widths.items():
        idx = alive[name].nonzero().flatten()
        n = len(idx) - width
        if name in removed and len(removed[name]) == n:
            out[name] = removed[name]
        elif n > 0:
            order = torch.sort(scores[name][idx], stable=True).indices
            out[name] = idx[order[:n]].sort().values
    return out


def alive_positions(groups: Sequence[ChannelGroup], alive: Mapping[str, torch.Tensor],
                    shapes: Mapping[str, Sequence[int]]) -> Dict[str, Dict[int, torch.Tensor]]:
    """``{tensor: {dim: bool vector}}``: the positions along each sliced dim of the tensors in ``shapes`` that no
    removed channel (``alive`` False) of ``groups`` covers; only (tensor, dim) pairs some removed channel touches."""
    per_dim: Dict[str, Dict[int, torch.Tensor]] = {}
    for group in groups:
        removed = (~alive[group.name]).nonzero().flatten().tolist()
        if not removed:
            continue
        for piece in group.slices:
            if piece.tensor not in shapes:
                continue
            size = shapes[piece.tensor][piece.dim]
            vec = per_dim.setdefault(piece.tensor, {}).setdefault(piece.dim, torch.ones(size, dtype=torch.bool))
            vec[[pos for j in removed for pos in piece.index[j]]] = False
    return per_dim


def tensor_keep_masks(groups: Sequence[ChannelGroup], alive: Mapping[str, torch.Tensor],
                      tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Elementwise 0/1 masks (in each tensor's dtype) for every tensor touched by a removed channel.

    A position is kept unless some removed channel's slice covers it; this is the channel mask F that is
    AND-ed into the unstructured masks and multiplied into norm/bias/free parameters. Buffers (running stats)
    need no masking: their channel's affine output is zero.
    """
    masks = {}
    for name, dims in alive_positions(groups, alive, {n: t.shape for n, t in tensors.items()}).items():
        tensor = tensors[name]
        keep = torch.ones(tensor.shape, dtype=torch.bool)
        for dim, vec in dims.items():
            shape = [1] * tensor.ndim
            shape[dim] = -1
            keep &= vec.view(shape)
        masks[name] = keep.to(device=tensor.device, dtype=tensor.dtype)
    return masks


class ChannelState:
    """Which channels of a model's groups are alive: in its current numbering and in the original one.

    The channel half of :class:`~chase_timm.Chase`, read through ``chase.channels`` (only Chase changes it):

    - ``groups``: every coupled channel group of the model as it is now (physically shrunk groups re-indexed);
      ``prunable``: those Chase may thin (removable, with a Conv/Linear producer to score);
    - ``alive``: ``{group: bool flags}`` in the current numbering; ``floors``: the fewest channels a group keeps;
      ``units``: channels one entry of a group counts for (``head_dim`` for an attention head's group, the class
      size for tied channels: a grouped conv's or GroupNorm's balanced class, a gate pair; else 1); ``heads``: the
      attention-head groups;
      ``total``: prunable channels of the original model (``width * unit`` summed: the S_c budget's unit);
    - ``allowed``: channel mask F (bool) of every sparse weight touched by a removed channel still in the model;
      ``channel_masks``: F of the other tensors so touched (norm weights, biases, ...), in their dtype.
    """

    def __init__(self, module: nn.Module, groups: List[ChannelGroup], channel_sparsity: float,
                 min_channel_ratio: float, round_to: int = 1, budget: str = "per_kind") -> None:
        self.groups = groups
        self.budget = budget
        self.prunable = [g for g in groups if g.prunable and g.producers()]
        self.alive = {g.name: torch.ones(g.width, dtype=torch.bool) for g in self.prunable}
        self.units = {g.name: g.unit for g in self.prunable}
        self.heads = {g.name for g in self.prunable if g.heads}
        self.floors = {g.name: group_floor(g.width, channel_sparsity, min_channel_ratio,
                                           1 if g.heads else class_step(round_to, g.unit)) for g in self.prunable}
        self.total = sum(g.width * g.unit for g in self.prunable)
        self.channel_sparsity = channel_sparsity
        self.width_policy: Optional[Callable[..., Dict[str, int]]] = None
        # (prunable groups, alive flags) -> what one channel of each saves; None ranks by UMM alone (the paper)
        self.channel_cost: Optional[Callable[[Sequence[ChannelGroup], Mapping[str, torch.Tensor]], Dict[str, float]]] = None
        self.widths_rounded = False  # the policy runs once, at the first event that reaches S_c
        self.allowed: Dict[str, torch.Tensor] = {}
        self.channel_masks: Dict[str, torch.Tensor] = {}
        # physical shrinking: original channel number of every channel still in the model, original widths,
        # original tensor shapes (UMM's original fan-in), a shape-only copy of the base (for width plans)
        self._origin = {g.name: torch.arange(g.width) for g in self.prunable}
        self._base_width = {g.name: g.width for g in groups}
        self._base_shapes = {n: tuple(t.shape) for n, t in named_tensors(module)}
        self._base: Optional[nn.Module] = None

    def budget_pools(self) -> Dict[str, List[str]]:
        """Prunable groups by the pool whose channels are ranked against each other and that reaches S_c on its own.

        ``"per_kind"``: internal channels, attention heads and residual streams are separate pools. Their UMMs are
        not comparable: a head's score averages 3·head_dim rows, so it sits at the mean of single rows and never
        ranks below the sparsest MLP channels; a stream's producers read from the internal channels, so their
        UMM (original fan-in) falls as those die, and one pool drives the stream to its floor (DeiT-S 0.07 of
        the dense FLOPs at S_c = 0.4). ``"pooled"``: one global ranking (the same for CNNs without prune_skip).
        """
        if self.budget == "pooled":
            return {"all": list(self.alive)}
        pools: Dict[str, List[str]] = {}
        for group in self.prunable:
            kind = "heads" if group.heads else "streams" if group.residual else "channels"
            pools.setdefault(kind, []).append(group.name)
        return pools

    def _due(self, names: Sequence[str], sparsity: float) -> int:
        """Channels (in units) ``names`` must lose now for their channel sparsity to reach ``sparsity``."""
        alive = sum(int(self.alive[n].sum()) * self.units[n] for n in names)
        return math.ceil(alive - sum(self._base_width[n] * self.units[n] for n in names) * (1.0 - sparsity) - 1e-9)

    def _units_of(self, removed: Mapping[str, torch.Tensor], names: Sequence[str]) -> int:
        """Channels (in units) ``removed`` takes from ``names``."""
        return sum(len(removed[n]) * self.units[n] for n in names if n in removed)

    def alive_count(self) -> int:
        """Prunable channels still alive (an entry counts its ``unit``: a head's ``head_dim``, a tied class's size)."""
        return sum(int(a.sum()) * self.units[n] for n, a in self.alive.items())

    def scores(self, tensors: Mapping[str, torch.Tensor], fanin: str) -> Dict[str, torch.Tensor]:
        """UMM of every prunable group's channels (see :func:`umm_scores`)."""
        keep = {**self.allowed, **{n: m.bool() for n, m in self.channel_masks.items()}}
        return umm_scores(self.prunable, tensors, keep, fanin, self._base_shapes)

    def remove_lowest(self, tensors: Mapping[str, torch.Tensor], sparsity: float, fanin: str,
                      generator: torch.Generator, round_to: int = 1) -> bool:
        """Mark the lowest-UMM channels of each budget pool (:meth:`budget_pools`) removed until the pool's channel
        sparsity reaches ``sparsity`` (floors permitting); with a ``channel_cost`` the lowest UMM per cost saved
        (:func:`per_cost`). Each pool ends on its nearest whole head, class or run (:func:`select_channels`); the
        internal-channel pool takes up what the other pools' rounding and floors leave, so the total stays S_c's
        (exactly where that pool's candidates are single channels: ``round_to=1``, no tied classes). False when none
        were due."""
        pools = self.budget_pools()
        due = {kind: self._due(names, sparsity) for kind, names in pools.items()}
        if "channels" in due:
            due["channels"] = self._due(list(self.alive), sparsity) - sum(due[k] for k in due if k != "channels")
        final = self.width_policy is not None and sparsity >= self.channel_sparsity and not self.widths_rounded
        if max(due.values(), default=0) <= 0 and not final:  # the last event often has nothing left: round anyway
            return False
        scores = self.scores(tensors, fanin)
        if self.channel_cost is not None:  # UMM per cost saved (ChaseConfig.channel_cost)
            scores = per_cost(scores, self.channel_cost(self.prunable, self.alive), self.units)
        removed: Dict[str, torch.Tensor] = {}
        for kind in sorted(pools, key=lambda k: k == "channels"):  # the channel pool last: it absorbs the rest
            names = pools[kind]
            if kind == "channels":
                due[kind] += sum(due[k] - self._units_of(removed, pools[k]) for k in pools if k != "channels")
            if due[kind] > 0:
                removed.update(select_channels({n: scores[n] for n in names}, self.alive, self.floors, due[kind],
                                               generator, round_to, self.units, self.heads))
        if final:  # each pool rounded on its own, so no pool pays for another's fast widths
            high = {n: int(a.sum()) for n, a in self.alive.items()}
            proposed = {n: high[n] - len(removed.get(n, ())) for n in high}
            widths: Dict[str, int] = {}
            for names in pools.values():
                members = set(names)
                widths.update(self.width_policy([g for g in self.prunable if g.name in members],
                                                {n: proposed[n] for n in names}, {n: high[n] for n in names},
                                                self.floors, self.units))
            removed = resize_removals(scores, self.alive, removed, widths)
            self.widths_rounded = True
        for name, idx in removed.items():
            self.alive[name][idx] = False
        return True

    def refresh_masks(self, tensors: Mapping[str, torch.Tensor], sparse: Collection[str]) -> None:
        """Recompute the channel masks F from the alive channels (``allowed`` for the ``sparse`` weights)."""
        keep = tensor_keep_masks(self.prunable, self.alive, tensors)
        self.allowed = {n: k.bool() for n, k in keep.items() if n in sparse}
        self.channel_masks = {n: k for n, k in keep.items() if n not in sparse}

    def original_alive(self, name: str, present: bool = False) -> torch.Tensor:
        """Flags of a group's channels in the original numbering: alive, or (``present``) still in the model."""
        flags = torch.zeros(self._base_width[name], dtype=torch.bool)
        flags[self._origin[name]] = True if present else self.alive[name]
        return flags

    def removed(self) -> Dict[str, List[int]]:
        """Removed channel indices per group, numbered as in the original model (only groups that lost channels)."""
        removed = {n: (~self.original_alive(n)).nonzero().flatten().tolist() for n in self.alive}
        return {n: r for n, r in removed.items() if r}

    def pending(self) -> Dict[str, List[int]]:
        """Removed channels still in the model (masked, not yet sliced out), numbered as the model is now."""
        return {n: (~a).nonzero().flatten().tolist() for n, a in self.alive.items() if not bool(a.all())}

    def shrunk(self) -> Dict[str, List[int]]:
        """Channels physically removed so far, in the original numbering."""
        return {n: (~self.original_alive(n, present=True)).nonzero().flatten().tolist() for n, origin in
                self._origin.items() if origin.numel() < self._base_width[n]}

    def record_shrink(self, module: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        """Follow ``removed`` (current numbering) out of the numbering; call just before slicing them out of
        ``module`` (its first call keeps a shape-only copy of the base model for :meth:`state_dict`'s width plan)."""
        if self._base is None:
            self._base = meta_clone(module)
        self.groups = reindex_groups(self.groups, removed)
        self.prunable = [g for g in self.groups if g.name in self.alive]
        for name, alive in self.alive.items():
            keep = torch.ones(len(alive), dtype=torch.bool)
            keep[removed.get(name, [])] = False
            self._origin[name], self.alive[name] = self._origin[name][keep], alive[keep]

    def state_dict(self, module: nn.Module) -> Dict[str, Any]:
        """``alive`` flags in the original numbering; after a shrink also ``shrunk`` and ``width_plan`` (``module``'s
        shapes relative to the base model, :func:`chase_timm.slim.apply_width_plan`)."""
        shrunk = self.shrunk()
        return {"alive": {n: self.original_alive(n) for n in self.alive},
                **({"shrunk": shrunk, "width_plan": width_plan(module, self._base)} if shrunk else {})}

    def load_alive(self, alive: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s ``alive`` (original numbering) onto the channels still in the model."""
        self.alive = {n: a.bool()[self._origin[n]] for n, a in alive.items()}

    def report(self, tensors: Mapping[str, torch.Tensor], fanin: str) -> List[Dict[str, Any]]:
        """One row per group: widths before/after, UMM distribution of kept channels, why excluded."""
        scores = self.scores(tensors, fanin)
        rows = []
        for group in self.groups:
            row = {"group": group.name, "width_before": self._base_width[group.name], "width_after": group.width,
                   "unit": group.unit, "residual": group.residual, "prunable": group.name in self.alive, "reason": group.reason}
            if group.name in self.alive:
                alive = self.alive[group.name]
                kept = scores[group.name][alive]
                row.update(width_after=int(alive.sum()), floor=self.floors[group.name],
                           umm_min=float(kept.min()), umm_median=float(kept.median()), umm_max=float(kept.max()))
            elif group.prunable:
                row.update(prunable=False, reason="no Conv/Linear producer to score")
            rows.append(row)
        return rows
