"""Gated and split MLPs, channel splits and re-parameterisable blocks shrink exactly (docs/blocks.md).

GluMlp (EVA-02's packed SwiGLU: a hidden channel and its gate partner ``c + H`` go together), Res2Net's
``torch.split(x, width)`` (every piece loses the same places and ``width`` follows) and MobileOne's multi-branch
blocks (one index set for every branch, identity BatchNorm included; ``reparameterize_model`` still fuses the slim
model). Each: the float64 shrink-vs-mask twin run (``recipes/shrink_equivalence.py``, 1e-9 relative), the float32
export check (1e-4 relative) and a ``save_pretrained`` -> ``local-dir:`` round trip.
"""
import collections

import pytest
import timm
import timm.utils
import torch

from chase_timm.graph import find_channel_groups, tensor_removals
from chase_timm.slim import slim_copy
import zoo_coverage
from helpers import check_model, tiny_model
from prunability_table import roundtrip
from shrink_equivalence import compare, float64

GLU = "eva02_tiny_patch14_224"  # smallest timm model with a GluMlp (5.5M parameters)


def _twin(name: str, **overrides):
    """The twin run, asserted exact; returns (result, {tensor: {dim: removed positions}} in the original numbering)."""
    with float64():
        result = compare(name, "sgd", **overrides)
    assert result.refused is None and result.error is None, (result.refused, result.error)
    assert result.removed and result.removed == result.twin_removed and result.masks_equal
    assert result.worst()[1] <= 1e-9, (result.worst(), result.diffs)
    return result, tensor_removals(result.twin_run[2].channels.groups, result.removed)


def _export_and_reload(name: str, prune_skip: bool) -> dict:
    """check_model's float32 export check, plus the save_pretrained -> local-dir: round trip of the slim model."""
    row = check_model(name, prune_skip, keep_models=True)
    assert row["removed"] > 0 and row["flops_ratio"] < 1.0
    assert row["rel_diff"] <= 1e-4, row["rel_diff"]
    assert roundtrip(row["slim"], 32) == 0.0
    return row


def test_glu_mlp_removes_a_channel_with_its_gate_partner_exactly():
    result, cut = _twin(GLU, channel_sparsity=0.3)
    hidden = result.twin_run[0].blocks[0].mlp.fc2.in_features  # H: fc1 has 2H rows, value then gate
    pairs = {name: dims[0] for name, dims in cut.items() if name.endswith("mlp.fc1.weight")}
    assert pairs, f"no GluMlp hidden channel was removed: {sorted(cut)}"
    for name, rows in pairs.items():
        value, gate = {r for r in rows if r < hidden}, {r - hidden for r in rows if r >= hidden}
        assert value == gate, name  # channel c went with its partner c + H
    slim = result.run[0]
    assert all(b.mlp.fc1.out_features == 2 * b.mlp.fc2.in_features for b in slim.blocks)


@pytest.mark.slow
def test_glu_mlp_exports_and_reloads():
    _export_and_reload(GLU, False)


