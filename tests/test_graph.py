"""Channel-group discovery: which groups exist, which are prunable and why not."""
import copy
import json
import re
import time
import warnings

import pytest
import timm
import torch
import torch.nn as nn

from chase_timm import Chase, ChaseConfig, graph
from chase_timm.graph import (
    RESIDUAL_REASON, TIMEOUT_REASON, ChannelGroup, find_channel_groups, tensor_removals,
)
from chase_timm.slim import apply_width_plan, slim_copy, width_plan


def _timm(arch: str, **kwargs) -> nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).eval()


@pytest.fixture(scope="module")
def resnet50():
    model = _timm("resnet50")
    x = torch.randn(1, 3, 64, 64)
    return model, find_channel_groups(model, x), find_channel_groups(model, x, prune_skip=True)


def test_resnet50_internal_groups_are_the_papers_bottleneck_convs(resnet50):
    _, groups, _ = resnet50
    prunable = [g for g in groups if g.prunable]
    assert sorted(g.name for g in prunable) == sorted(
        f"layer{s}.{b}.conv{c}" for s, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)) for b in range(blocks) for c in (1, 2))
    assert sum(g.width for g in prunable) == 7552
    conv2 = next(g for g in groups if g.name == "layer1.0.conv2")
    assert {(s.tensor, s.dim, s.role) for s in conv2.slices} == {
        ("layer1.0.conv2.weight", 0, "producer"), ("layer1.0.bn2.weight", 0, "norm"), ("layer1.0.bn2.bias", 0, "norm"),
        ("layer1.0.bn2.running_mean", 0, "norm"), ("layer1.0.bn2.running_var", 0, "norm"),
        ("layer1.0.conv3.weight", 1, "consumer")}
    assert conv2.producers() == (conv2.slices[0],)
    assert all(s.index == tuple((i,) for i in range(64)) for s in conv2.slices)


def test_resnet50_residual_streams_need_prune_skip(resnet50):
    _, groups, skip_groups = resnet50
    residual = [g for g in groups if g.residual]
    assert {g.name for g in residual} == {"conv1", "layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3", "layer4.0.conv3"}
    assert all(not g.prunable and g.reason == RESIDUAL_REASON for g in residual)
    assert all(g.prunable for g in skip_groups)
    stream = next(g for g in skip_groups if g.name == "layer4.0.conv3")
    assert ("fc.weight", 1, "consumer") in {(s.tensor, s.dim, s.role) for s in stream.slices}  # the head's input


