"""Coupled channel groups of any model, which of them can be removed physically, and why not.

torch-pruning's ``DependencyGraph`` records which tensor slices are coupled. Groups are collected per
Conv/Linear producer by a worklist walk over its dependencies that visits every (slice, channel) pair once
and honours the deadline (``get_pruning_group`` re-walks paths with every index subset and re-derives all
index mappings per call: minutes, or no end, on ECA/ReXNet-style graphs; ``get_all_groups`` is worse). Each
group is turned into explicit per-channel index tuples (flatten->Linear expansions, concat offsets and balanced
grouped-conv classes included) and judged by one rule: zeroing every slice of a channel must make the
network compute exactly what the physically sliced network computes. Structural checks give readable
reasons (norms mixing channels, head reshapes, grouped convs, classifier outputs, ...); a numerical
masked-vs-sliced comparison of all surviving groups backs them up for ops no rule knows.
"""
from __future__ import annotations

import bisect
import logging
import random
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from . import norms
from ._timm import classifier_modules, clear_eval_caches, conv_multiplier, deepcopy_model, default_example_input
from .adapters.autograd import (input_shapes, new_forward_hooks_removed, result_shape, saved_dim, saved_input_shape,
                                saved_permutation)
from .adapters.torch_pruning import (flatten_stride, is_interleave, is_permutation, map_concat, map_interleave,
                                     map_permutation, map_split, root_dependency, root_positions, split_layout,
                                     tolerant_index_mapping, walk_positions)
from .heads import HeadSpec, head_spec, qkv_as_modules
from .slim import slice_in_place
from .streams import StreamSpec, stream_spec

__all__ = ["ChannelSlice", "ChannelGroup", "find_channel_groups", "tensor_removals", "reindex_groups"]

_logger = logging.getLogger(__name__)

RESIDUAL_REASON = "residual stream (set prune_skip=True to prune it)"
TIMEOUT_REASON = "discovery time limit reached"
TOKEN_REASON = "its channels are the token axis of a token-mixing MLP (removing one would remove a token)"
_TOLERANCE = 1e-4  # max |masked - sliced| relative to the output scale
_MAX_EXPANSION = 256  # positions per channel a flatten->Linear may produce (a 16x16 map; 7x7 at 224 px)
_MAX_POSITIONS = 1024  # positions per channel one group's walk may visit, at least (ViT-S with prune_skip: 358)
# ... and per graph node: a stream walks its depth once (about 1 position per node per channel: ViT-S 358 over 336
# nodes, DaViT-S 1261 over 1336), an exploding walk far more (EfficientViT-MSRA's cascaded attention: 142k over 926)
# 2: twice a stream's need (4 made EfficientViT-MSRA's exploding walks 2.7x slower: m0 at 32 px 6 s -> 17 s, vs 9 s)
_POSITIONS_PER_NODE = 2
_LAYERS = (ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.LINEAR)
_OUT_HANDLERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)
_LINEAR_PARTS = ("MmBackward", "AddmmBackward", "ViewBackward", "UnsafeViewBackward", "ReshapeAlias")
# ops where two root channels meeting at one position are tied, not mixed: position-wise arithmetic and activations
# (torch-pruning types every unknown op as elementwise, matmuls and attention included), norms of one channel, splits
_CHANNEL_WISE = (ops.OPTYPE.BN, ops.OPTYPE.IN, ops.OPTYPE.SPLIT)
# Op names are matched exactly (autograd's name without "Backward<n>", ``_op``): a prefix "Add" would also match
# "Addmm", a matmul (F.linear / torch.addmm) that mixes channels.
_CHANNEL_WISE_FNS = frozenset({
    "Mul", "Add", "Sub", "Div", "Addcmul", "Addcdiv", "Neg", "Relu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish",
    "Hardsigmoid", "Hardtanh", "Elu", "LeakyRelu", "Mish", "Softplus", "Clamp", "ClampMin", "ClampMax", "Abs", "Pow",
    "Exp", "Exp2", "Expm1", "Sqrt", "Rsqrt", "Clone", "NativeDropout", "ToCopy"})
# what a bare parameter may feed to be a free slice: scale, shift (GRN's addcmul(bias, weight, x)), views, concat
_SCALE_SHIFT_OPS = frozenset({"Mul", "Add", "Sub", "Div", "Addcmul", "Expand", "View", "ReshapeAlias", "UnsafeView",
                              "Unsqueeze", "Squeeze", "Cat"})


@dataclass(frozen=True)
class ChannelSlice:
    """One parameter or buffer slice that carries a group's channels."""

    tensor: str
    dim: int
    index: tuple[tuple[int, ...], ...]
    role: str

    def to_dict(self) -> dict:
        """Plain JSON-safe data."""
        return {"tensor": self.tensor, "dim": self.dim, "index": [list(p) for p in self.index], "role": self.role}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelSlice":
        return cls(str(d["tensor"]), int(d["dim"]), tuple(tuple(int(i) for i in p) for p in d["index"]),
                   str(d["role"]))


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: a root producer plus every coupled slice."""

    name: str
    width: int
    slices: tuple[ChannelSlice, ...]
    residual: bool
    prunable: bool
    reason: str
    unit: int = 1  # channels one class stands for in the channel budget: head_dim for a head, else the class size
    heads: bool = False  # the classes are attention heads (their own budget pool, never rounded to channel_round_to)
    merges: bool = False  # passes adds/concats that only merge branches (states saved earlier: a stream)

    def producers(self) -> tuple[ChannelSlice, ...]:
        """Slices with role ``producer`` (output rows of Conv/Linear weights; for UMM scoring)."""
        return tuple(s for s in self.slices if s.role == "producer")

    def to_dict(self) -> dict:
        """Plain JSON-safe data."""
        return {"name": self.name, "width": self.width, "slices": [s.to_dict() for s in self.slices],
                "residual": self.residual, "prunable": self.prunable, "reason": self.reason, "unit": self.unit,
                "heads": self.heads, "merges": self.merges}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelGroup":
        unit = int(d.get("unit", 1))  # states saved before tied classes had units: unit > 1 meant a head
        return cls(str(d["name"]), int(d["width"]), tuple(ChannelSlice.from_dict(s) for s in d["slices"]),
                   bool(d["residual"]), bool(d["prunable"]), str(d["reason"]), unit, bool(d.get("heads", unit > 1)),
                   bool(d.get("merges", False)))


def find_channel_groups(
        model: nn.Module,
        example_inputs: torch.Tensor | tuple | None = None,
        *,
        prune_skip: bool = False,
        timeout: float = 60.0,
) -> list[ChannelGroup]:
    """All coupled channel groups of the (unwrapped) model, prunable or not, with reasons."""
    deadline = time.monotonic() + timeout
    inputs = as_inputs(model, example_inputs)
    try:
        with _tracing(model), qkv_as_modules(model), tolerant_index_mapping() as unmapped:
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, forward_fn=lambda m, args: m(*args), verbose=False)
    except Exception as err:  # never break the caller's training: report, don't raise (unless the inputs are wrong)
        _check_runs(model, inputs, example_inputs is None)
        return _placeholders(model, f"dependency graph could not be built: {type(err).__name__}: {str(err).strip()}")
    if time.monotonic() > deadline:
        return _placeholders(model, TIMEOUT_REASON)
    _map_channel_splits(graph, unmapped)
    drafts = _discover(graph, model, deadline, unmapped)
    _flag_overlaps(drafts)
    groups = [d.decide(prune_skip) for d in drafts]
    return _verified(model, groups, inputs, deadline)


def tensor_removals(groups: Sequence[ChannelGroup], removed: Mapping[str, Sequence[int]]) -> dict[str, dict[int, list[int]]]:
    """Group-channel removals {group name: channel indices} -> per tensor, per dim, sorted unique positions."""
    by_name = {g.name: g for g in groups}
    out: dict[str, dict[int, set[int]]] = {}
    for name, channels in removed.items():
        if name not in by_name:
            raise KeyError(f"unknown channel group {name!r}")
        group = by_name[name]
        bad = [c for c in channels if not 0 <= int(c) < group.width]
        if bad:
            raise ValueError(f"channels {bad} out of range for group {name!r} of width {group.width}")
        for s in group.slices:
            positions = out.setdefault(s.tensor, {}).setdefault(s.dim, set())
            for c in channels:
                positions.update(s.index[int(c)])
    return {t: {d: sorted(p) for d, p in dims.items() if p} for t, dims in out.items() if any(dims.values())}


def reindex_groups(groups: Sequence[ChannelGroup], removed: Mapping[str, Sequence[int]]) -> list[ChannelGroup]:
    """The groups of a model after ``removed`` channels were physically sliced out of it.

    The removed channels leave their groups, and every remaining position moves down past the positions cut
    from its tensor dim, so the groups index the shrunk tensors. Groups are disjoint, so a position that is
    cut but still listed by a surviving channel means the groups don't belong to the removal (ValueError).
    """
    cuts = tensor_removals(groups, removed)
    out = []
    for group in groups:
        gone = {int(c) for c in removed.get(group.name, ())}
        keep = [c for c in range(group.width) if c not in gone]
        slices = []
        for s in group.slices:
            cut = cuts.get(s.tensor, {}).get(s.dim, [])
            cut_set = set(cut)
            index = []
            for c in keep:
                if cut_set.intersection(s.index[c]):
                    raise ValueError(f"group {group.name!r} keeps a position of {s.tensor} dim {s.dim} that another "
                                     "group's removal cuts")
                index.append(tuple(p - bisect.bisect_left(cut, p) for p in s.index[c]))
            slices.append(ChannelSlice(s.tensor, s.dim, tuple(index), s.role))
        out.append(replace(group, width=len(keep), slices=tuple(slices)))
    return out


# ------------------------------------------------------------------------------------------------ tracing

def as_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    """Positional example inputs; tensors get requires_grad so tracing works even with frozen weights."""
    if example_inputs is None:
        example_inputs = default_example_input(model)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return tuple(x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in inputs)


def _check_runs(model: nn.Module, inputs: tuple, default: bool) -> None:
    """ValueError when ``inputs`` do not run through ``model`` at all (eval mode, no grad, training flags restored):
    a wrong example shape or size, which the caller's batches would not share, rather than an untraceable model."""
    try:
        with torch.no_grad(), _quiet(model):
            model.eval()
            model(*inputs)
    except Exception as err:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        what = "the default example input" if default else "example_inputs"
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{what} {shapes} does not run through {type(model).__name__} ({type(err).__name__}: "
                         f"{first}); pass example_inputs the model accepts, e.g. torch.randn(1, 3, H, W) at the input "
                         "size it was built for.") from None


