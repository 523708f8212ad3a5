"""Torch-Pruning internals the channel-group walk needs (``chase_timm.graph``), written against the 1.6.x layout.

``graph`` walks ``DependencyGraph`` dependencies itself (one channel group per producer, in linear time) instead
of calling ``get_pruning_group``, so it starts a walk the way Torch-Pruning does internally: a self-dependency
of the root and ``_HybridIndex`` positions that remember their root channel; and it reads the stride of a
flatten index mapping to bound how many positions a flatten->Linear expands to. ``build_dependency`` derives
the index mappings of all concat/split/reshape/... nodes in one pass that raises on the first node it cannot
map (a concat of input slices, a reshape to zero channels); ``tolerant_index_mapping`` lets the rest of the
graph be built and names the nodes left unmapped. It also reads the piece sizes a
split saved for backward and installs split and concat index mappings from the sizes autograd recorded: Torch-Pruning
maps dim-1 splits only (not the channel dim of (B, N, C) token tensors) and infers piece sizes by walking the graph.
Interleave and permutation mappings carry channels through reshapes that Torch-Pruning reads as channel-first blocks.
"""
from __future__ import annotations

from contextlib import contextmanager
from importlib.metadata import version
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch_pruning as tp
from torch_pruning import ops

from . import require
from .autograd import saved_dim

__all__ = ["check_version", "root_dependency", "root_positions", "walk_positions", "flatten_stride", "tolerant_index_mapping",
           "split_layout", "map_split", "map_concat", "map_interleave", "is_interleave", "map_permutation",
           "is_permutation"]


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
    return walk_positions((i, i) for i in channels)


