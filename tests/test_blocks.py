"""Gated and split MLPs, channel splits and re-parameterisable blocks shrink exactly (docs/blocks.md).

GluMlp (EVA-02's packed SwiGLU: a hidden channel and its gate partner ``c + H`` go together), Res2Net's
``torch.split(x, width)`` (every piece loses the same places and ``width`` follows) and MobileOne's multi-branch
blocks (one index set for every branch, identity BatchNorm included; ``reparameterize_model`` still fuses the slim
model). Each: the float64 shrink-vs-mask twin run (``recipes/shrink_equivalence.py``, 1e-9 relative), the float32
export check (1e-4 relative) and a ``save_pretrained`` -> ``local-dir:`` round trip. FastViT: a stream feeding a
depthwise conv with channel multiplier 2 loses whole groups of it. EfficientViM: an HSM-SSD inner channel
goes with both halves of ``hz_proj``'s split.
"""
import collections

import pytest
import timm
import timm.utils
import torch
from timm.layers import BlurPool2d, MixedConv2d, ScaledStdConv2d
from timm.models import byobnet, pvt_v2

from chase_timm.adapters.attention import SLIM, slim_subclass
from chase_timm.graph import find_channel_groups, tensor_removals
from chase_timm.slim import slim_copy
import zoo_coverage
from helpers import check_model, tiny_model
from prunability_table import roundtrip
from shrink_equivalence import compare, float64

GLU = "eva02_tiny_patch14_224"  # smallest timm model with a GluMlp (5.5M parameters)


@pytest.fixture
def two_block_glu(monkeypatch):
    """EVA-02 with 2 of its 12 blocks for the float64 twin: every block is the same GluMlp + attention block."""
    monkeypatch.setitem(zoo_coverage.SMALLER, GLU, {"depth": 2})


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


def test_glu_mlp_removes_a_channel_with_its_gate_partner_exactly(two_block_glu):
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
    # one block per stage but two in layer4, where both kinds of split block lose channels (asserted below)
    monkeypatch.setitem(zoo_coverage.SMALLER, "res2net50_14w_8s", {"layers": (1, 1, 1, 2)})
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
def test_mobileone_branches_share_one_index_set(monkeypatch):
    """Twin run over the first channel event (later ones diverge by BatchNorm rounding on the 1x1 last maps at
    32 px, as docs/shrinking.md notes for batch-2 ResNet-18): every kxk branch of a block loses the same rows."""
    # two depthwise + pointwise block pairs in stages 1 and 2 (of 8 and 10), identity branches included: 14 blocks
    blocks = byobnet.model_cfgs["mobileone_s0"].blocks
    monkeypatch.setitem(zoo_coverage.SMALLER, "mobileone_s0", {"blocks": (blocks[0], blocks[1][:4], blocks[2][:4],
                                                                          blocks[3])})
    _, cut = _twin("mobileone_s0", prune_skip=True, steps=2)
    rows = collections.defaultdict(list)  # block -> the rows each of its kxk branches lost
    for n, dims in cut.items():
        if ".conv_kxk." in n and n.endswith("conv.weight"):
            rows[n.split(".conv_kxk.")[0]].append(tuple(dims[0]))
    assert max(map(len, rows.values()), default=0) >= 4, dict(rows)  # a block's 4 branches lost rows
    assert all(len(set(r)) == 1 for r in rows.values()), dict(rows)


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


EDGENEXT = "edgenext_xx_small"
# one block per stage: stage 0's ConvBlock and a SplitTransposeBlock (split convs, XCA, MLP) in stages 1-3 (88
# channels chunked 30/30/28 in stage 2); layer scale 1 instead of 1e-6, else the blocks' outputs vanish under the
# shortcut in float32 and the export check could not fail
EDGENEXT_SMALL = {"depths": (1, 1, 1, 1), "ls_init_value": 1.0}


@pytest.fixture
def small_edgenext(monkeypatch):
    """The harnesses build models through zoo_coverage.build, which reads its SMALLER overrides per name."""
    monkeypatch.setitem(zoo_coverage.SMALLER, EDGENEXT, EDGENEXT_SMALL)


