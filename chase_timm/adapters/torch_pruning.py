"""Torch-Pruning internals the channel-group walk needs (``chase_timm.graph``), written against the 1.6.x layout.

``graph`` walks ``DependencyGraph`` dependencies itself (one channel group per producer, in linear time) instead
of calling ``get_pruning_group``, so it starts a walk the way Torch-Pruning does internally: a self-dependency
of the root and ``_HybridIndex`` positions that remember their root channel; and it reads the stride of a
flatten index mapping to bound how many positions a flatten->Linear expands to.
"""
from __future__ import annotations

from importlib.metadata import version
from typing import Any, Callable, Optional, Sequence

import torch_pruning as tp

from . import require

__all__ = ["check_version", "root_dependency", "root_positions", "flatten_stride"]


def check_version(found: str = getattr(tp, "__version__", None) or version("torch-pruning")) -> None:
    """ImportError (one line) unless ``found`` is a torch-pruning version this adapter was written for (some 1.6.0
    builds lack ``__version__``: the installed distribution's metadata then says)."""
    require("torch-pruning", found)


check_version()


def root_dependency(node: Any, handler: Callable) -> Any:
    """The dependency a walk from ``node`` starts with: ``handler`` (e.g. ``tp.prune_conv_out_channels``) on itself."""
    return tp.Dependency(handler, handler, source=node, target=node)


def root_positions(channels: Sequence[int]) -> list:
    """Walk positions for ``channels`` of the root: each is its own root channel (``.idx``, ``.root_idx``)."""
    return [tp._helpers._HybridIndex(idx=i, root_idx=i) for i in channels]


def flatten_stride(mapping: Any) -> Optional[int]:
    """Positions one channel expands to through a flatten index mapping (N, C, H, W) -> (N, C*H*W); ``None``
    when ``mapping`` is another kind of index mapping."""
    if isinstance(mapping, tp.dependency.index_mapping._FlattenIndexMapping):
        return mapping._stride
    return None
