"""Exact resume: state_dict -> a new process -> load_state_dict continues bit for bit."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chase_timm import Chase, ChaseConfig
from helpers import tiny_model, train

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(*args: str) -> None:
    paths = [str(WORKER.parent), str(WORKER.parents[1] / "recipes"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    subprocess.run([sys.executable, str(WORKER), *args], check=True, env=env, timeout=600)


@pytest.mark.slow
def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    run_worker("full", str(tmp_path / "half.pt"), str(tmp_path / "full.pt"))  # checkpoints half-way, runs on
    run_worker("second", str(tmp_path / "half.pt"), str(tmp_path / "resumed.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["step"] == full["step"] == 16
    assert any(not bool(a.all()) for a in full["alive"].values()), "the run should have removed channels"
    for name in full["masks"]:
        assert torch.equal(full["masks"][name], resumed["masks"][name]), name
    for name in full["alive"]:
        assert torch.equal(full["alive"][name], resumed["alive"][name]), name
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_loading_a_mismatched_state_fails_clearly():
    model = tiny_model("resnet18")
    chase = Chase(model, ChaseConfig(total_steps=10, channel_sparsity=0.0))
    state = chase.state_dict()
    with pytest.raises(ValueError, match="different config"):
        Chase(tiny_model("resnet18"), ChaseConfig(total_steps=20, channel_sparsity=0.0)).load_state_dict(state)
    with pytest.raises(ValueError, match="sparse weights"):
        Chase(tiny_model("resnet34"), ChaseConfig(total_steps=10, channel_sparsity=0.0)).load_state_dict(state)


def _frozen_backbone_run(steps: int, state: dict = None) -> tuple:
    """Only the classifier trains, so regrowth in the backbone ranks exact-zero gradients: ties everywhere,
    broken by Chase's generator. Resuming therefore needs the generator state, not just masks and counters."""
    model = tiny_model("resnet18", layers=(1, 1, 1, 1))  # one block per stage: the same kinds of tie, faster
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = ChaseConfig(total_steps=8, update_interval=2, phase_b_start_step=6, channel_sparsity=0.3,
                         channel_interval=2, channel_end_step=6)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    first = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        chase.load_state_dict(state["chase"])
        first = chase.step_count
    train(model, optimizer, chase, steps, size=16, first_step=first)
    return model, optimizer, chase


def test_resume_restores_the_tie_breaking_generator():
    _, _, full = _frozen_backbone_run(8)
    model, optimizer, half = _frozen_backbone_run(4)
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "chase": half.state_dict()})
    _, _, resumed = _frozen_backbone_run(4, state)
    assert resumed.step_count == full.step_count == 8
    assert all(torch.equal(full.masks[n], resumed.masks[n]) for n in full.masks), "resume lost the generator state"
    assert all(torch.equal(full.channels.alive[n], resumed.channels.alive[n]) for n in full.channels.alive)
