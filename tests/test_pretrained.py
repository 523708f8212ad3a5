"""Chase from pretrained weights: magnitude masks, the sparsity ramp, resume mid-ramp, config round trips, ranks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator, debug_launcher
from accelerate.utils import gather

from chase_timm import Chase, ChaseConfig
from chase_timm.sparsity import magnitude_masks
from helpers import batch, tiny_model, train
from recipe_helpers import fresh_accelerate

RAMP = dict(total_steps=24, update_interval=3, density=0.1, channel_sparsity=0.3, channel_interval=2,
            mask_init="magnitude", ramp_steps=9)


def test_magnitude_masks_keep_the_largest_weights_with_exact_counts():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(8, 4, 3, 3, generator=g), "b": torch.randn(10, 16, generator=g)}
    weights["b"][:, :8] = 0.5  # ties straddle the cut of layer b
    counts = {"a": 29, "b": 37}
    masks = magnitude_masks(weights, counts, torch.Generator().manual_seed(1))
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == weights[name].shape
        assert int(mask.sum()) == counts[name]
        kept, dropped = weights[name].abs()[mask], weights[name].abs()[~mask]
        assert kept.min() >= dropped.max(), name
    again = magnitude_masks(weights, counts, torch.Generator().manual_seed(1))
    assert all(torch.equal(masks[n], again[n]) for n in masks), "same generator, same tie-break"

    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    global_masks = magnitude_masks(weights, None, torch.Generator().manual_seed(1), total=50)
    kept = torch.cat([weights[n].abs()[m] for n, m in global_masks.items()])
    assert kept.numel() == 50 and torch.equal(kept.sort().values, everything.sort().values[-50:])


def test_density_ramp_is_cubic_from_dense_to_d_and_channels_start_late_in_it():
    config = ChaseConfig(total_steps=100, density=0.1, mask_init="magnitude")
    assert config.ramp_steps == 75 and config.channel_start_step == 50  # measured in docs/pretrained.md
    densities = [config.density_at(t) for t in range(101)]
    assert densities[0] == 1.0 and densities[75] == pytest.approx(0.1) and densities[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(densities, densities[1:]))
    assert config.density_at(15) == pytest.approx(0.1 + 0.9 * 0.8 ** 3)
    assert config.density_at(50) == pytest.approx(0.1 + 0.9 / 27)  # channels start when the budget is near d
    assert [t for t in range(101) if config.is_channel_step(t)] == [55, 75, 80]  # three events, not one
    assert config.channel_sparsity_at(50) == 0.0 and config.channel_sparsity_at(80) == pytest.approx(0.4)

    for total in range(1, 60):  # the derived defaults hold for runs of any length
        short = ChaseConfig(total_steps=total, mask_init="magnitude")
        assert short.channel_start_step < short.channel_end_step and short.ramp_steps <= total

    paper = ChaseConfig(total_steps=100, density=0.1)
    assert paper.ramp_steps == 0 and paper.channel_start_step == 0
    assert {paper.density_at(t) for t in (0, 50, 100)} == {0.1}
    one_shot = ChaseConfig(total_steps=100, density=0.1, mask_init="magnitude", ramp_steps=0)
    assert one_shot.density_at(0) == 0.1


def test_config_round_trips_and_old_dicts_load():
    config = ChaseConfig(**RAMP)
    assert ChaseConfig.from_dict(config.to_dict()) == config
    assert ChaseConfig.from_yaml(config.to_yaml()) == config
    old = ChaseConfig(total_steps=50).to_dict()
    for key in ("mask_init", "ramp_steps", "channel_start_step"):
        del old[key]
    assert ChaseConfig.from_dict(old) == ChaseConfig(total_steps=50)


@pytest.mark.parametrize("kwargs, field", [
    (dict(mask_init="pretrained"), "mask_init"),
    (dict(mask_init="magnitude", ramp_steps=101), "ramp_steps"),
    (dict(mask_init="magnitude", ramp_steps=-1), "ramp_steps"),
    (dict(mask_init="magnitude", channel_start_step=80), "channel_start_step"),  # at channel_end_step (80)
])
def test_bad_ramp_settings_fail_in_one_line(kwargs, field):
    with pytest.raises(ValueError, match=rf"^ChaseConfig\.{field} must") as err:
        ChaseConfig(total_steps=100, **kwargs)
    assert "\n" not in str(err.value)


def _pretrained(steps: int = 20):
    """A resnet18 trained a few steps on a fixed batch set, so its weights carry what it learned."""
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, y = batch(step % 4, n=8)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_magnitude_masks_keep_a_trained_model_closer_to_its_dense_outputs_than_random():
    model = _pretrained()
    x = torch.cat([batch(step % 4, n=8)[0] for step in range(4)])
    with torch.no_grad():
        dense = model(x)

    def error(**kwargs) -> float:
        clone = copy.deepcopy(model)
        Chase(clone, ChaseConfig(total_steps=40, channel_sparsity=0.0, **kwargs))
        with torch.no_grad():
            return float((clone(x) - dense).pow(2).mean())

    one_shot, random = error(mask_init="magnitude", ramp_steps=0), error(mask_init="random")
    assert one_shot < 0.5 * random, (one_shot, random)
    assert error(mask_init="magnitude") == 0.0  # with the ramp the first masks are dense


def test_ramp_prunes_to_the_current_budget_and_ends_at_d(resnet18_one_block_per_stage):
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    config = ChaseConfig(**RAMP)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    seen = {}
    train(model, optimizer, chase, config.total_steps, after_step=lambda s: seen.setdefault(s + 1, chase.stats()))
    for t in (3, 6):  # ramp updates: magnitude pruning down to density_at(t), regrowth up to rho_t once that is below
        budget = max(config.density_at(t), config.grow_density(t))
        assert seen[t]["nnz"] == round(budget * chase.total_weights), t
    assert config.density_at(3) > config.grow_density(3) and config.density_at(6) < config.grow_density(6)
    assert seen[2]["nnz"] == chase.total_weights  # dense until the first update
    assert config.channel_start_step == 6 and not any(seen[t]["channel_sparsity"] for t in range(1, 7))
    assert seen[config.total_steps]["nnz"] == round(0.1 * chase.total_weights)
    assert seen[config.total_steps]["channel_sparsity"] > 0.2


def test_resume_mid_ramp_continues_bitwise(resnet18_one_block_per_stage):
    config = ChaseConfig(**RAMP)

    def build():
        model = tiny_model("resnet18")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return model, optimizer

    model, optimizer = build()
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    train(model, optimizer, chase, 5)  # mid-ramp: one ramp update done, the next at step 6
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), chase.state_dict()))
    budget = chase.budget  # the last ramp update's, not the step's: density_at(5) would be another number
    assert budget != round(config.density_at(5) * chase.total_weights)
    train(model, optimizer, chase, config.total_steps - 5, first_step=5)

    model2, optimizer2 = build()
    model2.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    chase2 = Chase(model2, config, optimizer=optimizer2, example_inputs=torch.randn(1, 3, 32, 32))
    chase2.load_state_dict(saved[2])
    assert chase2.budget == budget
    train(model2, optimizer2, chase2, config.total_steps - 5, first_step=5)
    for name, mask in chase.masks.items():
        assert torch.equal(mask, chase2.masks[name]), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, model2.state_dict()[name]), name


def _wrap_on_two_ranks(same_weights: bool = True) -> None:
    accelerator = Accelerator(cpu=True)
    model = tiny_model("resnet18")  # seeded: the same weights on both ranks
    if not same_weights:
        with torch.no_grad():
            model.conv1.weight.mul_(1.0 + accelerator.process_index)
    chase = Chase(model, ChaseConfig(total_steps=10, channel_sparsity=0.0, mask_init="magnitude", ramp_steps=0))
    masks = torch.cat([m.flatten() for m in chase.masks.values()])
    both = gather(masks[None])
    assert torch.equal(both[0], both[1]), "masks differ across ranks"


def _wrap_diverging() -> None:
    _wrap_on_two_ranks(same_weights=False)


def test_magnitude_masks_are_rank_identical_and_differing_weights_fail_clearly(resnet18_one_block_per_stage):
    with fresh_accelerate():
        debug_launcher(_wrap_on_two_ranks, num_processes=2)
    with fresh_accelerate():
        with pytest.raises(Exception, match=r"RuntimeError: ChaseConfig\(mask_init='magnitude'\) draws the masks "
                                            r"from the weights, but they differ across ranks \(first: conv1.weight\)"):
            debug_launcher(_wrap_diverging, num_processes=2)


def test_the_default_ramp_ends_where_updates_stop_without_phase_b():
    # a derived default never raises: without phase B the ramp is cut to phase_b_start_step; a set one still fails
    config = ChaseConfig(total_steps=100, mask_init="magnitude", phase_b=False, phase_b_start_step=50)
    assert config.ramp_steps == 50 and config.channel_start_step == 33
    assert ChaseConfig(total_steps=100, mask_init="magnitude", phase_b=False).ramp_steps == 75  # B would start at 80
    with pytest.raises(ValueError, match="ramp_steps=60 ends after phase_b_start_step=50"):
        ChaseConfig(total_steps=100, mask_init="magnitude", phase_b=False, phase_b_start_step=50, ramp_steps=60)
