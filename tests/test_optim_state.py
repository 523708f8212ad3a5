"""Optimizer state through wrappers and containers: masking zeroes it, shrinking cuts it, and optimizers whose update
depends on the tensor's size are refused before shrinking could make a run differ from its masking twin."""
import copy
import warnings

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from timm.optim import create_optimizer_v2

from chase_timm import Chase, ChaseConfig
from chase_timm.optim_state import param_states, shrink_support, states_like
from helpers import tiny_model, train
from recipe_helpers import fresh_accelerate

pytestmark = pytest.mark.usefixtures("resnet18_one_block_per_stage")  # the same kinds of optimizer state, faster

STEPS = 10
SCHEDULE = dict(total_steps=STEPS, update_interval=3, channel_interval=2, channel_offset=0, channel_end_step=8,
                channel_sparsity=0.5, min_channel_ratio=0.5)


@pytest.fixture
def float64():
    """Shrinking vs masking in float64: these runs agree to ~1e-10 relative (rounding of differently shaped
    reductions, grown over 10 steps), the size-dependent optimizers of the issue differ by 1e-7 to 1e-2."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def _build(opt: str, shrink: str, wrap=lambda optimizer: optimizer):
    model = tiny_model("resnet18")
    optimizer = wrap(create_optimizer_v2(model, opt=opt, lr=1e-3, weight_decay=1e-4))
    for group in optimizer.param_groups:
        if "lookahead_k" in group:
            group["lookahead_k"] = 2  # slow-weight syncs at every other step, so 10 steps see five
    chase = Chase(model, ChaseConfig(**SCHEDULE, shrink=shrink), optimizer=optimizer,
                  example_inputs=torch.randn(1, 3, 32, 32))
    return model, optimizer, chase


def _assert_state_zero_where_masked(chase, optimizer, keys=None):
    checked = 0
    for name, mask in chase.masks.items():
        weight = chase.weights[name]
        for key, value in param_states(optimizer, weight):
            if value.shape == weight.shape and (keys is None or key in keys):
                assert not value[mask == 0].any(), f"{key} of {name} is non-zero behind the mask"
                checked += 1
    assert checked, "no optimizer state was found to check"


def test_lookahead_masking_zeroes_base_state_and_slow_weights():
    with fresh_accelerate():  # Lookahead inside Accelerate's AcceleratedOptimizer, as the recipe builds it
        model, optimizer, chase = _build("lookahead_adamw", "off", wrap=Accelerator(cpu=True).prepare)
        assert isinstance(optimizer, AcceleratedOptimizer)
        train(model, optimizer, chase, 4)
    weight = chase.weights["layer1.0.conv1.weight"]
    keys = {key for key, _ in param_states(optimizer, weight)}
    assert {"exp_avg", "exp_avg_sq", "lookahead_slow_buff"} <= keys
    _assert_state_zero_where_masked(chase, optimizer, {"exp_avg", "exp_avg_sq", "lookahead_slow_buff"})


def test_lookahead_shrinks_like_its_masking_twin_and_resumes_across_a_shrink(float64):
    shrunk = _build("lookahead_adamw", "events")
    twin = _build("lookahead_adamw", "off")
    saved = []

    def save(step: int) -> None:  # after the shrinks at steps 2 and 4, as a training loop checkpoints
        if step == 4:
            saved.extend(copy.deepcopy([shrunk[0].state_dict(), shrunk[1].state_dict(), shrunk[2].state_dict()]))

    first = train(*shrunk, STEPS, after_step=save)
    reference = train(*twin, STEPS)
    model, optimizer, chase = shrunk
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in twin[0].parameters())
    for name, weight in chase.weights.items():  # the base optimizer's state was cut with its parameter
        assert all(v.shape == weight.shape for _, v in param_states(optimizer, weight)), name
    assert max(abs(a - b) / abs(b) for a, b in zip(first, reference)) <= 1e-9

    # resume that checkpoint in fresh objects, finish: the same losses as the run that went on
    model, optimizer, chase = _build("lookahead_adamw", "events")
    chase.load_state_dict(saved[2])
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    assert train(model, optimizer, chase, STEPS - 5, first_step=5) == pytest.approx(first[5:], rel=1e-9, abs=0)


@pytest.mark.parametrize("opt", ["cadamw", "muon"])
def test_size_dependent_optimizers_are_refused_for_shrinking_and_masked_without_it(opt):
    with pytest.raises(ValueError, match="shrink='off'"):
        _build(opt, "events")
    model, optimizer, chase = _build(opt, "off")
    train(model, optimizer, chase, 4)
    _assert_state_zero_where_masked(chase, optimizer)


def test_verdicts_of_wrapped_and_unknown_optimizers():
    model = tiny_model("resnet18")
    assert shrink_support(create_optimizer_v2(model, opt="lookahead_sgd", lr=0.1))[0] == "exact"
    assert shrink_support(create_optimizer_v2(model, opt="lookahead_clion", lr=0.1))[0] == "refused"
    assert shrink_support(create_optimizer_v2(model, opt="adafactor", lr=0.1))[0] == "refused"

    class Custom(torch.optim.SGD):
        pass

    with pytest.warns(UserWarning, match="docs/optimizers.md"):
        Chase(model, ChaseConfig(**SCHEDULE, shrink="events"), optimizer=Custom(model.parameters(), lr=0.1),
              example_inputs=torch.randn(1, 3, 32, 32))


class ListMomentum(torch.optim.Optimizer):
    """Heavy-ball momentum plus a gradient average, kept as a list of tensors (as Kron keeps its preconditioners)."""

    def __init__(self, params, lr: float = 1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "buffers" not in state:
                    state["buffers"] = [torch.zeros_like(p), torch.zeros_like(p)]
                momentum, average = state["buffers"]
                momentum.mul_(0.9).add_(p.grad)
                average.lerp_(p.grad, 0.1)
                p.add_(momentum + average, alpha=-group["lr"])


def test_a_state_list_of_tensors_is_masked_and_sliced(float64):
    runs = {}
    for shrink in ("events", "off"):
        model = tiny_model("resnet18")
        optimizer = ListMomentum(model.parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chase = Chase(model, ChaseConfig(**SCHEDULE, shrink=shrink), optimizer=optimizer,
                          example_inputs=torch.randn(1, 3, 32, 32))
            runs[shrink] = (train(model, optimizer, chase, STEPS), model, optimizer, chase)
        assert not [w for w in caught if "continues with masking only" in str(w.message)]  # every shrink went through
    losses, model, optimizer, chase = runs["events"]
    for name, weight in chase.weights.items():
        assert len(states_like(optimizer, weight)) == 2, name
    _assert_state_zero_where_masked(chase, optimizer, {"buffers.0", "buffers.1"})
    _assert_state_zero_where_masked(runs["off"][3], runs["off"][2], {"buffers.0", "buffers.1"})
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, runs["off"][0])) <= 1e-9
