"""Unstructured DST on real timm models: ERK init, exact budgets, zero-started growth, masked state."""
import pytest
import torch
import torch.nn as nn

from chase_timm import Chase, ChaseConfig
from chase_timm.sparsity import allocate
from helpers import input_size, tiny_model, train

ZOO = ["resnet18", "resnet50", "mobilenetv3_small_050", "efficientnet_b0", "convnext_atto",
       "vit_tiny_patch16_224", "regnetx_002", "densenet121"]
STEPS = 10


def dst_config(**kwargs) -> ChaseConfig:
    """Updates every 3 steps; phase B from step 8; no channel pruning (that is tested elsewhere)."""
    return ChaseConfig(**{"total_steps": STEPS, "update_interval": 3, "phase_b_start_step": 8,
                          "channel_sparsity": 0.0, **kwargs})


def expected_nnz(chase: Chase, step: int) -> int:
    config = chase.config
    if step < config.phase_b_start_step:
        return round(config.grow_density(step) * chase.total_weights)
    return chase.budget


CASES = [(name, "sgd") for name in ZOO] + [(name, "adamw") for name in ("resnet18", "convnext_atto", "vit_tiny_patch16_224")]


@pytest.mark.parametrize("name, opt_name", CASES)
def test_dst_budget_growth_and_masking(name, opt_name):
    model = tiny_model(name)
    if opt_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    chase = Chase(model, dst_config(), optimizer=optimizer)

    # ERK: the global density is d to the weight; every layer gets its ERK share (rounded to a whole weight).
    stats = chase.stats()
    assert stats["nnz"] == round(0.1 * chase.total_weights)
    for layer, info in stats["layers"].items():
        assert abs(info["nnz"] - chase.erk[layer] * info["numel"]) < 1.0, layer
    expected = allocate(chase.budget, {n: chase.erk[n] * chase.numel[n] for n in chase.numel}, chase.numel)
    assert {n: i["nnz"] for n, i in stats["layers"].items()} == expected

    before = {}

    def check(step: int) -> None:
        t = step + 1
        if not (chase.config.is_update_step(t) or t == STEPS):
            return
        for n, w in chase.weights.items():
            inactive = chase.masks[n] == 0
            assert (w.detach()[inactive] == 0).all(), f"masked weight of {n} moved at step {t}"
            for value in optimizer.state[w].values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    assert (value[inactive] == 0).all(), f"optimizer state of {n} not masked at step {t}"
        if chase.config.is_update_step(t):
            assert chase.stats()["nnz"] == expected_nnz(chase, t), f"budget off after update at step {t}"
            for n, w in chase.weights.items():
                grown = (chase.masks[n] != 0) & (before[n] == 0)
                assert (w.detach()[grown] == 0).all(), f"grown weights of {n} do not start at zero"
                for value in optimizer.state[w].values():
                    if torch.is_tensor(value) and value.shape == w.shape:
                        assert (value[grown] == 0).all(), f"grown weights of {n} have stale optimizer state"
        before.update({n: m.clone() for n, m in chase.masks.items()})

    before.update({n: m.clone() for n, m in chase.masks.items()})
    train(model, optimizer, chase, STEPS, size=input_size(name), after_step=check)
    assert chase.stats()["phase"] == "B"


def test_layerwise_scope_keeps_exact_budgets():
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = Chase(model, dst_config(scope="layerwise"), optimizer=optimizer)
    seen = []

    def check(step: int) -> None:
        if chase.config.is_update_step(step + 1):
            seen.append((chase.stats()["nnz"], expected_nnz(chase, step + 1)))

    train(model, optimizer, chase, STEPS, after_step=check)
    assert seen and all(got == want for got, want in seen)


def test_updates_actually_move_connections():
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = Chase(model, dst_config(), optimizer=optimizer)
    start = {n: m.clone() for n, m in chase.masks.items()}
    train(model, optimizer, chase, STEPS)
    changed = sum(int((chase.masks[n] != start[n]).sum()) for n in start)
    assert changed > 0.01 * chase.budget


def test_bad_inputs_fail_before_any_step():
    model = tiny_model("resnet18")
    with pytest.raises(ValueError, match="no Conv/Linear weight"):
        Chase(nn.Sequential(nn.LayerNorm(8), nn.GELU()), dst_config())
    with pytest.raises(ValueError, match="no Conv/Linear weight"):
        Chase(model, dst_config(exclude=("*",)))
    with pytest.raises(ValueError, match="match no Conv/Linear module"):
        Chase(model, dst_config(exclude=("layer9.*",)))
    other = tiny_model("resnet18")
    with pytest.raises(ValueError, match="optimizer does not own"):
        Chase(model, dst_config(), optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="ChaseConfig"):
        Chase(model, {"density": 0.1})


def test_exclude_keeps_layers_dense():
    model = tiny_model("resnet18")
    chase = Chase(model, dst_config(exclude=("conv1", "fc")))
    assert "conv1.weight" not in chase.weights and "fc.weight" not in chase.weights
    assert bool((model.conv1.weight != 0).all())


def test_mask_model_masks_a_timm_ema_copy():
    from timm.utils import ModelEmaV3

    model = tiny_model("resnet18")
    ema = ModelEmaV3(model, decay=0.9)  # a dense copy, as when EMA is created before Chase
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = Chase(model, dst_config(), optimizer=optimizer)
    train(model, optimizer, chase, 4, after_step=lambda step: ema.update(model))
    ema_params = dict(ema.module.named_parameters())
    assert any(bool((ema_params[n][chase.masks[n] == 0] != 0).any()) for n in chase.masks)  # EMA lags the masks
    chase.mask_model(ema)
    assert all(bool((ema_params[n][chase.masks[n] == 0] == 0).all()) for n in chase.masks)
