"""The sparse-channel phenomenon: per-channel densities relative to their layer, fractions, plot, script."""
import json

import matplotlib
import pytest
import timm
import torch
import torch.nn as nn

import chase_timm
from chase_timm.analysis import channel_profile, plot_channel_profile, sparse_channel_fractions
import channel_phenomenon
from helpers import train


def test_hand_built_layer_densities_and_fractions():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1., 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]]).view(4, 4, 1, 1))
        model[1].weight.fill_(1.0)  # dense: nothing to compare against, left out
    (layer,) = channel_profile(model)
    assert layer.name == "0.weight" and layer.density == 0.5
    assert layer.relative_density.tolist() == [0.5, 1.0, 1.5, 1.0]
    assert layer.umm.tolist() == [0.25, 0.5, 0.75, 0.5]
    fractions = sparse_channel_fractions([layer])
    assert fractions["overall"] == {"0.5": 0.0, "0.7": 0.25, "0.8": 0.25}  # strictly below k x layer density
    assert fractions["0.weight"] == fractions["overall"]


def test_profile_of_a_chase_skips_removed_channels_and_the_classifier(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = chase_timm.ChaseConfig(total_steps=6, update_interval=3, channel_sparsity=0.5, channel_interval=1,
                                    channel_offset=0, channel_end_step=3)
    chase = chase_timm.Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    train(model, optimizer, chase, 4)
    profile = {layer.name: layer for layer in channel_profile(chase)}
    assert "fc.weight" not in profile
    group = next(g for g in chase.channels.prunable if not chase.channels.alive[g.name].all())  # a group that lost channels
    producer = group.producers()[0].tensor
    assert profile[producer].relative_density.numel() == int(chase.channels.alive[group.name].sum()) < group.width
    for layer in profile.values():  # relative to the layer's own density: the mean is 1 by definition
        assert layer.relative_density.mean().item() == pytest.approx(1.0, abs=1e-5)
    layers = list(profile.values())
    history = [{"updates": 1, "overall": sparse_channel_fractions(layers)["overall"]}]
    matplotlib.use("pdf")  # a user's backend (a notebook's inline one, say): drawing our figure must keep it
    path = plot_channel_profile(layers, tmp_path / "p.png", "t", history=history)
    assert path.stat().st_size > 10_000 and matplotlib.get_backend() == "pdf"
    dense = timm.create_model("resnet18", num_classes=10)
    with torch.no_grad():  # a random init may hold an exact zero, which would count as (barely) sparse
        for p in dense.parameters():
            p.abs_().add_(1e-3)
    with pytest.raises(ValueError, match="no sparse"):
        channel_profile(dense)


def test_channel_phenomenon_script(tmp_path):
    out = tmp_path / "phen"
    channel_phenomenon.main(["--model", "resnet18", "--img-size", "16", "--batch-size", "8", "--steps", "4",
                             "--update-interval", "2", "--lr", "0.02", "--output", str(out)])
    result = json.loads((out / "phenomenon.json").read_text())
    assert result["updates"] == 1 and [h["updates"] for h in result["history"]] == [0, 1]
    assert set(result["fractions"]["overall"]) == {"0.5", "0.7", "0.8"}
    assert (out / "phenomenon.png").stat().st_size > 10_000
