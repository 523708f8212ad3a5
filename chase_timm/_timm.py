"""Small facts about timm models shared by structure, surgery, hub and metrics (of ours, imports only the timm
adapter).

Which modules are the classifier, which input a model expects, every tensor by its canonical name, and a
deep copy that copes with autograd-cached tensors.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterator, Optional

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from .adapters.timm import recorded_model_args

__all__ = ["unwrap_model", "model_input_size", "default_example_input", "deepcopy_model", "named_tensors", "classifier_modules",
           "classifier_tensor_names", "clear_eval_caches", "conv_multiplier"]


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes: the size it was built at (``img_size=...`` as timm recorded it at creation, or on
    its patch embedding or itself) wins over timm's ``pretrained_cfg`` size, which describes the default build;
    channels: the ``in_chans`` it was built with (the cfg does not record an override), else its first conv's
    input (a space-to-depth stem, TResNet's or CSATv2's DCT, feeds its first conv a multiple of them)."""
    channels, size = 3, (224, 224)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if len(cfg.get("input_size", ())) == 3:
        channels, size = cfg["input_size"][0], tuple(cfg["input_size"][1:])
    args = recorded_model_args(model)
    in_chans = args.get("in_chans", getattr(model, "in_chans", None))
    if isinstance(in_chans, int) and not isinstance(in_chans, bool):
        channels = in_chans
    else:
        channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), channels)
    built = args.get("img_size")  # e.g. GCViT, EfficientFormerV2 keep no img_size attribute
    for img_size in itertools.chain([built], (getattr(module, "img_size", None) for module in model.modules())):
        if isinstance(img_size, int) or (isinstance(img_size, (tuple, list)) and len(img_size) == 2):
            size = tuple(to_2tuple(img_size))  # e.g. ViT, Mixer, Swin, PiT built with img_size=...
            break
    return (channels, *size)


def default_example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """A random image batch the model accepts, at :func:`model_input_size`, on the model's device and dtype."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    return torch.randn(batch_size, *model_input_size(model), device=device, dtype=dtype)


def deepcopy_model(model: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """``copy.deepcopy`` that also copes with tensors cached under autograd in plain attributes (LeViT and
    EfficientFormer cache attention biases after an eval forward with grad enabled; deepcopy refuses those)."""
    memo = {} if memo is None else memo
    for module in model.modules():
        for value in vars(module).values():
            for tensor in value.values() if isinstance(value, dict) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                    memo.setdefault(id(tensor), tensor.detach().clone())
    return copy.deepcopy(model, memo)


def conv_multiplier(layer: nn.Module) -> int:
    """k of a depthwise convolution with channel multiplier k > 1 (one input and k outputs per group: groups =
    in_channels, out_channels = k x in_channels, e.g. FastViT's downsampling conv); 0 for any other layer."""
    if not isinstance(layer, nn.modules.conv._ConvNd) or layer.transposed or not 1 < layer.groups == layer.in_channels:
        return 0
    k = layer.out_channels // layer.groups
    return k if k > 1 else 0


def clear_eval_caches(model: nn.Module) -> None:
    """Empty the eval-mode caches timm models fill from their parameters (``attention_bias_cache``: LeViT, TinyViT,
    EfficientFormer V1/V2, EfficientViT-MSRA), as their ``train()`` / ``eval()`` do. Call after running the user's
    model in eval mode and restoring its training flags directly: a forward with grad on leaves a non-leaf tensor
    there, which ``copy.deepcopy`` (timm's ``ModelEmaV3``) refuses, and a stale one in any case."""
    for module in model.modules():
        if isinstance(getattr(module, "attention_bias_cache", None), dict) and module.attention_bias_cache:
            module.attention_bias_cache = {}


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers, by their canonical (first) qualified names."""
    return itertools.chain(model.named_parameters(), model.named_buffers())


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The module(s) ``get_classifier()`` returns, ignoring Identity (num_classes=0)."""
    getter = getattr(model, "get_classifier", None)
    if getter is None:
        return []
    try:
        found = getter()
    except Exception:  # some wrappers raise when there is no head
        return []
    found = found if isinstance(found, (tuple, list)) else (found,)
    return [m for m in found if isinstance(m, nn.Module) and any(True for _ in m.parameters())]


def classifier_tensor_names(model: nn.Module) -> set[str]:
    """Canonical names of the classifier's parameters and buffers."""
    heads = classifier_modules(model)
    ids = {id(t) for head in heads for t in itertools.chain(head.parameters(), head.buffers())}
    return {name for name, t in named_tensors(model) if id(t) in ids}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The eager module inside DDP / ``accelerator.prepare`` / ``torch.compile`` wrappers, in any nesting."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(DDP(m)) or torch.compile(m)
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):  # what accelerator.prepare wraps
        model = model.module
    return getattr(model, "_orig_mod", model)  # DDP(torch.compile(m))
