"""Small shared pieces for the tests: tiny real timm models and a deterministic training loop."""
from __future__ import annotations

from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F

# Models whose default input size is fixed at construction get a small one.
SMALL_INPUT_KWARGS = {"vit": {"img_size": 32}, "mixer": {"img_size": 32}, "inception": {}}


def tiny_model(name: str, num_classes: int = 10, **kwargs) -> torch.nn.Module:
    """A real timm model, randomly initialised, sized for 32 px inputs where the architecture allows."""
    for prefix, extra in SMALL_INPUT_KWARGS.items():
        if name.startswith(prefix):
            kwargs = {**extra, **kwargs}
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def input_size(name: str) -> int:
    return 75 if name.startswith("inception") else 32


def batch(step: int, size: int = 32, n: int = 2, num_classes: int = 10):
    """The batch of a given step: identical in every process and every run."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


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
