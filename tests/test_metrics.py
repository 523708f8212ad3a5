"""FLOPs, training FLOPs and timing: torch.utils.flop_counter numbers checked against independent counts."""
import time

import pytest
import timm
import torch
import torch.nn as nn

import chase_timm
from chase_timm.metrics import (TrainingFlops, count_flops, flop_counts, interleaved_timings, resolve_input_size,
                                sparse_flops, throughput)
from chase_timm.training import size_summary
from helpers import train


def tiny_chase(**overrides):
    torch.manual_seed(0)  # a random init can draw exact zeros (about 1 in 2^24 weights); this one draws none
    model = timm.create_model("resnet18", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = chase_timm.ChaseConfig(**{"total_steps": 100, "update_interval": 50, "channel_sparsity": 0.0,
                                       **overrides})
    return model, optimizer, chase_timm.Chase(model, config, optimizer=optimizer,
                                              example_inputs=torch.randn(1, 3, 32, 32))


def test_dense_resnet50_flops_match_the_paper():
    model = timm.create_model("resnet50")
    flops = count_flops(model)  # default: the model's pretrained_cfg size, 224 px
    assert abs(flops / 2 - 4.1e9) < 0.03e9  # 4.1 GMACs
    assert abs(flops - 8.2e9) < 0.05e9  # the paper's dense ResNet-50: 8.2e9 FLOPs


def test_hand_computed_conv_and_linear():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    conv = 2 * 8 * (3 * 3 * 3) * (5 * 5)  # 2 x C_out x (C_in k k) x output pixels
    linear = 2 * (8 * 5 * 5) * 10
    assert count_flops(model, (3, 5, 5)) == conv + linear


def test_sparse_flops_of_a_half_masked_layer_are_half():
    model = timm.create_model("resnet18", num_classes=10)
    size = (3, 32, 32)
    dense = count_flops(model, size)
    assert sparse_flops(model, {}, size) == dense
    conv = 2 * 64 * 64 * 9 * 8 * 8  # layer1.0.conv1 at 8x8 output
    assert dense - sparse_flops(model, {"layer1.0.conv1.weight": 0.5}, size) == conv // 2
    with torch.no_grad():  # the same, measured from the weights' zeros (the init may draw exact zeros elsewhere)
        model.layer1[0].conv1.weight.fill_(1.0)
        before = sparse_flops(model, None, size)
        model.layer1[0].conv1.weight.view(64, -1)[:, ::2] = 0  # 288 of 576 weights per filter
    assert before - sparse_flops(model, None, size) == conv // 2
    with pytest.raises(ValueError, match="not Conv/Linear weights"):
        sparse_flops(model, {"layer1.0.bn1.weight": 0.5}, size)


def test_sparse_flops_accept_a_chase_its_stats_or_the_model():
    model, optimizer, chase = tiny_chase(total_steps=10, update_interval=2)
    from_masks = sparse_flops(chase, input_size=32)
    assert from_masks == sparse_flops(model, chase.stats()["layers"], 32) == sparse_flops(model, None, 32)
    assert from_masks < 0.6 * count_flops(model, 32)
    train(model, optimizer, chase, 2)  # an update at step 2 regrows weights at exactly 0
    assert sparse_flops(chase, input_size=32) > sparse_flops(model, None, 32)  # masks count them, zeros don't


def test_size_summary_counts_dense_and_sparse_flops_in_one_forward():
    model, optimizer, chase = tiny_chase(total_steps=10, update_interval=2)
    train(model, optimizer, chase, 2)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    summary = size_summary(model, (3, 32, 32), chase)
    assert len(forwards) == 1
    assert summary == {"params": sum(p.numel() for p in model.parameters()),
                       "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),
                       "dense_flops": count_flops(model, 32), "sparse_flops": sparse_flops(chase, input_size=32)}
    assert flop_counts(model, None, 32) == {"dense_flops": summary["dense_flops"],
                                            "sparse_flops": sparse_flops(model, None, 32)}


def test_input_size_follows_pretrained_cfg_or_a_data_config():
    model = timm.create_model("resnet18", num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
    assert resolve_input_size(model) == (3, 32, 32)
    assert count_flops(model) == count_flops(model, (3, 32, 32)) < count_flops(model, 64)
    config = timm.data.resolve_model_data_config(model)
    assert count_flops(model, {**config, "input_size": (3, 48, 48)}) == count_flops(model, (3, 48, 48))
    with pytest.raises(ValueError, match="input_size"):
        count_flops(model, (32, 32))


def test_training_flops_with_a_constant_mask_are_steps_x_3_x_forward():
    model, optimizer, chase = tiny_chase()  # no update within the 5 steps, no channel removal
    flops = TrainingFlops(chase, input_size=32)
    train(model, optimizer, chase, 5, after_step=lambda _: flops.step(2))  # helpers.batch has 2 images
    forward = sparse_flops(chase, input_size=32)
    assert flops.total == pytest.approx(5 * 2 * 3 * forward, rel=1e-9)
    assert flops.dense_total == 5 * 2 * 3 * count_flops(model, 32)
    assert flops.summary()["samples"] == 10


def test_training_flops_follow_masks_widths_and_dense_gradients():
    """Recounted at every update and channel event; update steps add the dense weight gradient at the current
    widths. Expected values come from independent counts: FlopCounterMode on the masks and on the export."""
    model, optimizer, chase = tiny_chase(total_steps=8, update_interval=2, channel_sparsity=0.5, channel_interval=1,
                                         channel_offset=0, channel_end_step=4)
    flops = TrainingFlops(chase, input_size=32)
    expected = 0.0

    def is_update(step: int) -> bool:  # Chase.step() also settles the budget at the last step
        return chase.config.is_update_step(step) or step == chase.config.total_steps

    for step in range(8):  # the counts before a step are what its forward and backward cost
        forward = sparse_flops(chase, input_size=32)
        expected += 3 * forward * 2
        if is_update(step + 1):
            expected += (count_flops(chase.export(), 32) - forward) * 2  # dense weight gradient at current widths
        train(model, optimizer, chase, 1, first_step=step, after_step=lambda _: flops.step(2))
    assert chase.stats()["channel_sparsity"] > 0.4
    assert flops.total == pytest.approx(expected, rel=1e-9)
    assert flops.sparse_forward == pytest.approx(sparse_flops(chase, input_size=32), rel=1e-9)
    assert flops.slim_forward == pytest.approx(count_flops(chase.export(), 32), rel=1e-9)


def test_interleaved_timings_rank_models_by_their_cost():
    class Sleeper(nn.Module):
        def __init__(self, seconds: float):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time.sleep(self.seconds)
            return x

    timings = interleaved_timings({"fast": Sleeper(0.01), "slow": Sleeper(0.03)}, torch.zeros(1), repeats=3,
                                  warmup=1, block_seconds=0.1)
    assert [len(m.raw_times) for m in timings.values()] == [3, 3]
    assert [m.number_per_run for m in timings.values()][0] > 1  # blocks of several calls: timer overhead amortised
    assert 1.8 < timings["slow"].median / timings["fast"].median < 3.5


def test_throughput_runs_and_restores_train_mode():
    model = timm.create_model("resnet18", num_classes=10).train()
    assert throughput(model, batch_size=2, input_size=(3, 32, 32), warmup=1, iters=2) > 0
    assert model.training


def test_sparse_flops_skip_removed_channels_of_kept_dense_layers():
    """Excluded (dense) convs lose the rows and columns of removed channels too, in masking mode: sparse_flops
    counts what TrainingFlops counts."""
    model, optimizer, chase = tiny_chase(total_steps=8, update_interval=2, channel_sparsity=0.5, channel_interval=1,
                                         channel_offset=0, channel_end_step=4,
                                         exclude=("layer3.0.conv1", "layer3.1.conv1", "layer4.0.conv1"))
    flops = TrainingFlops(chase, input_size=32)
    train(model, optimizer, chase, 4, after_step=lambda _: flops.step(2))
    dense_rows = chase.channels.channel_masks["layer4.0.conv1.weight"]
    assert 0 < dense_rows.count_nonzero() < dense_rows.numel()  # an excluded conv lost channels
    assert sparse_flops(chase, input_size=32) == pytest.approx(flops.sparse_forward, rel=1e-9)


@pytest.mark.parametrize("name, size", [("pit_ti_224", 224), ("resnet18", 32)])
def test_flops_are_the_same_under_no_grad_and_inference_mode(name, size):
    """torch's FlopCounterMode fails under no_grad on PiT (module tracker); counting must not depend on the mode."""
    model = timm.create_model(name)
    flops = count_flops(model, size)
    assert flops > 0
    with torch.no_grad():
        assert count_flops(model, size) == flops
    with torch.inference_mode():
        assert count_flops(model, size) == flops
