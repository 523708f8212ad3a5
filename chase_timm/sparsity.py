"""Unstructured sparsity: which weights are sparse, ERK budgets, exact-count selection, prune and grow.

Everything here is a pure function of tensors plus a seeded ``torch.Generator``, so every rank of a
distributed run that holds the same (synchronised) weights and gradients takes the same decisions.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .norms import STANDARDISED_CONVS

__all__ = [
    "conv_linear_weights",
    "find_sparse_weights",
    "erk_densities",
    "allocate",
    "random_masks",
    "select_extreme",
    "prune_smallest",
    "grow_largest",
    "zero_positions",
    "magnitude_masks",
]

SPARSE_MODULE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
# convs that standardise their weight in forward (NFNet, ResNetV2-BiT) stay dense: a masked zero becomes -mean/std
STANDARDISED_REASON = "weight standardisation in forward turns masked zeros non-zero"
EXCLUDED_REASON = "matched ChaseConfig.exclude"
_NARROW_ABOVE = 1_000_000  # selections over more scores than this are narrowed on a sample first
_SAMPLE_SIZE = 100_000


def conv_linear_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every Conv/Linear weight by ``"<module>.weight"`` name, in module order: the tensors sparse kernels would
    skip zeros of, and the candidates for sparsity."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, SPARSE_MODULE_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter)}


def find_sparse_weights(model: nn.Module, exclude: Sequence[str] = ()
                        ) -> Tuple[Dict[str, nn.Parameter], Dict[str, str]]:
    """Every Conv/Linear weight with ndim >= 2, keyed by parameter name, and {name: reason} of those kept dense.

    Norm weights, biases and free parameters are never sparsified (the reference's name-based rule would
    sparsify LayerNorm weights; we select by module type instead). Dense: ``exclude`` patterns, and
    weight-standardised convs, whose effective weight (w - mean) / std would not be sparse.
    """
    matched = {pattern: False for pattern in exclude}
    weights: Dict[str, nn.Parameter] = {}
    dense: Dict[str, str] = {}
    for name, weight in conv_linear_weights(model).items():
        if weight.ndim < 2:
            continue
        module_name = name.rpartition(".")[0]
        hits = [p for p in exclude if fnmatch.fnmatchcase(module_name, p)]
        for pattern in hits:
            matched[pattern] = True
        if hits:
            dense[name] = EXCLUDED_REASON
        elif isinstance(model.get_submodule(module_name), STANDARDISED_CONVS):
            dense[name] = STANDARDISED_REASON
        else:
            weights[name] = weight
    unused = [p for p, hit in matched.items() if not hit]
    if unused:
        raise ValueError(
            f"ChaseConfig.exclude pattern(s) {unused} match no Conv/Linear module of {type(model).__name__}; "
            "patterns are fnmatch globs over module names such as 'conv1' or 'head.*'.")
    return weights, dense


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> Dict[str, float]:
    """Erdos-Renyi-Kernel layer densities (kernel dims included, power 1) with overall density ``density``.

    raw_l = sum(shape) / prod(shape); eps solves sum(eps·raw_l·N_l) = d·N over layers not yet dense; layers whose
    density would exceed 1 are made dense (the largest first) and eps is solved again.
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    total = sum(numel.values())
    dense: set = set()
    while True:
        sparse_names = [n for n in shapes if n not in dense]
        if not sparse_names:
            return {n: 1.0 for n in shapes}
        budget = density * total - sum(numel[n] for n in dense)
        eps = budget / sum(raw[n] * numel[n] for n in sparse_names)
        largest = max(raw[n] for n in sparse_names)
        if eps * largest <= 1.0:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(n for n in sparse_names if raw[n] == largest)


def allocate(total: int, shares: Mapping[str, float], capacity: Mapping[str, int]) -> Dict[str, int]:
    """Split the integer ``total`` in proportion to ``shares`` without exceeding ``capacity`` (exact sum).

    Largest-remainder rounding; capacity overflow is water-filled into the remaining layers. If the total
    exceeds the overall capacity every layer is filled.
    """
    counts = {n: 0 for n in shares}
    open_names = [n for n in shares if capacity[n] > 0]
    remaining = min(total, sum(capacity[n] for n in open_names))
    while remaining > 0 and open_names:
        weight = sum(max(shares[n], 0.0) for n in open_names)
        if weight <= 0:  # no preference left: spread evenly over what still has room
            weight, share = float(len(open_names)), {n: 1.0 for n in open_names}
        else:
            share = {n: max(shares[n], 0.0) for n in open_names}
        ideal = {n: remaining * share[n] / weight for n in open_names}
        grant = {n: min(int(math.floor(ideal[n])), capacity[n] - counts[n]) for n in open_names}
        leftover = remaining - sum(grant.values())
        by_remainder = sorted(open_names, key=lambda n: (-(ideal[n] - math.floor(ideal[n])), n))
        for n in by_remainder:
            if leftover <= 0:
                break
            if grant[n] < capacity[n] - counts[n]:
                grant[n] += 1
                leftover -= 1
        for n in open_names:
            counts[n] += grant[n]
        remaining = leftover
        open_names = [n for n in open_names if counts[n] < capacity[n]]
    return counts


