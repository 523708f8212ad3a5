"""Norms that mix channels, made to compute over the alive channels only, so masking stays equal to slicing.

LayerNorm, RMSNorm and timm's SimpleNorm (RMS-like, unbiased variance; also timm's norm + act layers) take their
statistics over the channel dim, GroupNorm over each group of channels, GRN (ConvNeXt-V2's GlobalResponseNorm)
divides by the mean of the per-channel norms over channels, and timm's weight-standardised convolutions (StdConv2d,
ScaledStdConv2d and their ``Same`` forms: BiT ResNet-V2, NFNet, hybrid ViT stems) normalise each output row of their
weight over all its input channels. Once Chase zeroes a removed channel these statistics still count it (a mean over
C, not over the C' channels left), so the masked model is not the sliced one, and no change of the affine parameters
fixes it (the shift of the mean differs per token). A forward hook on each such module (module classes unchanged)
replaces its output with what the sliced timm module computes: LayerNorm / RMSNorm / SimpleNorm run their own
functional (``F.layer_norm``, ``F.rms_norm``, timm's ``simple_norm``, same eps; a norm + act layer then its dropout
and activation) on the alive channels gathered out of the input, and scatter the result back (removed channels output
0); GRN takes the channel mean of its norms over the alive channels only (its removed channels pass their input
through, which Chase has zeroed and the next layer ignores); a GroupNorm runs its own forward on the alive channels
and scatters (as many groups as before: Chase removes the same positions from every group); a standardised conv runs
its own forward on its weight's alive input columns and the alive input channels (what the sliced conv computes).

Which channels are alive is explicit data, not guessed from values: the 0/1 channel mask Chase keeps for the norm's
(conv's) ``weight`` (GRN's weight starts at zero in timm, so "weight == 0" cannot tell). :func:`follow_masks` installs or
updates the hooks from such masks (the training model, registered copies, a resumed run); :func:`removal_masks`
builds them from a removal plan (graph.py's numerical check); :func:`remove_hooks` strips them (exports: the slim
model is a plain timm model). A hook with every channel alive returns ``None`` (the module's own output is kept).
"""
from __future__ import annotations

from typing import Callable, Collection, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (GroupNorm, GroupNorm1, GroupNorm1Act, GroupNormAct, LayerNorm, LayerNorm2d, LayerNorm2dFp32,
                         LayerNormAct, LayerNormAct2d, LayerNormAct2dFp32, LayerNormActFp32, LayerNormFp32, RmsNorm,
                         RmsNorm2d, RmsNorm2dFp32, RmsNormAct, RmsNormAct2d, RmsNormAct2dFp32, RmsNormActFp32,
                         RmsNormFp32, ScaledStdConv2d, ScaledStdConv2dSame, SimpleNorm, SimpleNorm2d, SimpleNorm2dFp32,
                         SimpleNormFp32, StdConv2d, StdConv2dSame)
from timm.layers.fast_norm import simple_norm
from timm.layers.grn import GlobalResponseNorm
from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias

from .adapters.autograd import forward_hooks, remove_forward_hooks, with_parameters

__all__ = ["STANDARDISED_CONVS", "covers", "follow_masks", "removal_masks", "remove_hooks", "AliveChannels"]

# convs that standardise their weight in forward, each output row over (in_channels / groups) x kernel; exact types:
# a subclass may compute something else
STANDARDISED_CONVS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


def _layer_norm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, module.eps)


def _rms_norm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:], weight, module.eps)  # eps None: torch's nn.RMSNorm default, as in forward


def _simple_norm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return simple_norm(x, x.shape[-1:], weight, module.eps)  # timm's: unbiased variance, no centring of the output