def walk_positions(pairs: Iterable[tuple[int, int]]) -> list:
    """Walk positions from (position, root channel) pairs (``.idx``, ``.root_idx``)."""
    return [tp._helpers._HybridIndex(idx=i, root_idx=r) for i, r in pairs]


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
def split_layout(fn: Any) -> Optional[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(dim, piece sizes, input shape) of a ``SplitBackward0``/``SplitWithSizesBackward0`` node; ``None`` if unknown.

    ``chunk`` saves one split size (its dim signed by :func:`~chase_timm.adapters.autograd.saved_dim`)."""
    shape = tuple(getattr(fn, "_saved_self_sym_sizes", None) or ())
    if not shape or getattr(fn, "_saved_dim", None) is None:
        return None
    dim = saved_dim(fn) % len(shape)
    sizes = getattr(fn, "_saved_split_sizes", None)
    if sizes is None:
        size = getattr(fn, "_saved_split_size", None)
        if not size:
            return None
        sizes = [min(size, shape[dim] - start) for start in range(0, shape[dim], size)]
    return dim, tuple(int(s) for s in sizes), tuple(int(s) for s in shape)


def _install(dep: Any, slot: int, mapping: Any, kind: type) -> None:
    """Put a reverse mapping in ``slot`` and drop Torch-Pruning's own one of that kind from the other slot. A walk
    applies slot 0, then slot 1, so between a concat and a split that feeds it (Res2Net's last piece) the forward
    direction must split then offset into the concat (split 0, concat 1) and the reverse one undo the concat offset
    before the split's (concat 0, split 1); Torch-Pruning puts split mappings in slot 0 and concat ones in slot 1
    both ways."""
    dep.index_mapping[slot] = mapping
    if isinstance(dep.index_mapping[1 - slot], kind):
        dep.index_mapping[1 - slot] = None


def map_split(node: Any, sizes: Sequence[int]) -> None:
    """Install split index mappings on ``node`` (a Torch-Pruning split node) for pieces of ``sizes``, as Torch-Pruning's
    ``update_split_index_mapping`` does for dim-1 splits; each output's piece comes from its autograd ``output_nr``.
    Forward mappings go in slot 0, reverse ones in slot 1 (see ``_install``)."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    node.module.split_sizes, node.module.offsets = list(sizes), offsets
    for rank, out in enumerate(node.outputs):
        piece = next((nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn), rank)
        mapping = tp.dependency.index_mapping._SplitIndexMapping
        for dep in node.dependencies:
            if dep.target is out:
                dep.index_mapping[0] = mapping(offset=offsets[piece:piece + 2], reverse=False)
        for dep in out.dependencies:
            if dep.target is node:
                _install(dep, 1, mapping(offset=offsets[piece:piece + 2], reverse=True), mapping)


def map_concat(node: Any, sizes: Sequence[int]) -> bool:
    """Install concat index mappings on ``node`` (a Torch-Pruning concat node) whose autograd inputs have ``sizes``
    along the concat dim, in the order of ``node.grad_fn.next_functions``; a Torch-Pruning input node is matched to
    its place by its autograd node. Forward mappings go in slot 1, reverse ones in slot 0 (see ``_install``).
    True when every input got its mapping."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    node.module.concat_sizes, node.module.offsets = list(sizes), offsets
    places = [fn for fn, _ in node.grad_fn.next_functions]
    mapping = tp.dependency.index_mapping._ConcatIndexMapping
    complete = True
    for source in node.inputs:
        if sum(fn is source.grad_fn for fn in places) != 1:
            complete = False
            continue  # the same tensor concatenated twice, or not found: Torch-Pruning's own mapping stays
        piece = next(i for i, fn in enumerate(places) if fn is source.grad_fn)
        for dep in node.dependencies:
            if dep.target is source:
                _install(dep, 0, mapping(offset=offsets[piece:piece + 2], reverse=True), mapping)
        for dep in source.dependencies:
            if dep.target is node:
                dep.index_mapping[1] = mapping(offset=offsets[piece:piece + 2], reverse=False)
    return complete


class _InterleaveIndexMapping:
    """Channel c of a channels-last map flattened with ``k`` positions in front of it, ``(..., k, C) -> (..., k*C)``
    (Swin's patch merging), sits at positions c, C + c, ..., (k-1)*C + c; the reverse takes a position modulo C."""

    def __init__(self, channels: int, k: int, reverse: bool) -> None:
        self.channels, self.k, self.reverse = channels, k, reverse

    def __call__(self, idxs: list) -> list:
        hybrid = tp._helpers._HybridIndex
        if self.reverse:
            return list({hybrid(idx=i.idx % self.channels, root_idx=i.root_idx) for i in idxs})
        return [hybrid(idx=i.idx + j * self.channels, root_idx=i.root_idx) for i in idxs for j in range(self.k)]


def map_interleave(node: Any, channels: int, k: int, pieces: bool = False) -> None:
    """Install interleaved flatten mappings on a reshape ``node`` whose input is a channels-last map of ``channels``
    channels and whose output merges ``k`` positions into the channel dim (where torch-pruning's flatten mapping
    assumes channel-first blocks of ``k``). ``pieces``: the other way round, the input's channel dim of ``k``
    equal pieces is unflattened into (k, channels) (SelectiveKernel's ``view(B, num_paths, C // num_paths, ...)``),
    so channel c of the output sits at positions c, C + c, ... of the input."""
    for source in node.inputs:
        for dep in node.dependencies:
            if dep.target is source:
                dep.index_mapping[0] = _InterleaveIndexMapping(channels, k, reverse=not pieces)
        for dep in source.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _InterleaveIndexMapping(channels, k, reverse=pieces)
    if pieces:  # torch-pruning put its own (block) mapping between the reshape and its outputs: positions pass as is
        for target in node.outputs:
            for dep in (*node.dependencies, *target.dependencies):
                if {dep.source, dep.target} == {node, target}:
                    dep.index_mapping[0] = None


def is_interleave(dep: Any) -> bool:
    """Whether ``dep`` carries a mapping installed by :func:`map_interleave`."""
    return any(isinstance(m, _InterleaveIndexMapping) for m in dep.index_mapping)


class _PermutationIndexMapping:
    """Position p -> ``order[p]``: a channel vector's positions along a chain of reshapes and permutes."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = list(order)

    def __call__(self, idxs: list) -> list:
        return [tp._helpers._HybridIndex(idx=self.order[i.idx], root_idx=i.root_idx) for i in idxs]


def map_permutation(chain: Sequence[Any], order: Sequence[int]) -> None:
    """Install index mappings along ``chain`` (Torch-Pruning nodes, each the next one's only input) that carry a
    channel vector's positions as they are, and move position p of the first node to ``order[p]`` of the last on
    the edge into it (ResNeSt's RadixSoftmax, ``view(B, cardinality, radix, -1).transpose(1, 2) ... reshape(B,
    -1)``, where Torch-Pruning would read each intermediate dim 1 as channels). Both slots are replaced."""
    identity = list(range(len(order)))
    inverse = [0] * len(order)
    for p, q in enumerate(order):
        inverse[q] = p
    for a, b in zip(chain, chain[1:]):
        last = b is chain[-1]
        for dep in a.dependencies:
            if dep.target is b:
                dep.index_mapping = [_PermutationIndexMapping(order if last else identity), None]
        for dep in b.dependencies:
            if dep.target is a:
                dep.index_mapping = [_PermutationIndexMapping(inverse if last else identity), None]


def is_permutation(dep: Any) -> bool:
    """Whether ``dep`` carries a mapping installed by :func:`map_permutation`."""
    return any(isinstance(m, _PermutationIndexMapping) for m in dep.index_mapping)
