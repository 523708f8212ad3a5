"""Small shared pieces for the tests: tiny real timm models and a deterministic training loop."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch
import torch.nn.functional as F

from shrink_equivalence import batch  # noqa: F401  (re-exported for the tests)
from zoo_coverage import COVERAGE_LIST, build as tiny_model, check_model, input_size  # noqa: F401  (re-exported)


def coverage_params(names=COVERAGE_LIST) -> list:
    """Model names as pytest params in one xdist group per model: a model's tests share a worker, so its
    :func:`coverage_row` (and with it the channel-group discovery) runs once per test session."""
    return [pytest.param(name, id=name, marks=pytest.mark.xdist_group(f"coverage-{name}")) for name in names]


@functools.lru_cache(maxsize=None)
def coverage_row(name: str, prune_skip: bool) -> dict:
    """``check_model``'s row for a model of the coverage list (Chase run, export, comparison), once per process."""
    return check_model(name, prune_skip)


def session_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this test session that every xdist worker shares (build shared things in it under a FileLock)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    return root


def train(model, optimizer, chase, steps: int, size: int = 32, first_step: int = 0,
          after_step: Optional[Callable[[int], None]] = None) -> List[float]:
    """The documented loop: backward, optimizer.step(), chase.step(), zero_grad(). Returns the step losses."""
    model.train()
    losses = []
    for step in range(first_step, first_step + steps):
        x, y = batch(step, size)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        chase.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
    return losses


def zero_removed(model: torch.nn.Module, removals: dict) -> None:
    """What the controller does to removed channels: zero every parameter slice (buffers untouched)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, dims in removals.items():
            for dim, positions in dims.items():
                if name in params:
                    params[name].index_fill_(dim, torch.tensor(positions), 0)