class _Joins(nn.Module):
    """Adds and concats with and without a skip: which of their groups are residual streams (docs/blocks.md)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        conv = lambda i, o, g=1: nn.Conv2d(i, o, 3, padding=1, groups=g)  # noqa: E731
        self.stem, self.a, self.b, self.dw, self.c = conv(3, 8), conv(8, 8), conv(8, 8), conv(8, 8, 8), conv(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        y = {"skip": lambda: x + self.b(torch.relu(self.a(x))),           # ResNet's x + f(x)
             "shortcut": lambda: x + self.a(x),                           # one conv around the add
             "dense": lambda: self.c(torch.cat([x, self.b(torch.relu(self.a(x)))], 1)),  # DenseNet
             "merge": lambda: self.a(x) + self.b(x),                      # two branches summed
             "concat": lambda: self.c(torch.cat([self.a(x), self.b(x)], 1)),  # Inception
             "depthwise": lambda: x + self.dw(x)}[self.form]()             # ConvMixer
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("form, streams", [
    ("skip", {"stem"}), ("shortcut", {"stem"}), ("dense", {"stem"}),
    ("merge", {"stem"}), ("concat", set()), ("depthwise", set())])  # merge: x forks into two convs summed
def test_a_join_makes_a_residual_stream_only_around_a_skip(form, streams):
    model = _Joins(form).eval()
    groups = find_channel_groups(model, torch.randn(1, 3, 8, 8))
    joined = {g.name for g in groups if any(s.tensor.startswith(("a.", "b.", "stem.")) for s in g.slices)}
    assert {g.name for g in groups if g.residual} == streams
    assert all(g.prunable for g in groups if g.name in joined - streams), [(g.name, g.reason) for g in groups]
    assert all(g.reason == RESIDUAL_REASON for g in groups if g.name in streams)
    assert joined - streams or streams  # every form judges a group at its join


def test_res2net_branch_outputs_that_only_meet_the_concat_are_internal():
    model = _timm("res2next50", layers=(1, 1, 1, 2))
    groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    for name in ("layer4.0.convs.0", "layer4.0.convs.2", "layer4.1.convs.2"):  # first block's, a last branch's
        assert groups[name].prunable and not groups[name].residual, (name, groups[name].reason)
    for name in ("layer4.1.conv1", "layer4.0.conv3"):  # the split width: cat carries sp_1 past conv_2; the stream
        assert groups[name].residual and groups[name].reason == RESIDUAL_REASON, name
    # a Chase state saved when these groups were streams names why it can't resume
    chase = Chase(model, ChaseConfig(total_steps=10), example_inputs=torch.randn(1, 3, 32, 32))
    state = chase.state_dict()
    old = {**{k: v for k, v in state.items() if k != "streams"},
           "alive": {n: a for n, a in state["alive"].items() if n not in ("layer4.0.convs.0", "layer4.1.convs.2")}}
    with pytest.raises(ValueError, match=r"saved before groups whose adds or concats only merge branches became "
                                         r"prunable without prune_skip \(\d+ here, e.g. 'layer"):
        chase.load_state_dict(old)
    # with prune_skip the same groups were prunable but ranked with the streams: it resumes, with a warning
    chase = Chase(model, ChaseConfig(total_steps=10, prune_skip=True), example_inputs=torch.randn(1, 3, 32, 32))
    with pytest.warns(UserWarning, match=r"only merge branches were ranked with the residual streams"):
        chase.load_state_dict({k: v for k, v in chase.state_dict().items() if k != "streams"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chase.load_state_dict(chase.state_dict())


def test_resnet50_never_removes_classifier_outputs(resnet50):
    _, groups, skip_groups = resnet50
    for group in groups + skip_groups:
        assert not any(s.tensor == "fc.bias" or (s.tensor == "fc.weight" and s.dim == 0) for s in group.slices)


def test_discovery_leaves_model_untouched():
    model = _timm("resnet18").train()
    model.layer2.eval()
    state = copy.deepcopy(model.state_dict())
    find_channel_groups(model, torch.randn(2, 3, 32, 32))
    assert model.training and not model.layer2.training and model.layer3.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_vit_mlp_hidden_units_and_attention_heads_are_prunable():
    groups = find_channel_groups(_timm("vit_tiny_patch16_224", img_size=32), torch.randn(1, 3, 32, 32))
    prunable = {g.name: g for g in groups if g.prunable}
    assert sorted(prunable) == sorted([f"blocks.{i}.mlp.fc1" for i in range(12)] + [f"blocks.{i}.attn" for i in range(12)])
    fc1 = prunable["blocks.0.mlp.fc1"]
    assert fc1.width == 768
    assert {(s.tensor.split(".", 3)[-1], s.dim, s.role) for s in fc1.slices} == {
        ("fc1.weight", 0, "producer"), ("fc1.bias", 0, "bias"), ("fc2.weight", 1, "consumer")}
    heads = prunable["blocks.0.attn"]  # one channel per head: its q, k, v rows and proj columns (chase_timm.heads)
    assert (heads.width, heads.unit) == (3, 64)
    assert {(s.tensor, s.dim, s.role) for s in heads.slices} == {
        ("blocks.0.attn.qkv.weight", 0, "producer"), ("blocks.0.attn.qkv.bias", 0, "bias"),
        ("blocks.0.attn.proj.weight", 1, "consumer")}
    qkv = heads.slices[0].index[1]  # head 1: q rows 64..127, k rows 256..319, v rows 448..511
    assert qkv == tuple(range(64, 128)) + tuple(range(256, 320)) + tuple(range(448, 512))
    assert not any(g.name.endswith("attn.qkv") for g in groups)  # the head groups own the q/k/v rows
    stream = next(g for g in groups if g.name == "patch_embed.proj")
    assert stream.residual and "prune_skip" in stream.reason  # its LayerNorms are no reason (tests/test_norms.py)


@pytest.mark.parametrize("arch,block", [("mobilenetv3_small_050", "blocks.1.0"), ("efficientnet_b0", "blocks.2.1")])
def test_inverted_residual_expansion_includes_depthwise_and_se(arch, block):
    groups = find_channel_groups(_timm(arch), torch.randn(1, 3, 32, 32))
    expansion = next(g for g in groups if g.name == f"{block}.conv_pw")
    roles = {(s.tensor, s.dim): s.role for s in expansion.slices}
    assert expansion.prunable and not expansion.residual
    assert roles[(f"{block}.conv_dw.weight", 0)] == "producer"  # depthwise: in and out tied
    assert roles[(f"{block}.conv_pwl.weight", 1)] == "consumer"
    if arch == "efficientnet_b0":
        assert roles[(f"{block}.se.conv_reduce.weight", 1)] == "consumer"
        assert roles[(f"{block}.se.conv_expand.weight", 0)] == "producer"
    assert not any(g.prunable for g in groups if g.name == f"{block}.conv_dw")  # never a group of its own


def test_grouped_conv_channels_are_removed_in_balanced_classes():
    groups = find_channel_groups(_timm("regnetx_002"), torch.randn(1, 3, 32, 32))
    group = next(g for g in groups if g.name == "s2.b1.conv1.conv")  # 56 channels in 7 groups of 8
    assert group.prunable and group.width == 8
    rows = next(s for s in group.slices if s.tensor == "s2.b1.conv1.conv.weight")
    columns = next(s for s in group.slices if s.tensor == "s2.b1.conv2.conv.weight")
    assert rows.index[0] == tuple(range(0, 56, 8)) and columns.index[0] == (0,)


def test_a_depthwise_conv_with_channel_multiplier_removes_whole_groups_with_its_input():
    """Conv2d(4, 8, groups=4): input channel c goes with output channels 2c, 2c + 1 (FastViT's downsampling); one fed
    by the image stays whole and says why."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.ReLU(),
                          nn.Conv2d(4, 8, 3, groups=4), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    groups = {g.name: g for g in find_channel_groups(model, x)}
    group = groups["3"]
    assert group.prunable and group.width == 4 and group.unit == 1, group.reason
    index = {(s.tensor, s.dim): s.index for s in group.slices}
    assert index[("5.weight", 0)] == index[("6.weight", 0)] == index[("8.weight", 1)] == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert ("5.weight", 1) not in index  # one input per group: the rows are the group
    assert not groups["0"].prunable and "its input is the model input" in groups["0"].reason
    slim = slim_copy(model, tensor_removals(list(groups.values()), {"3": [1, 2]}))
    conv = slim[5]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (2, 4, 2)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, rows in ((masked[3], [1, 2]), (masked[5], [2, 3, 4, 5])):
            layer.weight[rows] = 0
            layer.bias[rows] = 0
        masked[6].bias[[2, 3, 4, 5]] = 0  # a removed channel's BN output is its bias: zero it like the mask does
        masked[6].running_mean[[2, 3, 4, 5]] = 0
        assert torch.allclose(slim(x), masked(x), atol=1e-6)
        assert slim[6].num_features == 4
    # the width plan says how many groups the multiplier conv has (its (4, 1, 3, 3) weight could be 4 groups of 1)
    plan = json.loads(json.dumps(width_plan(slim, model)))
    assert plan["conv_groups"] == {"5": 2}
    replayed = apply_width_plan(copy.deepcopy(model), plan)
    assert (replayed[5].in_channels, replayed[5].out_channels, replayed[5].groups) == (2, 4, 2)
    replayed.load_state_dict(slim.state_dict())
    assert torch.equal(replayed(x), slim(x))


def test_a_width_plan_from_before_multiplier_groups_keeps_every_group():
    """A plan without ``conv_groups`` (chase_timm before multiplier convs lost whole groups) cut one output of every
    group of a multiplier conv: replayed today it keeps every group, as the release that wrote it did."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4))
    plan = {"tensors": {"2.weight": [4, None, None, None], "2.bias": [4]}}
    conv = apply_width_plan(model, plan)[2]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (4, 4, 4)
    assert model(torch.randn(1, 3, 12, 12)).shape == (1, 4, 8, 8)


def test_flatten_to_linear_expands_each_channel_to_its_positions():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    x = torch.randn(1, 3, 6, 6)
    groups = find_channel_groups(model, x)
    conv = next(g for g in groups if g.name == "0")
    linear = next(s for s in conv.slices if s.tensor == "4.weight")
    assert conv.prunable and linear.dim == 1 and linear.index[1] == tuple(range(16, 32))
    assert not next(g for g in groups if g.name == "4").prunable  # its outputs are the model's outputs
    slim = slim_copy(model, tensor_removals(groups, {"0": [1, 4]}))
    assert slim[4].in_features == 4 * 16


def test_model_without_prunable_groups():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 1))
    groups = find_channel_groups(model, torch.randn(1, 3, 8, 8))
    assert [g.name for g in groups] == ["0", "3"] and not any(g.prunable for g in groups)
    assert "GroupNorm" in groups[0].reason and "output" in groups[1].reason


def test_tiny_timeout_returns_quickly_with_reasons():
    model = _timm("resnet18")
    start = time.monotonic()
    with pytest.warns(UserWarning, match="discovery"):
        groups = find_channel_groups(model, torch.randn(1, 3, 32, 32), timeout=1e-6)
    assert time.monotonic() - start < 5
    assert groups and all(not g.prunable and g.reason == TIMEOUT_REASON for g in groups)


class _NoAutograd(nn.Module):
    """A model that runs but can't be traced: its op has no autograd support (it refuses to run with grad on)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("this op has no autograd formula")
        return self.conv2(self.conv1(x))

    def train(self, mode=True):  # an override without ``return self`` (common): eval() then returns None
        super().train(mode)


def test_tracing_failure_is_a_reason_not_a_crash():
    model = _NoAutograd()
    model.train()
    with pytest.warns(UserWarning, match="discovery incomplete"):
        groups = find_channel_groups(model, torch.randn(1, 3, 32, 32))
    assert groups and all(not g.prunable for g in groups)
    assert re.match(r"dependency graph could not be built: RuntimeError", groups[0].reason)
    assert model.training and not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match=r"example_inputs \[\(1, 5, 32, 32\)\] does not run through"):
        find_channel_groups(_timm("resnet18"), torch.randn(1, 5, 32, 32))  # wrong channel count: the input's fault


