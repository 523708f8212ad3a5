"""What physically shrinking a training model needs besides the model: optimizer state and the DDP wrapper.

Shrinking keeps every ``nn.Parameter`` object (see :func:`chase_timm.slim.slice_in_place`), so the optimizer's
parameter lists stay valid; its per-parameter state (momentum, Adam moments, any tensor shaped like its
parameter, read through wrappers by :mod:`chase_timm.optim_state`) is cut the same way. A
``DistributedDataParallel`` wrapper fixes its reducer buckets to the parameter shapes at construction, so it
is rebuilt in place (same object, same settings, comm hooks re-registered) on every rank at the same step; the
caller's references to it stay valid. Everything is checked before anything changes.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ._timm import unwrap_model
from .adapters.ddp import check_rebuildable, rebuild_ddp
from .optim_state import param_states, replace_param_states
from .slim import sliced

__all__ = ["check_shrinkable", "slice_optimizer_state", "rebuild_ddp"]

Removals = Mapping[str, Mapping[int, Sequence[int]]]


def check_shrinkable(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                     params: Mapping[str, nn.Parameter], removals: Removals) -> None:
    """ValueError (nothing changed yet) if the wrapper can't be rebuilt or an optimizer state can't be cut."""
    inner = unwrap_model(model)
    if model is not inner and not (isinstance(model, DistributedDataParallel) and model.module is inner):
        raise ValueError(
            f"Chase can shrink a plain model or one wrapped by DistributedDataParallel (accelerator.prepare), not "
            f"{type(model).__name__}; shrink before wrapping (e.g. before torch.compile) or use ChaseConfig(shrink='off').")
    check_rebuildable(model)
    for name, param, value_name, value in _cut_states(optimizer, params, removals):
        if value.shape != param.shape:
            raise ValueError(
                f"optimizer state {value_name!r} of {name} has shape {tuple(value.shape)}, not the parameter's "
                f"{tuple(param.shape)}, so Chase cannot cut it when shrinking; use an optimizer whose state is "
                "shaped like its parameters (SGD, Adam, AdamW, ...) or ChaseConfig(shrink='off').")


def slice_optimizer_state(optimizer: Optional[torch.optim.Optimizer], params: Mapping[str, nn.Parameter],
                          removals: Removals) -> None:
    """Cut every per-parameter state tensor of the parameters in ``removals`` (call :func:`check_shrinkable` first)."""
    cut: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, param, value_name, value in _cut_states(optimizer, params, removals):
        cut.setdefault(id(param), {})[value_name] = sliced(value, removals[name], f"{name} {value_name}")
    for name, param in params.items():
        if id(param) in cut:
            replace_param_states(optimizer, param, cut.pop(id(param)))


def _cut_states(optimizer: Optional[torch.optim.Optimizer], params: Mapping[str, nn.Parameter], removals: Removals):
    """(name, parameter, state key, state tensor) for every non-scalar state tensor of a parameter being cut."""
    for name, dims in removals.items():
        param = params.get(name)
        if param is None or not dims:
            continue
        for value_name, value in param_states(optimizer, param):
            yield name, param, value_name, value

