"""Norms that mix channels (LayerNorm, RMSNorm, ConvNeXt-V2's GRN): the masked model computes what the slim one does.

Chase zeroes a removed channel; a LayerNorm/RMSNorm/GRN still counts it in its channel statistics unless
``chase_timm.norms`` restricts them to the alive channels. Unit checks of each hooked norm against the sliced plain
timm norm (float64), then whole models: ViT's embedding stream, ConvNeXt stages (LayerNorm2d / RmsNorm2d) and
ConvNeXt-V2's GRN hidden widths removed under Chase, exported and reloaded.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm, LayerNorm2d, RmsNorm, RmsNorm2d, SimpleNorm, SimpleNorm2d
from timm.layers.grn import GlobalResponseNorm

from chase_timm.norms import covers, follow_masks, remove_hooks
from chase_timm.slim import slim_copy

C, REMOVED = 8, [1, 4, 5]
NORMS = [
    (nn.LayerNorm(C), (2, 5, C)),
    (LayerNorm(C), (2, 3, 3, C)),
    (LayerNorm2d(C), (2, C, 3, 3)),
    (RmsNorm(C), (2, 5, C)),
    (RmsNorm2d(C), (2, C, 3, 3)),
    (nn.RMSNorm(C), (2, 5, C)),
    (SimpleNorm(C), (2, 5, C)),
    (SimpleNorm2d(C), (2, C, 3, 3)),
    (GlobalResponseNorm(C), (2, 3, 3, C)),
    (GlobalResponseNorm(C, channels_last=False), (2, C, 3, 3)),
]


@pytest.mark.parametrize("norm, shape", NORMS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_a_hooked_norm_computes_what_the_sliced_norm_computes(norm, shape):
    """float64; the removed channels' inputs are not even zero: the hook must ignore them."""
    torch.manual_seed(0)
    norm = norm.double()
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
            p[REMOVED] = 0  # what Chase does to a removed channel's slices
    x = torch.randn(shape, dtype=torch.float64)
    dim = -1 if shape[-1] == C else 1
    keep = [c for c in range(C) if c not in REMOVED]
    assert covers(norm)
    slim = slim_copy(norm, {n: {0: REMOVED} for n, _ in norm.named_parameters()})
    expected = slim(x.index_select(dim, torch.tensor(keep)))
    mask = torch.ones(C, dtype=torch.float64)
    mask[REMOVED] = 0
    follow_masks(norm, {"weight": mask})
    masked = norm(x)
    assert torch.allclose(masked.index_select(dim, torch.tensor(keep)), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(remove_hooks(copy.deepcopy(norm))(x).index_select(dim, torch.tensor(keep)), expected,
                              rtol=0, atol=1e-6)  # the plain norm counts the removed channels: the test can fail
    follow_masks(norm, {"weight": torch.ones(C, dtype=torch.float64)})  # all alive again: the module's own output
    assert torch.equal(norm(x), remove_hooks(copy.deepcopy(norm))(x))
