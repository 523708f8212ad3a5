"""Norms that mix channels, made to compute over the alive channels only, so masking stays equal to slicing.

LayerNorm, RMSNorm and timm's SimpleNorm (RMS-like, unbiased variance) take their statistics over the channel dim, and GRN (ConvNeXt-V2's GlobalResponseNorm)
divides by the mean of the per-channel norms over channels. Once Chase zeroes a removed channel, these statistics
still count it (a mean over C, not over the C' channels left), so the masked model is not the sliced one, and no
change of the affine parameters fixes it (the shift of the mean differs per token). A forward hook on each such
norm (module classes unchanged) replaces its output with the same formula over the alive channels: mean and
variance over C' for LayerNorm, mean of squares over C' for RMSNorm, variance over C' - 1 for SimpleNorm, the channel mean of GRN's norms over C' — the
arithmetic the sliced timm module does, eps placed as timm places it. A removed channel's output is its affine
terms (0 once Chase zeroes them), whatever its input.

Which channels are alive is explicit data, not guessed from values: the 0/1 channel mask Chase keeps for the norm's
``weight`` (GRN's weight starts at zero in timm, so "weight == 0" cannot tell). :func:`follow_masks` installs or
updates the hooks from such masks (the training model, registered copies, a resumed run); :func:`removal_masks`
builds them from a removal plan (graph.py's numerical check); :func:`remove_hooks` strips them (exports: the slim
model is a plain timm model). A hook with every channel alive returns ``None`` (the module's own output is kept).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import (LayerNorm, LayerNorm2d, LayerNorm2dFp32, LayerNormFp32, RmsNorm, RmsNorm2d, RmsNorm2dFp32,
                         RmsNormFp32, SimpleNorm, SimpleNorm2d, SimpleNorm2dFp32, SimpleNormFp32)
from timm.layers.grn import GlobalResponseNorm

from .adapters.autograd import forward_hooks, remove_forward_hooks

__all__ = ["covers", "follow_masks", "removal_masks", "remove_hooks", "AliveChannels"]


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 for the statistics (as F.layer_norm and timm's Fp32 norms compute them)."""
    return torch.promote_types(x.dtype, torch.float32)


def _layer_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    alive = mask.sum()
    mean = (x * mask).sum(dim, keepdim=True) / alive
    centred = (x - mean) * mask
    var = (centred * centred).sum(dim, keepdim=True) / alive
    y = centred * torch.rsqrt(var + module.eps) * _view(module.weight, dim)
    return y if module.bias is None else y + _view(module.bias, dim)


def _rms_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps  # torch's nn.RMSNorm default
    v = (x * x * mask).sum(dim, keepdim=True) / mask.sum()
    return x * torch.rsqrt(v + eps) * _view(module.weight, dim)


def _simple_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """timm's SimpleNorm: x scaled by the unbiased (C - 1) variance's rsqrt, no centring of the output."""
    alive = mask.sum()
    centred = (x - (x * mask).sum(dim, keepdim=True) / alive) * mask
    var = (centred * centred).sum(dim, keepdim=True) / (alive - 1)
    return x * torch.rsqrt(var + module.eps) * _view(module.weight, dim)


def _response_norm(module: GlobalResponseNorm, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    x_g = x.norm(p=2, dim=module.spatial_dim, keepdim=True)
    x_n = x_g / ((x_g * mask).sum(dim, keepdim=True) / mask.sum() + module.eps)
    return x + torch.addcmul(module.bias.view(module.wb_shape), module.weight.view(module.wb_shape), x * x_n)


def _view(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t if dim == -1 else t.view(-1, 1, 1)


# type -> (formula, channel dim). Exact types only: a subclass may compute something else (the numerical check in
# graph.py then finds it, and its group stays whole).
_FORMULAS: dict[type, tuple[Callable, int]] = {
    nn.LayerNorm: (_layer_norm, -1), LayerNorm: (_layer_norm, -1), LayerNormFp32: (_layer_norm, -1),
    LayerNorm2d: (_layer_norm, 1), LayerNorm2dFp32: (_layer_norm, 1),
    RmsNorm: (_rms_norm, -1), RmsNormFp32: (_rms_norm, -1), RmsNorm2d: (_rms_norm, 1), RmsNorm2dFp32: (_rms_norm, 1),
    SimpleNorm: (_simple_norm, -1), SimpleNormFp32: (_simple_norm, -1), SimpleNorm2d: (_simple_norm, 1),
    SimpleNorm2dFp32: (_simple_norm, 1),
    **({nn.RMSNorm: (_rms_norm, -1)} if hasattr(nn, "RMSNorm") else {}),
}


def covers(module: nn.Module) -> bool:
    """True for a norm whose statistics this module can restrict to the alive channels: timm's / torch's
    LayerNorm, LayerNorm2d, RmsNorm, RmsNorm2d, SimpleNorm, SimpleNorm2d (and their Fp32 forms; one normalised dim,
    with a weight) and GlobalResponseNorm."""
    if isinstance(module, GlobalResponseNorm):
        return type(module) is GlobalResponseNorm
    shape = getattr(module, "normalized_shape", ())
    return type(module) in _FORMULAS and len(shape) == 1 and getattr(module, "weight", None) is not None


class AliveChannels:
    """The forward hook: the norm's output recomputed over the channels where ``mask`` is 1 (``None``: all)."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if self.mask is None:
            return None
        x = args[0]
        if isinstance(module, GlobalResponseNorm):
            formula, dim = _response_norm, module.channel_dim
        else:
            formula, dim = _FORMULAS[type(module)]
        dtype = _stats_dtype(x)
        mask = self.mask.to(x.device, dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = formula(module, x.to(dtype), mask if dim == -1 else mask.view(-1, 1, 1), dim)
        return y.to(output.dtype)


def _hook(module: nn.Module) -> Optional[AliveChannels]:
    return next(iter(forward_hooks(module, AliveChannels)), None)


@torch.no_grad()
def follow_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Make every covered norm of ``model`` compute over the channels its ``weight``'s mask in ``masks`` keeps.

    ``masks``: {parameter name: 0/1 mask shaped like it} (Chase's channel masks). A norm with a zero in its mask
    gets an :class:`AliveChannels` hook (installed once; deep copies carry it along with its mask); any other
    hooked norm goes back to its own output. Call whenever the masks change or the model was sliced.
    """
    for name, module in model.named_modules():
        if not covers(module):
            continue
        mask = masks.get(f"{name}.weight" if name else "weight")
        hook = _hook(module)
        if mask is not None and not bool(mask.all()):
            if hook is None:
                hook = AliveChannels()
                module.register_forward_hook(hook)
            hook.mask = mask.detach().flatten().clone()
        elif hook is not None:
            hook.mask = None


def removal_masks(model: nn.Module, removals: Mapping[str, Mapping[int, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """{weight name: 0/1 mask} of the covered norms whose weight loses positions in ``removals``
    ({tensor: {dim: positions}}, as :func:`chase_timm.graph.tensor_removals` gives)."""
    out = {}
    for name, module in model.named_modules():
        weight_name = f"{name}.weight" if name else "weight"
        if covers(module) and weight_name in removals:
            mask = torch.ones_like(module.weight)
            mask[list(removals[weight_name].get(0, ()))] = 0
            out[weight_name] = mask
    return out


def remove_hooks(model: nn.Module) -> nn.Module:
    """``model`` without any :class:`AliveChannels` hook (an exported, sliced model computes this by itself)."""
    for module in model.modules():
        remove_forward_hooks(module, AliveChannels)
    return model