def test_groups_round_trip_through_json(resnet50):
    _, groups, _ = resnet50
    again = [ChannelGroup.from_dict(d) for d in json.loads(json.dumps([g.to_dict() for g in groups]))]
    assert again == groups


def test_tensor_removals_merges_groups_per_tensor(resnet50):
    _, groups, _ = resnet50
    removals = tensor_removals(groups, {"layer1.0.conv1": [3, 1], "layer1.0.conv2": [0]})
    assert removals["layer1.0.conv2.weight"] == {1: [1, 3], 0: [0]}
    assert removals["layer1.0.bn1.running_var"] == {0: [1, 3]}
    with pytest.raises(ValueError, match="out of range"):
        tensor_removals(groups, {"layer1.0.conv1": [64]})
    with pytest.raises(KeyError, match="nope"):
        tensor_removals(groups, {"nope": [0]})


def test_channel_mixing_ops_are_reported_and_discovery_stays_fast():
    model = _timm("ecaresnet26t")  # ECA: a Conv1d slides across the channel dim
    start = time.monotonic()
    groups = find_channel_groups(model, torch.randn(1, 3, 32, 32), prune_skip=True, timeout=30)
    assert time.monotonic() - start < 30
    assert TIMEOUT_REASON not in {g.reason for g in groups}
    stream = next(g for g in groups if g.name == "layer1.0.conv3")
    assert not stream.prunable and "mixed" in stream.reason
    assert next(g for g in groups if g.name == "layer1.0.conv1").prunable