@contextmanager
def _quiet(model: nn.Module) -> Iterator[None]:
    """Warnings silenced; every module's training flag restored afterwards (also after an exception), and the
    eval-mode caches the forward filled emptied."""
    flags = {m: m.training for m in model.modules()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag
        clear_eval_caches(model)


@contextmanager
def _tracing(model: nn.Module) -> Iterator[None]:
    """Grad enabled (torch-pruning traces autograd); training flags and forward hooks restored afterwards
    (torch-pruning leaves its tracing hooks behind when the forward raises)."""
    with torch.enable_grad(), _quiet(model), new_forward_hooks_removed(list(model.modules())):
        yield


def _placeholders(model: nn.Module, reason: str) -> list[ChannelGroup]:
    """One non-prunable group per Conv/Linear producer when the graph can't be built or time is up."""
    warnings.warn(f"channel-group discovery incomplete: {reason}")
    heads = set(map(id, classifier_modules(model)))
    return [_unreached(name, list(range(_out_channels(m))), reason).decide(False) for name, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and id(m) not in heads]


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _tensor_names(model: nn.Module) -> dict[int, str]:
    names = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(t), name)
    return names


# --------------------------------------------------------------------------------------------- discovery

@dataclass
class _Raw:
    """A slice before channel classes are known: root channel -> positions along ``dim``."""

    tensor: str
    dim: int
    role: str
    size: int                       # valid positions are 0..size-1
    by_root: dict[int, list[int]]
    local: int = 0                  # grouped-conv input: the weight holds position % local
    balance: int = 0                # grouped conv / GroupNorm: channels sharing position % balance go together


@dataclass
class _Draft:
    """A group under construction."""

    name: str
    requested: list[int]
    raws: list[_Raw] = field(default_factory=list)
    residual: bool = False
    joins: set = field(default_factory=set)  # the adds and concats the group's channels pass through
    problems: list[tuple[int, str]] = field(default_factory=list)  # (rank, reason); lowest rank is reported
    classes: list[list[int]] = field(default_factory=list)
    covers: dict[nn.Module, set[int]] = field(default_factory=dict)  # Conv/Linear output channels taken
    unit: int = 1                   # channels one head counts for in the budget (head_dim); see decide()
    heads: bool = False             # one class per attention head
    ties: list[tuple[int, int]] = field(default_factory=list)  # root channels that must be removed together

    def problem(self, reason: str, rank: int = 5) -> None:
        """Record why the group can't be pruned; ``rank`` orders reasons (0 = most fundamental)."""
        if (rank, reason) not in self.problems:
            self.problems.append((rank, reason))

    def decide(self, prune_skip: bool) -> ChannelGroup:
        """The group with its prunable verdict (before numerical verification)."""
        slices = tuple(ChannelSlice(r.tensor, r.dim, _class_index(r, self.classes), r.role) for r in self.raws)
        reason = min(self.problems)[1] if self.problems else (RESIDUAL_REASON if self.residual and not prune_skip else "")
        return ChannelGroup(self.name, len(self.classes), slices, self.residual, not reason, reason,
                            self.unit if self.heads else _class_size(self.classes), self.heads,
                            bool(self.joins) and not self.residual)


def _class_size(classes: list[list[int]]) -> int:
    """Channels one class stands for in the S_c budget: its tied root channels (a grouped conv's or GroupNorm's
    balanced class has one per group); the mean, rounded, where classes differ in size."""
    return max(1, round(sum(len(c) for c in classes) / len(classes))) if classes else 1


def _class_index(raw: _Raw, classes: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(sorted({p % raw.local if raw.local else p for r in members for p in raw.by_root.get(r, ())}))
                 for members in classes)


@dataclass
class _Context:
    graph: tp.DependencyGraph
    names: dict[int, str]
    module_names: dict[nn.Module, str]
    heads: set[int]
    unmapped: set        # nodes whose index mapping torch-pruning could not derive
    tied_inputs: dict[nn.Module, str] = field(default_factory=dict)  # layer -> why its input channels stay (heads)
    weight_path: set = field(default_factory=set)  # autograd nodes computing a covered standardised conv's weight
    attention_inputs: dict[nn.Module, nn.Module] = field(default_factory=dict)  # q/k/v layer -> its attention module


def _discover(graph: tp.DependencyGraph, model: nn.Module, deadline: float, unmapped: set) -> list[_Draft]:
    """One draft group per Conv/Linear root whose output channels no earlier group covered."""
    ctx = _Context(graph, _tensor_names(model), {m: n for n, m in model.named_modules()},
                   set(map(id, classifier_modules(model))), unmapped)
    ctx.weight_path = _weight_paths(graph, model)
    covered: dict[nn.Module, set[int]] = {}
    drafts = []
    for name, module in model.named_modules():  # attention heads first: their q/k/v outputs are taken
        spec = head_spec(module, model)
        if spec is not None:
            drafts.append(_head_draft(ctx, name, model if spec.in_model else module, spec, covered))
        stream = stream_spec(module)
        if stream is not None:
            drafts.append(_stream_draft(ctx, name, module, stream, covered))
    for name, module in model.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or id(module) in ctx.heads:
            continue
        todo = [i for i in range(_out_channels(module)) if i not in covered.get(module, ())]
        if not todo:
            continue
        if module not in graph.module2node:
            drafts.append(_unreached(name, todo, "not used in the traced forward pass"))
            continue
        if time.monotonic() > deadline:
            drafts.append(_unreached(name, todo, TIMEOUT_REASON))
            continue
        draft = _draft(ctx, name, module, todo, deadline)
        drafts.append(draft)
        for layer, channels in draft.covers.items():
            covered.setdefault(layer, set()).update(channels)
        covered.setdefault(module, set()).update(todo)
    return drafts


