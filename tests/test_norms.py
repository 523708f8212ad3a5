"""Norms that mix channels (LayerNorm, RMSNorm, GroupNorm, ConvNeXt-V2's GRN, weight-standardised convs): the masked
model computes what the slim one does.

Chase zeroes a removed channel; a LayerNorm/RMSNorm/GroupNorm/GRN still counts it in its channel statistics (a
StdConv2d / ScaledStdConv2d in each weight row's mean and variance) unless ``chase_timm.norms`` restricts them to the
alive channels. Unit checks of each hooked module against the sliced plain timm module (float64), then whole models:
ViT's embedding stream, ConvNeXt stages (LayerNorm2d / RmsNorm2d), ConvNeXt-V2's GRN hidden widths, BiT ResNet-V2
(GroupNorm + StdConv2d) and NFNet (ScaledStdConv2d) removed under Chase, exported and reloaded.
"""
import copy
import functools

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import (GroupNorm, GroupNorm1, GroupNormAct, LayerNorm, LayerNorm2d, LayerNormAct, LayerNormAct2d,
                         RmsNorm, RmsNorm2d, RmsNormAct2d, ScaledStdConv2d, ScaledStdConv2dSame, SimpleNorm,
                         SimpleNorm2d, StdConv2d, StdConv2dSame)
from timm.layers.grn import GlobalResponseNorm
from timm.models.metaformer import GroupNorm1NoBias

from chase_timm import Chase, ChaseConfig, save_pretrained
from chase_timm.adapters.autograd import forward_hooks
from chase_timm.norms import STANDARDISED_CONVS, AliveChannels, covers, follow_masks, remove_hooks
from chase_timm.slim import slim_copy
from helpers import check_model, tiny_model
from shrink_equivalence import compare, float64, loss_step
import zoo_coverage

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
    (RmsNormAct2d(C, act_layer=nn.GELU), (2, C, 3, 3)),  # norm + act layers: the norm, then dropout and activation
    (LayerNormAct(C, act_layer=nn.SiLU), (2, 5, C)),
    (LayerNormAct2d(C, act_layer=nn.Sigmoid), (2, C, 3, 3)),  # act(0) != 0: removed channels must still output 0
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
    if not isinstance(norm, GlobalResponseNorm):  # (GRN passes its removed channels' input through)
        assert not masked.index_select(dim, torch.tensor(REMOVED)).any()  # as the sliced model: nothing there
    assert not torch.allclose(remove_hooks(copy.deepcopy(norm))(x).index_select(dim, torch.tensor(keep)), expected,
                              rtol=0, atol=1e-6)  # the plain norm counts the removed channels: the test can fail
    follow_masks(norm, {"weight": torch.ones(C, dtype=torch.float64)})  # all alive again: the module's own output
    assert torch.equal(norm(x), remove_hooks(copy.deepcopy(norm))(x))


# modules run through their own forward on the alive slice: (module, removed channels: a GroupNorm's own channels,
# the same place in each of its groups; a conv's weight columns, i.e. input channels per group)
OWN_FORWARD = [
    (nn.GroupNorm(2, C), [1, 5]),
    (GroupNorm(C, num_groups=4), [0, 2, 4, 6]),
    (GroupNorm1(C), REMOVED),
    (GroupNormAct(C, num_groups=2, act_layer=nn.GELU), [2, 6]),
    (GroupNorm1NoBias(C), REMOVED),
    (StdConv2d(C, 6, 3), REMOVED),
    (StdConv2dSame(C, 6, 3, stride=2), REMOVED),
    (ScaledStdConv2d(C, 6, 3, gamma=1.7), REMOVED),
    (ScaledStdConv2dSame(C, 6, 3), REMOVED),
    (StdConv2d(C, 6, 3, groups=2), [1, 2]),  # input channels 1, 2, 5, 6
]