def random_masks(shapes: Mapping[str, Sequence[int]], counts: Mapping[str, int],
                 generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Boolean masks with exactly ``counts[name]`` ones at uniformly random positions (CPU tensors)."""
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[:counts[name]]] = True
        masks[name] = flat.view(*shape)
    return masks


def select_extreme(scores: torch.Tensor, k: int, generator: torch.Generator, largest: bool) -> torch.Tensor:
    """Indices of exactly ``k`` largest (or smallest) entries of a 1-D tensor; ties at the cut broken at random.

    ``topk`` alone picks an implementation-defined subset among equal scores (e.g. the many exact-zero
    gradients); here the tied candidates are subsampled with the shared generator, so the choice is
    unbiased and identical on every rank. Large inputs are first narrowed with a cut estimated on a strided
    sample (exact: the narrowing is only used when it provably holds every entry of the top ``k``).
    """
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    if n > _NARROW_ABOVE and k < n // 4:
        sample = scores[:: n // _SAMPLE_SIZE]
        margin = min(sample.numel(), int(k * sample.numel() / n * 1.2) + 64)
        edge = torch.topk(sample, margin, largest=largest, sorted=False).values
        beyond_edge = scores >= edge.min() if largest else scores <= edge.max()
        narrowed = beyond_edge.nonzero().flatten()
        if narrowed.numel() >= k:
            return narrowed[_select_exact(scores[narrowed], k, generator, largest)]
    return _select_exact(scores, k, generator, largest)


def _select_exact(scores: torch.Tensor, k: int, generator: torch.Generator, largest: bool) -> torch.Tensor:
    """``topk`` plus random tie-breaking at the cut (see :func:`select_extreme`)."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    values, indices = torch.topk(scores, k, largest=largest, sorted=False)
    cut = values.min() if largest else values.max()
    beyond = scores > cut if largest else scores < cut
    n_beyond = int(beyond.sum())
    tied = (scores == cut).nonzero().flatten()
    if n_beyond + tied.numel() == k:  # no ambiguity at the cut
        return indices
    choice = torch.randperm(tied.numel(), generator=generator)[: k - n_beyond].to(tied.device)
    return torch.cat([beyond.nonzero().flatten(), tied[choice]])


def _select(scores: Mapping[str, torch.Tensor], total: int, counts: Optional[Mapping[str, int]],
            generator: torch.Generator, largest: bool) -> Dict[str, torch.Tensor]:
    """Flat positions per layer: ``total`` chosen across all layers, or ``counts[name]`` within each layer."""
    if counts is not None:
        return {n: select_extreme(s, counts[n], generator, largest) for n, s in scores.items()}
    chosen = select_extreme(torch.cat(list(scores.values())), total, generator, largest).sort().values
    out, offset = {}, 0
    for name, layer_scores in scores.items():
        lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + layer_scores.numel()],
                                                          device=chosen.device))
        out[name] = chosen[lo:hi] - offset
        offset += layer_scores.numel()
    return out


def prune_smallest(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], generator: torch.Generator,
                   *, total: int = 0, counts: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
    """Deactivate the smallest-|w| active weights: ``total`` globally or ``counts`` per layer. Returns flat positions.

    Inactive positions score +inf, so they are never chosen while enough active weights exist.
    """
    scores = {n: torch.where(masks[n].bool(), w.detach().abs().float(), math.inf).flatten() for n, w in weights.items()}
    chosen = _select(scores, total, counts, generator, largest=False)
    for name, pos in chosen.items():
        _set_flat(masks[name], pos, 0)
    return chosen


def grow_largest(grads: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 allowed: Mapping[str, torch.Tensor], generator: torch.Generator,
                 *, total: int = 0, counts: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
    """Activate inactive positions (inside ``allowed`` where given) with the largest |grad|.

    ``total`` globally or ``counts`` per layer; non-candidates score -1, below any |grad|, so callers cap
    the request at the number of candidates. Returns the flat positions grown per layer.
    """
    scores = {}
    for name, grad in grads.items():
        candidate = masks[name] == 0
        if name in allowed:
            candidate &= allowed[name]
        scores[name] = torch.where(candidate, grad.detach().abs().float(), -1.0).flatten()
    chosen = _select(scores, total, counts, generator, largest=True)
    for name, pos in chosen.items():
        _set_flat(masks[name], pos, 1)
    return chosen


def zero_positions(tensors: Iterable[torch.Tensor], positions: torch.Tensor) -> None:
    """Set the given flat positions of every tensor to zero (new weights and their optimizer state)."""
    for tensor in tensors:
        _set_flat(tensor, positions, 0)


def _set_flat(tensor: torch.Tensor, positions: torch.Tensor, value: float) -> None:
    """``tensor.flatten()[positions] = value`` in place, whatever the memory layout (a channels_last weight cannot
    be viewed flat; flat positions are in logical order)."""
    if tensor.is_contiguous():
        tensor.view(-1)[positions] = value
    else:
        tensor[torch.unravel_index(positions, tensor.shape)] = value


def magnitude_masks(weights: Mapping[str, torch.Tensor], counts: Optional[Mapping[str, int]],
                    generator: torch.Generator, *, total: int = 0) -> Dict[str, torch.Tensor]:
    """Boolean masks keeping the largest-|w| weights: exactly ``counts[name]`` per layer, or (``counts=None``) the
    ``total`` largest over all layers (one global threshold). Masks live on the weights' devices.

    The initial masks of a pretrained start (``ChaseConfig(mask_init="magnitude")``): they keep what the
    checkpoint's largest weights compute. Ties at the cut are broken with the shared ``generator``
    (:func:`select_extreme`), so equal weights on every rank give equal masks.
    """
    scores = {n: w.detach().abs().float().flatten() for n, w in weights.items()}
    chosen = _select(scores, total, counts, generator, largest=True)
    masks = {}
    for name, weight in weights.items():
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        _set_flat(mask, chosen[name], 1)
        masks[name] = mask
    return masks
