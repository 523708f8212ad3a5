"""Shrinking vs masking from the same init, in float64: the one run the equivalence tests and the optimizer table use.

A shrinking run (``ChaseConfig(shrink="events")``) and an independent masking twin (``shrink="off"``) are built
separately from the same seed (same weights, same masks, same optimizer from ``timm.optim.create_optimizer_v2``
with its weight-decay parameter groups), trained on the same batches, and compared: the loss at every step, the
removed channels and masks, the weights and every per-parameter optimizer state tensor (the twin's cut as
``export()`` cuts the model), the eval outputs and the slim export, and optionally a registered timm EMA.

Tolerance: ``TOLERANCE = 1e-9`` relative. In float64 a correct shrinking run agrees with its twin to ~1e-12 (the
sliced and masked sums add the same non-zero terms, only in another order); a 1e-6 slip in one state tensor, or an
optimizer whose update depends on the tensor's size, shows up orders of magnitude above 1e-9.

Used by ``tests/test_shrink.py`` (the tests put ``recipes/`` on the path) and ``recipes/optimizer_table.py``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import timm
import timm.optim
import timm.utils
import torch
import torch.nn as nn
import torch.nn.functional as F

from chase_timm import Chase, ChaseConfig
from chase_timm.graph import tensor_removals
from chase_timm.optim_state import state_optimizer
from chase_timm.slim import sliced
from zoo_coverage import build as tiny_model, input_size

TOLERANCE = 1e-9
STEPS = 10
# a channel event every 2 steps from step 2 to 8 (4 shrinks), prune/regrow at steps 3, 6, 9 and the settling step 10
SCHEDULE = dict(total_steps=STEPS, update_interval=3, channel_interval=2, channel_offset=0, channel_end_step=8,
                channel_sparsity=0.5, min_channel_ratio=0.5)
WEIGHT_DECAY = 1e-4
BATCH = 8  # batch-2 BatchNorm on resnet18's 1x1 maps at 32 px amplifies rounding ~30x per step; 8 does not

Trio = Tuple[nn.Module, torch.optim.Optimizer, Chase]


def learning_rate(opt: str) -> Optional[float]:
    """0.01 for the SGD family (some of it has no default), otherwise the optimizer's own default."""
    base = opt.split("_")[-1]
    return 0.01 if "sgd" in base or base.startswith(("momentum", "nesterov")) else None


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Build and train in float64, so that every prune/regrow decision of the two runs is the same one."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """Per-parameter state, looking through timm's Lookahead (which keeps it in its base optimizer) with the
    library's one accessor; ``tests/test_optim_state.py`` checks that it finds Lookahead's moments and slow weights."""
    return state_optimizer(optimizer).state


def build(name: str, opt: str = "sgd", shrink: str = "events", channels_last: bool = False, **overrides) -> Trio:
    """Model (seeded), optimizer from ``create_optimizer_v2`` with weight decay, and Chase on the test schedule."""
    model = tiny_model(name)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = timm.optim.create_optimizer_v2(model, opt=opt, lr=learning_rate(opt),
                                               weight_decay=WEIGHT_DECAY)
    size = input_size(name)
    config = ChaseConfig(**{**SCHEDULE, "shrink": shrink, **overrides})
    return model, optimizer, Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, size, size))


def batch(step: int, size: int = 32, n: int = 2, num_classes: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch of a given step: identical in every process and every run."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def loss_step(model: nn.Module, optimizer: torch.optim.Optimizer, chase: Chase, step: int, size: int = 32,
              n: int = BATCH) -> float:
    """One documented training step (backward, optimizer.step(), chase.step(), zero_grad()); the loss.

    Second-order optimizers (timm's ``is_second_order``, e.g. AdaHessian) get ``backward(create_graph=True)``,
    as timm's train script gives them.
    """
    model.train()
    x, y = batch(step, size, n)
    loss = F.cross_entropy(model(x), y)
    loss.backward(create_graph=getattr(optimizer, "is_second_order", False))
    optimizer.step()
    chase.step()
    optimizer.zero_grad()
    return loss.item()


def rel_diff(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """max |a - b| over all pairs relative to max |b| over all of them (inf if shapes differ).

    One scale per kind of tensor (all weights, all ``exp_avg``, ...), not per tensor: a tensor that is zero up
    to rounding (a fresh BatchNorm's running mean) must not turn 1e-17 of noise into a relative 1.
    """
    diff, scale = 0.0, 0.0
    for a, b in pairs:
        if a.shape != b.shape:
            return math.inf
        if b.numel():
            diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(b.abs().max()))
    return diff / scale if scale > 0 else diff


def unmasked_state(chase: Chase, optimizer: torch.optim.Optimizer) -> List[str]:
    """State tensors shaped like their parameter that are non-zero where the parameter is masked (should be none)."""
    state = optimizer_state(optimizer)
    params = dict(chase.module.named_parameters())
    bad = []
    for name, mask in {**chase.masks, **chase.channels.channel_masks}.items():
        for key, value in state.get(params[name], {}).items():
            if torch.is_tensor(value) and value.shape == mask.shape and bool((value[mask == 0] != 0).any()):
                bad.append(f"{name} {key}")
    return bad


@dataclass
class Comparison:
    """What a shrinking run and its masking twin did; ``diffs`` holds relative differences by what was compared."""

    losses: List[float] = field(default_factory=list)
    twin_losses: List[float] = field(default_factory=list)
    widths: List[int] = field(default_factory=list)  # the shrinking model's parameter count at start, after each step
    removed: Dict[str, List[int]] = field(default_factory=dict)
    twin_removed: Dict[str, List[int]] = field(default_factory=dict)
    diffs: Dict[str, float] = field(default_factory=dict)
    masks_equal: bool = False
    unmasked_state: List[str] = field(default_factory=list)  # the twin's, after every step (masking only)
    refused: Optional[str] = None  # the ValueError that building the shrinking run raised
    error: Optional[str] = None  # what the shrinking run raised while training, and at which step
    run: Optional[Trio] = None  # (model, optimizer, chase) of the shrinking run
    twin_run: Optional[Trio] = None  # and of its masking twin

    @property
    def shrinks(self) -> int:
        """How many steps changed the shrinking run's width."""
        return sum(a != b for a, b in zip(self.widths, self.widths[1:]))

    @property
    def loss_diff(self) -> float:
        """Max relative loss difference over the steps run (inf if a loss is not finite)."""
        return max((abs(a - b) / max(abs(b), 1e-300) if math.isfinite(a) and math.isfinite(b) else math.inf
                    for a, b in zip(self.losses, self.twin_losses)), default=0.0)

    def worst(self) -> Tuple[str, float]:
        """The largest relative difference of anything compared, and what it was."""
        return max([("loss", self.loss_diff), *self.diffs.items()], key=lambda kv: kv[1])

    def exact(self) -> bool:
        """Same removed channels and masks, and everything within :data:`TOLERANCE` (relative)."""
        return (self.refused is None and self.error is None and self.removed == self.twin_removed
                and self.masks_equal and len(self.losses) == len(self.twin_losses) and self.worst()[1] <= TOLERANCE)


def compare(name: str, opt: str = "sgd", steps: int = STEPS, ema: bool = False, shrink: str = "events",
            batch_size: int = BATCH, **overrides) -> Comparison:
    """Train a masking twin, then the shrinking run from the same init, and compare them (call under float64).

    The twin's unmasked state is recorded after every step. A ValueError while building the shrinking run is
    recorded in ``refused``; an exception while training it in ``error`` (with the step): the table reports
    both, and :meth:`Comparison.exact` is false for either.
    """
    result = Comparison()
    size = input_size(name)
    result.twin_run = twin_trio = build(name, opt, shrink="off", **overrides)
    twin_ema = timm.utils.ModelEmaV3(twin_trio[0], decay=0.9) if ema else None
    if twin_ema is not None:  # registered in both runs: masked whenever the masks change, as documented
        twin_trio[2].register(twin_ema)
    for step in range(steps):
        result.twin_losses.append(loss_step(*twin_trio, step, size, batch_size))
        result.unmasked_state += [f"step {step + 1}: {b}" for b in unmasked_state(twin_trio[2], twin_trio[1])]
        if twin_ema is not None:
            twin_ema.update(twin_trio[0])
    try:
        result.run = trio = build(name, opt, shrink=shrink, **overrides)
    except ValueError as err:
        result.refused = str(err)
        return result
    model, optimizer, chase = trio
    own_ema = timm.utils.ModelEmaV3(model, decay=0.9) if ema else None
    if own_ema is not None:
        chase.register(own_ema)
    result.widths = [_numel(model)]
    try:
        for step in range(steps):
            result.losses.append(loss_step(*trio, step, size, batch_size))
            if own_ema is not None:
                own_ema.update(model)
            result.widths.append(_numel(model))
    except Exception as err:  # a crash after a shrink is a result here, not the end of the table
        result.error = f"step {len(result.losses) + 1}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return result
    twin_model, twin_opt, twin = twin_trio
    result.removed, result.twin_removed = chase.removed_channels(), twin.removed_channels()
    if result.removed != result.twin_removed:
        return result
    cut = tensor_removals(twin.channels.groups, result.twin_removed)  # the twin never shrank: its numbering is the original
    result.masks_equal = all(torch.equal(m, _cut(twin.masks[n], cut, n)) for n, m in chase.masks.items())
    # weights and buffers: the shrunk training model is the twin's slim export
    slim = twin.export()
    ours = dict(model.state_dict())
    result.diffs["weights"] = rel_diff((ours[k], v) for k, v in slim.state_dict().items() if v.is_floating_point())
    # every per-parameter optimizer state tensor shaped like its parameter, the twin's cut as the model is cut
    state, twin_state = optimizer_state(optimizer), optimizer_state(twin_opt)
    empty = torch.zeros(0)
    params, twin_params = dict(model.named_parameters()), dict(twin_model.named_parameters())
    for key in sorted({k for p in twin_params.values() for k, v in twin_state.get(p, {}).items()
                       if torch.is_tensor(v) and v.shape == p.shape}):
        pairs = [(state.get(params[n], {}).get(key, empty), _cut(twin_state[p][key], cut, n))
                 for n, p in twin_params.items() if key in twin_state.get(p, {})]
        result.diffs[f"state {key}"] = rel_diff(pairs)
    x = batch(100, size)[0]
    model.eval(), twin_model.eval()
    with torch.no_grad():
        reference = twin_model(x)
        result.diffs["outputs"] = rel_diff([(model(x), reference)])
        result.diffs["slim export outputs"] = rel_diff([(chase.export().eval()(x), reference)])
    if ema:
        ema_slim, twin_ema_slim = chase.export(own_ema).state_dict(), twin.export(twin_ema).state_dict()
        result.diffs["ema"] = rel_diff((ema_slim[k], v) for k, v in twin_ema_slim.items() if v.is_floating_point())
        result.diffs["ema shapes"] = 0.0 if {k: v.shape for k, v in own_ema.module.state_dict().items()} == \
            {k: v.shape for k, v in ours.items()} else math.inf
    return result


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cut(tensor: torch.Tensor, removals: Dict[str, Dict[int, List[int]]], name: str) -> torch.Tensor:
    """A tensor of the masked model's parameter ``name`` with the removed channels cut out, as export() cuts it."""
    return sliced(tensor, removals[name], name) if name in removals else tensor
