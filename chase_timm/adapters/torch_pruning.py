"""Torch-Pruning internals the channel-group walk needs (``chase_timm.graph``), written against the 1.6.x layout.

``graph`` walks ``DependencyGraph`` dependencies itself (one channel group per producer, in linear time) instead
of calling ``get_pruning_group``, so it starts a walk the way Torch-Pruning does internally: a self-dependency
of the root and ``_HybridIndex`` positions that remember their root channel; and it reads the stride of a
flatten index mapping to bound how many positions a flatten->Linear expands to. ``build_dependency`` derives
the index mappings of all concat/split/reshape/... nodes in one pass that raises on the first node it cannot
map (a concat of input slices, a reshape to zero channels); ``tolerant_index_mapping`` lets the rest of the
graph be built and names the nodes left unmapped.
"""
from __future__ import annotations

from contextlib import contextmanager
from importlib.metadata import version
from typing import Any, Callable, Iterator, Optional, Sequence

import torch_pruning as tp
from torch_pruning import ops

from . import require

__all__ = ["check_version", "root_dependency", "root_positions", "flatten_stride", "tolerant_index_mapping"]


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


@contextmanager
def tolerant_index_mapping() -> Iterator[set]:
    """While active, ``DependencyGraph.build_dependency`` skips nodes whose index mapping torch-pruning cannot
    derive instead of failing the whole graph; yields the set those nodes are added to (walks must stop there)."""
    module = tp.dependency.index_mapping
    original = module.update_index_mapping
    updates = {ops.OPTYPE.CONCAT: module.update_concat_index_mapping, ops.OPTYPE.SPLIT: module.update_split_index_mapping,
               ops.OPTYPE.RESHAPE: module.update_reshape_index_mapping,
               ops.OPTYPE.UNBIND: module.update_unbind_index_mapping,
               ops.OPTYPE.EXPAND: module.update_expand_index_mapping, ops.OPTYPE.SLICE: module.update_slice_index_mapping}
    unmapped: set = set()

    def update_index_mapping(graph: Any) -> None:
        for node in graph.module2node.values():
            update = updates.get(node.type)
            if update is None:
                continue
            try:
                update(graph, node)
            except Exception:  # torch-pruning bugs on odd shapes: a ZeroDivisionError, a None channel count
                unmapped.add(node)

    module.update_index_mapping = update_index_mapping
    try:
        yield unmapped
    finally:
        module.update_index_mapping = original
