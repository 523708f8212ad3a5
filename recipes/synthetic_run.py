"""Benchmark scaffolding: a Chase run whose whole schedule is compressed into a few random-batch steps.

The benchmarks need models with the widths a Chase config produces, not trained ones (speed, size and load time
depend only on the widths), so ``synthetic_run`` starts a randomly initialised timm model and runs every channel
event and mask update of ``config`` on batches of two random images at a small size (channel groups do not
depend on resolution). ``synthetic_config`` is such a schedule: a channel event every step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from chase_timm import Chase, ChaseConfig
from chase_timm.metrics import resolve_input_size

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}  # the benchmarks' --layouts


def synthetic_config(steps: int = 4, **overrides: Any) -> ChaseConfig:
    """A ``steps``-step ChaseConfig: a channel event every step until S_c is reached two steps before the end
    (Phase B from there), a mask update every ``steps // 2`` steps; ``overrides`` (ChaseConfig fields) on top.
    Raises ChaseConfig's ``TypeError`` / ``ValueError`` for an unknown field or a bad value."""
    end = max(1, steps - 2)
    schedule = dict(total_steps=steps, update_interval=max(1, steps // 2), channel_interval=1, channel_offset=0,
                    channel_end_step=end, phase_b_start_step=end)
    return ChaseConfig(**{**schedule, **overrides})


def synthetic_run(model_name: str, config: ChaseConfig, num_classes: int = 1000, size: Optional[int] = 32,
                  seed: int = 0, make_optimizer: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None,
                  **model_kwargs: Any) -> Tuple[nn.Module, torch.optim.Optimizer, Chase]:
    """The model, its SGD optimizer and Chase after all ``config.total_steps`` steps on random ``size``-px batches
    (masked, not shrunk unless ``config.shrink`` says so); the same widths for the same arguments. ``size=None``:
    32 px, or the model's own input size where timm marks it fixed (``pretrained_cfg["fixed_input_size"]``: ViTs,
    MLP-Mixers, LeViT, PiT, MaxViT, ...) or its patch embedding enforces it. The optimizer is
    ``make_optimizer(model)`` (default: SGD, lr 0.01, momentum 0.9); ``model_kwargs`` go to ``timm.create_model``
    (e.g. ``img_size=64`` with ``size=64``)."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=num_classes, **model_kwargs)
    if size is None:
        fixed = model.pretrained_cfg.get("fixed_input_size") or any(getattr(m, "strict_img_size", False)
                                                                     for m in model.modules())
        size = resolve_input_size(model)[-1] if fixed else 32
    optimizer = (make_optimizer or plain_sgd)(model)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, size, size))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.total_steps):
        x = torch.randn(2, 3, size, size, generator=generator)
        training_step(model, optimizer, chase, x, torch.randint(0, num_classes, (2,), generator=generator))
    return model, optimizer, chase


def plain_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The benchmarks' default optimizer: SGD, lr 0.01, momentum 0.9."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, chase: Optional[Chase], x: torch.Tensor,
                  y: torch.Tensor) -> None:
    """One full training step: forward, cross-entropy backward, ``optimizer.step()``, ``chase.step()`` (none
    without Chase: a plain step)."""
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    if chase is not None:
        chase.step()
    optimizer.zero_grad()