def _head_draft(ctx: _Context, name: str, module: nn.Module, spec: HeadSpec,
                covered: dict[nn.Module, set[int]]) -> _Draft:
    """One channel per attention head (:mod:`chase_timm.heads`); its producers' rows are marked covered. ``module``:
    what the spec's tensors are named in (the model, for a spec ``in_model``)."""
    heads = list(range(spec.heads))
    draft = _Draft(name, heads, classes=[[h] for h in heads], unit=spec.head_dim, heads=True)
    for piece in spec.slices:
        owner_name, _, attr = piece.tensor.rpartition(".")
        owner = module.get_submodule(owner_name)
        by_root = {h: list(positions) for h, positions in enumerate(piece.index)}
        _add_tensors(ctx, draft, owner, (attr,), piece.role, by_root, dim=piece.dim)
        if piece.dim == 0 and isinstance(owner, (nn.modules.conv._ConvNd, nn.Linear)):  # e.g. Swin V2's cpb_mlp
            covered.setdefault(owner, set()).update(p for positions in piece.index for p in positions)
        if piece.role == "producer" and isinstance(owner, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
            # one attention's q/k/v layers are one branch (_check_shortcut): the module, or where the spec is named in
            # the model (a group spanning several attention modules), the layer's own attention module
            ctx.attention_inputs[owner] = module.get_submodule(owner_name.rpartition(".")[0]) if spec.in_model \
                else module
            if spec.stream:
                ctx.tied_inputs[owner] = spec.stream
            if owner not in ctx.graph.module2node and not spec.reason:
                draft.problem("not used in the traced forward pass", 0)
    for path in spec.shared:  # e.g. MViTv2's pooling convs: head_dim channels, run on every head
        layer = module.get_submodule(path)
        covered.setdefault(layer, set()).update(range(_out_channels(layer)))
    if spec.reason:
        draft.problem(spec.reason, 0)
    elif spec.heads == 1:
        draft.problem("a single attention head (removing it would delete the attention)", 6)
    return draft


def _stream_draft(ctx: _Context, name: str, module: nn.Module, spec: StreamSpec,
                  covered: dict[nn.Module, set[int]]) -> _Draft:
    """A residual stream the walk can't follow (:mod:`chase_timm.streams`), one class per channel; named after
    its first writer, whose rows (and the other writers') are marked covered."""
    channels = list(range(spec.width))
    draft = _Draft(f"{name}.{spec.writers[0]}", channels, residual=True, classes=[[c] for c in channels])
    by_root = {c: [c] for c in channels}
    for tensor, dim, role in spec.slices:
        owner_name, _, attr = tensor.rpartition(".")
        _add_tensors(ctx, draft, module.get_submodule(owner_name), (attr,), role, by_root, dim=dim)
    for writer in spec.writers:
        covered.setdefault(module.get_submodule(writer), set()).update(channels)
    return draft


def _unreached(name: str, channels: list[int], reason: str) -> _Draft:
    """A root whose group was not built: one class per output channel, not prunable."""
    return _Draft(name, channels, problems=[(0, reason)], classes=[[i] for i in channels])


def _draft(ctx: _Context, name: str, module: nn.Module, todo: list[int], deadline: float) -> _Draft:
    """Collect the group rooted at ``module``'s output channels ``todo`` and translate every item."""
    try:
        group, mixed, ties = _coupled(ctx.graph, module, todo, deadline, ctx.unmapped, ctx.module_names)
    except TimeoutError:
        return _unreached(name, todo, TIMEOUT_REASON)
    except Exception as err:
        return _unreached(name, todo, f"torch-pruning failed: {type(err).__name__}: {str(err).strip()}")
    draft = _Draft(name, todo, ties=ties)
    for reason in mixed[:1]:
        draft.problem(reason, 4)
    for item in group:
        _translate(ctx, draft, item)
    _check_shortcut(ctx, draft, group)
    _check_skip(draft, group)
    _form_classes(draft)
    if len(draft.classes) == 1:
        draft.problem(_single_class(draft), 6)
    return draft


def _single_class(draft: _Draft) -> str:
    """Why a group's channels form one removable class (removing it would delete the layer)."""
    width = len(draft.classes[0])
    if width == 1:
        return "a single removable channel (removing it would delete the layer)"
    tying = next((r.tensor for r in draft.raws if r.balance and r.size > r.balance), None)
    why = (f"{tying} (a grouped convolution or GroupNorm) must lose the same channels in each of its groups"
           if tying else "elementwise joins or equal splits tie them")
    return f"its {width} channels are one removable class: {why} (removing it would delete the layer)"


@dataclass
class _Item:
    """One coupled (node, pruning function) with its positions and the root channel of each position."""

    dep: Any
    idxs: list[int]
    root_idxs: list[int]


def _coupled(graph: tp.DependencyGraph, module: nn.Module, channels: list[int], deadline: float, unmapped: set,
             module_names: Mapping[nn.Module, str]) -> tuple[list[_Item], list[str], list[tuple[int, int]]]:
    """Everything coupled to ``module``'s output ``channels`` by torch-pruning's dependency rules and index
    mappings. Each (node, function, position) is visited once, by its first root channel. A position reached
    again from another channel is not walked again, which keeps ECA/ReXNet-style graphs linear instead of
    quadratic: at a channel-wise op (the product of a gate and its value, an activation, a BatchNorm, a split:
    ``_channel_wise``) the two root channels become one removable class (third return value: tied pairs), as
    are the channels at the same place of every piece of an equal-piece channel split (Res2Net's
    ``torch.split(x, width)``, GLU's ``chunk(2)``) and the pieces an interleave mapping merges into one channel
    (SplitAttn's radix pieces, ``_map_channel_pieces``); anywhere else (a layer, a reshape, a matmul) the op mixes
    channels and is reported (second return value). A depthwise conv with channel multiplier k (``conv_multiplier``)
    takes its input channel c and its output channels c*k .. c*k+k-1 together (one group), whichever side the walk
    arrives at. Positions arriving at a node that is already queued join
    its queued batch, and a walk that visits more than ``_MAX_POSITIONS`` or ``_POSITIONS_PER_NODE`` per graph node
    per channel, whichever is more (chained reshapes, e.g. EfficientViT-MSRA's cascaded attention), stops as not
    prunable."""
    root = graph.module2node[module]
    fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
    if root.type == ops.OPTYPE.DEPTHWISE_CONV:
        fn = tp.prune_depthwise_conv_out_channels
    deps: dict = {}
    owners: dict = {}  # position -> root channel, per (node, function)
    mixed: dict[str, None] = {}
    mixed_at: set = set()
    ties: list[tuple[int, int]] = []
    pending: dict = {}  # positions not walked yet; arrivals merge while queued
    stack: list = []

    def arrive(dep: Any, positions: list) -> None:
        """Record positions reaching (dep.target, dep.handler) and queue the new ones; a multiplier conv's input
        channel c and its output channels c*k .. c*k+k-1 (one group) arrive together, tied."""
        key = (dep.target, dep.handler)
        known = owners.setdefault(key, {})
        fresh = []
        multiplier = conv_multiplier(dep.target.module)
        for i in positions:
            if i.idx not in known:
                known[i.idx] = i.root_idx
                fresh.append(i)
            elif known[i.idx] != i.root_idx and (multiplier or _channel_wise(dep.target) or is_interleave(dep)):
                ties.append((known[i.idx], i.root_idx))
            elif known[i.idx] != i.root_idx and key not in mixed_at:
                mixed_at.add(key)
                mixed[f"channels are mixed at {dep.target.name} (position {i.idx} carries several), so "
                      "masking is not equivalent to removal"] = None
        if not fresh:
            return
        deps.setdefault(key, dep)
        if key in pending:
            pending[key].extend(fresh)
        else:
            pending[key] = fresh
            stack.append(key)
        if multiplier and dep.handler == tp.prune_conv_in_channels:
            budget[0] += per_channel * len(fresh) * (multiplier - 1)  # each new output channel walks on its own
            arrive(root_dependency(dep.target, tp.prune_conv_out_channels),
                   walk_positions((i.idx * multiplier + j, i.root_idx) for i in fresh for j in range(multiplier)))
        elif multiplier and dep.handler == tp.prune_conv_out_channels:
            if not dep.target.inputs:  # the model's input: its channels can't go
                layer = dep.target.module
                mixed[f"the depthwise convolution {module_names.get(layer, type(layer).__name__)} "
                      f"({layer.in_channels}->{layer.out_channels}, groups={layer.groups}) removes output channels "
                      "a whole group at a time, with its input channel, and its input is the model input"] = None
            arrive(root_dependency(dep.target, tp.prune_conv_in_channels),
                   walk_positions((i.idx // multiplier, i.root_idx) for i in fresh))

    per_channel = max(_MAX_POSITIONS, _POSITIONS_PER_NODE * len(graph.module2node))
    budget = [per_channel * len(channels)]
    arrive(root_dependency(root, fn), root_positions(channels))
    while stack:
        if time.monotonic() > deadline:
            raise TimeoutError
        node, fn = stack.pop()
        idxs = pending.pop((node, fn))
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            if dep.target in unmapped:
                mixed[f"torch-pruning cannot map channel indices at {dep.target.name}, so the group is not "
                      "prunable"] = None
                continue
            mapped = _mapped(dep, idxs, _MAX_EXPANSION * len(channels))
            budget[0] -= len(mapped or ())
            if mapped is None or budget[0] < 0:
                mixed[f"torch-pruning's index mapping explodes at {dep.target.name} (repeated flatten/reshape), "
                      "so the group is not prunable"] = None
                if budget[0] < 0:
                    stack.clear()  # what was reached so far still marks the layers as covered
                    break
                continue
            arrive(dep, mapped)
    items = [_Item(deps[key], list(pos), list(pos.values())) for key, pos in owners.items() if pos]
    for (node, _), positions in owners.items():
        if node.type == ops.OPTYPE.SPLIT and positions:
            _split_ties(node, positions, ties, mixed)
    return items, list(mixed), ties


def _channel_wise(node: Any) -> bool:
    """Whether ``node`` computes each position from the same position of its inputs (see ``_CHANNEL_WISE_FNS``)."""
    return node.type in _CHANNEL_WISE or (node.type == ops.OPTYPE.ELEMENTWISE
                                          and _op(_fn_name(node)) in _CHANNEL_WISE_FNS)


def _op(fn_name: str) -> str:
    """An autograd node's op for exact matching: ``AddBackward0`` -> ``Add`` (``AddmmBackward0`` -> ``Addmm``)."""
    return re.sub(r"Backward\d*$", "", fn_name)


def _channel_split(node: Any) -> Optional[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(dim, piece sizes, input shape) of a split node along the channel dim; ``None`` for other splits. The channel
    dim is torch-pruning's (``_channel_dim``), or dim 1 of a (B, C, L) tensor from channel-first layers (a Conv1d's
    output: EfficientViM's HSM-SSD splits ``hz_proj(h)`` into ``h, z``)."""
    layout = split_layout(node.grad_fn)
    if not layout:
        return None
    dim, _, shape = layout
    channel_first = len(shape) == 3 and dim == 1 and _layout(node, 64) == "first"
    return layout if dim == _channel_dim(len(shape)) or channel_first else None


def _map_channel_splits(graph: tp.DependencyGraph, unmapped: set) -> None:
    """Index mappings for every channel split and concat from the sizes autograd saved. torch-pruning maps only
    dim-1 splits (not (B, N, C) token tensors split on C: GLU's ``chunk(2, -1)``, gMLP's gate), and infers piece
    sizes by walking the graph, which goes wrong where a piece is added to another branch (Res2Net's
    ``sp + spx[i]``) and can explode positions until the time limit (FocalNet). A node mapped here leaves
    ``unmapped`` (the nodes torch-pruning failed on)."""
    for node in list(graph.module2node.values()):
        layout = _channel_split(node) if node.type == ops.OPTYPE.SPLIT else None
        if layout:
            map_split(node, layout[1])
            unmapped.discard(node)
        if node.type == ops.OPTYPE.CONCAT and _map_channel_concat(node):
            unmapped.discard(node)
        if node.type == ops.OPTYPE.RESHAPE:
            _map_channels_last_flatten(node)
            _map_channel_pieces(node)
            _map_channel_permutation(node)


def _map_channels_last_flatten(node: Any) -> None:
    """A channels-last map flattened into its channel dim, (..., 2, 2, C) -> (..., 4C) (Swin's patch merging):
    channel c lands at c, C + c, 2C + c, 3C + c, not in torch-pruning's channel-first block."""
    before, after = saved_input_shape(node.grad_fn), result_shape(node.grad_fn)
    if not before or not after or len(after) < 2 or len(before) <= len(after) or not _channels_last(node):
        return
    channels, lead = before[-1], len(after) - 1
    k = _prod(before[lead:-1])
    if k > 1 and channels > 1 and tuple(before[:lead]) == tuple(after[:lead]) and after[-1] == k * channels:
        map_interleave(node, channels, k)


def _map_channel_pieces(node: Any) -> None:
    """An NCHW map's channel dim unflattened into equal pieces, (B, k*C, H, W) -> (B, k, C, H, W)
    (SelectiveKernel's per-path attention): channel c of the pieces is c, C + c, ... of the input, like an equal
    split, not torch-pruning's block of k consecutive positions."""
    before, after = saved_input_shape(node.grad_fn), result_shape(node.grad_fn)
    if len(before) != 4 or len(after) != 5 or before[0] != after[0] or \
            tuple(before[2:]) != tuple(after[3:]) or before[1] != after[1] * after[2] or _layout(node, 64) != "first":
        return
    if after[1] > 1 and after[2] > 1:
        map_interleave(node, after[2], after[1], pieces=True)


def _map_channel_permutation(node: Any) -> None:
    """A channel vector (B, N) or (B, N, 1, 1) unflattened, its dims permuted, and flattened back to its shape,
    with single-input elementwise ops between (ResNeSt's RadixSoftmax: ``view(B, cardinality, radix, -1)
    .transpose(1, 2)``, a softmax over the radix dim, ``reshape(B, -1)``, ``view(B, -1, 1, 1)``): a fixed
    permutation of the N channels, mapped from the start to the end of the chain. A softmax mixes the positions
    along its dim: exact only where they go together (a channel's radix pieces, tied where SplitAttn views the
    attention as (B, radix, C, 1, 1) pieces), which the numerical check confirms."""
    before, after = saved_input_shape(node.grad_fn), result_shape(node.grad_fn)
    if len(before) < 2 or len(after) < 3 or any(s != 1 for s in before[2:]) or after[0] != before[0] or \
            _prod(after[1:]) != before[1] or sum(s > 1 for s in after[1:]) < 2 or len(node.inputs) != 1:
        return
    index = torch.arange(before[1]).reshape(1, *after[1:])
    chain = [node.inputs[0], node]
    while len(chain[-1].outputs) == 1:
        nxt = chain[-1].outputs[0]
        shape = result_shape(nxt.grad_fn)
        order = saved_permutation(nxt.grad_fn)
        if not shape or shape[0] != before[0] or _prod(shape[1:]) != before[1] or len(nxt.inputs) != 1 or \
                nxt.type not in (ops.OPTYPE.RESHAPE, ops.OPTYPE.ELEMENTWISE) or (order and order[0] != 0):
            return
        index = index.permute(order) if order else index.reshape(1, *shape[1:])
        chain.append(nxt)
        if tuple(shape) == tuple(before):
            moved = torch.empty_like(index.flatten())
            moved[index.flatten()] = torch.arange(before[1])
            map_permutation(chain, moved.tolist())
            return


def _channels_last(node: Any, limit: int = 64) -> bool:
    """Whether the tensor ``node`` reshapes comes from channels-last layers: the nearest layers upstream are
    Linear layers or LayerNorms over the last dim (token and NHWC maps), or a permute that moved a convolution's
    channels last; none a convolution or BatchNorm."""
    return _layout(node, limit) == "last"


def _layout(node: Any, limit: int) -> Optional[str]:
    """``"first"`` if the nearest layers upstream of ``node`` keep channels in dim 1 (a convolution, BatchNorm,
    LayerNorm2d), ``"last"`` if they keep them in the last dim (Linear, LayerNorm), ``None`` if neither is found."""
    stack, seen, found = list(node.inputs), set(), None
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.type in (ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.BN):
            return "first"
        if n.type == ops.OPTYPE.LN and "2d" in type(n.module).__name__.lower():
            return "first"  # timm's LayerNorm2d / RmsNorm2d normalise NCHW maps over dim 1
        if _channels_to_last(n) and _layout(n, limit) == "first":
            found = "last"  # a convolution's NCHW map made channels-last (EdgeNeXt's tokens for its XCA)
        elif n.type in (ops.OPTYPE.LINEAR, ops.OPTYPE.LN):
            found = "last"
        else:
            stack.extend(n.inputs)
    return found


def _channels_to_last(node: Any) -> bool:
    """A permute moving dim 1 of a (B, C, N) or (B, C, H, W) tensor last."""
    fn = getattr(node, "grad_fn", None)
    order = saved_permutation(fn) if fn is not None else None
    return order is not None and len(order) >= 3 and order[-1] == 1 and order[0] == 0 and \
        list(order[1:-1]) == list(range(2, len(order)))


def _map_channel_concat(node: Any) -> bool:
    """Concat mappings from the input sizes autograd recorded, for concats along the channel dim (torch-pruning
    infers them by walking the graph, which fails behind a remapped split: Res2Net's ``torch.cat(spo, 1)``). True
    when every input got its mapping."""
    shapes = input_shapes(node.grad_fn)
    dim = saved_dim(node.grad_fn)
    if not shapes or any(not s or len(s) != len(shapes[0]) for s in shapes):
        return False
    dim %= len(shapes[0])
    return dim == _channel_dim(len(shapes[0])) and map_concat(node, [s[dim] for s in shapes])


def _split_ties(node: Any, positions: Mapping[int, int], ties: list, mixed: dict) -> None:
    """A channel split into equal pieces (``torch.split(x, width)``, ``chunk``) stays one only if every piece loses
    the same places: tie the root channels at the same place of every piece (the module's split size follows
    the new width). Unequal pieces or a split only partly in the group can't be kept equal."""
    layout = _channel_split(node)
    if layout is None:
        return
    _, sizes, shape = layout
    size = sizes[0]
    if len(set(sizes)) > 1 or set(positions) != set(range(shape[layout[0]])):
        what = f"into unequal pieces {list(sizes)}" if len(set(sizes)) > 1 else "partly outside the group"
        mixed[f"splits channels {what} at {node.name}, which must all lose the same channels"] = None
        return
    first: dict[int, int] = {}
    for p, root in positions.items():
        ties.append((first.setdefault(p % size, root), root))


def _mapped(dep: Any, idxs: list, limit: int) -> Optional[list]:
    """``idxs`` through the dependency's index mappings; ``None`` when a flatten expansion would produce more
    than ``limit`` positions (chained reshapes multiply positions without bound, e.g. global-context attention)."""
    for mapping in dep.index_mapping:
        if mapping is None or not idxs:
            continue
        stride = flatten_stride(mapping) or 1
        if not getattr(mapping, "reverse", True) and len(idxs) * stride > limit:
            return None
        idxs = mapping(idxs)
    return idxs


def _translate(ctx: _Context, draft: _Draft, item: _Item) -> None:
    """Turn one torch-pruning group item into raw slices, problems and flags."""
    node, handler = item.dep.target, item.dep.handler
    by_root: dict[int, list[int]] = {}
    for pos, root in zip(item.idxs, item.root_idxs):
        if root is None:
            draft.problem(f"torch-pruning lost the channel mapping at {node.name}", 4)
            return
        by_root.setdefault(root, []).append(pos)
    kind, module = node.type, node.module
    if getattr(node, "grad_fn", None) in ctx.weight_path:
        return  # computes a standardised conv's weight from its parameter, which the conv's own slice covers
    if (0, TOKEN_REASON) in draft.problems or (kind in _LAYERS and _other_axis(item.dep, len(set(item.idxs)))):
        return
    if kind == ops.OPTYPE.ELEMENTWISE and _onto_tokens(draft, item.dep):
        draft.problem(TOKEN_REASON, 0)  # what torch-pruning couples beyond is the token axis, not channels
        return
    if kind in _LAYERS:
        _layer_slices(ctx, draft, module, handler, by_root)
    elif kind in (ops.OPTYPE.BN, ops.OPTYPE.IN):
        _add_tensors(ctx, draft, module, ("weight", "bias", "running_mean", "running_var"), "norm", by_root)
    elif kind == ops.OPTYPE.GN:
        size = module.num_channels // module.num_groups
        if size > 1 and not norms.covers(module):
            draft.problem(f"GroupNorm (num_groups={module.num_groups}) normalises across these channels, "
                          "so masking is not equivalent to removal", 1)
        # covered: normalised over the alive channels, every group losing the same positions (sliced: same groups)
        balance = size if 1 < size < module.num_channels else 0
        _add_tensors(ctx, draft, module, ("weight", "bias"), "norm", by_root, balance=balance)
    elif kind == ops.OPTYPE.LN:
        if not norms.covers(module):  # covered norms compute over the alive channels (chase_timm.norms)
            draft.problem("LayerNorm normalises across these channels, so masking is not equivalent to removal", 1)
        _add_tensors(ctx, draft, module, ("weight", "bias"), "norm", by_root, dim=-1)
    elif kind == ops.OPTYPE.PRELU:
        if module.num_parameters > 1:
            _add_tensors(ctx, draft, module, ("weight",), "free", by_root)
    elif kind == ops.OPTYPE.PARAMETER:
        _parameter_slice(ctx, draft, node, by_root)
    elif kind in (ops.OPTYPE.EMBED, ops.OPTYPE.MHA, ops.OPTYPE.LSTM, ops.OPTYPE.CUSTOMIZED):
        draft.problem(f"touches {type(module).__name__}, whose channels can't be removed exactly", 2)
    elif kind == ops.OPTYPE.OUTPUT:
        draft.problem("reaches the model output (removing channels would change the output shape)", 0)
    elif kind == ops.OPTYPE.CONCAT:
        draft.joins.add(node)
    elif kind == ops.OPTYPE.ELEMENTWISE:
        if _is_add(node) and not _response_norm_add(node):
            draft.joins.add(node)
    else:
        _shape_op(draft, node, item)


def _layer_slices(ctx: _Context, draft: _Draft, layer: nn.Module, handler: Any, by_root: dict) -> None:
    """Conv/Linear weight rows (producer) or columns (consumer), with bias; depthwise convs are in=out tied."""
    is_out = handler in _OUT_HANDLERS
    if is_out:
        draft.covers.setdefault(layer, set()).update(p for ps in by_root.values() for p in ps)
        if id(layer) in ctx.heads:
            draft.problem("classifier output", 0)
        _add_tensors(ctx, draft, layer, _row_parameters(layer), "free", by_root)  # e.g. ScaledStdConv's gain
    elif layer in ctx.tied_inputs:
        draft.problem(ctx.tied_inputs[layer], 1)
    elif _standardised_weight(ctx, layer) and not norms.covers(layer):  # covered: standardised over alive inputs
        draft.problem(f"a convolution computing its weight in forward ({ctx.module_names.get(layer, type(layer).__name__)}"
                      ") consumes these channels: weight standardisation, e.g., counts zeroed inputs in each output "
                      "row's mean and variance, so masking is not equivalent to removal", 1)
    if isinstance(layer, nn.Linear):
        if is_out:
            _add_tensors(ctx, draft, layer, ("weight",), "producer", by_root)
            _add_tensors(ctx, draft, layer, ("bias",), "bias", by_root)
        else:
            _add_tensors(ctx, draft, layer, ("weight",), "consumer", by_root, dim=1)
        return
    groups, cin, cout = layer.groups, layer.in_channels, layer.out_channels
    multiplier = conv_multiplier(layer)
    if multiplier and not is_out:
        return  # one input channel per group: its weight rows are the output slice's, taken with them
    if multiplier or groups > 1 and groups == cin == cout:  # whole groups (a multiplier's: reached via its inputs)
        _add_tensors(ctx, draft, layer, ("weight",), "producer", by_root)
        _add_tensors(ctx, draft, layer, ("bias",), "bias", by_root)
    elif groups > 1 and (layer.transposed or handler == tp.prune_depthwise_conv_out_channels):
        draft.problem(f"grouped convolution (groups={groups}, {cin}->{cout}) is not supported", 2)
    elif is_out:
        balance = cout // groups if groups > 1 else 0
        _add_tensors(ctx, draft, layer, ("weight",), "producer", by_root, dim=1 if layer.transposed else 0,
                     balance=balance)
        _add_tensors(ctx, draft, layer, ("bias",), "bias", by_root, balance=balance)
    else:
        local = cin // groups if groups > 1 else 0
        _add_tensors(ctx, draft, layer, ("weight",), "consumer", by_root, dim=0 if layer.transposed else 1,
                     size=cin, local=local, balance=local)


def _standardised_weight(ctx: _Context, layer: nn.Module) -> bool:
    """A non-depthwise convolution whose forward convolves with a weight computed from its parameter (timm's
    StdConv2d / ScaledStdConv2d normalise each output row over in_channels x kernel)."""
    if not isinstance(layer, nn.modules.conv._ConvNd) or layer.groups == layer.in_channels == layer.out_channels:
        return False
    weight = _weight_source(ctx.graph.module2node.get(layer))
    while weight is not None and type(weight).__name__ == "ToCopyBackward0":  # a dtype cast (autocast, bf16 / fp16)
        weight = weight.next_functions[0][0]
    return weight is not None and type(weight).__name__ != "AccumulateGrad"


def _weight_source(node: Any) -> Any:
    """The autograd node that produced the weight a traced convolution ran with (None if unknown)."""
    fn = getattr(node, "grad_fn", None)
    sources = getattr(fn, "next_functions", ())
    return sources[1][0] if fn is not None and fn.name().startswith("ConvolutionBackward") and len(sources) > 1 \
        else None


def _weight_paths(graph: tp.DependencyGraph, model: nn.Module) -> set:
    """The autograd nodes between each covered standardised conv's weight parameter and the convolution (reshape,
    batch norm, cast): torch-pruning traces them like activations, but the conv's weight slice covers them."""
    path = set()
    for module in model.modules():
        stack = [_weight_source(graph.module2node.get(module))] if norms.covers(module) and \
            isinstance(module, norms.STANDARDISED_CONVS) else []
        while stack:
            fn = stack.pop()
            if fn is not None and fn not in path and type(fn).__name__ != "AccumulateGrad":
                path.add(fn)
                stack.extend(f for f, _ in fn.next_functions)
    return path


def _row_parameters(layer: nn.Module) -> tuple[str, ...]:
    """A layer's own parameters other than weight and bias with one entry per output channel: shaped like its
    weight with every dim but the first 1 (ScaledStdConv's ``gain``: (out, 1, 1, 1)); a 1-D parameter of a square
    layer could as well be per input channel, so it is not taken."""
    rows = _out_channels(layer)
    return tuple(n for n, p in layer.named_parameters(recurse=False)  # shaped like the weight, one entry per row
                 if n not in ("weight", "bias") and p.dim() == getattr(layer, "weight", p).dim()
                 and p.shape[0] == rows == p.numel())


def _add_tensors(ctx: _Context, draft: _Draft, module: nn.Module, attrs: Sequence[str], role: str,
                 by_root: dict, dim: int = 0, size: Optional[int] = None, local: int = 0, balance: int = 0) -> None:
    """Raw slices for the named tensors of ``module`` that exist."""
    for attr in attrs:
        tensor = getattr(module, attr, None)
        if not isinstance(tensor, torch.Tensor):
            continue
        if id(tensor) not in ctx.names:
            draft.problem(f"{ctx.module_names.get(module, type(module).__name__)}.{attr} is not a plain "
                          "parameter or buffer (parametrized?)", 2)
            continue
        d = dim % tensor.dim()
        draft.raws.append(_Raw(ctx.names[id(tensor)], d, role, size or tensor.shape[d], by_root, local, balance))


def _parameter_slice(ctx: _Context, draft: _Draft, node: Any, by_root: dict) -> None:
    """A bare nn.Parameter (layer scale, position embedding): a free slice if only scaled/shifted/concatenated."""
    param = node.module
    name = ctx.names.get(id(param), "an unnamed parameter")
    uses = [n.grad_fn.name() for n in node.outputs if hasattr(n.grad_fn, "name")]
    odd = [u for u in uses if _op(u) not in _SCALE_SHIFT_OPS]
    if odd or id(param) not in ctx.names:
        draft.problem(f"parameter {name} feeds {odd[0] if odd else 'an unknown op'}, "
                      "which torch-pruning cannot slice exactly", 2)
        return
    dim = node.pruning_dim % param.dim()
    draft.raws.append(_Raw(name, dim, "free", param.shape[dim], by_root))


def _is_add(node: Any) -> bool:
    """An elementwise add/sub of at least two computed tensors (a residual join)."""
    name = node.grad_fn.name() if hasattr(node.grad_fn, "name") else ""
    sources = {n for n in node.inputs if n.type != ops.OPTYPE.PARAMETER}
    return name.startswith(("AddBackward", "SubBackward")) and len(sources) >= 2


def _other_axis(dep: Any, width: int) -> bool:
    """Whether a Linear applied to a permuted view reads (or writes) an axis other than the one that carries the
    walk's ``width`` channels there. Then the channels are a batch axis to it: removing one takes none of its
    weights, and the walk passes it through (the numerical check confirms). torch-pruning follows channels through
    a permute as if it were elementwise and would map them onto the Linear's features. Examples: MLP-Mixer's and
    ResMLP's token MLP ((B, N, C) -> (B, C, N)), gMLP's spatial gating projection over the tokens of half of the
    hidden channels. The axes are told apart by size: the Linear's axis of the permuted tensor must differ from
    ``width`` and another non-batch axis must match it (a square token x channel map stays coupled); and the Linear
    must work on that axis, not on a flatten of the permuted tensor (ConvNeXt's head on a 1x1 map)."""
    layer = dep.target.module
    if not isinstance(layer, nn.Linear):
        return False
    up = dep.handler == tp.prune_linear_in_channels
    for near in (dep.target.inputs if up else dep.target.outputs):
        fn = getattr(_past_views(near, up), "grad_fn", None)
        order = saved_permutation(fn) if fn is not None else None
        if order:
            shape = result_shape(fn)  # the permuted tensor: the Linear's input, or its output permuted back
            features = len(order) - 1 if up else order.index(len(order) - 1)  # where the Linear's own axis lies
            own = layer.in_features if up else layer.out_features
            others = [s for i, s in enumerate(shape) if i not in (0, features)]
            return shape[features] == own != width and width in others
    return False


def _onto_tokens(draft: _Draft, dep: Any) -> bool:
    """A Linear's outputs transposed (B, C, N) -> (B, N, C) onto the token axis (MLP-Mixer's token-MLP output);
    not when the transposed tensor is unflattened into a (B, C, H, W) map, where dim 1 is a convolution's channel
    axis (PVT-v2's ``fc1 -> transpose -> view -> depthwise conv``)."""
    fn = getattr(dep.target, "grad_fn", None)
    if fn is None or saved_permutation(fn) != (0, 2, 1) or not isinstance(_past_views(dep.source, True).module,
                                                                           nn.Linear):
        return False
    out = result_shape(fn)
    width = len(draft.requested)
    return out[1] == width != out[2] and not any(
        n.type == ops.OPTYPE.RESHAPE and _unflattens_tokens(saved_input_shape(n.grad_fn), result_shape(n.grad_fn),
                                                            width) for n in dep.target.outputs)


def _unflattens_tokens(before: tuple, after: tuple, width: int) -> bool:
    """(B, C, N) -> (B, C, H, W) with the walk's ``width`` channels on dim 1 (told apart from N by size): the
    token axis of a channel-first token tensor unflattened into a map, channels untouched."""
    return len(before) == 3 and len(after) == 4 and tuple(before[:2]) == tuple(after[:2]) and \
        before[1] == width != before[2] == after[2] * after[3]


def _past_views(node: Any, up: bool) -> Any:
    """The first node up (or down) from ``node`` that is not part of F.linear on a 3-D input (its 3-D <-> 2-D
    views and the matmul of a non-contiguous input)."""
    while node.type == ops.OPTYPE.RESHAPE or (node.type == ops.OPTYPE.ELEMENTWISE
                                               and _fn_name(node).startswith(_LINEAR_PARTS)):
        near = [n for n in (node.inputs if up else node.outputs)
                if n.type != ops.OPTYPE.PARAMETER and not _fn_name(n).startswith("TBackward")]  # not the weight
        if len(near) != 1:
            break
        node = near[0]
    return node


def _fn_name(node: Any) -> str:
    fn = getattr(node, "grad_fn", None)
    return fn.name() if hasattr(fn, "name") else ""


def _response_norm_add(node: Any) -> bool:
    """GRN's own ``x + addcmul(bias, weight, x * x_n)``: a per-channel update of one tensor, not a residual join."""
    return any(n.grad_fn is not None and n.grad_fn.name().startswith("AddcmulBackward")
               and any(p.type == ops.OPTYPE.PARAMETER for v in n.inputs for p in v.inputs) for n in node.inputs)


def _shape_op(draft: _Draft, node: Any, item: _Item) -> None:
    """Reshape/split/unbind/slice/expand: fine only when they don't regroup the channel dim. The width a token
    tensor is told apart by is the positions reaching it (past a multiplier conv: k per requested channel)."""
    dep = item.dep
    fn = node.grad_fn
    name = fn.name() if hasattr(fn, "name") else type(fn).__name__
    before, after = saved_input_shape(fn), result_shape(fn)
    kind = node.type
    if kind == ops.OPTYPE.RESHAPE and (_keeps_channels(before, after) or _flatten(before, after, dep)
                                       or any(map(is_interleave, (dep, *node.dependencies)))
                                       or any(map(is_permutation, node.dependencies))
                                       or _keeps_last(before, after, node)
                                       or _unflattens_tokens(before, after, len(item.idxs))):
        return
    if kind == ops.OPTYPE.EXPAND and before and len(before) == len(after) and \
            before[_channel_dim(len(before))] == after[_channel_dim(len(after))]:
        return
    if kind == ops.OPTYPE.SLICE and _slice_keeps_channels(node):
        return
    if kind == ops.OPTYPE.SPLIT and _split_keeps_channels(node):
        return
    what = {ops.OPTYPE.RESHAPE: "reshape", ops.OPTYPE.SPLIT: "split", ops.OPTYPE.UNBIND: "unbind",
            ops.OPTYPE.SLICE: "channel slice", ops.OPTYPE.EXPAND: "expand"}.get(kind, str(kind))
    shapes = f" {list(before)} -> {list(after)}" if before and after else ""
    draft.problem(f"touches a {what} ({name}{shapes}) that regroups channels, e.g. into attention heads", 3)


def _slice_keeps_channels(node: Any) -> bool:
    """A slice along a dim other than the channel dim of its input's layout: the last dim of a channels-last map
    (cropping rows and columns of (B, H, W, C) back after window padding, ``x[:, :H, :W, :]``), else
    torch-pruning's convention (dim 1, or the last dim of a (B, N, C) token tensor)."""
    before = saved_input_shape(node.grad_fn)
    if not before:
        return False
    channels = len(before) - 1 if len(before) > 3 and _channels_last(node) else _channel_dim(len(before))
    return saved_dim(node.grad_fn) % len(before) != channels


def _split_keeps_channels(node: Any) -> bool:
    """A channel split whose pieces are consumed channel-wise (ties in ``_split_ties`` keep the pieces equal), or a
    split along a dim torch-pruning maps nothing on (neither dim 1 nor the last)."""
    layout = split_layout(node.grad_fn)
    if layout is None:
        return False
    dim, _, shape = layout
    return _channel_split(node) is not None or dim not in (1, len(shape) - 1)


def _channel_dim(ndim: int) -> int:
    """torch-pruning's channel convention: NCHW dim 1, (B, N, C) token tensors the last dim."""
    return 2 if ndim == 3 else min(1, ndim - 1)


def _keeps_channels(before: tuple, after: tuple) -> bool:
    """Only singleton dims change, or only dims after the channel dim are regrouped (NCHW -> NC(HW))."""
    if not before or not after:
        return False
    if [s for s in before if s != 1] == [s for s in after if s != 1]:
        return True
    lead = _channel_dim(len(before)) + 1
    return len(after) >= lead and tuple(before[:lead]) == tuple(after[:lead])


def _keeps_last(before: tuple, after: tuple, node: Any) -> bool:
    """A channels-last map regrouped in front of its channel dim: (B, H, W, C) -> windows of (B', N, C)."""
    return bool(before) and bool(after) and before[-1] == after[-1] and _channels_last(node)


def _flatten(before: tuple, after: tuple, dep: Any) -> bool:
    """(N, C, H, W) -> (N, C*H*W) with torch-pruning's flatten index mapping in place."""
    flat = len(before) >= 2 and tuple(after) == (before[0], _prod(before[1:]))
    return flat and any(flatten_stride(m) is not None for m in dep.index_mapping)


def _prod(sizes: Sequence[int]) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _check_shortcut(ctx: _Context, draft: _Draft, group: list[_Item]) -> None:
    """Also a residual stream: the tensor forks into a block and its projection shortcut (e.g. ResNet stem). The q, k
    and v layers of one attention module are one branch (HaloNet's q and kv: the logits' position bias is an add)."""
    members = {it.dep.target for it in group if it.dep.target.type in _LAYERS}
    branches: dict[Any, tuple[bool, bool]] = {}
    for reader in _readers(group):
        loops, reaches_add = _walk(reader, members - {reader})
        branch = ctx.attention_inputs.get(reader.module, reader)
        looped, added = branches.get(branch, (False, False))
        branches[branch] = (looped or loops, added or reaches_add)
    leaving = [reaches_add for loops, reaches_add in branches.values() if not loops]
    draft.residual |= len(leaving) >= 2 and any(leaving)


def _check_skip(draft: _Draft, group: list[_Item]) -> None:
    """A residual stream: a layer that reads the group's channels and writes other channels leads back to one of
    the group's adds or concats (``x + f(x)`` with a multi-layer ``f``, DenseNet's ``cat([x, f(x)])``; a single
    conv is ``_check_shortcut``'s). Joins that only merge branches (Inception's concat, GhostNet's
    ``cat([x, cheap(x)])``, summed re-parameterisable branches) leave the group internal, like a bottleneck's width."""
    if not draft.joins or draft.residual:
        return
    writers = {it.dep.target for it in group if it.dep.handler in _OUT_HANDLERS}
    stack = [out for reader in _readers(group) if reader not in writers for out in reader.outputs]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in draft.joins:
            draft.residual = True
            return
        if node not in seen:
            seen.add(node)
            stack.extend(node.outputs)


def _readers(group: list[_Item]) -> list[Any]:
    """The Conv/Linear nodes whose input channels are in the group (depthwise convs, tied in and out, are not)."""
    return [it.dep.target for it in group if it.dep.target.type in (ops.OPTYPE.CONV, ops.OPTYPE.LINEAR)
            and it.dep.handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels)]


def _walk(start: Any, members: set) -> tuple[bool, bool]:
    """From a consumer's output up to the next layers: (comes back into the group, reaches a residual add)."""
    stack, seen, loops, adds = list(start.outputs), set(), False, False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.type in _LAYERS:
            loops |= node in members
        elif _is_add(node):
            adds = True
        elif node.type != ops.OPTYPE.OUTPUT:
            stack.extend(node.outputs)
    return loops, adds


def _form_classes(draft: _Draft) -> None:
    """Validate positions, then tie root channels a grouped conv (balanced removal), an elementwise join of two
    channels or an equal-piece split forces together."""
    parent = {r: r for r in draft.requested}

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for raw in draft.raws:
        owners = {p: root for root, positions in raw.by_root.items() for p in positions}
        bad = [p for p in owners if not 0 <= p < raw.size]
        if bad:
            draft.problem(f"torch-pruning maps channels onto position {bad[0]} of {raw.tensor} dim {raw.dim} "
                          f"(size {raw.size}): inconsistent coupling, e.g. across a transpose or reshape")
        if raw.balance:
            if set(owners) != set(range(raw.size)):
                draft.problem(f"{raw.tensor} (a grouped convolution or GroupNorm) needs balanced per-group "
                              "removal and the group covers only part of its channels", 4)
            tie: dict[int, int] = {}
            for p, root in owners.items():
                other = tie.setdefault(p % raw.balance, root)
                parent[find(root)] = find(other)
    for a, b in draft.ties:
        if a is not None and b is not None:  # a lost root mapping is reported by _translate
            parent[find(a)] = find(b)
    classes: dict[int, list[int]] = {}
    for r in draft.requested:
        classes.setdefault(find(r), []).append(r)
    draft.classes = list(classes.values())


def _flag_overlaps(drafts: Sequence[_Draft]) -> None:
    """Groups must be disjoint: a tensor position claimed by two groups makes both non-prunable."""
    by_name = {d.name: d for d in drafts}
    owners: dict[tuple[str, int], dict[int, str]] = {}
    for draft in drafts:
        for raw in draft.raws:
            owner = owners.setdefault((raw.tensor, raw.dim), {})
            clashes = set()
            for p in {p % raw.local if raw.local else p for ps in raw.by_root.values() for p in ps}:
                other = owner.setdefault(p, draft.name)
                if other != draft.name:
                    clashes.add(other)
            for other in sorted(clashes):
                draft.problem(f"shares {raw.tensor} dim {raw.dim} with group {other!r}")
                by_name[other].problem(f"shares {raw.tensor} dim {raw.dim} with group {draft.name!r}")


# ------------------------------------------------------------------------------------------ verification

def _verified(model: nn.Module, groups: list[ChannelGroup], inputs: tuple, deadline: float) -> list[ChannelGroup]:
    """Numerically confirm masking == slicing for every prunable group; failures become non-prunable."""
    candidates = [g for g in groups if g.prunable]
    if not candidates:
        return groups
    rng = random.Random(0)
    subsets = {g.name: sorted(rng.sample(range(g.width), k)) for g, k in zip(candidates, _removal_counts(candidates))}
    failures: dict[str, str] = {}
    try:
        reference = _randomized(model)
        remaining = candidates
        while remaining:
            found = _bisect(reference, remaining, subsets, inputs, deadline)
            if not found:
                break
            failures.update(found)
            remaining = [g for g in remaining if g.name not in found]
    except Exception as err:  # the check itself could not run: nothing is confirmed
        failures = {g.name: f"numerical check could not run: {type(err).__name__}: {err}" for g in candidates}
    for name, reason in failures.items():
        _logger.info("channel group %s is not prunable: %s", name, reason)
    return [_with_reason(g, failures[g.name]) if g.name in failures else g for g in groups]


def _removal_counts(groups: Sequence[ChannelGroup]) -> list[int]:
    """Channels each group loses in the check: about half, but a different count for every group of the same width
    (w/2, w/2 + 1, w/2 - 1, ...), so that code reshaping one group's tensor with another group's width (timm's
    PVT-v2 forward, ``sr(x).reshape(B, C, -1)`` with the stream's C) fails instead of matching by coincidence."""
    seen: dict[int, int] = {}
    counts = []
    for g in groups:
        i = seen[g.width] = seen.get(g.width, -1) + 1
        offset = (i + 1) // 2 * (1 if i % 2 else -1)
        counts.append(1 + (g.width // 2 - 1 + offset) % (g.width - 1) if g.width > 1 else 1)
    return counts


def _randomized(model: nn.Module) -> nn.Module:
    """Eval-mode copy with every weight and BN statistic redrawn, so no zero-init branch or tiny layer scale
    hides a mismatch (exactness is structural, so any values will do)."""
    gen = torch.Generator().manual_seed(0)
    fresh: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if p.is_floating_point():
            fresh[id(p)] = nn.Parameter(_draw(tuple(p.shape), gen).to(p.device, p.dtype), p.requires_grad)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            mean, var = m.running_mean, m.running_var
            fresh[id(mean)] = (torch.randn(mean.shape, generator=gen) * 0.1).to(mean.device, mean.dtype)
            fresh[id(var)] = (torch.rand(var.shape, generator=gen) + 0.5).to(var.device, var.dtype)
    return _copy_sharing(model, fresh).eval()


def _copy_sharing(model: nn.Module, replaced: Mapping[int, torch.Tensor]) -> nn.Module:
    """Copy of the module tree that shares every tensor (no data copied) except those in ``replaced``."""
    memo = {id(t): replaced.get(id(t), t) for t in [*model.parameters(), *model.buffers()]}
    return deepcopy_model(model, memo)


def _draw(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Fan-in scaled normal weights; vectors (norm affine, biases, layer scales) uniform in [0.5, 1.5]."""
    if len(shape) < 2:
        return torch.rand(shape, generator=gen) + 0.5
    fan_in = max(1, _prod(shape) // shape[0])
    return torch.randn(shape, generator=gen) / fan_in ** 0.5


def _with_reason(group: ChannelGroup, reason: str) -> ChannelGroup:
    return replace(group, prunable=False, reason=reason)


def _bisect(model: nn.Module, batch: list[ChannelGroup], subsets: dict, inputs: tuple,
            deadline: float) -> dict[str, str]:
    """Names -> reason of the groups in ``batch`` that break masked/sliced equivalence (group testing)."""
    if time.monotonic() > deadline:
        return {g.name: TIMEOUT_REASON for g in batch}
    error = _mismatch(model, batch, subsets, inputs)
    if error is None:
        return {}
    if len(batch) == 1:
        return {batch[0].name: error}
    half = len(batch) // 2
    found = {**_bisect(model, batch[:half], subsets, inputs, deadline),
             **_bisect(model, batch[half:], subsets, inputs, deadline)}
    return found or {g.name: error + " (only in combination)" for g in batch}


def _mismatch(model: nn.Module, batch: list[ChannelGroup], subsets: dict, inputs: tuple) -> Optional[str]:
    """Zero the chosen channels' parameters in a copy, slice them out of it, compare eval outputs."""
    removals = tensor_removals(batch, {g.name: subsets[g.name] for g in batch})
    params = dict(model.named_parameters())
    zeroed = {}
    for name, dims in removals.items():
        if name in params:
            tensor = params[name].detach().clone()
            for dim, positions in dims.items():
                tensor.index_fill_(dim, torch.tensor(positions, device=tensor.device), 0)
            zeroed[id(params[name])] = nn.Parameter(tensor, requires_grad=False)
    work = _copy_sharing(model, zeroed)
    norms.follow_masks(work, norms.removal_masks(work, removals))  # as Chase runs the masked model
    try:
        with torch.no_grad():
            expected = _leaves(work(*inputs))
            slice_in_place(norms.remove_hooks(work), removals, refresh=False)
            actual = _leaves(work(*inputs))
    except Exception as err:
        return f"physically sliced model does not run: {type(err).__name__}: {err}"
    if len(expected) != len(actual) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return "physically sliced model changes the output shape"
    scale = max((e.abs().max().item() for e in expected if e.numel()), default=0.0) or 1.0
    diff = max((float((a - e).abs().max()) for a, e in zip(actual, expected) if e.numel()), default=0.0)
    if not diff <= _TOLERANCE * scale:  # also catches NaN
        return f"masking is not equivalent to removal (numerical check: max diff {diff:.3g} at output scale {scale:.3g})"
    return None


def _leaves(output: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, as float32."""
    if isinstance(output, torch.Tensor):
        return [output.float()]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _leaves(o)]
    return []
