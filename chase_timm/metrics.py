"""Measurement: dense, sparse and "GPU-supported" FLOPs (``torch.utils.flop_counter``) and throughput.

Definitions follow the paper's table: *test FLOPs* count only non-zero weights of Conv/Linear layers
(sparse kernels assumed); *GPU-supported FLOPs* are the dense FLOPs of the channel-slimmed network, which
ordinary dense kernels realise. Ratios are taken against the dense original.
"""
from __future__ import annotations

import time
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "sparse_flops", "throughput"]


def _input(model: nn.Module, input_size: Optional[Sequence[int]], batch_size: int, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    size = tuple(input_size or getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    return torch.randn(batch_size, *size, device=device, dtype=dtype)


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(iter(model.parameters()), torch.empty(0))


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None,
                by_module: bool = False) -> int | Dict[str, int]:
    """Dense FLOPs of one forward pass of one image (2 x MACs, as in the paper's table).

    ``input_size`` is (C, H, W); the default is the model's ``pretrained_cfg['input_size']``. With
    ``by_module`` returns FLOPs per leaf-module name instead of the total.
    """
    param = _first_param(model)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(_input(model, input_size, 1, param.device, param.dtype))
    finally:
        model.train(was_training)
    if not by_module:
        return int(counter.get_total_flops())
    prefix = type(model).__name__ + "."  # FlopCounterMode keys modules as "<RootClass>.<qualified name>"
    return {key[len(prefix):]: int(sum(ops.values())) for key, ops in counter.get_flop_counts().items()
            if key.startswith(prefix)}


def sparse_flops(model: nn.Module, densities: Mapping[str, float], input_size: Optional[Sequence[int]] = None) -> int:
    """FLOPs when every Conv/Linear weight named in ``densities`` (``"<module>.weight"``) skips its zeros."""
    per_module = count_flops(model, input_size, by_module=True)
    total = count_flops(model, input_size)
    saved = 0.0
    for weight_name, density in densities.items():
        module_name = weight_name.rsplit(".", 1)[0] if "." in weight_name else ""
        saved += per_module.get(module_name, 0) * (1.0 - density)
    return int(round(total - saved))


@torch.no_grad()
def throughput(model: nn.Module, batch_size: int = 64, input_size: Optional[Sequence[int]] = None,
               warmup: int = 3, iters: int = 10) -> float:
    """Images per second of eval-mode forward passes on the model's device (synchronised on CUDA)."""
    param = _first_param(model)
    device = param.device
    x = _input(model, input_size, batch_size, device, param.dtype)
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
