"""The ``Chase`` controller: masks, prune/regrow updates, channel removal, exact resume, and export.

Shaped like ``torch.ao.pruning``'s sparsifier: a small verb set (``step``, ``shrink``, ``state_dict``,
``load_state_dict``, ``stats``, ``report``, ``export``) over masks that are plain tensors owned here, not
module buffers (DDP would overwrite buffers from rank 0 and hide a divergence).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .channels import group_floor, select_channels, tensor_keep_masks, umm_scores
from .config import ChaseConfig
from .graph import ChannelGroup, find_channel_groups, reindex_groups, tensor_removals
from .optim_state import check_shrink_exact, states_like
from ._timm import deepcopy_model, named_tensors, unwrap_model
from .shrink import check_shrinkable, rebuild_ddp, slice_optimizer_state
from .slim import meta_clone, slice_in_place, slim_copy, sliced, width_plan
from .sparsity import (allocate, erk_densities, find_sparse_weights, grow_largest, prune_smallest,
                       random_masks, zero_positions)

__all__ = ["Chase"]


class Chase:
    """Channel-aware dynamic sparse training for a (possibly DDP/Accelerate-wrapped) model.

    Call :meth:`step` after ``optimizer.step()`` and before ``optimizer.zero_grad()``: the regrowth ranks the
    gradients of the batch just used. Under Accelerate gradient accumulation, micro-steps without a gradient
    sync and fp16 steps skipped on overflow are not counted, so ``config.total_steps`` counts optimizer steps;
    a step without gradients and a ``total_steps`` that looks counted in micro-steps are warned about once.

    Args:
        model: a timm (or any) model; DDP / ``accelerator.prepare`` / ``torch.compile`` wrappers are unwrapped.
        config: the :class:`ChaseConfig`.
        optimizer: the optimizer that owns the model's parameters (also inside Accelerate's wrapper or timm's
            ``Lookahead``); its per-parameter state shaped like the parameter (momentum, Adam moments, Lookahead's
            slow weights, list entries such as Kron's) is masked with the weights, so regrown weights start from
            zero state. State of another shape (Adafactor's factored statistics, Kron's preconditioners) is left
            as it is. With ``config.shrink != "off"`` an optimizer whose update depends on the tensor's size is
            refused (ValueError) and one never checked is warned about (:mod:`chase_timm.optim_state`).
        example_inputs: input used to trace channel coupling (default: one image of the model's input size).
    """

    def __init__(self, model: nn.Module, config: ChaseConfig, optimizer: Optional[torch.optim.Optimizer] = None,
                 example_inputs: Optional[torch.Tensor] = None) -> None:
        if not isinstance(config, ChaseConfig):
            raise TypeError(f"config must be a chase_timm.ChaseConfig, got {type(config).__name__}.")
        self.model = model
        self.module = unwrap_model(model)
        self.config = config
        self.optimizer = optimizer
        self.params: Dict[str, nn.Parameter] = dict(self.module.named_parameters())
        self.weights, self.kept_dense = find_sparse_weights(self.module, config.exclude)
        if not self.weights:
            raise ValueError(
                f"{type(self.module).__name__} has no Conv/Linear weight to sparsify (or ChaseConfig.exclude "
                "covers them all); Chase needs at least one.")
        self._check_optimizer_owns_weights()
        if config.shrink != "off" and config.channel_sparsity > 0:
            check_shrink_exact(optimizer)

        self.shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        self.numel = {n: w.numel() for n, w in self.weights.items()}
        self.total_weights = sum(self.numel.values())
        self.budget = round(config.density * self.total_weights)
        self.erk = erk_densities(self.shapes, config.density)
        self.generator = torch.Generator().manual_seed(config.seed)
        counts = allocate(self.budget, {n: self.erk[n] * self.numel[n] for n in self.shapes}, self.numel)
        self.masks = {n: m.to(device=self.weights[n].device, dtype=self.weights[n].dtype)
                      for n, m in random_masks(self.shapes, counts, self.generator).items()}

        self.groups: List[ChannelGroup] = (
            find_channel_groups(self.module, example_inputs, prune_skip=config.prune_skip,
                                timeout=config.discovery_timeout) if config.channel_sparsity > 0 else [])
        self.prunable = [g for g in self.groups if g.prunable and g.producers()]
        self.alive = {g.name: torch.ones(g.width, dtype=torch.bool) for g in self.prunable}
        self.floors = {g.name: group_floor(g.width, config.channel_sparsity, config.min_channel_ratio,
                                           config.channel_round_to) for g in self.prunable}
        self.channels_total = sum(g.width for g in self.prunable)
        self.channel_masks: Dict[str, torch.Tensor] = {}  # channel masks F of tensors that are not sparse weights
        self.allowed: Dict[str, torch.Tensor] = {}  # F of sparse weights touched by a removed channel (bool)
        # physical shrinking: original channel number of every channel still in the model, original widths,
        # original tensor shapes (UMM's original fan-in), a shape-only copy of the base (for width plans)
        self._origin = {g.name: torch.arange(g.width) for g in self.prunable}
        self._base_width = {g.name: g.width for g in self.groups}
        self._base_shapes = {n: tuple(t.shape) for n, t in named_tensors(self.module)}
        self._base: Optional[nn.Module] = None
        self._copies: List[nn.Module] = []
        if config.shrink != "off" and config.channel_sparsity > 0:  # only then is there anything to shrink
            check_shrinkable(model, None, {}, {})
        self.step_count = 0
        self.skipped_updates = 0
        self.unsynced_calls = 0  # step() calls that were not optimizer steps (micro-steps, fp16 skips)
        self._warned: set = set()
        self.apply_masks()

    # ------------------------------------------------------------------ training
    def step(self) -> None:
        """Advance one optimizer step: re-mask, then run a channel event and/or a prune/regrow update if due.

        Step ``total_steps`` always ends with a settling update, so every run ends at exactly d·N active weights.
        """
        if not self._optimizer_stepped():
            self.unsynced_calls += 1
            return
        self.step_count += 1
        t = self.step_count
        if t == 1:
            self._check_total_steps_unit()
        self.apply_masks()
        if self.prunable and self.config.is_channel_step(t):
            self._prune_channels(t)
        if self.config.runs_update(t):
            self._update_connections(t)
        if self.prunable and self.config.shrink != "off" and self.config.is_channel_step(t) and (
                self.config.shrink == "events" or t == self.config.channel_end_step):
            self._shrink_in_step()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero inactive weights, removed channels and the optimizer state behind them."""
        targets = [self.weights[n] for n in self.masks] + [self.params[n] for n in self.channel_masks]
        multipliers = list(self.masks.values()) + list(self.channel_masks.values())
        torch._foreach_mul_(targets, multipliers)
        if self.optimizer is None:
            return
        for param, mask in zip(targets, multipliers):
            for value in states_like(self.optimizer, param):
                value.mul_(mask)

    @torch.no_grad()
    def mask_model(self, other: nn.Module) -> None:
        """Apply the current masks to another copy of the model with the same names (e.g. timm's ModelEma)."""
        params = dict(_copy_module(other).named_parameters())
        masks = {**self.masks, **self.channel_masks}
        wrong = next((n for n, m in masks.items() if n not in params or params[n].shape != m.shape), None)
        if wrong is not None:
            found = tuple(params[wrong].shape) if wrong in params else "missing"
            raise ValueError(
                f"{type(other).__name__} does not match the training model: {wrong} is {found}, not "
                f"{tuple(masks[wrong].shape)}. Pass a copy of this model (e.g. its EMA); when the model shrinks "
                "during training, register the copy first (chase.register(ema)) so it shrinks along.")
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def _check_optimizer_owns_weights(self) -> None:
        """The optimizer must hold the sparse weights, else their state can't be masked (and they don't train)."""
        if self.optimizer is None:
            return
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [n for n, w in self.weights.items() if id(w) not in owned]
        if missing:
            raise ValueError(
                f"The optimizer does not own {len(missing)} of the model's Conv/Linear weights (e.g. {missing[:3]}). "
                "Create the optimizer from this model's parameters (after any model surgery) before building Chase.")

    def _optimizer_stepped(self) -> bool:
        """False for Accelerate micro-steps without gradient sync and for fp16 steps skipped on overflow."""
        opt = self.optimizer
        gradient_state = getattr(opt, "gradient_state", None)
        if gradient_state is not None and not gradient_state.sync_gradients:
            return False
        return not getattr(opt, "step_was_skipped", False)

    def _warn_once(self, key: str, message: str) -> None:
        """One warning per kind and Chase instance (misuse is reported, never repeated every step)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)  # the caller of step() / export()

    def _accumulation_steps(self) -> int:
        """Accelerate's gradient-accumulation factor (1 without Accelerate or accumulation)."""
        gradient_state = getattr(self.optimizer, "gradient_state", None)
        return int(getattr(gradient_state, "num_steps", 1) or 1)

    def _check_total_steps_unit(self) -> None:
        """At the first optimizer step: warn if total_steps is whole epochs of micro-batches, not of optimizer steps.

        Under accumulation over k micro-steps an epoch of L micro-batches has ceil(L/k) optimizer steps
        (Accelerate syncs at the end of the loader). A total that is a multiple of L but not of ceil(L/k)
        can only be epochs counted in micro-batches. (When k divides L the two readings coincide at the
        start; :meth:`export` then checks what actually ran.)
        """
        k = self._accumulation_steps()
        loader = getattr(getattr(self.optimizer, "gradient_state", None), "active_dataloader", None)
        length = len(loader) if k > 1 and loader is not None and hasattr(loader, "__len__") else 0
        total = self.config.total_steps
        if length and total % length == 0 and total % math.ceil(length / k):
            self._warn_once("micro_steps", _micro_steps_message(total, k, f"{total // length} epochs of {length} "
                                                                     "micro-batches"))

    def _check_run_length(self) -> None:
        """At export: warn if chase.step() was called exactly total_steps times but fewer were optimizer steps."""
        k, total = self._accumulation_steps(), self.config.total_steps
        if k > 1 and self.step_count < total == self.step_count + self.unsynced_calls:
            self._warn_once("micro_steps", _micro_steps_message(
                total, k, f"chase.step() ran {total} times but only {self.step_count} were optimizer steps"))

    # ------------------------------------------------------------------ channel removal
    def _prune_channels(self, t: int) -> None:
        """Remove the globally lowest-UMM channels so that channel sparsity follows the cubic schedule."""
        alive_total = sum(int(a.sum()) for a in self.alive.values())
        target_alive = self.channels_total * (1.0 - self.config.channel_sparsity_at(t))
        n_remove = math.ceil(alive_total - target_alive - 1e-9)
        if n_remove <= 0:
            return
        scores = self._umm_scores()
        removed = select_channels(scores, self.alive, self.floors, n_remove, self.generator,
                                  self.config.channel_round_to)
        for name, idx in removed.items():
            self.alive[name][idx] = False
        self._refresh_channel_masks()
        self.apply_masks()
        self._check_ranks_agree(t)

    def _umm_scores(self) -> Dict[str, torch.Tensor]:
        return umm_scores(self.prunable, self.params, self._keep_masks(), self.config.umm_fanin, self._base_shapes)

    def _keep_masks(self) -> Dict[str, torch.Tensor]:
        return {**self.allowed, **{n: m.bool() for n, m in self.channel_masks.items()}}

    def _refresh_channel_masks(self) -> None:
        """Recompute the channel masks F from the alive channels and AND them into the sparse masks."""
        keep = tensor_keep_masks(self.prunable, self.alive, self.params)
        self.allowed = {n: k.bool() for n, k in keep.items() if n in self.weights}
        for name in self.allowed:
            self.masks[name].mul_(keep[name])
        self.channel_masks = {n: k for n, k in keep.items() if n not in self.weights}

    # ------------------------------------------------------------------ connection updates
    @torch.no_grad()
    def _update_connections(self, t: int) -> None:
        """One prune/regrow update: phase A (soft memory bound) before T_dst, phase B (fixed density) after,
        and at the last step a settling update (no rotation, just back to the budget)."""
        grads = {n: (w.grad if w.grad is not None else torch.zeros_like(w)) for n, w in self.weights.items()}
        norms = torch.stack(torch._foreach_norm(list(grads.values())))
        if not bool(torch.isfinite(norms).all()):
            self.skipped_updates += 1  # e.g. an fp16 overflow step: a ranking on inf/nan would be noise
            return
        if not bool(norms.any()):
            self._warn_once("no_grad", (
                f"chase.step() found no gradients at update step {t} (all None or zero), so regrowth picks "
                "random positions. Call chase.step() after optimizer.step() and before optimizer.zero_grad()."))
        if t >= self.config.total_steps:
            phase = self._settle
        else:
            phase = self._phase_a_prune if t < self.config.phase_b_start_step else self._phase_b_prune
        nnz, to_grow, counts = phase(t, self._nnz_per_layer(), self.config.scope == "layerwise")
        to_grow = min(max(to_grow, 0), sum(self._capacity(nnz).values()))
        grown = grow_largest(grads, self.masks, self.allowed, self.generator, total=to_grow, counts=counts)
        for name, positions in grown.items():
            weight = self.weights[name]
            zero_positions([weight, *states_like(self.optimizer, weight)], positions)
        self.apply_masks()
        self._check_ranks_agree(t)

    def _phase_a_prune(self, t: int, nnz: Dict[str, int], layerwise: bool) -> Tuple[Dict[str, int], int, Optional[Dict]]:
        """MEST soft memory bound: prune back to the budget d·N, then plan regrowth up to rho_t·N."""
        excess = sum(nnz.values()) - self.budget
        if excess > 0:
            counts = allocate(excess, nnz, nnz) if layerwise else None
            pruned = prune_smallest(self.weights, self.masks, self.generator, total=excess, counts=counts)
            nnz = {n: k - pruned[n].numel() for n, k in nnz.items()}
        to_grow = round(self.config.grow_density(t) * self.total_weights) - sum(nnz.values())
        return nnz, to_grow, self._layerwise_growth(to_grow, nnz) if layerwise else None

    def _phase_b_prune(self, t: int, nnz: Dict[str, int], layerwise: bool) -> Tuple[Dict[str, int], int, Optional[Dict]]:
        """Fixed density: prune the weakest fraction pi_t plus any excess, then plan regrowth to exactly d·N."""
        return self._prune_to_budget(self.config.phase_b_rate(t), nnz, layerwise)

    def _settle(self, t: int, nnz: Dict[str, int], layerwise: bool) -> Tuple[Dict[str, int], int, Optional[Dict]]:
        """Last step: no rotation, only prune any excess and regrow any deficit, so the run ends at exactly d·N."""
        return self._prune_to_budget(0.0, nnz, layerwise)

    def _prune_to_budget(self, rate: float, nnz: Dict[str, int],
                         layerwise: bool) -> Tuple[Dict[str, int], int, Optional[Dict]]:
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

    def _nnz_per_layer(self) -> Dict[str, int]:
        return {n: int(m.count_nonzero()) for n, m in self.masks.items()}

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

    def _check_ranks_agree(self, t: int) -> None:
        """Fail loudly if the masks differ across ranks (cheap: a few integers per layer, all-reduced)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = next(iter(self.masks.values())).device
        signature = torch.tensor(
            [v for m in self.masks.values() for v in (int(m.count_nonzero()), int(m.flatten().nonzero().sum()))]
            + [int(a.sum()) for a in self.alive.values()], dtype=torch.float64, device=device)
        low, high = signature.clone(), signature.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(
                f"Chase masks differ across ranks after step {t}. Every rank must build Chase with the same "
                "config (seed) and call chase.step() after every optimizer step with synchronised gradients.")

    # ------------------------------------------------------------------ physical shrinking
    def register(self, *copies: nn.Module) -> None:
        """Copies with the same parameter names (e.g. timm's ``ModelEmaV3``) that shrink along with the model."""
        self._copies.extend(copies)

    def shrink(self, *copies: nn.Module) -> nn.Module:
        """Slice the channels removed so far out of the training model, so the next steps cost less.

        Cut in one place and consistently: the model's parameters (the same ``nn.Parameter`` objects, so the
        optimizer keeps working) and buffers, their gradients, every optimizer state tensor shaped like its
        parameter, Chase's masks and channel groups, and the registered copies plus ``copies`` (e.g. an EMA).
        The model then computes what the masked model computed; the budget stays d of the original model and
        reports keep the original channel numbering. A DDP wrapper is rebuilt in place, so call this on every
        rank at the same step. Raises ValueError, changing nothing, for a wrapper other than DDP or an
        optimizer state of another shape. Returns the model to train (the same object).
        """
        removed = self._pending()
        if removed:
            self._shrink_channels(removed, [*self._copies, *copies])
        return self.model

    def _shrink_in_step(self) -> None:
        """``config.shrink``'s automatic shrink; on a ValueError, warn once and keep training by masking."""
        if "shrink" in self._warned:
            return
        try:
            self.shrink()
        except ValueError as err:
            self._warn_once("shrink", f"{err} Training continues with masking only.")

    @torch.no_grad()
    def _shrink_channels(self, removed: Dict[str, List[int]], copies: List[nn.Module]) -> None:
        """Slice ``removed`` (current numbering) out of the model, optimizer state, copies and bookkeeping."""
        removals = tensor_removals(self.groups, removed)
        check_shrinkable(self.model, self.optimizer, self.params, removals)
        targets = [_copy_module(c) for c in copies]
        current = {n: t.shape for n, t in named_tensors(self.module)}
        for target in targets:
            theirs = {n: t.shape for n, t in named_tensors(target)}
            wrong = [n for n in removals if theirs.get(n) != current[n]]
            if wrong:
                raise ValueError(f"{type(target).__name__} given to Chase.shrink has no tensor {wrong[0]} shaped like "
                                 "the training model's; pass copies of this model (e.g. its EMA) only.")
        if self._base is None:
            self._base = meta_clone(self.module)
        grads = {n: sliced(p.grad, removals[n], n) for n, p in self.params.items()
                 if n in removals and p.grad is not None}
        slice_optimizer_state(self.optimizer, self.params, removals)
        slice_in_place(self.module, removals)
        for name, grad in grads.items():
            self.params[name].grad = grad
        for target in targets:
            slice_in_place(target, removals)
        self.masks = {n: sliced(m, removals[n], n) if n in removals else m for n, m in self.masks.items()}
        self.shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        self.numel = {n: w.numel() for n, w in self.weights.items()}
        self.groups = reindex_groups(self.groups, removed)
        self.prunable = [g for g in self.groups if g.name in self.alive]
        for name, alive in self.alive.items():
            keep = torch.ones(len(alive), dtype=torch.bool)
            keep[removed.get(name, [])] = False
            self._origin[name], self.alive[name] = self._origin[name][keep], alive[keep]
        self._refresh_channel_masks()  # channel masks only for removed channels still in the model (none after shrink())
        rebuild_ddp(self.model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (plain tensors and numbers; loads with ``weights_only=True``).

        Channels are numbered as in the original model. After :meth:`shrink`, ``shrunk`` lists the channels
        physically removed and ``width_plan`` the shrunk shapes relative to the base model
        (:func:`chase_timm.slim.apply_width_plan`); masks have the shrunk shapes.
        """
        shrunk = self._shrunk()
        return {
            "step": self.step_count,
            "skipped_updates": self.skipped_updates,
            "unsynced_calls": self.unsynced_calls,
            "config": self.config.to_dict(),
            "masks": {n: m.bool().cpu() for n, m in self.masks.items()},
            "alive": {n: self._original_alive(n) for n in self.alive},
            "generator": self.generator.get_state(),
            **({"shrunk": shrunk, "width_plan": width_plan(self.module, self._base)} if shrunk else {}),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model and config must be the ones it was saved from.

        A state saved after :meth:`shrink` shrinks this Chase's (base) model the same way first, so load it
        before the model's and optimizer's own state dicts (a DDP wrapper is rebuilt in place).
        """
        saved_config = ChaseConfig.from_dict(state["config"])
        if saved_config != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in state["config"].items()
                    if getattr(self.config, k) != (tuple(v) if isinstance(v, list) else v)}
            raise ValueError(f"Chase state was saved with a different config (saved, current): {diff}. "
                             "Build Chase with ChaseConfig.from_dict(state['config']) to resume.")
        if set(state["alive"]) != set(self.alive):
            raise ValueError("Chase state's channel groups differ from this model's; load it into the model "
                             "and config it was saved from.")
        shrunk = {n: list(c) for n, c in state.get("shrunk", {}).items()}
        if shrunk != self._shrunk() and self._shrunk():
            raise ValueError("Chase state was saved at another shrink than this model's; load it into a freshly "
                             "built base model and Chase.")
        removals = tensor_removals(self.groups, shrunk) if shrunk != self._shrunk() else {}
        expected = {n: tuple(size - len(removals.get(n, {}).get(d, ())) for d, size in enumerate(shape))
                    for n, shape in self.shapes.items()}
        masks = state["masks"]
        wrong = sorted(set(masks) ^ set(self.masks)) or sorted(
            n for n in masks if tuple(masks[n].shape) != expected[n])
        if wrong:
            raise ValueError(f"Chase state does not match this model's sparse weights (first mismatches: {wrong[:5]}); "
                             "it was saved from a different architecture or an exported (slim) model.")
        if removals:
            self._shrink_channels(shrunk, self._copies)
        self.step_count = int(state["step"])
        self.skipped_updates = int(state["skipped_updates"])
        self.unsynced_calls = int(state.get("unsynced_calls", 0))  # absent in states saved before it existed
        self.masks = {n: masks[n].to(device=self.weights[n].device, dtype=self.weights[n].dtype) for n in masks}
        self.alive = {n: a.bool()[self._origin[n]] for n, a in state["alive"].items()}
        self.generator.set_state(state["generator"])
        self._refresh_channel_masks()
        self.apply_masks()

    # ------------------------------------------------------------------ inspection and export
    def stats(self) -> Dict[str, Any]:
        """Overall and per-layer density, channel sparsity and the current phase."""
        nnz = self._nnz_per_layer()
        total_nnz = sum(nnz.values())
        alive_channels = sum(int(a.sum()) for a in self.alive.values())
        t = self.step_count
        phase = "A" if t < self.config.phase_b_start_step else ("B" if self.config.phase_b else "frozen")
        return {
            "step": t,
            "phase": phase,
            "nnz": total_nnz,
            "budget": self.budget,
            "density": total_nnz / self.total_weights,
            "channels_total": self.channels_total,
            "channels_alive": alive_channels,
            "channel_sparsity": 1.0 - alive_channels / self.channels_total if self.channels_total else 0.0,
            "skipped_updates": self.skipped_updates,
            "layers": {n: {"density": nnz[n] / self.numel[n], "nnz": nnz[n], "numel": self.numel[n],
                           "erk_density": self.erk[n]} for n in self.masks},
            "kept_dense": dict(self.kept_dense),
        }

    def report(self) -> List[Dict[str, Any]]:
        """One row per channel group: widths before/after, UMM distribution of kept channels, why excluded."""
        scores = self._umm_scores()
        rows = []
        for group in self.groups:
            row = {"group": group.name, "width_before": self._base_width[group.name], "width_after": group.width,
                   "residual": group.residual, "prunable": group.name in self.alive, "reason": group.reason}
            if group.name in self.alive:
                alive = self.alive[group.name]
                kept = scores[group.name][alive]
                row.update(width_after=int(alive.sum()), floor=self.floors[group.name],
                           umm_min=float(kept.min()), umm_median=float(kept.median()), umm_max=float(kept.max()))
            elif group.prunable:
                row.update(prunable=False, reason="no Conv/Linear producer to score")
            rows.append(row)
        return rows

    def removed_channels(self) -> Dict[str, List[int]]:
        """Removed channel indices per group, numbered as in the original model (only groups that lost channels)."""
        removed = {n: (~self._original_alive(n)).nonzero().flatten().tolist() for n in self.alive}
        return {n: r for n, r in removed.items() if r}

    def _original_alive(self, name: str, present: bool = False) -> torch.Tensor:
        """Flags of a group's channels in the original numbering: alive, or (``present``) still in the model."""
        flags = torch.zeros(self._base_width[name], dtype=torch.bool)
        flags[self._origin[name]] = True if present else self.alive[name]
        return flags

    def _pending(self) -> Dict[str, List[int]]:
        """Removed channels still in the model (masked, not yet sliced out), numbered as the model is now."""
        return {n: (~a).nonzero().flatten().tolist() for n, a in self.alive.items() if not bool(a.all())}

    def _shrunk(self) -> Dict[str, List[int]]:
        """Channels physically removed so far, in the original numbering."""
        return {n: (~self._original_alive(n, present=True)).nonzero().flatten().tolist() for n, origin in
                self._origin.items() if origin.numel() < self._base_width[n]}

    def export(self, model: Optional[nn.Module] = None) -> nn.Module:
        """A new, physically slimmed copy of the model (same class and interface); the training model is untouched.

        ``model``: export another copy with the same parameter names instead, e.g. timm's ``ModelEmaV3``: the
        copy is masked (weights and removed channels) and sliced like the training model; ``model`` itself
        is untouched.
        """
        self._check_run_length()
        removals = tensor_removals(self.groups, self._pending())
        if model is None:
            return slim_copy(self.module, removals)
        clone = deepcopy_model(_copy_module(model))
        self.mask_model(clone)
        slice_in_place(clone, removals)
        return clone


def _copy_module(other: nn.Module) -> nn.Module:
    """The model inside a wrapped copy: timm's ModelEmaV2/V3 keep it in ``.module``."""
    other = unwrap_model(other)
    return unwrap_model(getattr(other, "module", other))


def _micro_steps_message(total: int, k: int, evidence: str) -> str:
    return (f"ChaseConfig.total_steps={total} looks counted in micro-steps ({evidence}) under gradient accumulation "
            f"over {k} steps; Chase counts optimizer steps, so its schedules would not finish. Use "
            f"total_steps=epochs * math.ceil(len(loader) / {k}).")