@pytest.mark.parametrize("module, removed", OWN_FORWARD, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_a_hooked_group_norm_or_standardised_conv_computes_what_the_sliced_module_computes(module, removed):
    """float64: GroupNorm statistics per group and a weight row's standardisation over the alive channels only; the
    removed channels' inputs are not even zero (the hook must ignore them)."""
    torch.manual_seed(0)
    module = module.double()
    conv = isinstance(module, STANDARDISED_CONVS)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    columns = module.weight.shape[1] if conv else C
    inputs = sorted(g * columns + j for g in range(C // columns) for j in removed)  # a conv's input channels
    keep = torch.tensor([c for c in range(C) if c not in inputs])
    cut = {"weight": {1: removed}} if conv else {n: {0: removed} for n, _ in module.named_parameters()}
    assert covers(module)
    slim = slim_copy(module, cut)
    x = torch.randn(2, C, 7, 7, dtype=torch.float64)
    expected = slim(x.index_select(1, keep))
    mask = torch.ones_like(module.weight)
    with torch.no_grad():
        for name, dims in cut.items():  # what Chase does to a removed channel's slices
            for dim, positions in dims.items():
                mask.index_fill_(dim, torch.tensor(positions), 0)
                module.get_parameter(name).index_fill_(dim, torch.tensor(positions), 0)
    follow_masks(module, {"weight": mask})
    masked = module(x)
    assert torch.allclose(masked if conv else masked.index_select(1, keep), expected, rtol=0, atol=1e-12)
    zeroed = x.index_fill(1, torch.tensor(inputs), 0)  # the plain module counts the removed channels: can fail
    plain = remove_hooks(copy.deepcopy(module))(zeroed)
    assert not torch.allclose(plain if conv else plain.index_select(1, keep), expected, rtol=0, atol=1e-6)
    follow_masks(module, {"weight": torch.ones_like(mask)})  # all alive again: the module's own output
    assert torch.equal(module(x), remove_hooks(copy.deepcopy(module))(x))


def test_a_hooked_group_norm_keeps_its_own_output_dtype_under_autocast(monkeypatch):
    """timm's fast_norm GroupNorm runs in the autocast dtype whatever its input's (CUDA autocast's own group_norm: in
    float32): the scatter must not cast the hooked output back to the input's dtype (or, on CUDA, fail on it)."""
    monkeypatch.setattr("timm.layers.norm.is_fast_norm", lambda: True)
    norm = GroupNorm(C, num_groups=2)
    assert norm._fast_norm
    plain = copy.deepcopy(norm)
    follow_masks(norm, {"weight": torch.ones(C).index_fill_(0, torch.tensor([1, 5]), 0)})
    x = torch.randn(2, C, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == plain(x).dtype == torch.bfloat16


def test_a_hooked_module_is_not_modified_while_its_hook_runs_its_forward_on_the_alive_slice():
    """Another thread (DataParallel replicas share hooks; a model served from threads) may run the module meanwhile:
    torch.func.functional_call swapped the sliced weight onto the module itself for that time."""
    norm = GroupNormAct(C, num_groups=2)
    seen = []
    norm.act.register_forward_hook(lambda act, args, out: seen.append(tuple(norm.weight.shape)))
    follow_masks(norm, {"weight": torch.ones(C).index_fill_(0, torch.tensor([1, 5]), 0)})
    norm(torch.randn(2, C, 4, 4))
    assert seen == [(C,), (C,)]  # the module's own forward, then the hook's on the alive slice


def _hooked(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if forward_hooks(m, AliveChannels)]


def _removed_kinds(chase, removed) -> set:
    """Kinds of norm-coupled channels among the removed groups: a residual stream through a channel-mixing norm
    (LayerNorm/RMSNorm/SimpleNorm), GRN hidden widths, GroupNorm channels and inputs of a weight-standardised conv."""
    kinds = set()
    for group in (g for g in chase.channels.groups if g.name in removed):
        norms = {type(chase.module.get_submodule(s.tensor.rsplit(".", 1)[0])) for s in group.slices
                 if s.tensor.endswith(".weight") and covers(chase.module.get_submodule(s.tensor.rsplit(".", 1)[0]))}
        kinds |= {"grn"} if GlobalResponseNorm in norms else set()
        kinds |= {"group_norm"} if any(issubclass(t, nn.GroupNorm) for t in norms) else set()
        kinds |= {"norm_act"} if any("NormAct" in t.__name__ and not issubclass(t, nn.GroupNorm) for t in norms) \
            else set()
        kinds |= {"standardised"} if any(s.dim == 1 and isinstance(chase.module.get_submodule(
            s.tensor.rsplit(".", 1)[0]), STANDARDISED_CONVS) for s in group.slices) else set()
        kinds |= {"stream"} if group.residual and {t for t in norms if t is not GlobalResponseNorm
                                                   and not issubclass(t, STANDARDISED_CONVS)} else set()
        kinds |= {"tokens"} if {s.tensor for s in group.slices} >= {"cls_token", "pos_embed"} else set()
    return kinds


EXPORTS = [
    ("vit_tiny_patch16_224", True, {"stream", "tokens"}),  # patch embed, cls token, pos embed, every LayerNorm, head
    ("convnextv2_atto", False, {"grn"}),
    ("convnext_zepto_rms", True, {"stream"}),  # SimpleNorm2d stages
    ("resnetv2_50x1_bit", True, {"group_norm", "standardised", "stream"}),  # BiT: GroupNormAct + StdConv2d
    ("poolformerv2_s12", True, {"group_norm", "stream"}),  # MetaFormer's GroupNorm1NoBias / LayerNorm2dNoBias stages
    ("test_efficientnet_ln", False, {"norm_act"}),  # timm's LayerNormAct2d in the inverted residuals
]


@pytest.mark.parametrize("name, prune_skip, kinds", EXPORTS)
def test_norm_coupled_channels_are_removed_and_export_and_reload_exactly(name, prune_skip, kinds, tmp_path):
    """float32: Chase steps with channel events, the slim export (no hooks) and its save_pretrained -> local-dir:
    reload compute what the masked training model computes (<= 1e-4 relative, as check_export)."""
    row = check_model(name, prune_skip, keep_models=True)
    chase, slim = row["chase"], row["slim"]
    assert kinds <= _removed_kinds(chase, chase.removed_channels()), _removed_kinds(chase, chase.removed_channels())
    assert _hooked(chase.module) and not _hooked(slim)  # the masked model needs them; the slim model is plain timm
    assert row["rel_diff"] <= 1e-4 and row["flops_ratio"] < 0.75, row
    save_pretrained(slim, tmp_path / "m")
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = chase.module.eval()(x)
        for model in (slim.eval(), reloaded):
            assert float((model(x) - reference).abs().max() / reference.abs().max()) <= 1e-4


TWINS = [
    pytest.param("convnext_zepto_rms", True, {"stream"}),
    pytest.param("resnetv2_50", True, {"group_norm", "standardised", "stream"}),  # built as BiT (TWIN_SMALLER)
    pytest.param("convnextv2_atto", False, {"grn"}, marks=pytest.mark.slow),
    pytest.param("convnextv2_atto", True, {"grn", "stream"}, marks=pytest.mark.slow),
    pytest.param("vit_tiny_patch16_224", True, {"stream", "tokens"}, marks=pytest.mark.slow),
    pytest.param("mixer_s16_224", True, {"stream"}, marks=pytest.mark.slow),
]


# fewer parameters for the float64 twins (optimizer, EMA and mask work scale with them): the norms, the streams
# and the token parameters are all still there
TWIN_SMALLER = {"vit_tiny_patch16_224": {"depth": 2}, "mixer_s16_224": {"mlp_ratio": (0.5, 0.5)},
                "convnextv2_atto": {"depths": (1, 1, 1, 1)},
                # resnetv2_50x1_bit's layers with one block per stage (its entry point fixes ``layers``; at full
                # depth float64 rounding alone grows to ~1e-6 over the 10 steps, masked twin against itself)
                "resnetv2_50": {"layers": (1, 1, 1, 1), "conv_layer": functools.partial(StdConv2d, eps=1e-8),
                                "norm_layer": GroupNormAct, "stem_type": "fixed"}}


@pytest.mark.parametrize("name, prune_skip, kinds", TWINS)
def test_shrinking_norm_coupled_channels_equals_the_masking_twin(name, prune_skip, kinds, monkeypatch):
    """float64, 1e-9 relative (tests/test_shrink.py's harness): losses, weights, AdamW state, outputs, slim export,
    and a registered EMA (its norms are hooked through Chase.register / mask_model)."""
    if name in TWIN_SMALLER:
        monkeypatch.setitem(zoo_coverage.SMALLER, name, TWIN_SMALLER[name])
    with float64():
        result = compare(name, "adamw", ema=True, prune_skip=prune_skip)
    assert result.exact(), (result.worst(), result.error, result.refused)
    assert result.shrinks == 4 and result.widths[-1] < 0.9 * result.widths[0]
    assert kinds <= _removed_kinds(result.twin_run[2], result.removed)


def test_a_resumed_run_computes_over_the_alive_channels_again():
    """Chase.load_state_dict re-hooks a fresh model's norms (masking only, so nothing is sliced to show it)."""
    def run():
        model = tiny_model("convnextv2_atto")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        config = ChaseConfig(total_steps=10, channel_interval=1, channel_offset=0, channel_end_step=1,
                             channel_sparsity=0.5, min_channel_ratio=0.5)
        return model, optimizer, Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))

    model, optimizer, chase = run()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    loss_step(model, optimizer, chase, 0)  # the channel event: GRN hidden widths halved, masked
    assert _removed_kinds(chase, chase.removed_channels()) == {"grn"}
    fresh, fresh_optimizer, resumed = run()
    resumed.load_state_dict(chase.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert _hooked(fresh) == _hooked(model) != []
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
        assert not torch.allclose(remove_hooks(fresh)(x), model(x), rtol=1e-4)  # without them it would differ


def _layer_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _standardised_cnn() -> nn.Module:  # BiT's pieces: a GroupNorm of 4 groups, StdConv2d reading masked channels
    return nn.Sequential(nn.Conv2d(3, 16, 3), GroupNormAct(16, num_groups=4), StdConv2d(16, 16, 3), nn.ReLU(),
                         StdConv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("make, shape, hooked", [(_layer_norm_mlp, (8,), {"0"}),
                                                  (_standardised_cnn, (3, 12, 12), {"0", "2"})])
def test_a_model_compiled_before_the_first_channel_event_follows_the_alive_channel_norms(make, shape, hooked):
    # torch.compile does not see forward hooks added after its first call: the hooks are attached at Chase()
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ChaseConfig(total_steps=4, update_interval=2, channel_interval=1, channel_offset=0,
                         channel_end_step=2, channel_sparsity=0.5, min_channel_ratio=0.5)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(2, *shape))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, *shape)
    for _ in range(3):
        compiled(x).square().mean().backward()
        optimizer.step(), chase.step(), optimizer.zero_grad()
    assert hooked <= set(chase.removed_channels())  # groups through the norm / into the standardised conv
    out = compiled(x).detach()  # same grad mode as training: no recompile that would pick up a late hook
    torch.testing.assert_close(out, model(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(out, chase.export()(x).detach(), rtol=1e-5, atol=1e-6)
