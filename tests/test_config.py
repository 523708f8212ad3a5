"""ChaseConfig: validation names the field, defaults follow total_steps, round trips, schedules."""
import math

import pytest

from chase_timm import ChaseConfig


def test_defaults_are_derived_from_total_steps():
    config = ChaseConfig(total_steps=250_000)
    assert config.update_interval == 1000  # the paper's Delta T_p on a long run
    assert config.phase_b_start_step == 200_000 and config.channel_end_step == 200_000  # epoch 80 of 100
    assert config.channel_offset == 500  # Delta T_p / 2
    assert config.channel_interval == 2000
    short = ChaseConfig(total_steps=300)  # about 20 updates, a channel event every second update
    assert short.update_interval == 15 and short.channel_interval == 30 and short.channel_offset == 7
    assert ChaseConfig(total_steps=100).update_interval == 10  # grown weights get at least 10 steps
    tiny = ChaseConfig(total_steps=4)
    assert tiny.update_interval == 4 and tiny.channel_interval == 4


def test_from_epochs_short_run_defaults_are_in_epochs():
    """The digits default: 22 steps per epoch, 20 epochs; updates once per epoch, channel events every 2 epochs,
    the first 1.5 epochs in (after a 1-epoch warm-up), channel pruning over by epoch 16 so 4 epochs recover."""
    config = ChaseConfig.from_epochs(epochs=20, steps_per_epoch=22)
    assert config.total_steps == 440 and config.update_interval == 22 and config.channel_interval == 44
    events = [t for t in range(1, 441) if config.is_channel_step(t)]
    assert events[0] == 33 and events[-1] == config.channel_end_step == 352
    assert [t for t in range(1, 441) if config.is_update_step(t)][:3] == [22, 44, 66]
    # long runs keep the paper's Delta T_p cap of 1000 steps
    assert ChaseConfig.from_epochs(epochs=100, steps_per_epoch=2502).update_interval == 1000
    # fractional steps per epoch (a run compressed by --max-steps) and explicit step values
    compressed = ChaseConfig.from_epochs(epochs=3, steps_per_epoch=10 / 3, channel_offset=0)
    assert compressed.total_steps == 10 and compressed.update_interval == 3 and compressed.channel_interval == 6
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ChaseConfig.from_epochs(epochs=3, steps_per_epoch=0)


@pytest.mark.parametrize("fmt", ["dict", "json", "yaml"])
def test_round_trip(fmt):
    config = ChaseConfig(total_steps=1234, density=0.2, channel_sparsity=0.3, scope="layerwise",
                         exclude=("conv1", "fc"), prune_skip=True, channel_round_to=8)
    if fmt == "dict":
        again = ChaseConfig.from_dict(config.to_dict())
    elif fmt == "json":
        again = ChaseConfig.from_json(config.to_json())
    else:
        again = ChaseConfig.from_yaml(config.to_yaml())
    assert again == config


@pytest.mark.parametrize("field, value", [
    ("density", 0.0), ("density", 1.5), ("density", float("nan")),
    ("soft_bound", -0.1), ("soft_bound", 0.95),  # density + soft_bound > 1
    ("soft_bound_end", 0.2),
    ("total_steps", 0), ("total_steps", 10.5),
    ("update_interval", 0), ("update_interval", -5), ("update_interval", 5000),
    ("channel_interval", 0),
    ("phase_b_start_step", 2000),  # switch after the end
    ("channel_end_step", 2000), ("channel_end_step", 0),
    ("channel_offset", -1),
    ("channel_sparsity", 1.0), ("channel_sparsity", -0.1),
    ("min_channel_ratio", 0.0), ("min_channel_ratio", 1.5),
    ("scope", "per-layer"), ("umm_fanin", "dead"),
    ("phase_b_rate_start", 2.0), ("phase_b_rate_end", 0.9),
    ("channel_round_to", 0), ("seed", -1), ("discovery_timeout", 0),
    ("prune_skip", "yes"), ("exclude", ("",)),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ChaseConfig(**{"total_steps": 1000, field: value})


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="densty"):
        ChaseConfig.from_dict({"total_steps": 10, "densty": 0.1})
    with pytest.raises(TypeError, match=r"Unknown ChaseConfig field\(s\) \['chanel_sparsity'\]; valid fields .*'channel_sparsity'"):
        ChaseConfig(total_steps=10, chanel_sparsity=0.4)  # the constructor names the valid fields too

    class Tuned(ChaseConfig):  # a plain subclass taking its own keyword: its __init__, not the check, decides
        def __init__(self, total_steps: int, warmup: int = 0) -> None:
            super().__init__(total_steps=total_steps)
            object.__setattr__(self, "warmup", warmup)

    assert Tuned(10, warmup=3).warmup == 3


def test_from_epochs_matches_the_paper_imagenet_schedule():
    config = ChaseConfig.from_epochs(epochs=100, steps_per_epoch=2502, channel_end_epoch=80, phase_b_epoch=80,
                                     channel_interval_epochs=2, update_interval=1000, soft_bound_end=0.005)
    assert config.total_steps == 250_200 and config.channel_end_step == 200_160
    assert config.channel_interval == 5004
    # derived values of the spec's table 9.4 (ImageNet epochs 10 / 40 / 80)
    ratios = [config.channel_sparsity_at(e * 2502) / config.channel_sparsity for e in (10, 40, 80)]
    assert [round(r, 3) for r in ratios] == [0.33, 0.875, 1.0]
    rhos = [config.grow_density(e * 2502) for e in (10, 40, 80)]
    assert [round(r, 3) for r in rhos] == [0.148, 0.128, 0.105]


def test_schedules_endpoints():
    config = ChaseConfig(total_steps=1000)
    assert config.grow_density(0) == pytest.approx(0.15)
    assert config.grow_density(config.phase_b_start_step) == pytest.approx(0.1)
    assert config.phase_b_rate(0) == pytest.approx(0.5) and config.phase_b_rate(1000) == pytest.approx(0.005)
    assert config.channel_sparsity_at(0) == 0 and config.channel_sparsity_at(800) == pytest.approx(0.4)
    assert config.channel_sparsity_at(10_000) == pytest.approx(0.4)
    events = [t for t in range(1, 1001) if config.is_channel_step(t)]
    assert events[0] == 75 and all((t + 25) % 100 == 0 for t in events[:-1]) and events[-1] == 800
    updates = [t for t in range(1, 1001) if config.is_update_step(t)]
    assert updates[0] == 50 and math.gcd(*updates) == 50
    frozen = ChaseConfig(total_steps=1000, phase_b=False)
    assert max(t for t in range(1, 1001) if frozen.is_update_step(t)) < 800
