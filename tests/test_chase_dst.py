"""Unstructured DST on real timm models: ERK init, exact budgets, zero-started growth, masked state."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from chase_timm import Chase, ChaseConfig
from chase_timm.sparsity import allocate, erk_densities
from helpers import batch, input_size, tiny_model, train
from recipe_helpers import fresh_accelerate
import zoo_coverage


@pytest.fixture(autouse=True)
def _smaller_resnets(resnet18_one_block_per_stage, monkeypatch):
    """Conftest's one-block-per-stage resnet18 (the behaviour tests: budgets, updates, EMA copies, warnings; and
    its model-coverage cases: BasicBlocks with an identity and with a downsampling shortcut) and resnet50 with one
    Bottleneck per stage (8M parameters, not 23.5M; each with its downsampling shortcut): the layer kinds of the full
    models, on which ERK, the budgets and the masking work layer by layer."""
    monkeypatch.setitem(zoo_coverage.SMALLER, "resnet50", {"layers": (1, 1, 1, 1)})


MODELS = ["resnet18", "resnet50", "mobilenetv3_small_050", "efficientnet_b0", "convnext_atto",
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


CASES = [(name, "sgd") for name in MODELS] + [(name, "adamw") for name in ("resnet18", "convnext_atto", "vit_tiny_patch16_224")]


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
        assert abs(info["nnz"] - info["erk_density"] * info["numel"]) < 1.0, layer
    layers = stats["layers"]
    numel = {n: i["numel"] for n, i in layers.items()}
    expected = allocate(chase.budget, {n: i["erk_density"] * i["numel"] for n, i in layers.items()}, numel)
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


# ------------------------------------------- weight standardisation, misuse warnings, end-of-run budget, EMA export
def _effective_weights(model: nn.Module, x: torch.Tensor) -> dict:
    """The weight tensor each conv/linear module really multiplies with in forward (after any standardisation)."""
    seen, current = {}, []

    class Capture(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.nn.functional.conv2d, torch.nn.functional.linear) and current:
                seen.setdefault(current[-1], args[1].detach().clone())
            return func(*args, **(kwargs or {}))

    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, a: current.append(f"{names[m]}.weight"))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [m.register_forward_hook(lambda m, a, o: current.pop() and None)
              for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad(), Capture():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("name", ["nf_regnet_b0", "resnetv2_50x1_bit"])
def test_weight_standardised_convs_stay_dense_with_a_reason(name):
    """NFNet / BiT convs standardise w in forward, so a masked zero is not zero: Chase must not call them sparse."""
    model = tiny_model(name)
    chase = Chase(model, dst_config(), example_inputs=torch.randn(1, 3, 32, 32))
    effective = _effective_weights(model, torch.randn(1, 3, 32, 32))
    for layer, info in chase.stats()["layers"].items():
        assert int(effective[layer].count_nonzero()) <= info["nnz"], f"{layer} is reported sparse but is not"
    kept = chase.stats()["kept_dense"]
    assert kept and all("standardisation" in reason for reason in kept.values())


def test_step_after_zero_grad_warns_once():
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    chase = Chase(model, dst_config(update_interval=2))
    with pytest.warns(UserWarning, match="no gradients") as record:
        for step in range(7):  # three update steps, all after zero_grad
            x, y = batch(step, 16)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            chase.step()
    assert sum("no gradients" in str(w.message) for w in record) == 1
    with warnings.catch_warnings(record=True) as record:  # the documented order: no warning
        warnings.simplefilter("always")
        train(model, optimizer, Chase(model, dst_config(update_interval=2), optimizer=optimizer), 4, size=16)
    assert not [w for w in record if "no gradients" in str(w.message)]


@pytest.mark.parametrize("case", ["shorter_than_an_interval", "channel_event_after_last_update", "phase_a_only"])
def test_every_run_ends_exactly_at_the_density_budget(case):
    config = {
        "shorter_than_an_interval": dict(total_steps=5, update_interval=5, channel_sparsity=0.5, channel_interval=1,
                                         channel_offset=0, channel_end_step=4),
        "channel_event_after_last_update": dict(total_steps=12, update_interval=3, phase_b_start_step=6,
                                                channel_sparsity=0.5, channel_interval=11, channel_offset=0,
                                                channel_end_step=11),
        "phase_a_only": dict(total_steps=8, update_interval=3, phase_b=False, phase_b_start_step=7,
                             channel_sparsity=0.0),
    }[case]
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = Chase(model, ChaseConfig(**config), optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    train(model, optimizer, chase, config["total_steps"])
    assert chase.stats()["nnz"] == chase.budget
    if config["channel_sparsity"]:
        assert chase.stats()["channel_sparsity"] > 0.4
        for name, keep in chase.channels.allowed.items():  # every active weight sits inside a surviving channel
            assert not bool((chase.masks[name].bool() & ~keep).any()), name


def test_export_of_a_timm_ema_copy_is_slim_and_equals_the_masked_ema():
    from timm.utils import ModelEmaV3

    model = tiny_model("resnet18")
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = ChaseConfig(total_steps=6, update_interval=3, channel_sparsity=0.5, channel_interval=1,
                         channel_offset=0, channel_end_step=4)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    train(model, optimizer, chase, 6, after_step=lambda step: ema.update(model))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    slim_ema = chase.export(model=ema)
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items()), "export changed the EMA"
    assert type(slim_ema) is type(model)
    assert [p.shape for p in slim_ema.parameters()] == [p.shape for p in chase.export().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(slim_ema.state_dict().values(),
                                                     chase.export().state_dict().values())), "exported the model"
    chase.mask_model(ema)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference, output = ema.module.eval()(x), slim_ema.eval()(x)
    assert (output - reference).abs().max() <= 1e-5 * reference.abs().max()


def _run_to_update(chase: Chase, model, optimizer, t_update: int, size: int = 16) -> tuple:
    """Train until just before the update at ``t_update``; return masks and weights of that moment and after it."""
    train(model, optimizer, chase, t_update - 1, size=size)
    x, y = batch(t_update, size)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    masks = {n: m.clone() for n, m in chase.masks.items()}
    weights = {n: w.detach().clone() for n, w in chase.weights.items()}
    chase.step()
    optimizer.zero_grad()
    return masks, weights


def test_phase_b_rotates_exactly_the_scheduled_fraction():
    """A phase-B update prunes ceil(pi_t * nnz) weights and regrows as many (re-grown ones restart at zero)."""
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = Chase(model, dst_config(phase_b_start_step=3, update_interval=3, total_steps=12))
    masks, weights = _run_to_update(chase, model, optimizer, 6)
    pruned = grown = 0
    for n, before in masks.items():
        after, now = chase.masks[n].bool(), chase.weights[n].detach()
        was = before.bool()
        restarted = was & after & (weights[n] != 0) & (now == 0)  # pruned, then regrown at zero in the same update
        pruned += int((was & ~after).sum() + restarted.sum())
        grown += int((~was & after).sum() + restarted.sum())
    expected = math.ceil(chase.config.phase_b_rate(6) * chase.budget)
    assert expected > 1000 and pruned == grown == expected
    assert chase.stats()["nnz"] == chase.budget


def test_layerwise_scope_keeps_each_layers_erk_count():
    """Layerwise phase B: every layer ends each update at its own ERK share, computed here from the shapes."""
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = Chase(model, dst_config(scope="layerwise", phase_b_start_step=3, update_interval=3, total_steps=12))
    shapes = {n: tuple(w.shape) for n, w in chase.weights.items()}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    erk = erk_densities(shapes, 0.1)
    want = allocate(round(0.1 * sum(numel.values())), {n: erk[n] * numel[n] for n in shapes}, numel)
    start = {n: m.clone() for n, m in chase.masks.items()}
    _run_to_update(chase, model, optimizer, 6)
    assert {n: int(m.count_nonzero()) for n, m in chase.masks.items()} == want
    assert any(not torch.equal(start[n], chase.masks[n]) for n in start)  # connections did move


def test_non_finite_gradients_skip_the_update_and_fp16_skipped_steps_are_not_counted():
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    chase = Chase(model, dst_config(update_interval=2))
    train(model, optimizer, chase, 1, size=16)
    x, y = batch(1, 16)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model.fc.weight.grad[0, 0] = float("inf")  # an overflowed gradient at update step 2
    masks = {n: m.clone() for n, m in chase.masks.items()}
    chase.step()
    assert chase.step_count == 2 and chase.stats()["skipped_updates"] == 1
    assert all(torch.equal(masks[n], chase.masks[n]) for n in masks), "an update ranked non-finite gradients"

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    model.zero_grad()
    with fresh_accelerate():
        Accelerator(cpu=True)
        scaler = torch.amp.GradScaler("cpu")  # what fp16 training uses: a step with inf/nan grads is skipped
        optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), device_placement=False,
                                         scaler=scaler)
        chase = Chase(model, dst_config(update_interval=2), optimizer=optimizer)
        for overflow in (False, True, False):
            x, y = batch(3, 16)
            loss = torch.nn.functional.cross_entropy(model(x), y) * (float("inf") if overflow else 1.0)
            scaler.scale(loss).backward()
            optimizer.step()  # AcceleratedOptimizer unscales, skips on overflow and updates the scaler
            chase.step()
            optimizer.zero_grad()
    assert chase.step_count == 2 and chase.stats()["skipped_updates"] == 0
