"""Two real processes (gloo DDP on CPU): every mask decision is identical on every rank."""
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator, debug_launcher
from accelerate.utils import gather

from chase_timm import Chase, ChaseConfig
from helpers import batch, tiny_model

CONFIG = dict(total_steps=12, update_interval=3, phase_b_start_step=9, channel_sparsity=0.3,
              channel_interval=2, channel_end_step=10)


def _train_on_two_ranks(seed_offset: int = 0) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(rank)  # different local init: prepare() must broadcast rank 0's weights
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    config = ChaseConfig(**CONFIG, seed=rank * seed_offset)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    for step in range(config.total_steps):
        x, y = batch(2 * step + rank)  # each rank sees its own data
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        chase.step()
        optimizer.zero_grad()

    masks = torch.cat([m.flatten() for m in chase.masks.values()])
    alive = torch.cat([a.float() for a in chase.alive.values()])
    weights = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
    for name, local in (("masks", masks), ("alive channels", alive), ("weights", weights)):
        both = gather(local[None])
        assert torch.equal(both[0], both[1]), f"{name} differ across ranks"
    assert chase.stats()["channel_sparsity"] > 0.1 and chase.stats()["nnz"] == chase.budget


def _diverging_seeds() -> None:
    _train_on_two_ranks(seed_offset=1)


def test_masks_identical_across_two_ddp_processes():
    debug_launcher(_train_on_two_ranks, num_processes=2)


def test_divergent_ranks_are_detected():
    with pytest.raises(Exception, match="differ across ranks"):
        debug_launcher(_diverging_seeds, num_processes=2)


def test_gradient_accumulation_counts_optimizer_steps_only():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    chase = Chase(model, ChaseConfig(total_steps=10, update_interval=2, channel_sparsity=0.0), optimizer=optimizer)
    for step in range(8):
        with accelerator.accumulate(model):
            x, y = batch(step)
            accelerator.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            chase.step()
            optimizer.zero_grad()
    assert chase.step_count == 4
