"""Adapter for optimizer wrappers: the only place that reads timm's ``Lookahead._base_optimizer``.

timm's ``Lookahead`` keeps no state of its own: the base optimizer's ``state`` holds every per-parameter tensor,
Lookahead's slow weights (``lookahead_slow_buff``) included. timm has no public accessor for the base optimizer,
so reaching it is tied to the timm versions this adapter was written for (:data:`TIMM_VERSIONS`).
"""
from __future__ import annotations

import functools

import timm
import torch
from accelerate.optimizer import AcceleratedOptimizer
from packaging.version import Version
from timm.optim import Lookahead

__all__ = ["TIMM_VERSIONS", "check_timm_version", "unwrap_optimizer"]

TIMM_VERSIONS = (Version("1.0.31"), Version("1.1"))  # [low, high): Lookahead keeps its base in ``_base_optimizer``


@functools.lru_cache(maxsize=None)  # called on every unwrap: parse once
def check_timm_version(version: str | None = None) -> None:
    """RuntimeError (one line) unless the installed timm (or ``version``) is one this adapter was written for."""
    found = Version(version or timm.__version__)
    low, high = TIMM_VERSIONS
    if not low <= found < high:
        raise RuntimeError(
            f"chase_timm reads timm's Lookahead internals as of timm >={low},<{high}, but timm {found} is installed; "
            f"install a timm in that range, or use the base optimizer without Lookahead.")


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the per-parameter state, inside Accelerate's ``AcceleratedOptimizer`` (its public
    ``.optimizer``) and timm's ``Lookahead`` (its base optimizer), in any nesting."""
    while True:
        if isinstance(optimizer, Lookahead):
            check_timm_version()
            optimizer = optimizer._base_optimizer
        elif isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        else:
            return optimizer
