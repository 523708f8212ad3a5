"""Chase hyperparameters: one validated dataclass, plain-data round trips, schedule helpers.

Every knob of the reference implementation is here with the paper's defaults (ImageNet ResNet-50 row:
d=0.1, S_c=0.4, beta=0.2). Step-valued knobs left as ``None`` are derived from ``total_steps`` so a short
run gets the same *shape* of schedule as the paper's 100-epoch run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

__all__ = ["ChaseConfig", "cosine_anneal"]

_SCOPES = ("global", "layerwise")
_FANIN_MODES = ("original", "alive")
_SHRINK_MODES = ("off", "events", "end")
_MASK_INITS = ("random", "magnitude")
_WIDTH_ROUNDINGS = ("none", "latency")
_CHANNEL_BUDGETS = ("per_kind", "pooled")
_CHANNEL_COSTS = ("none", "flops", "latency")
_LATENCY_LAYOUTS = ("channels_last", "nchw")
RAMP_FRACTION = 0.75  # default ramp length with mask_init="magnitude", as a fraction of total_steps (measured)
CHANNEL_START_IN_RAMP = 2 / 3  # default channel start, as a fraction of the ramp: the budget is within (1-d)/27 of d


def cosine_anneal(start: float, end: float, step: int, period: int) -> float:
    """``torch.optim.lr_scheduler.CosineAnnealingLR``'s curve from ``start`` to ``end`` over ``period`` steps."""
    if period <= 0:
        return end
    progress = min(max(step, 0), period) / period
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


