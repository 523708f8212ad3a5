"""Small shared pieces for the tests: tiny real timm models and a deterministic training loop."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from zoo_coverage import build as tiny_model, input_size  # noqa: F401  (re-exported for the tests)


def batch(step: int, size: int = 32, n: int = 2, num_classes: int = 10):
    """The batch of a given step: identical in every process and every run."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


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
