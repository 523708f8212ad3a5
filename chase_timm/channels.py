"""Channel sparsity policy: UMM scores per group, floors, and exact global selection of channels to remove.

Structure (which slices are coupled) comes from :mod:`chase_timm.graph`; this module only decides *which*
channels go, following the paper: the globally lowest Unmasked Mean Magnitude first, never taking a group
below its floor floor(C·(1-S_c)·beta).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import torch

from .graph import ChannelGroup

__all__ = ["group_floor", "umm_scores", "select_channels", "tensor_keep_masks"]


def group_floor(width: int, channel_sparsity: float, min_channel_ratio: float, round_to: int = 1) -> int:
    """Fewest channels a group may keep: floor(C·(1-S_c)·beta), at least one (and a multiple of ``round_to``)."""
    floor = max(1, int(width * (1.0 - channel_sparsity) * min_channel_ratio))
    if round_to > 1:
        floor = min(width, math.ceil(floor / round_to) * round_to)
    return floor


def _index_tensor(index: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Group channel j -> positions along the slice dim, as a padded (width, k) tensor (-1 = padding)."""
    k = max(len(pos) for pos in index)
    rows = [list(pos) + [-1] * (k - len(pos)) for pos in index]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _per_channel_sum(values: torch.Tensor, index: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum a per-position vector over each group channel's positions."""
    idx = _index_tensor(index, values.device)
    padded = torch.cat([values, values.new_zeros(1)])
    return padded[idx].sum(dim=1)


def umm_scores(groups: Sequence[ChannelGroup], tensors: Mapping[str, torch.Tensor],
               keep: Mapping[str, torch.Tensor] | None = None, fanin: str = "original",
               base_shapes: Mapping[str, Sequence[int]] | None = None) -> Dict[str, torch.Tensor]:
    """Unmasked Mean Magnitude of every channel of every group (float64 on CPU).

    UMM_c = sum of |w| over the channel's producer rows (masked zeros included) / their fan-in. With several
    producers (depthwise convs, SE gates, residual streams) the L1 norms and the fan-ins are summed, so a
    single-producer group reduces to the paper's formula. ``fanin="alive"`` divides by the fan-in that is
    still unmasked in ``keep`` (elementwise channel masks) instead of the original one. ``base_shapes``: the
    tensors' shapes before the model was physically shrunk, which the original fan-in is measured on.
    """
    scores = {}
    for group in groups:
        l1 = torch.zeros(group.width, dtype=torch.float64)
        fan = torch.zeros(group.width, dtype=torch.float64)
        for piece in group.producers():
            weight = tensors[piece.tensor].detach()
            other_dims = [d for d in range(weight.ndim) if d != piece.dim]
            row_l1 = weight.abs().sum(dim=other_dims, dtype=torch.float64)
            if fanin == "alive" and keep is not None and piece.tensor in keep:
                row_fan = keep[piece.tensor].sum(dim=other_dims, dtype=torch.float64)
            else:  # "alive" without channel masks: nothing removed is left in the (shrunk) tensor
                shape = weight.shape if fanin == "alive" or base_shapes is None else base_shapes[piece.tensor]
                row_fan = torch.full_like(row_l1, math.prod(shape) / shape[piece.dim])
            l1 += _per_channel_sum(row_l1, piece.index).cpu()
            fan += _per_channel_sum(row_fan, piece.index).cpu()
        scores[group.name] = l1 / fan.clamp_min(1.0)
    return scores


def select_channels(scores: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor],
                    floors: Mapping[str, int], n_remove: int, generator: torch.Generator,
                    round_to: int = 1) -> Dict[str, torch.Tensor]:
    """Choose ``n_remove`` alive channels with the globally lowest score, never below a group's floor.

    Water-filling: channels are visited from the lowest score up (exact ties in random order from the shared
    generator) and skipped once their group sits at its floor, so a saturated group's share flows to the
    others. With ``round_to > 1`` each group then keeps a multiple of ``round_to`` channels (rounding up,
    i.e. restoring its highest-scored picks, so floors always hold). Returns removed indices per group.
    """
    names = [n for n in scores if bool(alive[n].any())]
    if n_remove <= 0 or not names:
        return {}
    cand_scores, cand_group, cand_index = [], [], []
    for gi, name in enumerate(names):
        idx = alive[name].nonzero().flatten()
        cand_scores.append(scores[name][idx])
        cand_group.append(torch.full_like(idx, gi))
        cand_index.append(idx)
    flat_scores = torch.cat(cand_scores)
    shuffle = torch.randperm(flat_scores.numel(), generator=generator)
    order = shuffle[torch.sort(flat_scores[shuffle], stable=True).indices]
    group_of = torch.cat(cand_group)[order].tolist()
    index_of = torch.cat(cand_index)[order].tolist()

    room = {gi: int(alive[n].sum()) - floors[n] for gi, n in enumerate(names)}
    chosen: Dict[int, list] = {gi: [] for gi in range(len(names))}
    taken = 0
    for gi, ci in zip(group_of, index_of):
        if taken >= n_remove:
            break
        if room[gi] > 0:
            chosen[gi].append(ci)
            room[gi] -= 1
            taken += 1
    if round_to > 1:
        for gi, picks in chosen.items():
            kept = int(alive[names[gi]].sum()) - len(picks)
            excess = (-kept) % round_to  # channels to give back so the kept count is a multiple
            if excess:
                del picks[len(picks) - min(excess, len(picks)):]
    return {names[gi]: torch.tensor(sorted(p), dtype=torch.long) for gi, p in chosen.items() if p}


def tensor_keep_masks(groups: Sequence[ChannelGroup], alive: Mapping[str, torch.Tensor],
                      tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Elementwise 0/1 masks (in each tensor's dtype) for every tensor touched by a removed channel.

    A position is kept unless some removed channel's slice covers it; this is the channel mask F that is
    AND-ed into the unstructured masks and multiplied into norm/bias/free parameters.
    """
    per_dim: Dict[str, Dict[int, torch.Tensor]] = {}
    for group in groups:
        removed = (~alive[group.name]).nonzero().flatten().tolist()
        if not removed:
            continue
        for piece in group.slices:
            if piece.tensor not in tensors:
                continue  # buffers (running stats) need no masking: their channel's affine output is zero
            size = tensors[piece.tensor].shape[piece.dim]
            vec = per_dim.setdefault(piece.tensor, {}).setdefault(piece.dim, torch.ones(size, dtype=torch.bool))
            vec[[pos for j in removed for pos in piece.index[j]]] = False
    masks = {}
    for name, dims in per_dim.items():
        tensor = tensors[name]
        keep = torch.ones(tensor.shape, dtype=torch.bool)
        for dim, vec in dims.items():
            shape = [1] * tensor.ndim
            shape[dim] = -1
            keep &= vec.view(shape)
        masks[name] = keep.to(device=tensor.device, dtype=tensor.dtype)
    return masks
