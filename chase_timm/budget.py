"""The unstructured-sparsity budget: masks of the sparse weights held at d·N active weights through training.

:class:`MaskBudget` is the policy arithmetic behind :meth:`chase_timm.Chase.step`'s prune/regrow updates: an
ERK-random start; phase A (MEST's soft memory bound: prune back to d·N, regrow to rho_t·N); phase B (fixed
density: prune the weakest fraction pi_t, regrow to exactly d·N); a settling update at the last step. With
``scope="layerwise"`` every count is split per layer by ERK on the shapes that surviving channels leave. The
selection itself (exact counts, seeded tie-breaking) is :mod:`chase_timm.sparsity`'s.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .config import ChaseConfig
from .slim import sliced
from .sparsity import allocate, erk_densities, grow_largest, magnitude_masks, prune_smallest, random_masks

__all__ = ["MaskBudget"]

_Plan = Tuple[Dict[str, int], int, Optional[Dict[str, int]]]  # nnz per layer after pruning, total to grow, per layer


class MaskBudget:
    """Masks of ``weights`` (same names; live tensors, so slicing them in place is followed by :meth:`slice`).

    ``masks`` hold 0/1 in each weight's dtype and device; ``budget`` is d·N of the original model (during a
    sparsity ramp, ``ChaseConfig.density_at(t)``·N) and stays so when channels are removed; ``allowed`` (set by
    :meth:`restrict`) is where weights may still grow. ``mask_init="magnitude"`` draws the first masks from the
    weights' magnitudes, at ``start_density`` (the ramp's start; default ``density``).
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], density: float, generator: torch.Generator,
                 mask_init: str = "random", start_density: Optional[float] = None) -> None:
        self.weights = weights
        self.generator = generator
        self.shapes = {n: tuple(w.shape) for n, w in weights.items()}
        self.numel = {n: w.numel() for n, w in weights.items()}
        self.total = sum(self.numel.values())
        self.budget = round((density if start_density is None else start_density) * self.total)
        self.erk = erk_densities(self.shapes, density)
        counts = allocate(self.budget, {n: self.erk[n] * self.numel[n] for n in self.shapes}, self.numel)
        drawn = (magnitude_masks(weights, counts, generator) if mask_init == "magnitude"
                 else random_masks(self.shapes, counts, generator))
        self.masks = {n: m.to(device=weights[n].device, dtype=weights[n].dtype) for n, m in drawn.items()}
        self.allowed: Mapping[str, torch.Tensor] = {}

    def restrict(self, allowed: Mapping[str, torch.Tensor]) -> None:
        """Confine the masks (now and every later regrowth) to ``allowed`` (bool, per weight; absent = anywhere)."""
        self.allowed = allowed
        for name, keep in allowed.items():
            self.masks[name].mul_(keep)

    def load(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks (e.g. saved ones, bool) by copies in each weight's dtype and device."""
        self.masks = {n: masks[n].to(device=self.weights[n].device, dtype=self.weights[n].dtype) for n in masks}

    def slice(self, removals: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        """Follow weights that were just sliced in place: cut the same positions out of the masks."""
        self.masks = {n: sliced(m, removals[n], n) if n in removals else m for n, m in self.masks.items()}
        self.shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        self.numel = {n: w.numel() for n, w in self.weights.items()}

    def follow(self, t: int, config: ChaseConfig) -> None:
        """Set the budget to the sparsity ramp's ``density_at(t)``·N (d·N without a ramp)."""
        self.budget = round(config.density_at(t) * self.total)

    def nnz(self) -> Dict[str, int]:
        """Active weights per layer."""
        return {n: int(m.count_nonzero()) for n, m in self.masks.items()}

    @torch.no_grad()
    def update(self, t: int, config: ChaseConfig, grads: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One prune/regrow update after step ``t``: phase A before T_dst, phase B after, settling at the last
        step (no rotation, just back to the budget). Returns the flat positions grown per layer."""
        self.follow(t, config)  # during a sparsity ramp: prune down to density_at(t)·N
        if t >= config.total_steps:
            phase = self._settle
        else:
            phase = self._phase_a_prune if t < config.phase_b_start_step else self._phase_b_prune
        nnz, to_grow, counts = phase(t, config, self.nnz(), config.scope == "layerwise")
        to_grow = min(max(to_grow, 0), sum(self._capacity(nnz).values()))
        return grow_largest(grads, self.masks, self.allowed, self.generator, total=to_grow, counts=counts)

    def _phase_a_prune(self, t: int, config: ChaseConfig, nnz: Dict[str, int], layerwise: bool) -> _Plan:
        """MEST soft memory bound: prune back to the budget d·N, then plan regrowth up to rho_t·N."""
        excess = sum(nnz.values()) - self.budget
        if excess > 0:
            counts = allocate(excess, nnz, nnz) if layerwise else None
            pruned = prune_smallest(self.weights, self.masks, self.generator, total=excess, counts=counts)
            nnz = {n: k - pruned[n].numel() for n, k in nnz.items()}
        to_grow = round(config.grow_density(t) * self.total) - sum(nnz.values())
        return nnz, to_grow, self._layerwise_growth(to_grow, nnz) if layerwise else None

    def _phase_b_prune(self, t: int, config: ChaseConfig, nnz: Dict[str, int], layerwise: bool) -> _Plan:
        """Fixed density: prune the weakest fraction pi_t plus any excess, then plan regrowth to exactly d·N."""
        return self._prune_to_budget(config.phase_b_rate(t), nnz, layerwise)

    def _settle(self, t: int, config: ChaseConfig, nnz: Dict[str, int], layerwise: bool) -> _Plan:
        """Last step: no rotation, only prune any excess and regrow any deficit, so the run ends at exactly d·N."""
        return self._prune_to_budget(0.0, nnz, layerwise)

    def _prune_to_budget(self, rate: float, nnz: Dict[str, int], layerwise: bool) -> _Plan:
        """Prune the weakest fraction ``rate`` plus any excess over the (per-layer) budget; plan regrowth to it."""
        targets = self._layerwise_targets() if layerwise else {}
        counts = ({n: min(k, math.ceil(rate * k) + max(k - targets[n], 0)) for n, k in nnz.items()}
                  if layerwise else None)
        total = sum(nnz.values())
        pruned = prune_smallest(self.weights, self.masks, self.generator, counts=counts,
                                total=min(total, math.ceil(rate * total) + max(total - self.budget, 0)))
        nnz = {n: k - pruned[n].numel() for n, k in nnz.items()}
        growth = {n: max(targets[n] - k, 0) for n, k in nnz.items()} if layerwise else None
        return nnz, self.budget - sum(nnz.values()), growth

    def _alive_numel(self) -> Dict[str, int]:
        """Weights per layer inside surviving channels."""
        return {n: int(self.allowed[n].sum()) if n in self.allowed else self.numel[n] for n in self.masks}

    def _capacity(self, nnz: Dict[str, int]) -> Dict[str, int]:
        """Inactive positions per layer that may still be grown."""
        return {n: alive - nnz[n] for n, alive in self._alive_numel().items()}

    def _alive_erk(self) -> Dict[str, float]:
        """ERK densities recomputed on the shrunk shapes at density budget / alive weights (ImageNet script)."""
        shapes = {}
        for name, shape in self.shapes.items():
            keep = self.allowed.get(name)
            if keep is None:
                shapes[name] = shape
                continue
            out_alive = int(keep.flatten(1).any(1).sum())
            in_alive = int(keep.transpose(0, 1).flatten(1).any(1).sum())
            shapes[name] = (max(out_alive, 1), max(in_alive, 1), *shape[2:])
        alive_total = sum(self._alive_numel().values())
        return erk_densities(shapes, min(1.0, self.budget / max(alive_total, 1)))

    def _layerwise_growth(self, to_grow: int, nnz: Dict[str, int]) -> Dict[str, int]:
        """Phase-A regrowth per layer: ERK-dense layers are refilled, the rest grow in proportion to their nnz."""
        capacity = self._capacity(nnz)
        erk = self._alive_erk()
        counts = {n: capacity[n] if erk[n] >= 1.0 else 0 for n in nnz}
        rest = {n: (nnz[n] if erk[n] < 1.0 else 0) for n in nnz}
        extra = allocate(max(to_grow - sum(counts.values()), 0), rest,
                         {n: capacity[n] - counts[n] for n in nnz})
        return {n: counts[n] + extra[n] for n in nnz}

    def _layerwise_targets(self) -> Dict[str, int]:
        """Phase-B density per layer: each layer's ERK share of the budget on its alive shape."""
        alive_numel = self._alive_numel()
        erk = self._alive_erk()
        return allocate(self.budget, {n: erk[n] * alive_numel[n] for n in self.shapes}, alive_numel)
