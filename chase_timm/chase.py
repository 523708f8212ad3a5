"""The ``Chase`` controller: the verbs of channel-aware dynamic sparse training over a model and its optimizer.

Shaped like ``torch.ao.pruning``'s sparsifier: a small verb set (``step``, ``shrink``, ``register``, ``state_dict``,
``load_state_dict``, ``stats``, ``report``, ``export``) over masks that are plain tensors, not module buffers (DDP
would overwrite buffers from rank 0 and hide a divergence). The policies live in their modules: the masks and
their d·N budget (phase A / B arithmetic) in :mod:`chase_timm.budget`, which channels are alive or removed in
:mod:`chase_timm.channels`; Chase keeps the counters and applies their decisions to the model, its optimizer
state and registered copies.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .budget import MaskBudget
from .channels import ChannelState
from .config import ChaseConfig
from .cost import FlopCosts
from .graph import as_inputs, find_channel_groups, tensor_removals
from .latency import LatencyCosts, LatencyRounding, LatencyTable
from .norms import attach as attach_norms, follow_masks, remove_hooks
from .optim_state import check_shrink_exact, state_optimizer, states_like
from ._timm import deepcopy_model, named_tensors, unwrap_model
from .shrink import check_shrinkable, rebuild_ddp, slice_optimizer_state
from .slim import slice_in_place, slim_copy, sliced
from .sparsity import find_sparse_weights, zero_positions

__all__ = ["Chase"]


class Chase:
    """Channel-aware dynamic sparse training for a (possibly DDP/Accelerate-wrapped) model.

    Call order, every optimizer step::

        optimizer.step()
        chase.step()          # after optimizer.step(), before zero_grad(): regrowth ranks this batch's gradients
        ema.update(model)     # a registered EMA (chase.register(ema)): after chase.step(), never before
        optimizer.zero_grad()

    Under Accelerate gradient accumulation, micro-steps without a gradient sync and fp16 steps skipped on
    overflow are not counted, so ``config.total_steps`` counts optimizer steps; a step without gradients and a
    ``total_steps`` that looks counted in micro-steps are warned about once.

    Copies registered with :meth:`register` (timm's ``ModelEmaV3``) shrink with the model and are masked by
    :meth:`step` whenever the masks change, before the EMA's own update: ``ema.update`` then blends a model
    whose inactive weights are 0 into an EMA whose inactive weights are 0, so they stay exactly 0 and every
    active entry is what masking after the update would give. Calling ``ema.update`` *before* ``chase.step()``
    blends the optimizer's not-yet-masked values in (non-zeros where the masks are 0, kept until the masks next
    change); the first step warns about it.

    To resume, load Chase's state before the model's and optimizer's (a state saved after a shrink first shrinks
    the freshly built model): :func:`chase_timm.training.load_checkpoint` does it in that order.

    Read-only views: ``module`` (the unwrapped model), ``optimizer``, ``weights`` (the sparse Conv/Linear weights
    by name), ``masks`` (their 0/1 masks), ``budget`` (d·N active weights of the original model),
    ``total_weights`` (N), ``step_count`` (optimizer steps counted), ``accumulation_steps`` (Accelerate's
    gradient-accumulation factor) and ``channels`` (a :class:`~chase_timm.channels.ChannelState`: groups, alive
    channels, floors, channel masks). ``config`` may be replaced by an edited copy (``dataclasses.replace``) to
    change the schedule of the steps still to come.

    Args:
        model: a timm (or any) model; DDP / ``accelerator.prepare`` / ``torch.compile`` wrappers are unwrapped.
        config: the :class:`ChaseConfig`.
        optimizer: the optimizer that owns the model's parameters (also inside Accelerate's wrapper or timm's
            ``Lookahead``); its per-parameter state shaped like the parameter (momentum, Adam moments, Lookahead's
            slow weights, list entries such as Kron's) is masked with the weights, so regrown weights start from
            zero state. State of another shape (Adafactor's factored statistics, Kron's preconditioners) is left
            as it is. With ``config.shrink != "off"`` and ``channel_sparsity > 0`` an optimizer whose update depends
            on the tensor's size is refused (ValueError) and one never checked is warned about
            (:mod:`chase_timm.optim_state`).
        example_inputs: input used to trace channel coupling (default: one image of the model's input size).
    """

    def __init__(self, model: nn.Module, config: ChaseConfig, optimizer: Optional[torch.optim.Optimizer] = None,
                 example_inputs: Optional[torch.Tensor] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Chase wraps a torch.nn.Module (e.g. timm.create_model('resnet50')), got "
                            f"{type(model).__name__}.")
        if not isinstance(config, ChaseConfig):
            raise TypeError(f"config must be a chase_timm.ChaseConfig, got {type(config).__name__}.")
        self._model = model
        self._module = unwrap_model(model)
        self.config = config
        self._optimizer = optimizer
        self._params: Dict[str, nn.Parameter] = dict(self._module.named_parameters())
        self._weights, self._kept_dense = find_sparse_weights(self._module, config.exclude)
        if not self._weights:
            raise ValueError(
                f"{type(self._module).__name__} has no Conv/Linear weight to sparsify (or ChaseConfig.exclude "
                "covers them all); Chase needs at least one.")
        self._check_optimizer_owns_weights()
        if config.shrink != "off" and config.channel_sparsity > 0:
            check_shrink_exact(optimizer)
        self._generator = torch.Generator().manual_seed(config.seed)
        if config.mask_init == "magnitude" and config.density_at(0) < 1:  # masks from the weights: equal on every rank
            _check_weights_agree(self._weights)
        self._budget = MaskBudget(self._weights, config.density, self._generator, config.mask_init,
                                  config.density_at(0))
        groups = (find_channel_groups(self._module, example_inputs, prune_skip=config.prune_skip,
                                      timeout=config.discovery_timeout) if config.channel_sparsity > 0 else [])
        self._channels = ChannelState(self._module, groups, config.channel_sparsity, config.min_channel_ratio,
                                      config.channel_round_to, config.channel_budget)
        attach_norms(self._module, {s.tensor for g in self._channels.prunable for s in g.slices})
        if groups and not self._channels.prunable:
            reasons = Counter(g.reason or "no Conv/Linear producer to score" for g in groups)
            warnings.warn(f"channel_sparsity={config.channel_sparsity} but none of the {len(groups)} channel groups of "
                          f"{type(self._module).__name__} can be removed (most often: {reasons.most_common(1)[0][0]}), "
                          "so Chase trains with unstructured sparsity only; chase.report() gives each group's reason.",
                          stacklevel=2)
        table = (LatencyTable(self._module, config.latency_batch_size, config.latency_img_size, config.latency_layout,
                              backward=config.latency_backward, cache=config.latency_cache)
                 if groups and "latency" in (config.channel_cost, config.width_rounding) else None)
        if config.channel_cost == "flops" and groups:
            self._channels.channel_cost = FlopCosts(self._module, as_inputs(self._module, example_inputs))
        elif config.channel_cost == "latency" and groups:
            self._channels.channel_cost = LatencyCosts(self._module, table)
        if config.width_rounding == "latency" and groups:
            self._channels.width_policy = LatencyRounding(self._module, table, round_to=config.channel_round_to)
        self._copies: List[nn.Module] = []
        if config.shrink != "off" and config.channel_sparsity > 0:  # only then is there anything to shrink
            check_shrinkable(model, None, {}, {})
        self._step_count = 0
        self._skipped_updates = 0
        self._unsynced_calls = 0  # step() calls that were not optimizer steps (micro-steps, fp16 skips)
        self._warned: set = set()
        if optimizer is not None:  # the optimizer that steps (inside Lookahead's and Accelerate's wrappers)
            state_optimizer(optimizer).register_step_pre_hook(self.mask_gradients)
        self.apply_masks()

    # ------------------------------------------------------------------ read-only views
    @property
    def module(self) -> nn.Module:
        """The unwrapped model Chase masks and shrinks."""
        return self._module

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer whose state is masked and sliced with the weights."""
        return self._optimizer

    @property
    def weights(self) -> Mapping[str, nn.Parameter]:
        """The sparse Conv/Linear weights by parameter name."""
        return MappingProxyType(self._weights)

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """0/1 mask of every sparse weight (its dtype and device; shrunk with the model)."""
        return MappingProxyType(self._budget.masks)

    @property
    def budget(self) -> int:
        """Active weights every update returns to: d·N of the original model (during a sparsity ramp,
        ``config.density_at(t)``·N at the last update)."""
        return self._budget.budget

    @property
    def total_weights(self) -> int:
        """N: the sparse weights' element count in the original model."""
        return self._budget.total

    @property
    def step_count(self) -> int:
        """Optimizer steps counted so far (micro-steps and skipped fp16 steps are not)."""
        return self._step_count

    @property
    def accumulation_steps(self) -> int:
        """Accelerate's gradient-accumulation factor (1 without Accelerate or accumulation)."""
        gradient_state = getattr(self._optimizer, "gradient_state", None)
        return int(getattr(gradient_state, "num_steps", 1) or 1)

    @property
    def channels(self) -> ChannelState:
        """Channel groups, alive and removed channels, floors and channel masks (read, don't write)."""
        return self._channels

    # ------------------------------------------------------------------ training
    def step(self) -> None:
        """Advance one optimizer step: re-mask, then run a channel event and/or a prune/regrow update if due.

        Step ``total_steps`` always ends with a settling update, so every run ends at exactly d·N active weights.
        """
        if not self._optimizer_stepped():
            self._unsynced_calls += 1
            return
        self._step_count += 1
        t = self._step_count
        if t == 1:
            self._check_total_steps_unit()
            self._check_copies_masked()
        self.apply_masks()
        channel_event = bool(self._channels.prunable) and self.config.is_channel_step(t)
        if channel_event:
            self._prune_channels(t)
        if self.config.runs_update(t):
            self._update_connections(t)
        if channel_event and self.config.shrink != "off" and (
                self.config.shrink == "events" or t == self.config.channel_end_step):
            self._shrink_in_step()
        if self.config.runs_update(t) or self.config.is_channel_step(t):  # the masks may have changed
            for copy in self._copies:
                self.mask_model(copy)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero inactive weights, removed channels and the optimizer state behind them."""
        channel_masks = self._channels.channel_masks
        targets = [self._weights[n] for n in self._budget.masks] + [self._params[n] for n in channel_masks]
        multipliers = list(self._budget.masks.values()) + list(channel_masks.values())
        torch._foreach_mul_(targets, multipliers)
        if self.optimizer is None:
            return
        for param, mask in zip(targets, multipliers):
            for value in states_like(self.optimizer, param):
                value.mul_(mask)

    @torch.no_grad()
    def mask_gradients(self, *_: Any) -> None:
        """Zero the gradients of removed channels still in the model (masking, or until ``shrink="end"``), which the
        shrunk model does not have. A removed channel's consumer weights get a gradient wherever its input is not 0
        (an activation with f(0) != 0: StarReLU's bias, a sigmoid), and a norm over a tensor or over all gradients
        (Lamb's trust ratio and global clipping, LARS, ``clip_grad_norm_``) would count it. Runs before every step
        of the optimizer Chase was given (a step pre-hook); call it yourself before clipping gradients."""
        masks = {**self._channels.allowed, **self._channels.channel_masks}
        grads = [(self._params[n].grad, m) for n, m in masks.items() if self._params[n].grad is not None]
        if grads:
            torch._foreach_mul_([g for g, _ in grads], [m.to(g.dtype) for g, m in grads])

    @torch.no_grad()
    def mask_model(self, other: nn.Module) -> None:
        """Apply the current masks to another copy of the model with the same names (e.g. timm's ModelEma)."""
        params = dict(_copy_module(other).named_parameters())
        masks = {**self._budget.masks, **self._channels.channel_masks}
        wrong = next((n for n, m in masks.items() if n not in params or params[n].shape != m.shape), None)
        if wrong is not None:
            found = tuple(params[wrong].shape) if wrong in params else "missing"
            raise ValueError(
                f"{type(other).__name__} does not match the training model: {wrong} is {found}, not "
                f"{tuple(masks[wrong].shape)}. Pass a copy of this model (e.g. its EMA); when the model shrinks "
                "during training, register the copy first (chase.register(ema)) so it shrinks along.")
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))
        follow_masks(_copy_module(other), self._channels.channel_masks)  # norms over the alive channels

    def _check_optimizer_owns_weights(self) -> None:
        """The optimizer must hold the sparse weights, else their state can't be masked (and they don't train)."""
        if self._optimizer is None:
            return
        owned = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
        missing = [n for n, w in self._weights.items() if id(w) not in owned]
        if missing:
            raise ValueError(
                f"The optimizer does not own {len(missing)} of the model's Conv/Linear weights (e.g. {missing[:3]}). "
                "Create the optimizer from this model's parameters (after any model surgery) before building Chase.")

    def _optimizer_stepped(self) -> bool:
        """False for Accelerate micro-steps without gradient sync and for fp16 steps skipped on overflow."""
        opt = self._optimizer
        gradient_state = getattr(opt, "gradient_state", None)
        if gradient_state is not None and not gradient_state.sync_gradients:
            return False
        return not getattr(opt, "step_was_skipped", False)

    def _warn_once(self, key: str, message: str) -> None:
        """One warning per kind and Chase instance (misuse is reported, never repeated every step)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)  # the caller of step() / export()

    def _check_total_steps_unit(self) -> None:
        """At the first optimizer step: warn if total_steps is whole epochs of micro-batches, not of optimizer steps.

        Under accumulation over k micro-steps an epoch of L micro-batches has ceil(L/k) optimizer steps
        (Accelerate syncs at the end of the loader). A total that is a multiple of L but not of ceil(L/k)
        can only be epochs counted in micro-batches. (When k divides L the two readings coincide at the
        start; :meth:`export` then checks what actually ran.)
        """
        k = self.accumulation_steps
        loader = getattr(getattr(self._optimizer, "gradient_state", None), "active_dataloader", None)
        length = len(loader) if k > 1 and loader is not None and hasattr(loader, "__len__") else 0
        total = self.config.total_steps
        if length and total % length == 0 and total % math.ceil(length / k):
            self._warn_once("micro_steps", _micro_steps_message(total, k, f"{total // length} epochs of {length} "
                                                                     "micro-batches"))

    @torch.no_grad()
    def _check_copies_masked(self) -> None:
        """At the first optimizer step: warn if a registered copy was updated before chase.step() (it then holds
        non-zeros where the masks are 0, which only an EMA updated from the not-yet-masked model can)."""
        masks = {**self._budget.masks, **self._channels.channel_masks}
        for copy in self._copies:
            params = dict(_copy_module(copy).named_parameters())
            if any(bool(params[n][m.to(params[n].device) == 0].any()) for n, m in masks.items()):
                self._warn_once("copy_order", (
                    f"a registered {type(copy).__name__} has non-zero weights where Chase's masks are 0 at the first "
                    "step: call ema.update(model) after chase.step(), which masks registered copies when the masks "
                    "change; updated before it, the EMA averages the optimizer's unmasked values in."))

    def _check_run_length(self) -> None:
        """At export: warn if chase.step() was called exactly total_steps times but fewer were optimizer steps."""
        k, total, steps = self.accumulation_steps, self.config.total_steps, self._step_count
        if k > 1 and steps < total == steps + self._unsynced_calls:
            self._warn_once("micro_steps", _micro_steps_message(
                total, k, f"chase.step() ran {total} times but only {steps} were optimizer steps"))

    # ------------------------------------------------------------------ channel removal
    def _prune_channels(self, t: int) -> None:
        """Remove the globally lowest-UMM channels so that channel sparsity follows the cubic schedule."""
        if not self._channels.remove_lowest(self._params, self.config.channel_sparsity_at(t), self.config.umm_fanin,
                                            self._generator, self.config.channel_round_to):
            return
        self._refresh_channel_masks()
        self.apply_masks()
        self._check_ranks_agree(t)

    def _refresh_channel_masks(self) -> None:
        """Recompute the channel masks F from the alive channels and AND them into the sparse masks."""
        self._channels.refresh_masks(self._params, self._weights)
        self._budget.restrict(self._channels.allowed)
        follow_masks(self._module, self._channels.channel_masks)  # LayerNorm/RMSNorm/GRN over the alive channels

    # ------------------------------------------------------------------ connection updates
    @torch.no_grad()
    def _update_connections(self, t: int) -> None:
        """One prune/regrow update (:meth:`MaskBudget.update`), new weights and their optimizer state from zero."""
        grads = {n: (w.grad if w.grad is not None else torch.zeros_like(w)) for n, w in self._weights.items()}
        norms = torch.stack(torch._foreach_norm(list(grads.values())))
        if not bool(torch.isfinite(norms).all()):
            self._skipped_updates += 1  # e.g. an fp16 overflow step: a ranking on inf/nan would be noise
            return
        if not bool(norms.any()):
            self._warn_once("no_grad", (
                f"chase.step() found no gradients at update step {t} (all None or zero), so regrowth picks "
                "random positions. Call chase.step() after optimizer.step() and before optimizer.zero_grad()."))
        grown = self._budget.update(t, self.config, grads)
        for name, positions in grown.items():
            weight = self.weights[name]
            zero_positions([weight, *states_like(self.optimizer, weight)], positions)
        self.apply_masks()
        self._check_ranks_agree(t)

    def _check_ranks_agree(self, t: int) -> None:
        """Fail loudly if the masks differ across ranks (cheap: a few integers per layer, all-reduced)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        masks = self._budget.masks
        device = next(iter(masks.values())).device
        signature = torch.tensor(
            [v for m in masks.values() for v in (int(m.count_nonzero()), int(m.flatten().nonzero().sum()))]
            + [int(a.sum()) for a in self._channels.alive.values()], dtype=torch.int64, device=device)
        low, high = signature.clone(), signature.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(
                f"Chase masks differ across ranks after step {t}. Every rank must build Chase with the same "
                "config (seed) and call chase.step() after every optimizer step with synchronised gradients.")

    # ------------------------------------------------------------------ physical shrinking
    def register(self, *copies: nn.Module) -> None:
        """Copies with the same parameter names (e.g. timm's ``ModelEmaV3``) that shrink along with the model and
        are masked now and whenever the masks change (see the call order in the class docstring).

        Raises ValueError, registering nothing, for a copy whose shapes differ from the training model's.
        """
        for copy in copies:
            self.mask_model(copy)
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
        removed = self._channels.pending()
        if removed:
            self._shrink_channels(removed, [*self._copies, *copies])
        return self._model

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
        removals = tensor_removals(self._channels.groups, removed)
        check_shrinkable(self._model, self.optimizer, self._params, removals)
        targets = [_copy_module(c) for c in copies]
        current = {n: t.shape for n, t in named_tensors(self._module)}
        for target in targets:
            theirs = {n: t.shape for n, t in named_tensors(target)}
            wrong = [n for n in removals if theirs.get(n) != current[n]]
            if wrong:
                raise ValueError(f"{type(target).__name__} given to Chase.shrink has no tensor {wrong[0]} shaped like "
                                 "the training model's; pass copies of this model (e.g. its EMA) only.")
        self._channels.record_shrink(self._module, removed)
        grads = {n: sliced(p.grad, removals[n], n) for n, p in self._params.items()
                 if n in removals and p.grad is not None}
        slice_optimizer_state(self.optimizer, self._params, removals)
        slice_in_place(self._module, removals)
        for name, grad in grads.items():
            self._params[name].grad = grad
        for target in targets:
            slice_in_place(target, removals)
        self._budget.slice(removals)
        self._refresh_channel_masks()  # channel masks only for removed channels still in the model (none after shrink())
        for target in targets:
            follow_masks(target, self._channels.channel_masks)
        rebuild_ddp(self._model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (plain tensors and numbers; loads with ``weights_only=True``).

        Channels are numbered as in the original model. After :meth:`shrink`, ``shrunk`` lists the channels
        physically removed and ``width_plan`` the shrunk shapes relative to the base model
        (:func:`chase_timm.slim.apply_width_plan`); masks have the shrunk shapes.
        """
        channels = self._channels.state_dict(self._module)
        return {
            "step": self._step_count,
            "skipped_updates": self._skipped_updates,
            "unsynced_calls": self._unsynced_calls,
            "config": self.config.to_dict(),
            "masks": {n: m.bool().cpu() for n, m in self._budget.masks.items()},
            "budget": self._budget.budget,  # during a sparsity ramp: density_at(the last update step)·N
            "alive": channels.pop("alive"),
            "generator": self._generator.get_state(),
            "channel_unit": "channels",  # S_c counts a tied class as its channels (states before: as one)
            "streams": "skips",  # only groups with a skip are residual streams (states before: any add or concat)
            **channels,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model and config must be the ones it was saved from.

        A state saved after :meth:`shrink` shrinks this Chase's (base) model and registered copies the same way
        first, so load it before the model's and optimizer's own state dicts (a DDP wrapper is rebuilt in place);
        :func:`chase_timm.training.load_checkpoint` keeps that order.
        """
        saved = {"channel_budget": "pooled", **state["config"]}  # states from before channel_budget: one ranking
        if ChaseConfig.from_dict(saved) != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in saved.items()
                    if getattr(self.config, k) != (tuple(v) if isinstance(v, list) else v)}
            raise ValueError(f"Chase state was saved with a different config (saved, current): {diff}. Build Chase "
                             "with ChaseConfig.from_dict(state['config']) to resume (a state without channel_budget "
                             "was saved with channel_budget='pooled').")
        merges = [g.name for g in self._channels.prunable if g.merges] if "streams" not in state else []
        if set(state["alive"]) != set(self._channels.alive):
            if merges and set(state["alive"]) < set(self._channels.alive):
                raise ValueError(f"Chase state was saved before groups whose adds or concats only merge branches "
                                 f"became prunable without prune_skip ({len(merges)} here, e.g. {merges[0]!r}); "
                                 "resume it with the chase_timm release that saved it, or start the run again.")
            raise ValueError("Chase state's channel groups differ from this model's; load it into the model "
                             "and config it was saved from.")
        if merges and self.config.channel_budget == "per_kind":
            warnings.warn(f"this Chase state was saved when groups whose adds or concats only merge branches were "
                          f"ranked with the residual streams ({len(merges)} here, e.g. {merges[0]!r}); they now rank "
                          "with the internal channels, so the rest of the run can remove other channels than the "
                          "release that saved it would; resume with that release to keep its picks.", stacklevel=2)
        shrunk, now = {n: list(c) for n, c in state.get("shrunk", {}).items()}, self._channels.shrunk()
        if shrunk != now and now:
            raise ValueError("Chase state was saved at another shrink than this model's; load it into a freshly "
                             "built base model and Chase.")
        removals = tensor_removals(self._channels.groups, shrunk) if shrunk != now else {}
        expected = {n: tuple(size - len(removals.get(n, {}).get(d, ())) for d, size in enumerate(shape))
                    for n, shape in self._budget.shapes.items()}
        masks = state["masks"]
        wrong = sorted(set(masks) ^ set(self._budget.masks)) or sorted(
            n for n in masks if tuple(masks[n].shape) != expected[n])
        if wrong:
            raise ValueError(f"Chase state does not match this model's sparse weights (first mismatches: {wrong[:5]}); "
                             "it was saved from a different architecture or an exported (slim) model.")
        if removals:
            self._shrink_channels(shrunk, self._copies)
        self._step_count = int(state["step"])
        self._skipped_updates = int(state["skipped_updates"])
        self._unsynced_calls = int(state.get("unsynced_calls", 0))  # absent in states saved before it existed
        self._budget.load(masks)
        if "budget" in state:
            self._budget.budget = int(state["budget"])
        else:  # a state saved before the ramp existed: no ramp, so d·N
            self._budget.follow(self._step_count, self.config)
        self._channels.load_alive(state["alive"])
        if "channel_unit" not in state and any(g.unit > 1 and not g.heads for g in self._channels.prunable):
            warnings.warn("this Chase state was saved before S_c counted a class of tied channels (grouped conv, "
                          "GroupNorm, gate pair) as its channels: the channels it removed stay removed and the rest of "
                          "the run counts channels, so the final channel sparsity can differ from S_c; resume it with "
                          "the chase_timm release that started it to keep the old count.", stacklevel=2)
        self._generator.set_state(state["generator"])
        self._refresh_channel_masks()
        self.apply_masks()
        for copy in self._copies:
            self.mask_model(copy)

    # ------------------------------------------------------------------ inspection and export
    def stats(self) -> Dict[str, Any]:
        """Overall and per-layer density, channel sparsity and the current phase."""
        budget, nnz = self._budget, self._budget.nnz()
        total_nnz = sum(nnz.values())
        alive_channels, channels_total = self._channels.alive_count(), self._channels.total
        t = self._step_count
        phase = "A" if t < self.config.phase_b_start_step else ("B" if self.config.phase_b else "frozen")
        return {
            "step": t,
            "phase": phase,
            "nnz": total_nnz,
            "budget": budget.budget,
            "density": total_nnz / budget.total,
            "channels_total": channels_total,
            "channels_alive": alive_channels,
            "channel_sparsity": 1.0 - alive_channels / channels_total if channels_total else 0.0,
            "skipped_updates": self._skipped_updates,
            "layers": {n: {"density": nnz[n] / budget.numel[n], "nnz": nnz[n], "numel": budget.numel[n],
                           "erk_density": budget.erk[n]} for n in budget.masks},
            "kept_dense": dict(self._kept_dense),
        }

    def report(self) -> List[Dict[str, Any]]:
        """One row per channel group: widths before/after, UMM distribution of kept channels, why excluded."""
        return self._channels.report(self._params, self.config.umm_fanin)

    def removed_channels(self) -> Dict[str, List[int]]:
        """Removed channel indices per group, numbered as in the original model (only groups that lost channels)."""
        return self._channels.removed()

    def export(self, model: Optional[nn.Module] = None) -> nn.Module:
        """A new, physically slimmed copy of the model (same class and interface); the training model is untouched.

        ``model``: export another copy with the same parameter names instead, e.g. timm's ``ModelEmaV3``: the
        copy is masked (weights and removed channels) and sliced like the training model; ``model`` itself
        is untouched.
        """
        self._check_run_length()
        removals = tensor_removals(self._channels.groups, self._channels.pending())
        if model is None:
            return remove_hooks(slim_copy(self._module, removals))  # a plain timm model, no chase_timm.norms hooks
        clone = deepcopy_model(_copy_module(model))
        self.mask_model(clone)
        slice_in_place(remove_hooks(clone), removals)
        return clone


def _check_weights_agree(weights: Mapping[str, nn.Parameter]) -> None:
    """Masks drawn from weights are rank-identical only if the weights are: fail clearly if they differ across ranks
    (cheap: two float64 sums per layer, all-reduced as min and max)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = next(iter(weights.values())).device
    signature = torch.stack([s for w in weights.values() for s in (w.detach().double().sum(),
                                                                    w.detach().double().abs().sum())]).to(device)
    low, high = signature.clone(), signature.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        first = list(weights)[int((low != high).nonzero()[0]) // 2]
        raise RuntimeError(
            f"ChaseConfig(mask_init='magnitude') draws the masks from the weights, but they differ across ranks "
            f"(first: {first}). Load the same checkpoint on every rank, or build Chase after accelerator.prepare / "
            "DDP (which broadcasts rank 0's weights).")


def _copy_module(other: nn.Module) -> nn.Module:
    """The model inside a wrapped copy: timm's ModelEmaV2/V3 keep it in ``.module``."""
    other = unwrap_model(other)
    return unwrap_model(getattr(other, "module", other))


def _micro_steps_message(total: int, k: int, evidence: str) -> str:
    return (f"ChaseConfig.total_steps={total} looks counted in micro-steps ({evidence}) under gradient accumulation "
            f"over {k} steps; Chase counts optimizer steps, so its schedules would not finish. Use "
            f"total_steps=epochs * math.ceil(len(loader) / {k}).")
