"""Adapter for optimizer wrappers: the only place that reads timm's ``Lookahead._base_optimizer``.

timm's ``Lookahead`` keeps no state of its own: the base optimizer's ``state`` holds every per-parameter tensor,
Lookahead's slow weights (``lookahead_slow_buff``) included. timm has no public accessor for the base optimizer,
so reaching it is tied to the timm versions in :data:`chase_timm.adapters.SUPPORTED`. Accelerate's
``AcceleratedOptimizer`` is looked through by its public ``.optimizer`` (accelerate is optional for the library).
"""
from __future__ import annotations

import timm
import torch
from timm.optim import Lookahead

from . import require

try:
    from accelerate.optimizer import AcceleratedOptimizer
except ImportError:  # the core library runs without accelerate: then nothing is an AcceleratedOptimizer
    AcceleratedOptimizer = ()

__all__ = ["check_version", "unwrap_optimizer"]


def check_version(found: str = timm.__version__) -> None:
    """ImportError (one line) unless ``found`` is a timm version whose ``Lookahead`` this adapter was written for."""
    require("timm", found)


check_version()


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the per-parameter state, inside Accelerate's ``AcceleratedOptimizer`` (its public
    ``.optimizer``) and timm's ``Lookahead`` (its base optimizer), in any nesting."""
    while True:
        if isinstance(optimizer, Lookahead):
            optimizer = optimizer._base_optimizer
        elif isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        else:
            return optimizer
