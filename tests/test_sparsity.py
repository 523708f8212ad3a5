"""Unstructured-sparsity primitives: ERK, exact allocation, exact selection with random tie-breaking."""
import math

import pytest
import torch

from chase_timm.sparsity import allocate, erk_densities, random_masks, select_extreme

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
