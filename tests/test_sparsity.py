"""Unstructured-sparsity primitives: ERK, exact allocation, exact selection with random tie-breaking."""
import math

import pytest
import torch

from chase_timm.sparsity import allocate, erk_densities, grow_largest, prune_smallest, random_masks, select_extreme

SHAPES = {"stem": (16, 3, 3, 3), "a": (64, 16, 3, 3), "b": (128, 64, 3, 3), "fc": (10, 128)}


def test_erk_follows_the_formula_and_hits_the_density():
    densities = erk_densities(SHAPES, 0.1)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    assert sum(densities[n] * numel[n] for n in SHAPES) == pytest.approx(0.1 * sum(numel.values()))
    sparse = [n for n in SHAPES if densities[n] < 1]
    ratio = {n: densities[n] / (sum(SHAPES[n]) / numel[n]) for n in sparse}  # eps is shared
    assert max(ratio.values()) == pytest.approx(min(ratio.values()))
    assert densities["stem"] == 1.0  # small stem would exceed 1: capped dense


def test_allocate_is_exact_and_capped():
    counts = allocate(1000, {"a": 1.0, "b": 2.0, "c": 7.0}, {"a": 1000, "b": 1000, "c": 50})
    assert sum(counts.values()) == 1000 and counts["c"] == 50
    assert counts["b"] == pytest.approx(2 * counts["a"], abs=1)
    assert allocate(10, {"a": 1.0}, {"a": 3}) == {"a": 3}


def test_random_masks_have_exact_counts_and_follow_the_seed():
    counts = {"a": 100, "b": 5}
    shapes = {"a": (10, 20), "b": (5, 5)}
    first = random_masks(shapes, counts, torch.Generator().manual_seed(3))
    again = random_masks(shapes, counts, torch.Generator().manual_seed(3))
    assert all(int(first[n].sum()) == counts[n] for n in counts)
    assert all(torch.equal(first[n], again[n]) for n in counts)


@pytest.mark.parametrize("largest", [True, False])
def test_select_extreme_exact_count_with_ties(largest):
    scores = torch.tensor([0.0] * 50 + [1.0] * 5 + [2.0] * 5)
    k = 8 if largest else 20
    chosen = select_extreme(scores, k, torch.Generator().manual_seed(0), largest)
    assert chosen.numel() == k and chosen.unique().numel() == k
    if largest:
        assert set(range(55, 60)) <= set(chosen.tolist()) and (scores[chosen] >= 1).all()
    else:
        assert (scores[chosen] == 0).all()
    again = select_extreme(scores, k, torch.Generator().manual_seed(0), largest)
    other = select_extreme(scores, k, torch.Generator().manual_seed(1), largest)
    assert torch.equal(chosen.sort().values, again.sort().values)
    assert not torch.equal(chosen.sort().values, other.sort().values)  # ties are broken at random


def _distinct(shape, seed: int) -> torch.Tensor:
    """Values with distinct magnitudes and random signs, so every ranking has exactly one right answer."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    magnitude = (torch.randperm(numel, generator=g) + 1).float() / numel
    sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).view(shape)


def _random_mask(shape, density: float, seed: int) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density).float()


def _sorted_pick(values: dict, candidate: dict, k: int, largest: bool) -> set:
    """Brute force: a full sort of every candidate's value across layers; the first k as (layer, flat position)."""
    names, positions = [], []
    for n, ok in candidate.items():
        pos = ok.reshape(-1).nonzero().flatten()
        names += [n] * pos.numel()
        positions.append(pos)
    positions = torch.cat(positions)
    flat = torch.cat([values[n].reshape(-1)[candidate[n].reshape(-1)] for n in candidate])
    order = torch.sort(flat, descending=largest, stable=True).indices[:k].tolist()
    return {(names[i], int(positions[i])) for i in order}


# one small layer and one above the 1M-score narrowing threshold of select_extreme
RANKING_SHAPES = {"small": (6, 5), "large": (1100, 1000)}


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_prune_smallest_removes_the_smallest_magnitudes(per_layer):
    weights = {n: _distinct(s, i) for i, (n, s) in enumerate(RANKING_SHAPES.items())}
    masks = {n: _random_mask(s, 0.5, 10 + i) for i, (n, s) in enumerate(RANKING_SHAPES.items())}
    before = {n: m.clone() for n, m in masks.items()}
    counts = {"small": 4, "large": 3000} if per_layer else None
    chosen = prune_smallest(weights, masks, torch.Generator().manual_seed(0), total=5000, counts=counts)

    def brute_force(names, k):  # sort every active weight by |w| and take the k smallest
        return _sorted_pick({n: weights[n].abs() for n in names}, {n: before[n] != 0 for n in names}, k, False)

    want = (brute_force(["small"], 4) | brute_force(["large"], 3000)) if per_layer else brute_force(list(weights), 5000)
    assert {(n, int(p)) for n, pos in chosen.items() for p in pos} == want
    for n in masks:
        assert torch.equal(before[n] - masks[n], torch.zeros_like(masks[n]).view(-1).index_fill_(0, chosen[n], 1.0).view_as(masks[n]))


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_grow_largest_activates_the_largest_gradients_inside_allowed(per_layer):
    grads = {n: _distinct(s, 20 + i) for i, (n, s) in enumerate(RANKING_SHAPES.items())}
    masks = {n: _random_mask(s, 0.3, 30 + i) for i, (n, s) in enumerate(RANKING_SHAPES.items())}
    allowed = {"large": torch.arange(1100)[:, None].expand(1100, 1000) % 3 != 0}  # a removed-channel pattern
    before = {n: m.clone() for n, m in masks.items()}
    counts = {"small": 5, "large": 4000} if per_layer else None
    chosen = grow_largest(grads, masks, allowed, torch.Generator().manual_seed(0), total=6000, counts=counts)

    def brute_force(names, k):  # sort every candidate by |grad| and take the k largest
        ok = {n: (before[n] == 0) & allowed.get(n, True) for n in names}
        return _sorted_pick({n: grads[n].abs() for n in names}, ok, k, True)

    want = (brute_force(["small"], 5) | brute_force(["large"], 4000)) if per_layer else brute_force(list(grads), 6000)
    assert {(n, int(p)) for n, pos in chosen.items() for p in pos} == want
    assert all(int(masks[n].sum() - before[n].sum()) == chosen[n].numel() for n in masks)


def test_select_extreme_narrowing_path_is_exact():
    """Above 1M scores the cut is estimated on a sample first; the answer must still be the exact top k."""
    scores = _distinct((1_200_000,), 5).abs()
    for largest in (True, False):
        for k in (1, 1000, 250_000):
            chosen = select_extreme(scores, k, torch.Generator().manual_seed(0), largest)
            want = torch.topk(scores, k, largest=largest).indices
            assert torch.equal(chosen.sort().values, want.sort().values), (largest, k)
