"""Rebuilding a live ``DistributedDataParallel`` after its parameters changed shape (``chase_timm.shrink``).

DDP fixes its reducer buckets to the parameter shapes at construction and offers no public "rebuild", so the
wrapper's own ``__init__`` is re-run on the same object with the settings it was built with (read back from the
attributes DDP keeps), and its comm hooks (kept in ``_comm_hooks``) are registered again. Written against torch
2.14's constructor; older keyword names are handled where they differ.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import require

__all__ = ["check_version", "check_rebuildable", "rebuild_ddp"]

_MB = 1024 * 1024  # DDP's bucket caps are given in MiB and kept in bytes
# DistributedDataParallel constructor arguments that its instances keep under the same name
_DDP_SETTINGS = ("device_ids", "output_device", "dim", "process_group", "find_unused_parameters",
                 "gradient_as_bucket_view", "static_graph", "mixed_precision", "forward_sync_buffers",
                 "skip_all_reduce_unused_params", "batched_grad_copy")


def check_version(found: str = torch.__version__) -> None:
    """ImportError (one line) unless ``found`` is a torch version this adapter was written for."""
    require("torch", found)


check_version()


def check_rebuildable(model: nn.Module) -> None:
    """ValueError (nothing changed) if ``model`` is a DDP wrapper whose settings :func:`rebuild_ddp` can't carry."""
    if not isinstance(model, DistributedDataParallel):
        return
    if getattr(model, "_delay_all_reduce_params", None):
        raise ValueError("Chase cannot rebuild a DistributedDataParallel with delay_all_reduce_named_params; "
                         "use ChaseConfig(shrink='off').")
    if getattr(model, "mixed_precision", None) is not None:
        raise ValueError("Chase cannot rebuild a DistributedDataParallel with its own mixed_precision (its hooks "
                         "register once); use autocast (accelerate's mixed_precision) or ChaseConfig(shrink='off').")


def rebuild_ddp(model: nn.Module) -> None:
    """Re-run ``DistributedDataParallel.__init__`` on the same wrapper so its reducer matches the new shapes.

    Collective: every rank must call it at the same step. A plain model is left alone. The wrapper keeps its
    identity (what ``accelerator.prepare`` returned stays the model to train), its settings (bucket caps
    included: the default first-bucket cap, a uniform ``bucket_cap_mb`` or a per-bucket ``bucket_cap_mb_list``)
    and comm hooks.
    """
    if not isinstance(model, DistributedDataParallel):
        return
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    settings = {name: getattr(model, name) for name in _DDP_SETTINGS if name in accepted and hasattr(model, name)}
    if "forward_sync_buffers" not in settings and "broadcast_buffers" in accepted:  # torch < 2.13's name for it
        settings["broadcast_buffers"] = model.broadcast_buffers
    if "init_sync" in accepted:  # ranks already hold the same parameters; rank-local buffers must stay rank-local
        settings["init_sync"] = False  # (torch >= 2.13 broadcasts buffers at init when forward_sync_buffers is given)
    settings.update(_bucket_caps(model, accepted))
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


def _bucket_caps(model: DistributedDataParallel, accepted) -> dict:
    """The bucket-size arguments ``model`` was built with: none when it uses the defaults (whose first bucket is
    smaller), else ``bucket_cap_mb``, and ``bucket_cap_mb_list`` (torch >= 2.14) when per-bucket caps were given."""
    caps = list(getattr(model, "bucket_bytes_cap_list", None) or ())
    if caps and "bucket_cap_mb_list" in accepted:
        return {"bucket_cap_mb_list": [cap / _MB for cap in caps]}
    if getattr(model, "bucket_bytes_cap_default", False):
        return {}
    return {"bucket_cap_mb": model.bucket_bytes_cap / _MB}


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
