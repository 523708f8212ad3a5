"""``ChaseConfig(channel_cost="flops")``: channels ranked by UMM per FLOP saved, the channel budget unchanged.

The FLOPs a channel saves (``chase_timm.cost.FlopCosts``) equal a finite difference of the FLOPs count (slice the
channel out, count again) on a CNN and on a ViT whose residual stream and MLP have already lost channels; a run
at the same S_c removes as many channels as pure UMM but more FLOPs (on Swin enough for a 0.65 target); a bad value is refused naming the choices.
"""
import pytest
import timm
import torch

from chase_timm import ChaseConfig
from chase_timm.cost import FlopCosts, module_flops
from chase_timm.graph import find_channel_groups, tensor_removals
from chase_timm.heads import head_counts
from chase_timm.metrics import count_flops
from chase_timm.norms import follow_masks
from chase_timm.slim import meta_clone, slim_copy
from recipe_helpers import load_recipe
from synthetic_run import synthetic_config, synthetic_run


def _flops(model: torch.nn.Module) -> int:
    """FLOPs of one 32-px image, counted on a meta copy (attention matmuls included, as FlopCosts counts)."""
    return module_flops(meta_clone(model), (torch.empty(1, 3, 32, 32, device="meta"),))[0]


@pytest.mark.parametrize("name, kwargs, prune_skip", [
    ("resnet10t", {}, False),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, True),  # heads, MLP channels, the residual stream
])
def test_flops_one_channel_saves_match_a_finite_difference(name, kwargs, prune_skip):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = [g for g in find_channel_groups(model, x, prune_skip=prune_skip) if g.prunable and g.producers()]
    alive = {g.name: torch.ones(g.width, dtype=torch.bool) for g in groups}
    for g in groups[::2]:  # every other group has lost its first third already: its neighbours' costs shrink
        alive[g.name][: g.width // 3] = False
    costs = FlopCosts(model, (x,))(groups, alive)
    removed = {n: (~a).nonzero().flatten().tolist() for n, a in alive.items()}
    before = _flops(slim_copy(model, tensor_removals(groups, removed)))
    kinds = set()
    for g in groups:
        j = int(alive[g.name].nonzero()[0])
        after = _flops(slim_copy(model, tensor_removals(groups, {**removed, g.name: removed[g.name] + [j]})))
        assert costs[g.name] == pytest.approx(before - after, rel=1e-9), g.name
        kinds.add("head" if g.heads else "stream" if g.residual else "channel")
    assert kinds == ({"channel"} if not prune_skip else {"head", "stream", "channel"})


def test_flops_are_counted_on_meta_with_norm_hooks_active_and_training_flags_kept():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=1).train()
    mask = torch.ones(model.embed_dim)
    mask[:3] = 0
    follow_masks(model, {"norm.weight": mask})  # Chase's hook on the final LayerNorm, holding a CPU mask
    ran_on = []
    model.register_forward_pre_hook(lambda module, args: ran_on.append(args[0].device.type))
    FlopCosts(model, (torch.randn(1, 3, 32, 32),))
    assert ran_on == ["meta"]  # the shape-only copy, not the training model
    model.patch_embed.eval()  # a submodule the user keeps in eval
    module_flops(model, (torch.randn(1, 3, 32, 32),))
    assert model.training and model.blocks.training and not model.patch_embed.training


def test_flops_cost_removes_more_flops_at_the_same_channel_budget():
    runs = {}
    for cost in ("none", "flops"):
        config = synthetic_config(4, channel_cost=cost, prune_skip=True)  # streams: stage 0 costs 4x stage 1
        model, _, chase = synthetic_run("resnet10t", config, num_classes=10)
        runs[cost] = (chase.channels.alive_count(), count_flops(chase.export(), 32) / count_flops(model, 32))
    assert runs["flops"][0] == runs["none"][0]  # S_c: the same number of channels removed
    assert runs["flops"][1] < runs["none"][1] - 0.02, runs  # ... and more FLOPs


@pytest.mark.parametrize("prune_skip", [False, True])
def test_a_hierarchical_transformer_meets_a_flops_target_at_sc_0_4_only_when_ranked_by_cost(prune_skip):
    """Swin at S_c 0.4: pure UMM spends the channel count on the last stage (its cheapest, ERK-sparsest channels);
    UMM per FLOP saved thins the early stages' heads instead (docs/speed.md section 5)."""
    runs = {}
    for cost in ("none", "flops"):
        config = synthetic_config(4, channel_cost=cost, prune_skip=prune_skip)
        model, _, chase = synthetic_run("swin_tiny_patch4_window7_224", config, num_classes=10, size=64,
                                        img_size=64, window_size=4, depths=(1, 1, 2, 1))
        slim = chase.export()
        runs[cost] = (chase.channels.alive_count(), count_flops(slim, 64) / count_flops(model, 64), head_counts(slim))
    assert runs["flops"][0] == runs["none"][0]  # the same channel count removed
    assert runs["none"][1] > 0.75 and runs["flops"][1] <= 0.65, runs
    assert runs["none"][2]["layers.0.blocks.0.attn"] == 3 and runs["flops"][2]["layers.0.blocks.0.attn"] < 3, runs


def test_the_train_recipe_passes_channel_cost_to_chase():
    recipe = load_recipe()
    assert recipe.parse_args(["--channel-cost", "flops"])[1]["channel_cost"] == "flops"
    assert "channel_cost" not in recipe.parse_args([])[1]  # the library's default, the paper's UMM


def test_unknown_channel_cost_names_the_choices():
    with pytest.raises(ValueError, match=r"channel_cost must be one of \['none', 'flops', 'latency'\], got 'latency2'"):
        ChaseConfig(total_steps=10, channel_cost="latency2")


def test_latency_cost_keeps_the_channel_budget_and_times_every_group_on_this_device(tmp_path):
    cache = tmp_path / "latency.json"
    config = synthetic_config(3, channel_cost="latency", latency_batch_size=1, latency_img_size=32,
                              latency_cache=str(cache))
    model, _, chase = synthetic_run("resnet10t", config, num_classes=10)
    _, _, pure = synthetic_run("resnet10t", synthetic_config(3), num_classes=10)
    assert chase.channels.alive_count() == pure.channels.alive_count()
    seconds = chase.channels.channel_cost(chase.channels.prunable, chase.channels.alive)
    # every group timed; a marginal slope is never negative, and an overhead-bound layer may save ~0 (noise)
    assert set(seconds) == set(chase.channels.alive) and all(s >= 0 for s in seconds.values()), seconds
    assert sum(s > 0 for s in seconds.values()) > len(seconds) / 2, seconds
    assert cache.is_file()  # measured here, cached for the next run
