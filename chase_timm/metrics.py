"""Measurement: dense, sparse and "GPU-supported" FLOPs (``torch.utils.flop_counter``) and throughput.

Definitions follow the paper's table: *test FLOPs* count only non-zero weights of Conv/Linear layers
(sparse kernels assumed); *GPU-supported FLOPs* are the dense FLOPs of the channel-slimmed network, which
ordinary dense kernels realise. Ratios are taken against the dense original.
"""
from __future__ import annotations

import time
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ._timm import default_example_input

__all__ = ["count_flops", "sparse_flops", "throughput"]


def _example(model: nn.Module, input_size: Optional[Sequence[int]], batch_size: int) -> torch.Tensor:
    """A random batch of ``input_size`` (C, H, W), or of the size the model expects (see ``default_example_input``)."""
    example = default_example_input(model, batch_size)
    return example if input_size is None else example.new_empty(batch_size, *input_size).normal_()


@torch.no_grad()
def _count(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, Dict[str, int]]:
    """Total FLOPs of one image and FLOPs per module name, from one eval-mode forward pass."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(_example(model, input_size, 1))
    finally:
        model.train(was_training)
    prefix = type(model).__name__ + "."  # FlopCounterMode keys modules as "<RootClass>.<qualified name>"
    per_module = {key[len(prefix):]: int(sum(ops.values())) for key, ops in counter.get_flop_counts().items()
                  if key.startswith(prefix)}
    return int(counter.get_total_flops()), per_module


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Dense FLOPs of one forward pass of one image (2 x MACs, as in the paper's table).

    ``input_size`` is (C, H, W); the default is the size the model expects (timm ``pretrained_cfg``).
    """
    return _count(model, input_size)[0]


def sparse_flops(model: nn.Module, densities: Mapping[str, float], input_size: Optional[Sequence[int]] = None) -> int:
    """FLOPs when every Conv/Linear weight named in ``densities`` (``"<module>.weight"``) skips its zeros."""
    total, per_module = _count(model, input_size)
    saved = sum(per_module.get(name.rpartition(".")[0], 0) * (1.0 - density) for name, density in densities.items())
    return int(round(total - saved))


@torch.no_grad()
def throughput(model: nn.Module, batch_size: int = 64, input_size: Optional[Sequence[int]] = None,
               warmup: int = 3, iters: int = 10) -> float:
    """Images per second of eval-mode forward passes on the model's device (synchronised on CUDA)."""
    x = _example(model, input_size, batch_size)
    device = x.device
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batch_size * iters / (time.perf_counter() - start)
    finally:
        model.train(was_training)
