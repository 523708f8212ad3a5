"""Exact resume: state_dict -> a new process -> load_state_dict continues bit for bit."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chase_timm import Chase, ChaseConfig
from helpers import tiny_model

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(*args: str) -> None:
    paths = [str(WORKER.parent), str(WORKER.parents[1] / "recipes"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    subprocess.run([sys.executable, str(WORKER), *args], check=True, env=env, timeout=600)


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    run_worker("full", str(tmp_path / "full.pt"))
    run_worker("first", str(tmp_path / "half.pt"))
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