@pytest.mark.parametrize("prune_skip", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_edgenext_mlp_widths_xca_heads_and_the_stage_0_1_streams_shrink_exactly(small_edgenext, prune_skip):
    result, _ = _twin(EDGENEXT, prune_skip=prune_skip, channel_sparsity=0.3)
    dense, slim = result.twin_run[0], result.run[0]
    mlps = {n for n in result.removed if n.endswith(".mlp.fc1")}
    assert {f"stages.{i}.blocks.0.mlp.fc1" for i in (1, 2, 3)} <= mlps, mlps  # the SplitTransposeBlocks' MLPs
    assert {n for n in result.removed if n.endswith(".xca")}  # XCA heads (chase_timm.heads)
    # stage 0's stream (ConvBlocks only) and stage 1's (chunked in equal halves, then XCA's tokens): LayerNorm-coupled
    streams = ("stem.0", "stages.1.downsample.1")
    assert bool(set(streams) & set(result.removed)) == prune_skip, result.removed.keys()
    assert slim.stem[0].out_channels == slim.stages[0].blocks[0].norm.normalized_shape[0] \
        == dense.stem[0].out_channels - len(result.removed.get("stem.0", ()))
    assert slim.stages[1].blocks[0].xca.qkv.in_features == slim.stages[1].downsample[1].out_channels
    groups = {g.name: g for g in result.run[2].channels.groups}
    assert all(groups[s].prunable == prune_skip for s in streams)
    for stage in (2, 3):  # 88 channels chunked 30/30/28, 168 in 42s: left whole by the split rules, with the reason
        stream = groups[f"stages.{stage}.downsample.1"]
        assert not stream.prunable and "channels are mixed" in stream.reason, stream.reason
        assert slim.stages[stage].downsample[1].out_channels == dense.stages[stage].downsample[1].out_channels


@pytest.mark.parametrize("prune_skip", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_edgenext_exports_and_reloads(small_edgenext, prune_skip):
    row = _export_and_reload(EDGENEXT, prune_skip)
    removed = row["chase"].removed_channels()
    streams = {"stem.0", "stages.1.downsample.1"}  # the LayerNorm-coupled streams of stages 0 and 1
    assert {n for n in removed if n.endswith(".mlp.fc1")} and bool(streams & set(removed)) == prune_skip, removed.keys()


GMLP = "gmlp_ti16_224"  # at 32 px: 4 tokens, so each spatial gating unit's token-mixing proj is a Linear(4, 4)


def _gmlp_widths(model) -> list:
    """Per block: (fc1 rows, SGU norm width, token proj in/out, fc2 columns)."""
    return [(m.fc1.out_features, m.gate.norm.normalized_shape, m.gate.proj.in_features, m.gate.proj.out_features,
             m.fc2.in_features) for m in (b.mlp_channels for b in model.blocks)]


def test_gmlp_spatial_gating_removes_a_channel_with_its_gate_half_exactly():
    """Hidden channel j of u (fc1 row j) goes with j of v (row j + H), the SGU norm's j and fc2's column j; the
    token-mixing proj (applied to v transposed) passes the channels through and keeps all of its weights."""
    result, cut = _twin(GMLP, channel_sparsity=0.3, steps=4)
    hidden = result.twin_run[0].blocks[0].mlp_channels.fc2.in_features  # H: fc1 has 2H rows, u then v
    rows = {name: dims[0] for name, dims in cut.items() if name.endswith("mlp_channels.fc1.weight")}
    assert rows, f"no gMLP hidden channel was removed: {sorted(cut)}"
    for name, removed in rows.items():
        assert {r for r in removed if r < hidden} == {r - hidden for r in removed if r >= hidden}, name
    assert not [name for name in cut if ".gate.proj." in name]
    widths = _gmlp_widths(result.run[0])
    assert all(fc1 == 2 * fc2 and norm == (fc2,) and proj == [4, 4] for fc1, norm, *proj, fc2 in widths), widths
    assert min(fc2 for *_, fc2 in widths) < hidden


def test_gmlp_exports_and_reloads():
    """float32 export of a gMLP with narrower spatial gating units, and its save_pretrained -> local-dir: reload."""
    row = _export_and_reload(GMLP, False)
    hidden = row["chase"].module.blocks[0].mlp_channels.fc2.in_features
    assert min(fc2 for *_, fc2 in _gmlp_widths(row["slim"])) < hidden


def test_a_linear_on_a_flattened_permuted_map_still_consumes_its_channels():
    # ConvNeXt's RMS head permutes a 1x1 map (B, C, 1, 1), flattens it and feeds head.fc: the permuted tensor's last
    # axis has size 1, but fc reads all C channels, so the permuted-view rule must not pass the stage-3 stream by
    groups = find_channel_groups(timm.create_model("convnext_zepto_rms"), torch.randn(1, 3, 32, 32), prune_skip=True)
    assert all(g.prunable for g in groups), [(g.name, g.reason) for g in groups if not g.prunable]


PVT = "pvt_v2_b0"  # one block per stage: fc1 -> transpose -> view(B, C, H, W) -> depthwise conv -> flatten -> fc2


@pytest.fixture
def small_pvt(monkeypatch):
    monkeypatch.setitem(zoo_coverage.SMALLER, PVT, {"depths": (1, 1, 1, 1)})


def test_pvt_v2_mlp_hidden_channels_shrink_exactly_through_the_depthwise_conv(small_pvt):
    """fc1's outputs are transposed onto dim 1 of a (B, C, H, W) map for the depthwise conv, not onto a token axis:
    a hidden channel takes fc1's row, the depthwise conv's filter and fc2's column together."""
    result, cut = _twin(PVT, channel_sparsity=0.3)
    removed = {n for n in result.removed if n.endswith(".mlp.fc1")}
    assert removed - {"stages.3.blocks.0.mlp.fc1"}, result.removed.keys()  # a stage whose map is not 1x1 at 32 px
    dense, slim = result.twin_run[0], result.run[0]
    widths = [(b.mlp.fc1.out_features, b.mlp.dwconv.out_channels, b.mlp.dwconv.groups, b.mlp.fc2.in_features)
              for s in slim.stages for b in s.blocks]
    assert all(len(set(w)) == 1 for w in widths), widths
    assert sum(w[0] for w in widths) < sum(b.mlp.fc1.out_features for s in dense.stages for b in s.blocks)


def test_equal_width_groups_lose_different_counts_in_the_numerical_check(small_pvt, monkeypatch):
    """A PVT-v2 slim forward that flattens the ``sr`` output with the stream's C, ``sr(x).reshape(B, C, -1)`` (timm's,
    which chase_timm's slim forward replaces by ``flatten(2)``): with prune_skip the stream and each ``sr`` output
    have the same width, so the numerical check must remove different counts from them (``_removal_counts``) to see
    that the sliced model only runs when both lose the same channels; removing half of each would pass them."""
    reads_c = slim_subclass(pvt_v2.Attention, "SlimPvtV2Attention", [("reshape(B, N, C)", "reshape(B, N, -1)", 1)])
    monkeypatch.setitem(SLIM, pvt_v2.Attention, reads_c)
    model = zoo_coverage.build(PVT)
    groups = find_channel_groups(model, torch.randn(1, 3, 32, 32), prune_skip=True)
    sr = [g for g in groups if g.name.endswith(".attn.sr")]
    assert sr and not any(g.prunable for g in sr), [(g.name, g.reason) for g in sr]
    assert any(g.prunable and g.name.endswith(".mlp.fc1") for g in groups)


def test_pvt_v2_exports_and_reloads(small_pvt):
    row = _export_and_reload(PVT, False)
    assert {n for n in row["chase"].removed_channels() if n.endswith(".mlp.fc1")}



def test_nfnet_scaled_std_conv_gain_and_standardised_inputs_shrink_exactly(monkeypatch):
    """ScaledStdConv2d scales each output row by its own ``gain`` (sliced with the row) and standardises each row over
    all its input channels; Chase leaves masked inputs out of those statistics (``chase_timm.norms``), so the channels
    such convs consume shrink too, those of the grouped 3x3 convs included: the float64 twin, then export + reload."""
    # one block per stage (4 of 16): every block is the same pre-activation bottleneck with a grouped 3x3 and SE
    monkeypatch.setitem(zoo_coverage.SMALLER, "nf_regnet_b0", {"depths": (1, 1, 1, 1)})
    result, cut = _twin("nf_regnet_b0", prune_skip=True, channel_sparsity=0.7)
    model = result.twin_run[0]
    convs = {n.rsplit(".", 1)[0] for n, dims in cut.items() if n.endswith(".weight") and 1 in dims}
    standardised = {n for n in convs if isinstance(model.get_submodule(n), ScaledStdConv2d)}
    assert {n for n in cut if n.endswith(".gain")}, sorted(cut)
    assert standardised and any(model.get_submodule(n).groups > 1 for n in standardised), sorted(convs)
    _export_and_reload("nf_regnet_b0", True)


def test_selective_kernel_paths_and_split_input_shrink_exactly(monkeypatch):
    """SelectiveKernel stacks its paths and views fc_select's output as (B, num_paths, C, 1, 1): channel c is row c
    of every path conv and rows c, C + c of fc_select. With prune_skip the stream into a block is split over the
    paths (``torch.split(x, self.in_channels // self.num_paths)``): both pieces lose the same channels and the
    block's in_channels follows."""
    # one block per stage: the first conv of every block is a SelectiveKernel, stage 1's with an identity shortcut
    monkeypatch.setitem(zoo_coverage.SMALLER, "skresnet18", {"layers": (1, 1, 1, 1)})
    result, cut = _twin("skresnet18", prune_skip=True, channel_sparsity=0.3, steps=4)
    paths = {n for n in result.removed if ".conv1.paths.0.conv" in n}
    assert paths, result.removed.keys()
    for name in paths:
        block = name[:-len(".paths.0.conv")]
        rows = cut[f"{block}.attn.fc_select.weight"][0]
        width = result.twin_run[0].get_submodule(block).out_channels
        assert cut[f"{block}.paths.1.conv.weight"][0] == [r for r in rows if r < width]
        assert {r - width for r in rows if r >= width} == {r for r in rows if r < width}
    slim = result.run[0]
    blocks = [m for m in slim.modules() if type(m).__name__ == "SelectiveKernel"]
    assert all(b.in_channels == 2 * b.paths[0].conv.in_channels and b.out_channels == b.paths[1].conv.out_channels
               for b in blocks)
    assert any(b.in_channels < d.in_channels for b, d in zip(blocks, (m for m in result.twin_run[0].modules()
                                                                          if type(m).__name__ == "SelectiveKernel")))
    assert roundtrip(slim.float(), 32) == 0.0


def test_fastvit_streams_shrink_with_the_multiplier_downsample_exactly():
    """FastViT's downsampling conv is depthwise with channel multiplier 2 (Conv2d(C, 2C, groups=C)): a stream channel
    c leaves with its output channels 2c and 2c + 1 (one group), so ``groups`` follows the stream (docs/blocks.md)."""
    result, cut = _twin("fastvit_t8", prune_skip=True, channel_sparsity=0.3, steps=2)
    dense, slim = result.twin_run[0], result.run[0]
    conv = "stages.1.downsample.proj.0.large_conv.conv"
    rows = cut[f"{conv}.weight"][0]
    assert rows and all(r % 2 == 0 and r + 1 in rows for r in rows[::2]), rows  # whole groups of 2 outputs
    lost = dense.get_submodule(conv).groups - slim.get_submodule(conv).groups
    assert lost == len(rows) // 2 > 0
    block = slim.stages[1].downsample.proj[0]
    assert block.groups == block.in_chs == slim.stem[2].conv_kxk[0].conv.out_channels
    assert block.out_chs == 2 * block.in_chs


def test_fastvit_exports_reloads_and_the_slim_model_reparameterizes():
    row = _export_and_reload("fastvit_t8", True)
    slim = row["slim"].eval()
    assert slim.stages[1].downsample.proj[0].in_chs < 48  # the stem / stage-0 stream (48 wide) shrank
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = slim(x)
        output = timm.utils.reparameterize_model(slim)(x)
    assert float((output - reference).abs().max() / reference.abs().max()) <= 1e-5



@pytest.mark.parametrize("overrides", [{}, pytest.param(
    {"cardinality": 2, "base_width": 32, "block_args": {"radix": 4, "avd": True, "avd_first": False}},
    marks=pytest.mark.slow)])
def test_resnest_split_attention_radix_pieces_lose_the_same_channels_exactly(monkeypatch, overrides):
    """ResNeSt's SplitAttn: ``conv`` (radix * C rows, groups = cardinality * radix) viewed as (B, radix, C, H, W),
    ``fc2``'s radix * C rows through RadixSoftmax (view (B, cardinality, radix, C / cardinality), transpose, softmax
    over the radix dim, flatten back): output channel c is rows c, C + c, ... of both, column c of ``fc1`` and of the
    next conv; every radix piece loses the same channels and ``groups`` stays. Float32 export and reload too."""
    monkeypatch.setitem(zoo_coverage.SMALLER, "resnest14d", overrides)
    result, cut = _twin("resnest14d", channel_sparsity=0.3, steps=2)
    dense, slim = result.twin_run[0], result.run[0]
    blocks = [n[:-len(".conv2.conv.weight")] for n in cut if n.endswith(".conv2.conv.weight")]
    assert blocks, sorted(cut)
    for block in blocks:
        attn, small = dense.get_submodule(f"{block}.conv2"), slim.get_submodule(f"{block}.conv2")
        width, rows = attn.fc1.in_channels, cut[f"{block}.conv2.conv.weight"][0]
        kept = [c for c in rows if c < width]
        assert rows == [c + r * width for r in range(attn.radix) for c in kept], (block, rows)
        assert cut[f"{block}.conv2.fc2.weight"][0] == rows and cut[f"{block}.conv2.bn0.weight"][0] == rows
        assert cut[f"{block}.conv3.weight"][1] == kept  # fc1 (groups = cardinality) holds c % its group width
        assert cut[f"{block}.conv2.fc1.weight"][1] == sorted({c % attn.fc1.weight.shape[1] for c in kept})
        assert small.conv.out_channels == small.fc2.out_channels == small.radix * small.fc1.in_channels
        assert small.fc1.in_channels == width - len(kept) and small.conv.groups == attn.conv.groups
    _export_and_reload("resnest14d", False)


VIM = "efficientvim_m1"
VIM_SMALL = {"depths": (1, 1, 1), "embed_dim": (16, 24, 32), "state_dim": (8, 6, 4)}


def test_efficientvim_hsm_ssd_inner_width_shrinks_exactly_with_both_split_halves(monkeypatch):
    """EfficientViM's HSM-SSD: ``h, z = torch.split(hz_proj(h), [d_inner, d_inner], dim=1)`` on a Conv1d's (B, C, L)
    output, ``out_proj(h * act(z) + h * D)``: inner channel c is ``hz_proj`` rows c and d_inner + c with ``out_proj``'s
    column c, and ``d_inner`` (the split size) follows. Float32 export and local-dir: reload too."""
    monkeypatch.setitem(zoo_coverage.SMALLER, VIM, VIM_SMALL)
    result, cut = _twin(VIM, channel_sparsity=0.5, steps=2)
    dense, slim = result.twin_run[0], result.run[0]
    rows = {n[:-len(".hz_proj.conv.weight")]: dims[0] for n, dims in cut.items() if n.endswith(".hz_proj.conv.weight")}
    assert rows, sorted(cut)
    for mixer, removed in rows.items():
        inner = dense.get_submodule(mixer).d_inner
        kept = [r for r in removed if r < inner]
        assert removed == kept + [r + inner for r in kept] and cut[f"{mixer}.out_proj.conv.weight"][1] == kept
        small = slim.get_submodule(mixer)
        assert small.d_inner == small.out_proj.conv.in_channels == small.hz_proj.conv.out_channels // 2 \
            == inner - len(kept)
    _export_and_reload(VIM, False)


def test_mixed_conv_piece_sizes_follow_the_channels_left():
    """timm's MixedConv2d (MixNet) splits its input by a list, ``torch.split(x, self.splits, 1)``, one conv per piece:
    after a resize ``splits`` and the in/out channel sums follow the piece convs, so the groups through its equal
    pieces are prunable and export exactly (they were left whole: "physically sliced model does not run")."""
    row = _export_and_reload("mixnet_s", True)
    assert not [g.name for g in row["channel_groups"] if "physically sliced" in g.reason]
    mixed = [m for m in row["slim"].modules() if isinstance(m, MixedConv2d)]
    assert all(m.splits == [c.in_channels for c in m.values()] and m.in_channels == sum(m.splits) and
               m.out_channels == sum(c.out_channels for c in m.values()) for m in mixed)
    dense = [m for m in row["chase"].module.modules() if isinstance(m, MixedConv2d)]
    assert any(m.splits != d.splits for m, d in zip(mixed, dense))


def test_blur_pool_takes_its_channels_from_the_input_after_a_resize():
    """timm's BlurPool2d built for C channels convolves with C identical filter rows, groups=C (ResNetBlur's and
    TResNet's anti-aliasing): the groups through it were left whole ("physically sliced model does not run"); a
    resize switches it to timm's channels=None form (the filter expanded to the input's channels), exactly."""
    row = _export_and_reload("resnetblur18", True)
    groups = {g.name: g for g in row["channel_groups"]}
    assert all(groups[n].prunable for n in ("conv1", "layer2.0.conv1", "layer4.0.conv1")), groups["conv1"].reason
    assert all(m.channels is None for m in row["slim"].modules() if isinstance(m, BlurPool2d))