@dataclass(kw_only=True)
class ChaseConfig:
    """All of Chase's knobs. Paper symbols in brackets; steps are optimizer steps.

    Attributes:
        total_steps: Length of the training run in optimizer steps (E·I).
        density: Overall unstructured density d of the sparse Conv/Linear weights (0.1 = 90 % sparse).
        soft_bound: p, the MEST soft memory bound: phase A grows to rho_t = cosine(d+p -> d+soft_bound_end).
        soft_bound_end: Extra density phase A anneals to (0 in the CIFAR scripts, 0.005 on ImageNet).
        update_interval: Delta T_p, steps between prune/regrow updates (default: 5 % of the run, at least
            10 (or the whole run if shorter), at most 1000).
        phase_b: After ``phase_b_start_step`` run fixed-density prune/regrow (RigL-like) instead of freezing.
        phase_b_start_step: T_dst, the phase A -> B switch (default 0.8·total_steps, i.e. epoch 80 of 100).
        phase_b_rate_start / phase_b_rate_end: Phase-B prune fraction, cosine over the whole run (0.5 -> 0.005).
        scope: ``"global"`` prune/grow ranks all layers together (CIFAR scripts); ``"layerwise"`` keeps
            per-layer ERK budgets (ImageNet script).
        exclude: fnmatch patterns of module names whose weights stay dense (e.g. ``"conv1"``, ``"head.*"``).
        channel_sparsity: S_c, final fraction of prunable channels removed (0 disables channel pruning).
        min_channel_ratio: beta; every group keeps at least floor(C·(1-S_c)·beta) channels.
        channel_interval: Delta T, steps between channel-pruning events (default: ``2 * update_interval``,
            at most the whole run).
        channel_offset: Channel events fire when (t + offset) % Delta T == 0 (default Delta T_p / 2).
        channel_end_step: T_c, channel sparsity reaches S_c here (default 0.8·total_steps).
        channel_round_to: Keep a multiple of this many channels per group (hardware-friendly widths).
        channel_budget: ``"per_kind"`` (default): internal channels, attention heads (``head_dim`` channels each)
            and, with ``prune_skip``, residual streams each lose S_c of their channels, ranked by UMM within the
            kind, because UMMs of different kinds are not comparable (``ChannelState.budget_pools``); ``"pooled"``:
            one global UMM ranking over all of them. The two are the same for a CNN without ``prune_skip``.
        channel_cost: ``"none"`` (the paper, the default): channels ranked by UMM alone; ``"flops"``: ranked by UMM
            divided by the FLOPs one channel of its group saves (``chase_timm.cost.FlopCosts``, recounted at every
            channel event), i.e. the least magnitude lost per FLOP saved, the channel count S_c unchanged: the
            same S_c removes more FLOPs (Swin-T, ResNet-50), at some accuracy cost at equal FLOPs (docs/speed.md);
            ``"latency"``: the same with the seconds a channel saves, measured on the model's device in the
            ``latency_*`` setting (``chase_timm.latency.LatencyCosts``; new widths are timed at every event).
        width_rounding: ``"none"`` (the paper: widths by UMM alone, the default) or ``"latency"``: at the event
            that reaches S_c, every group moves to the fastest nearby width (multiples of 8/16/32 either side)
            by layer latencies measured on the model's device (``chase_timm.latency``), floors kept and the
            total removed channels within S_c's count plus 0.5 % of the prunable channels.
        latency_batch_size / latency_img_size / latency_layout / latency_backward: the setting the latencies of
            ``width_rounding`` / ``channel_cost="latency"`` are measured in: batch size (32), square input size
            (default: the model's pretrained_cfg size), memory layout (``"channels_last"`` or ``"nchw"``), forward only (False) or forward + backward.
        latency_cache: JSON file the measured latencies are cached in (keyed by device, model, batch size,
            input size, layout and pass); None measures afresh every run.
        prune_skip: Also prune residual-stream groups as one unit (the paper's faster "prune skip").
        umm_fanin: UMM denominator: ``"original"`` fan-in (paper) or ``"alive"`` fan-in.
        seed: Seed of the generator behind initial masks and tie-breaking (same on every rank).
        discovery_timeout: Seconds allowed for channel-group discovery before the rest is skipped.
        shrink: Physically remove channels from the training model (and its optimizer state) during training:
            ``"off"`` (mask only, the default), ``"events"`` (after every channel event) or ``"end"`` (once, at
            ``channel_end_step``); see ``Chase.shrink``. Exact (the same run as masking) only under optimizers
            whose update ignores the tensor's size: others are refused (``chase_timm.optim_state``).
        mask_init: Initial masks: ``"random"`` (the paper's ERK-random draw, for training from scratch) or
            ``"magnitude"`` (the largest |w| of the model's own weights within each layer's ERK budget, for a
            pretrained start).
        ramp_steps: Length of the sparsity ramp: the active budget follows :meth:`density_at`, a cubic from
            1.0 (the dense pretrained start) down to ``density`` (gradual magnitude pruning, Zhu & Gupta 2017).
            0 is one-shot. Default: three quarters of the run with ``mask_init="magnitude"``, 0 with ``"random"``.
        channel_start_step: Channel sparsity starts rising after this step (default two thirds of ``ramp_steps``,
            at most ``channel_end_step - 1``: the cubic ramp's budget is then within (1 - d)/27 of d, so channels
            are scored on weights that are nearly at the final density, and several channel events remain).
    """

    total_steps: int
    density: float = 0.1
    soft_bound: float = 0.05
    soft_bound_end: float = 0.0
    update_interval: Optional[int] = None
    phase_b: bool = True
    phase_b_start_step: Optional[int] = None
    phase_b_rate_start: float = 0.5
    phase_b_rate_end: float = 0.005
    scope: str = "global"
    exclude: Tuple[str, ...] = ()
    channel_sparsity: float = 0.4
    min_channel_ratio: float = 0.2
    channel_interval: Optional[int] = None
    channel_offset: Optional[int] = None
    channel_end_step: Optional[int] = None
    channel_round_to: int = 1
    channel_budget: str = "per_kind"
    channel_cost: str = "none"
    width_rounding: str = "none"
    latency_batch_size: int = 32
    latency_img_size: Optional[int] = None
    latency_layout: str = "channels_last"
    latency_backward: bool = False
    latency_cache: Optional[str] = None
    prune_skip: bool = False
    umm_fanin: str = "original"
    seed: int = 0
    discovery_timeout: float = 60.0
    shrink: str = "off"
    mask_init: str = "random"
    ramp_steps: Optional[int] = None
    channel_start_step: Optional[int] = None

    def __post_init__(self) -> None:
        self.exclude = tuple(self.exclude) if not isinstance(self.exclude, str) else (self.exclude,)
        self._validate_given()
        self._derive_defaults()
        self._validate_steps()

    # ----------------------------------------------------------------- validation
    def _validate_given(self) -> None:
        _check_int("total_steps", self.total_steps, low=1)
        _check_range("density", self.density, 0.0, 1.0, low_open=True)
        _check_range("soft_bound", self.soft_bound, 0.0, 1.0 - self.density,
                     hint="density + soft_bound must not exceed 1")
        _check_range("soft_bound_end", self.soft_bound_end, 0.0, self.soft_bound,
                     hint="phase A anneals from density+soft_bound down to density+soft_bound_end")
        _check_range("phase_b_rate_start", self.phase_b_rate_start, 0.0, 1.0)
        _check_range("phase_b_rate_end", self.phase_b_rate_end, 0.0, self.phase_b_rate_start,
                     hint="the phase-B rate anneals downwards")
        _check_choice("scope", self.scope, _SCOPES)
        _check_choice("umm_fanin", self.umm_fanin, _FANIN_MODES)
        _check_choice("shrink", self.shrink, _SHRINK_MODES)
        _check_choice("mask_init", self.mask_init, _MASK_INITS)
        _check_range("channel_sparsity", self.channel_sparsity, 0.0, 1.0, high_open=True)
        _check_range("min_channel_ratio", self.min_channel_ratio, 0.0, 1.0, low_open=True)
        _check_int("channel_round_to", self.channel_round_to, low=1)
        _check_choice("width_rounding", self.width_rounding, _WIDTH_ROUNDINGS)
        _check_choice("channel_budget", self.channel_budget, _CHANNEL_BUDGETS)
        _check_choice("channel_cost", self.channel_cost, _CHANNEL_COSTS)
        _check_choice("latency_layout", self.latency_layout, _LATENCY_LAYOUTS)
        _check_int("latency_batch_size", self.latency_batch_size, low=1)
        if self.latency_img_size is not None:
            _check_int("latency_img_size", self.latency_img_size, low=1)
        if self.latency_cache is not None and not isinstance(self.latency_cache, str):
            raise ValueError(f"ChaseConfig.latency_cache must be a file path (str) or None, got {self.latency_cache!r}.")
        _check_int("seed", self.seed, low=0)
        _check_range("discovery_timeout", self.discovery_timeout, 0.0, math.inf, low_open=True)
        for flag in ("phase_b", "prune_skip", "latency_backward"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"ChaseConfig.{flag} must be true or false, got {getattr(self, flag)!r}.")
        if not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"ChaseConfig.exclude must be a list of non-empty module-name patterns, got {self.exclude!r}.")
        for name in ("update_interval", "channel_interval", "phase_b_start_step", "channel_end_step", "ramp_steps",
                     "channel_start_step"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0 if name.endswith(("_step", "_steps")) else 1)
        if self.channel_offset is not None:
            _check_int("channel_offset", self.channel_offset, low=0)

    def _derive_defaults(self) -> None:
        """Fill step knobs left as ``None`` from ``total_steps`` (the paper's values on long runs).

        ΔT_p: 5 % of the run (about 20 prune/regrow updates), at least 10 steps so grown weights can train,
        at most the paper's 1000. ΔT: two update intervals. Offset ΔT_p/2, so channel events fall between
        updates. T_dst and T_c: 80 % of the run (epoch 80 of 100), leaving the last fifth to recover.
        """
        t = self.total_steps
        if self.update_interval is None:
            self.update_interval = min(1000, max(t // 20, min(10, t)))
        if self.phase_b_start_step is None:
            self.phase_b_start_step = round(0.8 * t)
        if self.channel_interval is None:
            self.channel_interval = min(t, 2 * self.update_interval)
        if self.channel_offset is None:
            self.channel_offset = self.update_interval // 2 % self.channel_interval
        if self.channel_end_step is None:
            self.channel_end_step = max(1, round(0.8 * t))
        if self.ramp_steps is None:
            ramp = round(RAMP_FRACTION * t) if self.mask_init == "magnitude" else 0
            self.ramp_steps = ramp if self.phase_b else min(ramp, self.phase_b_start_step)  # updates stop there
        if self.channel_start_step is None:  # late in the ramp, but never so late that no channel event is left
            self.channel_start_step = min(round(CHANNEL_START_IN_RAMP * self.ramp_steps), self.channel_end_step - 1)

    def _validate_steps(self) -> None:
        t = self.total_steps
        _check_int("update_interval", self.update_interval, low=1, high=t,
                   hint="an update interval longer than the run would never update")
        _check_int("channel_interval", self.channel_interval, low=1, high=t)
        _check_int("channel_offset", self.channel_offset, low=0, high=self.channel_interval - 1,
                   hint="the offset shifts events inside one channel interval")
        _check_int("phase_b_start_step", self.phase_b_start_step, low=0, high=t,
                   hint="the phase A -> B switch must not come after the end of training")
        _check_int("channel_end_step", self.channel_end_step, low=1, high=t,
                   hint="channel pruning must end by total_steps")
        _check_int("ramp_steps", self.ramp_steps, low=0, high=t, hint="the sparsity ramp must end by total_steps")
        if self.channel_sparsity > 0:
            _check_int("channel_start_step", self.channel_start_step, low=0, high=self.channel_end_step - 1,
                       hint="channel pruning starts late in the sparsity ramp (default 2/3 of ramp_steps) and must "
                            "start before channel_end_step: shorten ramp_steps or set channel_start_step")
            start, end, off, every = self.channel_start_step, self.channel_end_step, self.channel_offset, \
                self.channel_interval
            if self.ramp_steps and (end - 1 + off) // every - (start + off) // every < 1:  # only the final event left
                warnings.warn(f"ChaseConfig: channel pruning runs only from step {start} to {end}, so one channel "
                              f"event removes all of channel_sparsity={self.channel_sparsity}; shorten ramp_steps "
                              "(or set channel_start_step earlier) or move channel_end_step later.", UserWarning,
                              stacklevel=4)
        if not self.phase_b and self.ramp_steps > self.phase_b_start_step:
            raise ValueError(f"ChaseConfig.ramp_steps={self.ramp_steps} ends after phase_b_start_step="
                             f"{self.phase_b_start_step} with phase_b=False, where updates stop: the ramp would stop "
                             "part-way. Shorten ramp_steps or keep phase_b=True.")

    # ----------------------------------------------------------------- schedules
    def grow_density(self, step: int) -> float:
        """rho_t: the density phase A regrows to (cosine from d+p to d+soft_bound_end over T_dst)."""
        return cosine_anneal(self.density + self.soft_bound, self.density + self.soft_bound_end,
                             step, self.phase_b_start_step)

    def phase_b_rate(self, step: int) -> float:
        """pi_t: phase-B prune fraction, cosine from 0.5 to 0.005 over the whole run."""
        return cosine_anneal(self.phase_b_rate_start, self.phase_b_rate_end, step, self.total_steps)

    def channel_sparsity_at(self, step: int) -> float:
        """s_t = S_c·(1 - (1 - (t - t_0)/(T_c - t_0))^3): the cubic (GMP) channel-sparsity schedule, from
        ``channel_start_step`` t_0 (0 in the paper) to ``channel_end_step`` T_c."""
        start = min(self.channel_start_step, self.channel_end_step - 1)
        progress = min(max(step - start, 0), self.channel_end_step - start) / (self.channel_end_step - start)
        return self.channel_sparsity * (1.0 - (1.0 - progress) ** 3)

    def density_at(self, step: int) -> float:
        """The active budget's density after ``step``: d + (1 - d)·(1 - t/T_ramp)^3, a cubic from 1.0 (dense) to d
        over ``ramp_steps`` (gradual magnitude pruning); always d without a ramp."""
        if self.ramp_steps == 0:
            return self.density
        progress = min(max(step, 0), self.ramp_steps) / self.ramp_steps
        return self.density + (1.0 - self.density) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Whether a prune/regrow update runs after optimizer step ``step`` (1-based)."""
        in_phase_a = step < self.phase_b_start_step
        return step % self.update_interval == 0 and (in_phase_a or self.phase_b) and step < self.total_steps

    def runs_update(self, step: int) -> bool:
        """Whether ``Chase.step()`` changes the masks by prune/regrow after ``step``: a scheduled update, or the
        settling update at ``total_steps`` that ends every run at exactly d·N."""
        return step == self.total_steps or self.is_update_step(step)

    def is_channel_step(self, step: int) -> bool:
        """Whether a channel-pruning event runs after optimizer step ``step`` (1-based).

        Events fire every ``channel_interval`` steps, shifted by ``channel_offset``, plus one at
        ``channel_end_step`` itself so the schedule lands exactly on S_c.
        """
        on_grid = (step + self.channel_offset) % self.channel_interval == 0
        return self.channel_sparsity > 0 and self.channel_start_step < step <= self.channel_end_step and (
            on_grid or step == self.channel_end_step)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_epochs(
            cls,
            *,
            epochs: float,
            steps_per_epoch: float,
            channel_end_epoch: Optional[float] = None,
            phase_b_epoch: Optional[float] = None,
            channel_interval_epochs: Optional[float] = 2.0,
            update_interval_epochs: Optional[float] = 1.0,
            total_steps: Optional[int] = None,
            **kwargs: Any,
    ) -> "ChaseConfig":
        """Build a config from epoch-valued schedule points, as the paper's scripts state them.

        ``steps_per_epoch`` counts optimizer steps (after data sharding and gradient accumulation); it may be
        fractional when a run is compressed into fewer steps. Defaults for short runs, in epochs: a
        prune/regrow update once per epoch (never more than the paper's 1000 steps apart) and a channel event
        every 2 epochs, the first one 1.5 epochs in (offset ΔT_p/2), so a warm-up of up to 1.5 epochs sees
        none; channel pruning and phase A end at 80 % of the run. Step-valued keyword arguments
        (``update_interval=1000``, ``channel_offset=...``) override the epoch-valued ones. ``total_steps``, when
        given, is the run's exact number of optimizer steps (a run capped at a step count: ``epochs ×
        steps_per_epoch`` of a fractional rate can round one below it); by default ``floor(epochs × steps_per_epoch)``.
        """
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, (int, float)) or not (
                steps_per_epoch > 0 and math.isfinite(steps_per_epoch)):
            raise ValueError(f"steps_per_epoch must be a positive number, got {steps_per_epoch!r}.")
        to_steps = lambda e: None if e is None else int(math.floor(e * steps_per_epoch))
        at_least_one = lambda e: None if e is None else max(1, to_steps(e))
        total = to_steps(epochs) if total_steps is None else total_steps
        if "update_interval" not in kwargs and update_interval_epochs is not None:
            kwargs["update_interval"] = min(1000, at_least_one(update_interval_epochs), max(1, total or 1))
        if "channel_interval" not in kwargs and channel_interval_epochs is not None:
            kwargs["channel_interval"] = min(at_least_one(channel_interval_epochs), max(1, total or 1))
        return cls(total_steps=total, channel_end_step=at_least_one(channel_end_epoch),
                   phase_b_start_step=to_steps(phase_b_epoch), **kwargs)

    # ----------------------------------------------------------------- round trips
    def to_dict(self) -> dict:
        """Plain-data view (all derived defaults resolved), JSON/YAML safe."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["exclude"] = list(self.exclude)
        return out

    def __new__(cls, *args: Any, **kwargs: Any) -> "ChaseConfig":
        """An unknown field (usually a typo) is a TypeError that lists the valid ones (when the dataclass ``__init__``
        takes the arguments, not a subclass's own)."""
        owner = next(k for k in cls.__mro__ if "__init__" in vars(k))
        unknown = _unknown_fields(owner, kwargs) if "__dataclass_fields__" in vars(owner) else ""
        if unknown:
            raise TypeError(unknown)
        return super().__new__(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ChaseConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        unknown = _unknown_fields(cls, data)
        if unknown:
            raise ValueError(unknown)
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ChaseConfig":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "ChaseConfig":
        import yaml
        return cls.from_dict(yaml.safe_load(text) or {})


def _check_int(name: str, value: Any, *, low: int, high: Optional[int] = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"ChaseConfig.{name} must be {allowed}, got {value!r}." + (f" ({hint})" if hint else ""))


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False, hint: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"ChaseConfig.{name} must be in {interval}, got {value!r}." + (f" ({hint})" if hint else ""))


def _check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ChaseConfig.{name} must be one of {list(choices)}, got {value!r}.")


def _unknown_fields(cls: type, names: Mapping[str, Any]) -> str:
    """The error message for keys of ``names`` that are not fields of ``cls`` ("" when all are)."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(names) - known)
    return f"Unknown ChaseConfig field(s) {unknown}; valid fields are {sorted(known)}." if unknown else ""
