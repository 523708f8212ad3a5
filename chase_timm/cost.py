"""What removing a channel saves: FLOPs per channel of every channel group, for ``ChaseConfig(channel_cost="flops")``.

The paper removes the channels with the lowest UMM wherever they are. A channel of a late stage (7x7 tokens or
pixels) saves a fraction of the FLOPs of an early one, and ERK makes late layers the sparsest, so pure UMM takes
the cheapest channels first. :class:`FlopCosts` gives each group the FLOPs one of its channels saves; Chase then
ranks channels by UMM per FLOP saved (:func:`chase_timm.channels.per_cost`), the channel budget unchanged.

Counting: one forward of a shape-only (meta) copy under ``torch.utils.flop_counter.FlopCounterMode`` gives the
FLOPs of every module. A Conv/Linear layer's FLOPs are proportional to (rows) x (columns per group), so a group
channel covering ``p`` of the ``n`` positions along one weight dim saves ``F·p/n`` times the alive fraction of the
other dim (a depthwise conv, one column, counts once); an attention head also saves ``1/heads`` of the FLOPs its
attention module computes itself (q·kᵀ and attn·v, or ``nn.MultiheadAttention``'s fused projections). Exact to
first order: the count is redone when the model's shapes change (a physical shrink) and the alive fractions are
taken at every channel event. Not attributed: FLOPs of layers whose weights no group slices although their
size follows a channel count (token-mixing Linears of MLP-Mixer/gMLP act on a channel-batched tensor).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ._timm import clear_eval_caches, named_tensors
from .channels import alive_positions
from .graph import ChannelGroup
from .norms import remove_hooks
from .slim import meta_clone
from .sparsity import conv_linear_weights

__all__ = ["module_flops", "FlopCosts"]


def module_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Tuple[int, Dict[str, int]]:
    """Total FLOPs of ``model(*inputs)`` and the FLOPs of every module that ran (children included), by module
    name ("" is the model), from one forward under ``FlopCounterMode`` in eval mode (every module's own training flag restored).

    Counted with autograd on, whatever the caller's mode: FlopCounterMode's module tracker fails under no_grad on
    some models (PiT: "Expected gradient function to be set"); the count is the same either way.
    """
    flags = {m: m.training for m in model.modules()}  # a submodule the user keeps in eval stays so
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(False), torch.enable_grad(), counter:
            model(*inputs)
    finally:
        for module, flag in flags.items():
            module.training = flag
        clear_eval_caches(model)  # LeViT's attention-bias cache, filled with grad on: deepcopy would refuse it
    prefix = type(model).__name__ + "."  # FlopCounterMode keys modules as "<RootClass>.<qualified name>"
    per_module = {key[len(prefix):]: int(sum(ops.values())) for key, ops in counter.get_flop_counts().items()
                  if key.startswith(prefix)}
    return int(counter.get_total_flops()), per_module


class FlopCosts:
    """The cost model of ``ChaseConfig(channel_cost="flops")``: called with the prunable groups and their alive
    flags, returns the FLOPs (of one forward of ``inputs``) that removing one more channel of each group saves, an
    attention head counting whole. ``inputs``: example inputs (a meta copy, without Chase's norm hooks, runs on
    their shapes; a model that does not run on meta, e.g. one reading tensor values, is counted on itself with
    them, moved to its device). Counts once here."""

    def __init__(self, model: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
        self.model = model
        self.inputs = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)
        self._shapes: Optional[Dict[str, Tuple[int, ...]]] = None
        self._layer_flops: Dict[str, int] = {}  # Conv/Linear weight name -> its layer's FLOPs
        self._own_flops: Dict[str, int] = {}  # module name -> FLOPs it computes outside its child modules
        self._count()

    def _count(self) -> None:
        """Count FLOPs per module on a meta copy of the model as it is now (again only after a shape change)."""
        shapes = {n: tuple(t.shape) for n, t in named_tensors(self.model)}
        if shapes == self._shapes:
            return
        clone = remove_hooks(meta_clone(self.model))  # norm hooks hold real-device masks; FLOPs are the slice's
        try:
            _, per_module = module_flops(clone, tuple(torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor)
                                                      else x for x in self.inputs))
        except Exception:  # noqa: BLE001 — data-dependent forwards fail on meta; the real model counts the same
            clone = self.model
            device = next((t.device for _, t in named_tensors(clone)), None)
            _, per_module = module_flops(clone, tuple(x.to(device) if isinstance(x, torch.Tensor) and device else x
                                                      for x in self.inputs))
        self._layer_flops = {n: per_module.get(n.rpartition(".")[0], 0) for n in conv_linear_weights(clone)}
        self._own_flops = {name: per_module.get(name, 0) - sum(per_module.get(f"{name}.{c}" if name else c, 0)
                                                                for c, _ in module.named_children())
                           for name, module in clone.named_modules()}
        self._shapes = shapes

    def __call__(self, groups: Sequence[ChannelGroup], alive: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """FLOPs one channel (one entry: a whole head for an attention group) of each of ``groups`` saves now."""
        self._count()
        kept = alive_positions(groups, alive, self._shapes)

        def fraction(tensor: str, dim: int) -> float:
            vec = kept.get(tensor, {}).get(dim)
            return 1.0 if vec is None else int(vec.sum()) / vec.numel()

        costs = {}
        for group in groups:
            saved, owners = 0.0, set()
            for piece in group.slices:
                if piece.tensor in self._layer_flops and piece.dim in (0, 1):
                    per_channel = sum(len(p) for p in piece.index) / len(piece.index)
                    saved += (self._layer_flops[piece.tensor] * per_channel / self._shapes[piece.tensor][piece.dim]
                              * fraction(piece.tensor, 1 - piece.dim))
                if group.heads:  # the attention module: the parent of its projections, or the module itself
                    module = piece.tensor.rpartition(".")[0]
                    owners.add(module.rpartition(".")[0] if f"{module}.weight" in self._layer_flops else module)
            saved += sum(self._own_flops.get(o, 0) for o in owners) / group.width
            costs[group.name] = saved
        return costs
