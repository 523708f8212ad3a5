"""What physically shrinking a training model needs besides the model: optimizer state and the DDP wrapper.

Shrinking keeps every ``nn.Parameter`` object (see :func:`chase_timm.slim.slice_in_place`), so the optimizer's
parameter lists stay valid; its per-parameter state (momentum, Adam moments, any tensor shaped like its
parameter, read through wrappers by :mod:`chase_timm.optim_state`) is cut the same way. A
``DistributedDataParallel`` wrapper fixes its reducer buckets to the parameter shapes at construction, so it
is rebuilt in place (same object, same settings, comm hooks re-registered) on every rank at the same step; the
caller's references to it stay valid. Everything is checked before anything changes.
"""
from __future__ import annotations

import inspect
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ._timm import unwrap_model
from .optim_state import param_states, replace_param_states
from .slim import sliced

__all__ = ["check_shrinkable", "slice_optimizer_state", "rebuild_ddp"]

Removals = Mapping[str, Mapping[int, Sequence[int]]]

# DistributedDataParallel constructor arguments that its instances keep under the same name
_DDP_SETTINGS = ("device_ids", "output_device", "dim", "process_group", "find_unused_parameters",
                 "gradient_as_bucket_view", "static_graph", "mixed_precision", "forward_sync_buffers",
                 "skip_all_reduce_unused_params", "batched_grad_copy")


def check_shrinkable(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                     params: Mapping[str, nn.Parameter], removals: Removals) -> None:
    """ValueError (nothing changed yet) if the wrapper can't be rebuilt or an optimizer state can't be cut."""
    inner = unwrap_model(model)
    if model is not inner and not (isinstance(model, DistributedDataParallel) and model.module is inner):
        raise ValueError(
            f"Chase can shrink a plain model or one wrapped by DistributedDataParallel (accelerator.prepare), not "
            f"{type(model).__name__}; shrink before wrapping (e.g. before torch.compile) or use ChaseConfig(shrink='off').")
    if isinstance(model, DistributedDataParallel) and getattr(model, "_delay_all_reduce_params", None):
        raise ValueError("Chase cannot rebuild a DistributedDataParallel with delay_all_reduce_named_params; "
                         "use ChaseConfig(shrink='off').")
    if isinstance(model, DistributedDataParallel) and getattr(model, "mixed_precision", None) is not None:
        raise ValueError("Chase cannot rebuild a DistributedDataParallel with its own mixed_precision (its hooks "
                         "register once); use autocast (accelerate's mixed_precision) or ChaseConfig(shrink='off').")
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


def rebuild_ddp(model: nn.Module) -> None:
    """Re-run ``DistributedDataParallel.__init__`` on the same wrapper so its reducer matches the new shapes.

    Collective: every rank must call it at the same step. A plain model is left alone. The wrapper keeps its
    identity (what ``accelerator.prepare`` returned stays the model to train), its settings and comm hooks.
    """
    if not isinstance(model, DistributedDataParallel):
        return
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    settings = {name: getattr(model, name) for name in _DDP_SETTINGS if name in accepted and hasattr(model, name)}
    if "forward_sync_buffers" not in settings and "broadcast_buffers" in accepted:  # torch < 2.13's name for it
        settings["broadcast_buffers"] = model.broadcast_buffers
    if "init_sync" in accepted:  # ranks already hold the same parameters; rank-local buffers must stay rank-local
        settings["init_sync"] = False  # (torch >= 2.13 broadcasts buffers at init when forward_sync_buffers is given)
    settings["bucket_cap_mb"] = model.bucket_bytes_cap / (1024 * 1024)
    hooks = list(getattr(model, "_comm_hooks", []))
    module = model.module
    _check_same_shapes(module, model.process_group)
    for attr in ("logger", "reducer"):  # the old reducer's autograd hooks hold the old bucket layout
        if hasattr(model, attr):
            delattr(model, attr)
    DistributedDataParallel.__init__(model, module, **settings)
    for hook, state in hooks:
        for attr in ("error_dict", "p_memory_dict", "q_memory_dict"):  # PowerSGD: buffers per old bucket
            if isinstance(getattr(state, attr, None), dict):
                getattr(state, attr).clear()
        model.register_comm_hook(state, hook)


def _check_same_shapes(module: nn.Module, group) -> None:
    """RuntimeError unless every rank holds the same parameter shapes: the rebuild skips DDP's own check
    (``init_sync=False``), and a rank that did not shrink would otherwise hang or mix gradients."""
    params = list(module.parameters())
    summary = torch.tensor([len(params), sum(p.numel() for p in params),
                            sum((i + 1) * p.numel() for i, p in enumerate(params))], device=params[0].device)
    low, high = summary.clone(), summary.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError("ranks hold different parameter shapes after a shrink: call chase.step() (or "
                           "chase.shrink()) on every rank at the same step.")
