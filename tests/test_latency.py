"""Hardware-aware widths and export for speed: the latency table's cache and keys, the fast-neighbour rounding's
budget and floors, ChaseConfig(width_rounding="latency") in a run, BatchNorm folding (exact, reloadable, refuses
training) and the measured-speed lines of `chase-timm info` and the model card. No timing is asserted here:
speed belongs in recipes/benchmark.py."""
import json

import pytest
import timm
import torch
from accelerate import Accelerator, debug_launcher

import chase_timm
from chase_timm.channels import group_floor, resize_removals
from chase_timm.cli import main as cli_main
from chase_timm.graph import find_channel_groups
from chase_timm.latency import LatencyCosts, LatencyTable, candidate_widths, excess_costs, fast_widths
from recipe_helpers import fresh_accelerate
from synthetic_run import synthetic_config, synthetic_run


@pytest.fixture(scope="module")
def slim18():
    """A slim resnet18 (S_c 0.5, widths from a 4-step synthetic schedule), in eval mode."""
    return synthetic_run("resnet18", synthetic_config(4, channel_sparsity=0.5), 10, 32, 0)[2].export().eval()


def test_candidate_widths_are_aligned_neighbours_within_bounds():
    assert candidate_widths(53, 40, 60) == [48, 53, 56]
    assert candidate_widths(53, 1, 512) == [32, 48, 53, 56, 64]
    assert candidate_widths(5, 5, 7) == [5]  # floor 5, at most 7 left: nothing aligned fits
    # classes of 3 tied channels (a grouped conv with 3 groups): 16 classes are 48 channels, a multiple of 8, 16 and
    # of round_to 6; 8 classes are 24 (of 8 and 6); 11 (33 channels) is kept only as the proposed width
    assert candidate_widths(11, 1, 20, unit=3, round_to=6) == [8, 11, 16]
    assert candidate_widths(12, 1, 20, unit=3, round_to=6) == [8, 12, 16]


def test_fast_widths_takes_dips_keeps_the_budget_and_needs_no_dip_to_stay():
    # group a sits just above a fast width (48), b just below one (64); c has no dip: linear cost
    costs = {"a": {48: 30.0, 53: 55.0, 56: 52.0}, "b": {56: 50.0, 60: 58.0, 64: 49.0}, "c": {40: 40.0, 44: 44.0}}
    proposed = {"a": 53, "b": 60, "c": 44}
    excess = {n: excess_costs(c, proposed[n]) for n, c in costs.items()}
    assert excess["c"] == pytest.approx({40: 44.0, 44: 44.0})  # linear: no width is better than its size says
    widths = fast_widths(excess, proposed, slack=2)
    assert widths == {"a": 48, "b": 64, "c": 44}
    assert -2 <= sum(widths.values()) - sum(proposed.values()) <= 0  # removed channels: S_c's count .. + slack
    # without slack the removed count stays exactly S_c's (a: -5 and b: +4 would remove one channel more)
    tight = fast_widths(excess, proposed, slack=0)
    assert sum(tight.values()) == sum(proposed.values())
    # a group without measured costs keeps its width
    assert fast_widths({}, {"x": 7}, slack=3) == {"x": 7}


def test_resize_removals_keeps_the_lowest_scored_channels_out():
    scores = {"g": torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2]), "h": torch.tensor([1.0, 2.0])}
    alive = {"g": torch.tensor([True, True, True, True, True, False]), "h": torch.ones(2, dtype=torch.bool)}
    removed = {"g": torch.tensor([1]), "h": torch.tensor([0])}
    out = resize_removals(scores, alive, removed, {"g": 2})
    assert out["g"].tolist() == [0, 1, 3]  # 5 alive -> 2 kept: the three lowest alive (0.1, 0.3, 0.5) go
    assert out["h"].tolist() == [0]  # untouched group
    assert resize_removals(scores, alive, removed, {"g": 4})["g"].tolist() == [1]  # already right: same picks


def test_latency_table_caches_per_device_model_batch_and_layout(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10)
    cache = tmp_path / "latency.json"
    table = LatencyTable(model, batch_size=2, img_size=32, layout="channels_last", cache=cache, min_run_time=0.001,
                         rounds=1)
    layers = table.layers(model)
    conv = layers["layer1.0.conv1.weight"]
    shapes = [table.shape("layer1.0.conv1.weight", conv, conv.in_channels, c) for c in (32, 40)]
    table.measure(shapes)
    stored = json.loads(cache.read_text())
    assert list(stored) == [table.key] and set(stored[table.key]) == set(shapes)
    for part in ("resnet10t", "batch 2", "3x32x32", "channels_last", "forward", "threads"):
        assert part in table.key
    again = LatencyTable(model, batch_size=2, img_size=32, layout="channels_last", cache=cache)
    assert again.seconds == stored[table.key]  # read back: nothing to measure
    for other in (dict(batch_size=4), dict(layout="nchw"), dict(backward=True), dict(img_size=64)):
        fresh = LatencyTable(model, **{**dict(batch_size=2, img_size=32, layout="channels_last"), **other},
                             cache=cache)
        assert fresh.key != table.key and fresh.seconds == {}
    with pytest.raises(ValueError, match="layout"):
        LatencyTable(model, layout="nhwc")


def test_a_corrupt_cache_is_recalibrated_and_rewritten_atomically(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10)
    cache = tmp_path / "latency.json"
    cache.write_text('{"cpu|resnet10t": {"[\\"conv\\", 3')  # cut short, as by a crash mid-write
    inode = cache.stat().st_ino
    with pytest.warns(UserWarning, match="not a JSON object of tables"):
        table = LatencyTable(model, batch_size=1, img_size=32, cache=cache, min_run_time=1e-4, rounds=1)
        assert table.seconds == {}
        conv = table.layers(model)["layer1.0.conv1.weight"]
        table.measure([table.shape("layer1.0.conv1.weight", conv, conv.in_channels, 8)])
    assert list(json.loads(cache.read_text())) == [table.key]
    # a new file renamed over the old one (a reader sees either whole), nothing left behind
    assert cache.stat().st_ino != inode and [p.name for p in tmp_path.iterdir()] == ["latency.json"]