@pytest.mark.slow
def test_res2net_split_pieces_lose_the_same_channels_and_width_follows(monkeypatch):
    # one block per stage but three in layer4, where both kinds of split block lose channels (asserted below)
    monkeypatch.setitem(zoo_coverage.SMALLER, "res2net50_14w_8s", {"layers": (1, 1, 1, 3)})
    result, cut = _twin("res2net50_14w_8s", prune_skip=True, channel_sparsity=0.5)
    dense, slim = result.twin_run[0], result.run[0]
    split = {name[:-len(".conv1.weight")]: dims[0] for name, dims in cut.items()
             if name.startswith("layer") and name.endswith(".conv1.weight")}
    assert split, "no Res2Net split (conv1 -> torch.split) channel was removed"
    # a stage's first block (pooled last piece) and one adding the pieces up
    assert {dense.get_submodule(b).is_first for b in split} == {True, False}, sorted(split)
    for block_name, rows in split.items():
        width, scale = dense.get_submodule(block_name).width, dense.get_submodule(block_name).scale
        per_piece = collections.Counter(r // width for r in rows)
        assert len(per_piece) == scale and len(set(per_piece.values())) == 1, (block_name, per_piece)
        block = slim.get_submodule(block_name)
        assert block.width == width - len(rows) // scale == block.convs[0].in_channels
        assert block.conv1.out_channels == scale * block.width


@pytest.mark.slow
def test_res2net_exports_and_reloads():
    row = _export_and_reload("res2net50_14w_8s", True)
    assert row["groups"] > 33  # the split blocks' conv1 groups join the 33 that were prunable before


def test_a_mobileone_with_narrower_depthwise_blocks_still_reparameterizes():
    """Half of a stage stream (depthwise and pointwise blocks, identity BatchNorms) cut: the blocks' ``groups``
    follows the depthwise conv, so reparameterize_model builds the right identity kernel and fused conv."""
    model = tiny_model("mobileone_s0").eval()
    groups = find_channel_groups(model, torch.randn(1, 3, 32, 32), prune_skip=True)
    group = next(g for g in groups if g.name == "stages.1.1.conv_kxk.0.conv")
    assert group.prunable, group.reason
    slim = slim_copy(model, tensor_removals(groups, {group.name: list(range(0, group.width, 2))})).eval()
    block = slim.stages[1][2]  # depthwise, with an identity branch
    assert block.conv_kxk[0].conv.groups == block.groups == group.width // 2
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = slim(x)
        output = timm.utils.reparameterize_model(slim)(x)
    assert float((output - reference).abs().max() / reference.abs().max()) <= 1e-5


@pytest.mark.slow
def test_mobileone_exports_reloads_and_the_slim_model_reparameterizes():
    """float32 export, round trip, and timm's reparameterize_model on the slim training-form model."""
    row = _export_and_reload("mobileone_s0", True)
    slim = row["slim"].eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = slim(x)
        fused = timm.utils.reparameterize_model(slim)
        output = fused(x)
    assert not any(hasattr(m, "conv_kxk") for m in fused.modules())  # really fused
    assert float((output - reference).abs().max() / reference.abs().max()) <= 1e-5


@pytest.mark.slow
def test_mobileone_branches_share_one_index_set():
    """Twin run over the first channel event (later ones diverge by BatchNorm rounding on the 1x1 last maps at
    32 px, as docs/shrinking.md notes for batch-2 ResNet-18; the second cuts the same block): every kxk branch loses
    the same rows."""
    _, cut = _twin("mobileone_s0", prune_skip=True, steps=2)
    rows = {n: dims[0] for n, dims in cut.items() if ".conv_kxk." in n and n.endswith("conv.weight")}
    assert len(rows) >= 4 and len({tuple(r) for r in rows.values()}) == 1, rows.keys()


def test_csp_stage_split_halves_shrink_with_prune_skip():
    # CrossStage splits conv_exp's output in halves with x.split(self.expand_chs // 2): both halves lose the same
    # channels (tied) and expand_chs follows conv_exp; before, the sliced model did not run and the groups stayed
    groups = find_channel_groups(timm.create_model("cs3darknet_focus_s"), torch.randn(1, 3, 32, 32), prune_skip=True)
    assert all(g.prunable for g in groups), [(g.name, g.reason) for g in groups if not g.prunable]
    row = _export_and_reload("cs3darknet_focus_s", True)
    stages = [s for s in row["slim"].stages if hasattr(s, "expand_chs")]
    assert stages and all(s.expand_chs == s.conv_exp.conv.out_channels for s in stages)
    assert any(s.expand_chs < row["chase"].module.stages[i].expand_chs for i, s in enumerate(row["slim"].stages)
               if hasattr(s, "expand_chs"))