def _alive_norm(module: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The sliced norm's output on the alive channels ``index`` of ``x``, channels last (an NCHW norm works on the
    channels-last view, as timm's LayerNorm2d does: one gather, no extra copy)."""
    formula, dim = _FORMULAS[type(module)]
    x = x if dim == -1 else x.movedim(1, -1)
    bias = getattr(module, "bias", None)
    return formula(module, x.index_select(-1, index), module.weight.index_select(0, index).to(x.dtype),
                   None if bias is None else bias.index_select(0, index).to(x.dtype))


def _scatter_norm_act(module: nn.Module, y: torch.Tensor, shape: torch.Size, index: torch.Tensor) -> torch.Tensor:
    """``y`` (the alive channels, channels last) through a norm + act layer's dropout and activation in the module's
    layout, as the sliced module applies them (removed channels get 0, whatever act(0) is), scattered back into
    ``shape`` (the module's input shape) with zeros in the removed channels."""
    first = _FORMULAS[type(module)][1] == 1
    if type(module) in _NORM_ACTS:
        y = module.act(module.drop(y.movedim(-1, 1) if first else y))
        y = y.movedim(1, -1) if first else y
    out = y.new_zeros(shape[:1] + shape[2:] + shape[1:2] if first else shape).index_copy(-1, index, y)
    return out.movedim(-1, 1) if first else out


def _response_norm(module: GlobalResponseNorm, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRN with the mean of the channel norms taken over the alive channels (``mask``)."""
    mask = mask.view(module.wb_shape)
    x_g = x.norm(p=2, dim=module.spatial_dim, keepdim=True)
    x_n = x_g / ((x_g * mask).sum(module.channel_dim, keepdim=True) / mask.sum() + module.eps)
    return x + torch.addcmul(module.bias.view(module.wb_shape), module.weight.view(module.wb_shape), x * x_n)


# type -> (formula, channel dim). Exact types only: a subclass may compute something else (the numerical check in
# graph.py then finds it, and its group stays whole).
_FORMULAS: dict[type, tuple[Callable, int]] = {
    nn.LayerNorm: (_layer_norm, -1), LayerNorm: (_layer_norm, -1), LayerNormFp32: (_layer_norm, -1),
    LayerNorm2d: (_layer_norm, 1), LayerNorm2dFp32: (_layer_norm, 1),
    RmsNorm: (_rms_norm, -1), RmsNormFp32: (_rms_norm, -1), RmsNorm2d: (_rms_norm, 1), RmsNorm2dFp32: (_rms_norm, 1),
    SimpleNorm: (_simple_norm, -1), SimpleNormFp32: (_simple_norm, -1), SimpleNorm2d: (_simple_norm, 1),
    SimpleNorm2dFp32: (_simple_norm, 1),
    LayerNormNoBias: (_layer_norm, -1), LayerNorm2dNoBias: (_layer_norm, 1),  # MetaFormer's (forwards inherited)
    # norm + act layers: the norm, then their dropout and activation (_NORM_ACTS)
    LayerNormAct: (_layer_norm, -1), LayerNormActFp32: (_layer_norm, -1), LayerNormAct2d: (_layer_norm, 1),
    LayerNormAct2dFp32: (_layer_norm, 1), RmsNormAct: (_rms_norm, -1), RmsNormActFp32: (_rms_norm, -1),
    RmsNormAct2d: (_rms_norm, 1), RmsNormAct2dFp32: (_rms_norm, 1),
    **({nn.RMSNorm: (_rms_norm, -1)} if hasattr(nn, "RMSNorm") else {}),
}


@torch.compiler.disable  # run eagerly: inductor cannot lower a conv whose input width changes at every event
def _own_forward(module: nn.Module, x: torch.Tensor, hook: "AliveChannels") -> torch.Tensor:
    """The module's own forward on its alive slice: the alive input channels ``hook.inputs`` of ``x`` (dim 1) and its
    ``weight`` (a GroupNorm's weight and bias: their alive entries; a standardised conv's weight: its alive input
    columns), i.e. what the sliced module computes; a GroupNorm's output is scattered back (removed channels 0)."""
    index, inputs = hook.index.to(x.device), hook.inputs.to(x.device)
    if isinstance(module, nn.GroupNorm):
        params = {n: p.index_select(0, index) for n, p in (("weight", module.weight),
                                                           ("bias", module.bias)) if p is not None}
    else:
        params = {"weight": module.weight.index_select(1, index)}
    # forward called directly, not through __call__: the module's hooks (this one included) do not run again
    y = with_parameters(module, params).forward(x.index_select(1, inputs))
    return y.new_zeros(y.shape[:1] + x.shape[1:]).index_copy(1, inputs, y) if isinstance(module, nn.GroupNorm) else y


def _alive_columns(mask: torch.Tensor) -> torch.Tensor:
    """0/1 flags of a standardised conv's weight columns (input channels per group) some alive row still reads."""
    return (mask.reshape(mask.shape[0], mask.shape[1], -1).amax(dim=(0, 2)) > 0).to(mask.dtype)


_NORM_ACTS = (LayerNormAct, LayerNormActFp32, LayerNormAct2d, LayerNormAct2dFp32, RmsNormAct, RmsNormActFp32,
              RmsNormAct2d, RmsNormAct2dFp32)  # forward: the norm, then self.drop and self.act

# GroupNorm classes calling F.group_norm (timm's: or its fast_norm form) on their input, then (the Act forms) dropout
# and an activation; exact types, as above
_GROUP_NORMS = (nn.GroupNorm, GroupNorm, GroupNorm1, GroupNormAct, GroupNorm1Act, GroupNorm1NoBias)
_OWN_FORWARD = _GROUP_NORMS + STANDARDISED_CONVS


def covers(module: nn.Module) -> bool:
    """True for a norm whose statistics this module can restrict to the alive channels: timm's / torch's
    LayerNorm, LayerNorm2d, RmsNorm, RmsNorm2d, SimpleNorm, SimpleNorm2d (and their Fp32 forms; one normalised dim,
    with a weight; timm's norm + act forms too), GroupNorm (torch's; timm's GroupNorm, GroupNorm1, their Act forms,
    MetaFormer's GroupNorm1NoBias; with a weight), GlobalResponseNorm and timm's weight-standardised convs (not
    depthwise: those standardise over their kernel only)."""
    if isinstance(module, GlobalResponseNorm):
        return type(module) is GlobalResponseNorm
    if isinstance(module, nn.GroupNorm):
        return type(module) in _GROUP_NORMS and module.weight is not None
    if type(module) in STANDARDISED_CONVS:
        return not module.groups == module.in_channels == module.out_channels
    shape = getattr(module, "normalized_shape", ())
    return type(module) in _FORMULAS and len(shape) == 1 and getattr(module, "weight", None) is not None


class AliveChannels:
    """The forward hook: the norm's output recomputed over the channels where ``mask`` is 1 (``None``: all). For a
    GroupNorm or a standardised conv (run through its own forward) ``inputs`` holds the alive input channels; a
    standardised conv's ``mask`` flags its weight's input columns (per group)."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.index: Optional[torch.Tensor] = None  # positions where mask is 1
        self.inputs: Optional[torch.Tensor] = None  # alive input channels (a standardised conv: of every group)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if self.mask is None:
            return None
        x = args[0]
        if type(module) in _OWN_FORWARD:  # in the module's own dtype and autocast state, as its forward runs
            return _own_forward(module, x, self)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least, as the norms do
        index = self.index.to(x.device)
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(module, GlobalResponseNorm):
                return _response_norm(module, x, self.mask.to(x.device, x.dtype)).to(output.dtype)
            y = _alive_norm(module, x, index)
        return _scatter_norm_act(module, y.to(output.dtype), x.shape, index)  # act in the module's autocast state


def _hook(module: nn.Module) -> Optional[AliveChannels]:
    return next(iter(forward_hooks(module, AliveChannels)), None)


def attach(model: nn.Module, weights: Collection[str]) -> None:
    """An inactive :class:`AliveChannels` hook on every covered norm whose ``weight`` is in ``weights`` (the
    tensors of prunable channel groups), installed before training: ``torch.compile`` does not see forward hooks
    added after its first call, but does follow the mask of a hook that was already there."""
    for name, module in model.named_modules():
        if covers(module) and (f"{name}.weight" if name else "weight") in weights and _hook(module) is None:
            module.register_forward_hook(AliveChannels())


@torch.no_grad()
def follow_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Make every covered norm of ``model`` compute over the channels its ``weight``'s mask in ``masks`` keeps.

    ``masks``: {parameter name: 0/1 mask shaped like it} (Chase's channel masks). A norm with a zero in its mask (a
    standardised conv: an input column no alive row reads) gets an :class:`AliveChannels` hook (installed once; deep
    copies carry it along with its mask); any other hooked norm goes back to its own output. Call whenever the masks
    change or the model was sliced.
    """
    for name, module in model.named_modules():
        if not covers(module):
            continue
        mask = masks.get(f"{name}.weight" if name else "weight")
        conv = type(module) in STANDARDISED_CONVS
        if mask is not None:
            mask = _alive_columns(mask.detach()) if conv else mask.detach().flatten().clone()
        hook = _hook(module)
        if mask is not None and not bool(mask.all()):
            if hook is None:
                hook = AliveChannels()
                module.register_forward_hook(hook)
            hook.mask = mask
            hook.index = mask.nonzero().flatten()
            hook.inputs = hook.index
            if conv:  # input channel of group g, column j: g * columns + j
                hook.inputs = (torch.arange(module.groups, device=mask.device)[:, None] * mask.numel()
                               + hook.index).flatten()
        elif hook is not None:
            hook.mask = hook.index = hook.inputs = None


def removal_masks(model: nn.Module, removals: Mapping[str, Mapping[int, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """{weight name: 0/1 mask} of the covered norms (and standardised convs) whose weight loses positions in
    ``removals`` ({tensor: {dim: positions}}, as :func:`chase_timm.graph.tensor_removals` gives)."""
    out = {}
    for name, module in model.named_modules():
        weight_name = f"{name}.weight" if name else "weight"
        if covers(module) and weight_name in removals:
            mask = torch.ones_like(module.weight)
            for dim, positions in removals[weight_name].items():
                mask.index_fill_(dim, torch.tensor(list(positions), dtype=torch.long, device=mask.device), 0)
            out[weight_name] = mask
    return out


def remove_hooks(model: nn.Module) -> nn.Module:
    """``model`` without any :class:`AliveChannels` hook (an exported, sliced model computes this by itself)."""
    for module in model.modules():
        remove_forward_hooks(module, AliveChannels)
    return model