def test_latency_cost_is_the_time_one_channel_saves_not_the_time_per_channel():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    groups = [g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32)) if g.prunable][:4]
    widths = {g.name: g.width for g in groups}
    alive = {g.name: torch.ones(g.width, dtype=torch.bool) for g in groups}
    table = LatencyTable(model, batch_size=1, img_size=32, min_run_time=1e-4, rounds=1)
    LatencyCosts(model, table)(groups, alive)  # times what it needs on this device
    for shape in table.seconds:  # known times: 50 us per call (not saved by a removed channel) + 1 ns per weight
        spec = json.loads(shape)
        table.seconds[shape] = 50e-6 + 1e-9 * spec[1] * spec[2]
    costs = LatencyCosts(model, table)(groups, alive)
    timed = len(table.seconds)
    ends = table.group_costs(model, groups, widths, {n: [w // 2, w] for n, w in widths.items()})
    assert len(table.seconds) == timed  # widths down to half were timed already
    for name, w in widths.items():
        t = ends[name]
        assert costs[name] == pytest.approx((t[w] - t[w // 2]) / (w - w // 2), rel=1e-6), name


def _costs_on_two_ranks(model, groups, cache) -> None:
    torch.set_num_threads(1)  # a forked rank must not enter the OpenMP pool the parent's timings started (it can hang)
    accelerator = Accelerator(cpu=True)
    table = LatencyTable(model, batch_size=1, img_size=32, cache=cache, min_run_time=1e-4, rounds=1)
    costs = LatencyCosts(model, table)(groups, {g.name: torch.ones(g.width, dtype=torch.bool) for g in groups})
    assert set(costs) == {g.name for g in groups}
    # only rank 0 measured (and wrote the cache); rank 1 received its costs
    assert bool(table.seconds) == accelerator.is_main_process, (accelerator.process_index, len(table.seconds))


def test_latency_costs_are_measured_on_rank_0_only(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10)
    groups = [g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32)) if g.prunable][:2]
    with fresh_accelerate():
        debug_launcher(_costs_on_two_ranks, args=(model, groups, tmp_path / "latency.json"), num_processes=2)
    assert json.loads((tmp_path / "latency.json").read_text())


def test_width_rounding_latency_keeps_floors_and_the_channel_budget(tmp_path):
    cache = tmp_path / "latency.json"
    config = synthetic_config(4, channel_sparsity=0.5, width_rounding="latency", latency_batch_size=2,
                              latency_img_size=32, latency_cache=str(cache))
    assert chase_timm.ChaseConfig.from_dict(json.loads(config.to_json())) == config
    chase = synthetic_run("resnet10t", config, 10, 32, 0)[2]
    state = chase.channels
    assert json.loads(cache.read_text())  # calibrated on this device, cached
    assert state.widths_rounded  # the policy ran at the event that reached S_c (with nothing left to remove there)
    removed = state.total - state.alive_count()
    slack = max(1, -(-state.total * 5 // 1000))
    assert round(state.total * 0.5) <= removed <= round(state.total * 0.5) + slack
    for name, alive in state.alive.items():
        assert int(alive.sum()) >= state.floors[name] == group_floor(len(alive), 0.5, 0.2)
    with pytest.raises(ValueError, match="width_rounding"):
        chase_timm.ChaseConfig(total_steps=10, width_rounding="fast")


def test_fold_batchnorm_is_exact_reloads_folded_and_refuses_training(slim18, tmp_path):
    folded = chase_timm.fold_batchnorm(slim18)
    assert type(folded) is type(slim18) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in slim18.modules())  # the input is untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference, got = slim18(x), folded(x)
    assert torch.allclose(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    chase_timm.save_pretrained(folded, tmp_path / "folded")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'folded'}", pretrained=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    with pytest.raises(RuntimeError, match="inference only"):
        loaded(x)  # create_model returns training mode: a folded model refuses to train without its norms
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), got)
    assert loaded.forward_features(x).shape[1] == slim18.num_features  # the timm interface is kept


def test_info_and_card_report_measured_speed(slim18, tmp_path, capsys):
    speed = {"measured_speed": [{"batch_size": 1, "layout": "channels_last", "speedup": 1.52, "img_per_s": 80.5},
                                {"batch_size": 32, "layout": "channels_last", "speedup": 1.41, "img_per_s": 120.0}],
             "throughput_device": "cpu (test CPU, 2 threads)"}
    chase_timm.save_pretrained(slim18, tmp_path / "fast", metrics=speed)
    chase_timm.save_pretrained(slim18, tmp_path / "plain")
    lines = ["measured speedup over base, batch 1, channels_last on cpu (test CPU, 2 threads): 1.52x (80.5 img/s)",
             "measured speedup over base, batch 32, channels_last on cpu (test CPU, 2 threads): 1.41x (120.0 img/s)"]
    assert cli_main(["info", str(tmp_path / "fast")]) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in lines)
    card = (tmp_path / "fast" / "README.md").read_text()
    assert "| measured speedup over base, batch 32, channels_last on cpu (test CPU, 2 threads) | 1.41x (120.0 img/s) |" in card
    assert cli_main(["info", str(tmp_path / "plain")]) == 0
    assert "measured speedup" not in capsys.readouterr().out  # nothing measured, nothing claimed
    assert "measured speedup" not in (tmp_path / "plain" / "README.md").read_text()
