"""Masked model == physically sliced model across timm families; width plans replay bit-identically."""
import copy
import functools
import json

import pytest
import timm
import torch

from chase_timm._timm import default_example_input
from chase_timm.graph import tensor_removals
from chase_timm.norms import follow_masks, removal_masks
from chase_timm.slim import apply_width_plan, recalibrate_batchnorm, slim_copy, width_plan
from helpers import check_model, coverage_params, coverage_row, input_size, tiny_model, zero_removed

TOLERANCE = 1e-4


def _randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm affine/statistics and layer scales, so masked channels really carry values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _slimmed(arch: str, prune_skip: bool):
    """(masked model, slim model, input, prunable groups) with 30-50 % of every prunable group removed; the groups
    are those the coverage run of the same model found (discovery is slow: once per model and setting)."""
    torch.manual_seed(0)
    size = input_size(arch)
    model = _randomize_(tiny_model(arch))
    x = torch.randn(1, 3, size, size)
    groups = coverage_row(arch, prune_skip)["channel_groups"]
    prunable = [g for g in groups if g.prunable]
    gen = torch.Generator().manual_seed(2)
    removed = {}
    for g in prunable:
        count = max(1, int(g.width * (0.3 + 0.2 * torch.rand(1, generator=gen).item())))
        removed[g.name] = sorted(torch.randperm(g.width, generator=gen)[:count].tolist())
    removals = tensor_removals(groups, removed)
    masked = copy.deepcopy(model)
    zero_removed(masked, removals)
    follow_masks(masked, removal_masks(masked, removals))  # and its norms compute over the alive channels
    return masked, slim_copy(masked, removals), x, tuple(prunable)