def test_a_lost_root_mapping_behind_a_channel_wise_op_leaves_the_group_whole_not_a_crash(monkeypatch):
    # NesT: torch-pruning loses a position's root channel on the way to an elementwise op where two channels meet;
    # discovery used to raise KeyError(None) while tying them. Its attention heads are head groups now
    # (chase_timm.heads), which take the qkv rows before the walk: walked as plain layers, as before, here
    monkeypatch.setattr(graph, "head_spec", lambda module, model=None: None)
    groups = find_channel_groups(timm.create_model("nest_tiny", img_size=32), torch.randn(1, 3, 32, 32))
    assert any(g.prunable for g in groups) and not all(g.prunable for g in groups)


class _AddmmGate(nn.Module):
    """Two halves of one layer's output meet in torch.addmm(a, b, w): a matmul over b's channels, not a gate."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.register_buffer("w", torch.randn(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, -1)
        return self.head(torch.addmm(a * 2, b.relu(), self.w))


class _BareMatmul(nn.Module):
    """A layer's channels multiplied by a bare parameter in torch.addmm (F.linear's op): not a scale or shift."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.weight = nn.Parameter(torch.randn(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(torch.addmm(h, h, self.weight))


@pytest.mark.parametrize("module, reason", [(_AddmmGate, "channels are mixed at"),
                                            (_BareMatmul, "parameter weight feeds")])
def test_a_matmul_is_not_taken_for_a_channel_wise_add(module, reason):
    """AddmmBackward0 mixes channels. Op names once matched by prefix, so "Add" took it for a channel-wise add: the
    halves were tied as at a gate, the parameter passed as a scale, and only the numerical check refused the
    groups (it needs the sliced model to fail). The structural rules now refuse them, naming the op."""
    torch.manual_seed(0)
    group = next(g for g in find_channel_groups(module(), torch.randn(2, 5)) if g.name == "fc")
    assert not group.prunable and group.reason.startswith(reason) and "AddmmBackward0" in group.reason, group.reason


def test_a_deep_models_residual_stream_is_walked_to_its_end():
    """The walk budget grows with the graph: a 40-block ViT's stream (about 30 positions per channel per block)
    is prunable under prune_skip, as the 12-block one is (DaViT-S's 9-block stage was left whole)."""
    model = _timm("vit_tiny_patch16_224", img_size=32, depth=40)
    groups = find_channel_groups(model, torch.randn(1, 3, 32, 32), prune_skip=True)
    stream = next(g for g in groups if g.name == "patch_embed.proj")
    assert stream.prunable, stream.reason
