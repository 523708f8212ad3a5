"""Channel-aware Chase: cubic schedule, floors, global UMM selection, permanence, budget, exact export."""
import pytest
import torch

from chase_timm import Chase, ChaseConfig
from chase_timm.channels import umm_scores
from chase_timm.metrics import count_flops
from helpers import input_size, tiny_model, train

STEPS = 12


def channel_config(**kwargs) -> ChaseConfig:
    """Channel events every 2 steps until step 8, DST updates every 3 steps, phase B from step 9."""
    return ChaseConfig(**{"total_steps": STEPS, "update_interval": 3, "phase_b_start_step": 9,
                          "channel_sparsity": 0.5, "min_channel_ratio": 0.5, "channel_interval": 2,
                          "channel_end_step": 8, **kwargs})


def make(name: str, **config):
    model = tiny_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    size = input_size(name)
    chase = Chase(model, channel_config(**config), optimizer=optimizer,
                  example_inputs=torch.randn(1, 3, size, size))
    return model, optimizer, chase


def test_schedule_floors_global_umm_permanence_and_budget():
    model, optimizer, chase = make("resnet18")
    config = chase.config
    assert [g.name for g in chase.prunable][:2] == ["layer1.0.conv1", "layer1.1.conv1"]
    history = []

    def check(step: int) -> None:
        t = step + 1
        alive = {n: a.clone() for n, a in chase.alive.items()}
        if history:
            for n, a in alive.items():
                assert not bool((a & ~history[-1][n]).any()), "a removed channel came back"
        history.append(alive)
        for n, a in alive.items():
            assert int(a.sum()) >= chase.floors[n], f"{n} fell below its floor"
        if config.is_channel_step(t):
            sparsity = chase.stats()["channel_sparsity"]
            assert config.channel_sparsity_at(t) <= sparsity < config.channel_sparsity_at(t) + 1.0 / chase.channels_total
        if config.is_update_step(t):
            want = round(config.grow_density(t) * chase.total_weights) if t < config.phase_b_start_step else chase.budget
            assert chase.stats()["nnz"] == want, f"budget off at step {t}"

    # global UMM order: record scores just before one event and compare with what it removed
    event = next(t for t in range(2, STEPS) if config.is_channel_step(t))
    before = {}

    def capture(step: int) -> None:
        if step + 2 == event:
            before["scores"] = umm_scores(chase.prunable, chase.params)
            before["alive"] = {n: a.clone() for n, a in chase.alive.items()}
        check(step)

    train(model, optimizer, chase, STEPS, after_step=capture)
    assert chase.stats()["channel_sparsity"] == pytest.approx(config.channel_sparsity, abs=1.0 / chase.channels_total)
    assert chase.stats()["nnz"] == chase.budget  # d of the ORIGINAL model, regrown inside surviving channels

    # the event's removals are the lowest-UMM channels among groups that were not held by their floor
    after = history[event - 1]
    removed, kept = [], []
    for n, score in before["scores"].items():
        newly = before["alive"][n] & ~after[n]
        removed += score[newly].tolist()
        if int(after[n].sum()) > chase.floors[n]:
            kept += score[after[n]].tolist()
    assert removed and max(removed) <= min(kept)


def test_removed_channels_are_masked_everywhere_and_export_is_exact():
    model, optimizer, chase = make("resnet18")
    train(model, optimizer, chase, STEPS)
    group = next(g for g in chase.prunable if not bool(chase.alive[g.name].all()))
    gone = (~chase.alive[group.name]).nonzero().flatten().tolist()
    params = dict(model.named_parameters())
    for piece in group.slices:
        if piece.tensor in params:
            positions = [p for j in gone for p in piece.index[j]]
            assert (params[piece.tensor].index_select(piece.dim, torch.tensor(positions)) == 0).all(), piece.tensor

    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = chase.export()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export changed the training model"
    assert type(slim) is type(model)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    model.eval(), slim.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference, output = model(x), slim(x)
    assert (output - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_paper_imagenet_setting_on_resnet50():
    """d=0.1, S_c=0.4, beta=0.2 over a short schedule: the 32 bottleneck-internal producers shrink."""
    model, optimizer, chase = make("resnet50", channel_sparsity=0.4, min_channel_ratio=0.2, total_steps=8,
                                   update_interval=4, channel_interval=1, channel_offset=0, channel_end_step=6,
                                   phase_b_start_step=6)
    names = {g.name for g in chase.prunable}
    assert names == {f"layer{s}.{b}.conv{c}" for s, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3))
                     for b in range(blocks) for c in (1, 2)}
    assert chase.channels_total == 7552
    train(model, optimizer, chase, 8)
    slim = chase.export()
    ratio = count_flops(slim, (3, 224, 224)) / count_flops(model, (3, 224, 224))
    print(f"resnet50 S_c=0.4: GPU-supported FLOPs ratio {ratio:.3f} (paper 0.67-0.68)")
    assert chase.stats()["channel_sparsity"] == pytest.approx(0.4, abs=1e-3)
    assert 0.5 < ratio < 0.85


def test_no_prunable_group_exports_unchanged():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    chase = Chase(model, channel_config(), example_inputs=torch.randn(1, 3, 8, 8))
    report = chase.report()
    assert not chase.prunable and all(row["reason"] for row in report)
    slim = chase.export()
    assert [p.shape for p in slim.parameters()] == [p.shape for p in model.parameters()]