def _feature_channels(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    return [f.shape[1] for f in model.forward_intermediates(x, intermediates_only=True)]


@pytest.mark.slow
@pytest.mark.parametrize("prune_skip", [False, True], ids=["internal", "prune_skip"])
@pytest.mark.parametrize("arch", coverage_params())
def test_slim_copy_matches_masked_model(arch, prune_skip):
    masked, slim, x, prunable = _slimmed(arch, prune_skip)
    if prune_skip and not any(g.residual for g in prunable):
        pytest.skip(f"{arch}: no prunable residual group (none exist, or they normalise across channels)")
    head = {id(t) for t in masked.get_classifier().parameters()}
    head_rows = {n for n, t in masked.named_parameters() if id(t) in head}
    assert not any(s.tensor in head_rows and (s.dim == 0 or s.role == "bias") for g in prunable for s in g.slices)
    with torch.no_grad():
        expected, actual = masked(x), slim(x)
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= TOLERANCE * scale
    if prunable:
        assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in masked.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("arch", coverage_params())
def test_slim_model_keeps_timm_interface(arch):
    slim, x = copy.deepcopy(_slimmed(arch, True)[1]), _slimmed(arch, True)[2]
    with torch.no_grad():
        features = slim.forward_features(x)
        assert _feature_channels(slim, x) == [info["num_chs"] for info in slim.feature_info]
        assert slim.forward_head(features, pre_logits=True).shape[-1] == slim.head_hidden_size
        channel_dim = 1 if features.dim() == 4 and arch not in ("vit_tiny_patch16_224", "mixer_s16_224") else -1
        assert features.shape[channel_dim] == slim.num_features
        slim.reset_classifier(5)
        assert slim(x).shape == (1, 5)


def test_reset_classifier_of_an_attention_pool_vit_builds_on_the_pooled_width():
    # SigLIP-style MAP head: attn_pool has its own stream (proj -> mlp), cut under prune_skip apart from the blocks'
    # stream; reset_classifier builds nn.Linear(embed_dim, n), so embed_dim must be the pooled (pre-logits) width
    row = check_model("vit_tiny_patch16_224", prune_skip=True, keep_models=True, depth=1, global_pool="map")
    slim = row["slim"].eval()
    assert 192 > slim.head.in_features != slim.num_features < 192  # both streams lost channels, not the same number
    slim.reset_classifier(5)
    with torch.no_grad():
        assert slim(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_the_default_example_input_has_the_image_channels_behind_a_space_to_depth_stem(in_chans):
    # TResNet folds 4x4 pixels into 16x the channels before its first conv (48 for RGB): tracing, FLOP counting and
    # the re-measuring of num_features after a shrink need an input with the image's channels, not the conv's
    model = timm.create_model("tresnet_m", pretrained=False, num_classes=4, in_chans=in_chans).eval()
    x = default_example_input(model)
    assert x.shape == (1, in_chans, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 4)


@pytest.mark.xdist_group("coverage-resnet18")
def test_masked_model_untouched_by_slim_copy():
    masked, slim, x, _ = _slimmed("resnet18", False)
    assert masked.layer1[0].conv1.weight.shape == (64, 64, 3, 3)
    assert slim.layer1[0].conv1.weight.shape[0] < 64


@pytest.mark.slow
@pytest.mark.parametrize("arch", coverage_params(["resnet50", "efficientnet_b0", "densenet121", "regnetx_002",
                                                  "convnext_atto", "vit_tiny_patch16_224", "vgg11_bn", "dla34"]))
def test_width_plan_replays_on_meta_built_model(arch):
    masked, slim, x, _ = _slimmed(arch, True)
    with torch.device("meta"):
        base = tiny_model(arch)
    plan = json.loads(json.dumps(width_plan(slim, base)))
    assert plan["tensors"]
    apply_width_plan(base, plan)
    base.to_empty(device="cpu")
    base.load_state_dict(slim.state_dict(), strict=True)
    base.eval()
    with torch.no_grad():
        assert torch.equal(base(x), slim(x))
    assert base.num_features == slim.num_features
    assert [i["num_chs"] for i in base.feature_info] == [i["num_chs"] for i in slim.feature_info]


@pytest.mark.xdist_group("coverage-vgg11_bn")
def test_width_plan_leaves_class_count_to_the_new_model():
    masked, slim, x, _ = _slimmed("vgg11_bn", False)  # pre-logits are pruned, so the classifier input shrinks
    plan = width_plan(slim, tiny_model("vgg11_bn"))
    assert plan["tensors"]["head.fc.weight"][0] is None
    model = apply_width_plan(tiny_model("vgg11_bn", num_classes=3), plan)
    assert model.head.fc.weight.shape == (3, slim.head.fc.weight.shape[1])
    assert model(x).shape == (1, 3)
    headless = apply_width_plan(tiny_model("vgg11_bn", num_classes=0), plan)
    assert headless(x).shape == (1, slim.head_hidden_size)


def test_apply_width_plan_rejects_unknown_tensor():
    with pytest.raises(ValueError, match="layer9.conv.weight"):
        apply_width_plan(tiny_model("resnet18"), {"tensors": {"layer9.conv.weight": [8, 8, 3, 3]}})


def test_apply_width_plan_rejects_wrong_rank():
    with pytest.raises(ValueError, match="conv1.weight"):
        apply_width_plan(tiny_model("resnet18"), {"tensors": {"conv1.weight": [32, 3]}})


def test_apply_width_plan_rejects_inconsistent_plan():
    with pytest.raises(ValueError, match="bn1"):
        apply_width_plan(tiny_model("resnet18"), {"tensors": {"conv1.weight": [32, 3, 7, 7]}})


def test_recalibrate_batchnorm_matches_update_bn():
    model = tiny_model("resnet18").train()
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4)) for _ in range(3)]
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, reference)
    model.layer1.eval()  # per-module flags survive
    recalibrate_batchnorm(model, iter(batches + batches), num_batches=3)
    assert not model.layer1.training and model.training
    assert torch.allclose(model.bn1.running_mean, reference.bn1.running_mean)
    assert torch.allclose(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_slim_copy_handles_tensors_cached_under_autograd():
    model = tiny_model("resnet18").eval()
    model.layer1[0].cache = {"cpu": model.conv1.weight * 2}  # like LeViT's attention-bias cache
    slim = slim_copy(model, {"layer1.0.conv1.weight": {0: [0]}, "layer1.0.bn1.weight": {0: [0]},
                             "layer1.0.bn1.bias": {0: [0]}, "layer1.0.bn1.running_mean": {0: [0]},
                             "layer1.0.bn1.running_var": {0: [0]}, "layer1.0.conv2.weight": {1: [0]}})
    assert slim.layer1[0].conv1.out_channels == 63 and slim.layer1[0].conv2.in_channels == 63
    assert slim(torch.randn(1, 3, 32, 32)).shape == (1, 10)
