"""Channel streams the dependency-graph walk can't follow, described from their module's structure.

MobileViT's ``MobileVitBlock`` unfolds its ``conv_1x1`` output into patches with reshapes that fold the channel dim
into the batch (``x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w)``) and back after its transformer,
so torch-pruning's index mapping loses the channels there and the walk refuses the group ("touches a reshape that
regroups channels"). timm's forward takes ``C`` from the tensor, so the block runs with a narrower transformer
stream as it is. :func:`stream_spec` lists that stream's tensors: ``conv_1x1`` rows, each transformer block's
``norm1`` / ``norm2``, ``attn.qkv`` and ``mlp.fc1`` input columns, ``attn.proj`` and ``mlp.fc2`` output rows and
biases, the block's ``norm`` and ``conv_proj``'s input columns; :mod:`chase_timm.graph` builds its group from it, a
residual stream (the transformer adds to it), pruned with ``prune_skip``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from timm.layers import Attention, Mlp
from timm.models import mobilevit, vision_transformer

from .norms import covers

__all__ = ["StreamSpec", "stream_spec"]


@dataclass(frozen=True)
class StreamSpec:
    """A module's channel stream: its width, its tensors (name relative to the module, dim, role as in
    :mod:`chase_timm.graph`) and the layers whose output rows it is (no other group is rooted there)."""

    width: int
    slices: tuple[tuple[str, int, str], ...]
    writers: tuple[str, ...]


def stream_spec(module: nn.Module) -> Optional[StreamSpec]:
    """The transformer stream of a MobileViT ``MobileVitBlock`` whose transformer is timm's pre-norm ViT ``Block``
    (``Attention``, ``Mlp``, no layer scale) with norms :mod:`chase_timm.norms` covers, else ``None``."""
    if not isinstance(module, mobilevit.MobileVitBlock) or not covers(module.norm) or \
            not all(map(_plain_block, module.transformer)):
        return None
    slices = [("conv_1x1.weight", 0, "producer")]
    slices += [("conv_1x1.bias", 0, "bias")] if module.conv_1x1.bias is not None else []  # timm builds none
    writers = ["conv_1x1"]
    for i, block in enumerate(module.transformer):
        at = f"transformer.{i}"
        slices += [(f"{at}.{norm}.{t}", 0, "norm") for norm in ("norm1", "norm2") for t in ("weight", "bias")
                   if getattr(getattr(block, norm), t, None) is not None]
        slices += [(f"{at}.attn.qkv.weight", 1, "consumer"), (f"{at}.mlp.fc1.weight", 1, "consumer")]
        for layer in ("attn.proj", "mlp.fc2"):
            slices.append((f"{at}.{layer}.weight", 0, "producer"))
            if block.get_submodule(layer).bias is not None:
                slices.append((f"{at}.{layer}.bias", 0, "bias"))
            writers.append(f"{at}.{layer}")
    slices += [(f"norm.{t}", 0, "norm") for t in ("weight", "bias") if getattr(module.norm, t, None) is not None]
    slices.append(("conv_proj.conv.weight", 1, "consumer"))
    return StreamSpec(module.conv_1x1.out_channels, tuple(slices), tuple(writers))


def _plain_block(block: nn.Module) -> bool:
    """timm's ViT ``Block`` with ``Attention`` and ``Mlp`` (Linears, no inner norms), covered norms, no layer scale."""
    return (type(block) is vision_transformer.Block and isinstance(block.attn, Attention)
            and isinstance(block.mlp, Mlp) and isinstance(block.mlp.fc1, nn.Linear)
            and isinstance(block.mlp.norm, nn.Identity) and isinstance(block.attn.norm, nn.Identity)
            and all(isinstance(getattr(block, ls), nn.Identity) for ls in ("ls1", "ls2"))
            and covers(block.norm1) and covers(block.norm2))
