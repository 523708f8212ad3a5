"""Small shared pieces for the tests: tiny real timm models and a deterministic training loop."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from shrink_equivalence import batch  # noqa: F401  (re-exported for the tests)
from zoo_coverage import build as tiny_model, input_size  # noqa: F401  (re-exported for the tests)


def train(model, optimizer, chase, steps: int, size: int = 32, first_step: int = 0,
          after_step: Optional[Callable[[int], None]] = None) -> None:
    """The documented loop: backward, optimizer.step(), chase.step(), zero_grad()."""
    model.train()
    for step in range(first_step, first_step + steps):
        x, y = batch(step, size)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        chase.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
