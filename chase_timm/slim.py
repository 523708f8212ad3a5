"""Physical channel removal: slim copies, JSON width plans replayed on fresh models, BN recalibration.

Every resize goes through one path (``_resize``): new tensors are swapped in (into the same ``nn.Parameter``
objects, so an optimizer holding them stays valid when a training model shrinks), then module attributes
(conv/linear/norm sizes) are re-derived from the tensor shapes, then timm's model-level widths
(``num_features``, ``head_hidden_size``, ``feature_info``, head ``in_features``) are re-measured with a
shape-only forward on the ``meta`` device, so ``forward_features``, ``reset_classifier`` and
``features_only`` keep working on the slim model.
"""
from __future__ import annotations

import hashlib
import itertools
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import BlurPool2d

from ._timm import classifier_tensor_names, conv_multiplier, deepcopy_model, default_example_input, named_tensors
from .adapters.autograd import non_persistent_buffer_names
from .heads import has_heads, head_conv_groups, heads_resized, refresh_heads
from .norms import follow_masks

__all__ = ["slim_copy", "slice_in_place", "meta_clone", "sliced", "width_plan", "apply_width_plan", "recalibrate_batchnorm"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def slim_copy(model: nn.Module, removals: Mapping[str, Mapping[int, Sequence[int]]]) -> nn.Module:
    """Deep copy of the (unwrapped) model with the listed tensor positions removed; the input model is untouched."""
    slim = deepcopy_model(model)
    slice_in_place(slim, removals)
    return slim


def slice_in_place(model: nn.Module, removals: Mapping[str, Mapping[int, Sequence[int]]], refresh: bool = True) -> None:
    """Remove the listed positions from the model's own tensors; ``refresh=False`` skips timm attribute re-measuring.

    Norms computing over alive channels (:mod:`chase_timm.norms`) go back to their own output: their masks
    describe the unsliced widths (the caller that masks the sliced model sets them again)."""
    follow_masks(model, {})
    slots = _tensor_slots(model)
    new = {}
    for name, dims in removals.items():
        if name not in slots:
            raise ValueError(f"removals name tensor {name!r}, which the model does not have")
        new[name] = sliced(_get(slots[name][0]).detach(), dims, name)
    _resize(model, new, slots, refresh)


def sliced(tensor: torch.Tensor, dims: Mapping[int, Sequence[int]], name: str = "tensor") -> torch.Tensor:
    """``tensor`` without the listed positions along each dim (masks and optimizer state are cut like weights)."""
    for dim, positions in sorted(dims.items()):
        tensor = _drop(tensor, name, int(dim), positions)
    return tensor


def width_plan(model: nn.Module, base: nn.Module) -> dict:
    """JSON-safe plan of every tensor whose shape differs from ``base``, and a fingerprint of ``base``.

    A plan entry lists the new size of every changed dim and ``None`` for dims left as they are (so
    overrides such as ``num_classes`` or ``in_chans`` of the model it is replayed on still apply; a
    classifier's class dim is always ``None``; a non-persistent buffer that grew is a cache the model rebuilds
    for its input size and is left out). ``base`` records what the plan was made for: a digest of the base's
    tensor names and the base shape of every planned tensor, which ``apply_width_plan`` checks.
    """
    base_shapes = {name: list(t.shape) for name, t in named_tensors(base)}
    classifier = classifier_tensor_names(model)
    caches = non_persistent_buffer_names(model)
    tensors, planned_base = {}, {}
    for name, tensor in named_tensors(model):
        if name not in base_shapes:
            raise ValueError(f"tensor {name!r} does not exist in the base model; is it the same architecture?")
        grown = any(size > base for size, base in zip(tensor.shape, base_shapes[name]))
        if name in caches and (grown or tensor.dim() != len(base_shapes[name])):
            continue  # a cache the model rebuilds for its input size (ConViT's rel_indices), not a width
        if tensor.dim() != len(base_shapes[name]):
            raise ValueError(f"tensor {name!r} is {tensor.dim()}-d here but {len(base_shapes[name])}-d in the base")
        shape = [None if size == base else size for size, base in zip(tensor.shape, base_shapes[name])]
        if name in classifier and shape and tensor.shape[0] == getattr(model, "num_classes", None):
            shape[0] = None  # the class dim: keep the class count of whatever model the plan is replayed on
        if any(size is not None for size in shape):
            tensors[name] = shape
            planned_base[name] = base_shapes[name]
    # a multiplier conv's weight (rows, 1, k, k) reads as fewer groups or as fewer outputs per group: say which
    groups = {name: model.get_submodule(name).groups for name, conv in base.named_modules()
              if conv_multiplier(conv) and f"{name}.weight" in tensors}
    return {"tensors": tensors, "classifier": sorted(classifier & tensors.keys()), "conv_groups": groups,
            "base": {"names_sha256": _names_digest(base), "shapes": planned_base}}


def apply_width_plan(model: nn.Module, plan: Mapping, keep_values: bool = False) -> nn.Module:
    """Resize a fresh base model in place to the plan's shapes (same device/dtype).

    New tensors are uninitialised, or with ``keep_values`` the leading slice of the old ones (e.g. timm's own
    random initialisation cut to the slim widths). A plan made for another base architecture is refused.
    """
    entries = plan.get("tensors") if isinstance(plan, Mapping) else None
    if not isinstance(entries, Mapping):
        raise ValueError("width plan must be a mapping with a 'tensors' mapping of name -> shape")
    _check_plan_base(model, plan)
    slots = _tensor_slots(model)
    new = {}
    for name, shape in entries.items():
        if name not in slots:
            if _is_classifier_entry(plan, name, shape):
                continue  # classifier entry, and this model has no classifier (num_classes=0)
            raise ValueError(f"width plan names tensor {name!r}, which this model does not have")
        old = _get(slots[name][0])
        target = _planned_shape(name, old, shape)
        if keep_values:
            new[name] = old[tuple(slice(0, size) for size in target)].clone()
        else:
            new[name] = torch.empty(target, device=old.device, dtype=old.dtype)
    # a plan without conv_groups (chase_timm before multiplier convs lost whole groups) kept every group
    groups = plan.get("conv_groups") if "conv_groups" in plan else {
        name: conv.groups for name, conv in model.named_modules() if conv_multiplier(conv)}
    _resize(model, new, slots, refresh=True, conv_groups=groups)
    return model


def recalibrate_batchnorm(model: nn.Module, batches: Iterable, num_batches: Optional[int] = None) -> None:
    """Recompute BatchNorm running statistics over the first ``num_batches`` of ``batches`` (the cumulative average of
    ``torch.optim.swa_utils.update_bn``, on the model's device); unlike ``update_bn``, which resets every module to
    the top-level train/eval flag, each module keeps its own flag."""
    flags = {m: m.training for m in model.modules()}
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    torch.optim.swa_utils.update_bn(itertools.islice(batches, num_batches), model,
                                    device=None if tensor is None else tensor.device)
    for m, flag in flags.items():
        m.training = flag


# ------------------------------------------------------------------------------------- plan validation

def _names_digest(model: nn.Module) -> str:
    """SHA-256 of the model's sorted non-classifier tensor names: identifies the architecture a plan fits."""
    names = sorted(set(name for name, _ in named_tensors(model)) - classifier_tensor_names(model))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _check_plan_base(model: nn.Module, plan: Mapping) -> None:
    """ValueError unless ``model`` is the base the plan was made for (tensor names, planned base shapes)."""
    base = plan.get("base")
    if base is None:
        return  # a hand-written plan: only its own entries are checked
    if not isinstance(base, Mapping) or not isinstance(base.get("shapes"), Mapping):
        raise ValueError("width plan 'base' must be a mapping with 'names_sha256' and 'shapes'")
    fix = "build the base architecture the plan was made for (same model name and build kwargs)"
    if base.get("names_sha256") != _names_digest(model):
        raise ValueError(f"width plan does not fit this {type(model).__name__}: its tensor names differ from the "
                         f"base the plan was made for; {fix}")
    current = {name: list(t.shape) for name, t in named_tensors(model)}
    for name, shape in base["shapes"].items():
        if name not in current:
            continue  # classifier of a model built with num_classes=0
        planned = plan["tensors"].get(name) or []
        mismatch = [d for d, size in enumerate(shape) if d < len(planned) and planned[d] is not None
                    and (d >= len(current[name]) or current[name][d] != size)]
        if len(shape) != len(current[name]) or mismatch:
            raise ValueError(f"width plan does not fit this {type(model).__name__}: {name} has shape "
                             f"{current[name]} here but {shape} in the base the plan was made for; {fix}")


def _is_classifier_entry(plan: Mapping, name: str, shape: Any) -> bool:
    """Whether a plan entry belongs to the classifier (absent from models built with ``num_classes=0``)."""
    if "classifier" in plan:
        return name in plan["classifier"]
    return isinstance(shape, (list, tuple)) and bool(shape) and shape[0] is None  # hand-written plan


# ----------------------------------------------------------------------------------------------- tensors

def _tensor_slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Canonical tensor name -> every (module, attribute) holding that tensor (shared tensors have several)."""
    names = {id(t): name for name, t in named_tensors(model)}
    slots: dict[str, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, tensor in itertools.chain(module._parameters.items(), module._buffers.items()):
            if tensor is not None and id(tensor) in names:
                slots.setdefault(names[id(tensor)], []).append((module, attr))
    return slots


def _get(slot: tuple[nn.Module, str]) -> torch.Tensor:
    module, attr = slot
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _drop(tensor: torch.Tensor, name: str, dim: int, positions: Sequence[int]) -> torch.Tensor:
    """``tensor`` without ``positions`` along ``dim``."""
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"{name}: dim {dim} out of range for shape {tuple(tensor.shape)}")
    size = tensor.shape[dim]
    drop = {int(p) for p in positions}
    if any(not 0 <= p < size for p in drop):
        raise ValueError(f"{name}: positions {sorted(drop)} out of range for dim {dim} of size {size}")
    keep = torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long, device=tensor.device)
    out = tensor.index_select(dim, keep)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)  # a channels_last model stays channels_last
    return out


def _planned_shape(name: str, old: torch.Tensor, shape: Any) -> list[int]:
    """Plan entry -> concrete shape (``None`` keeps the model's own size), validated."""
    if not isinstance(shape, (list, tuple)) or len(shape) != old.dim():
        raise ValueError(f"width plan shape {shape!r} for {name!r} does not match its {old.dim()}-d tensor")
    target = [old.shape[i] if size is None else size for i, size in enumerate(shape)]
    if any(not isinstance(size, int) or isinstance(size, bool) or size <= 0 for size in target):
        raise ValueError(f"width plan shape {shape!r} for {name!r} must hold positive integers")
    if any(size > old.shape[i] for i, size in enumerate(target)):
        raise ValueError(f"width plan shape {shape!r} for {name!r} is wider than the model's {list(old.shape)}: "
                         "a plan only removes channels; was it made for a larger base?")
    return target


def _resize(model: nn.Module, new: Mapping[str, torch.Tensor], slots, refresh: bool,
            conv_groups: Optional[Mapping[str, int]] = None) -> None:
    """Swap in the new tensors, re-derive module attributes (``conv_groups``: the groups of named multiplier convs,
    which their weight's shape leaves open), then re-measure timm's model-level widths."""
    before = _measure(model) if refresh and _has_timm_widths(model) else None
    links, split_links = _block_size_links(model), _split_size_links(model)
    touched = []
    for name, tensor in new.items():
        for module, attr in slots[name]:
            if attr in module._parameters:
                param = module._parameters[attr]  # the same Parameter object: optimizer references stay valid
                _set_data(param, tensor)
                if param.grad is not None and param.grad.shape != tensor.shape:
                    param.grad = None  # a stale gradient of the old shape; callers that need it slice it first
            else:
                module._buffers[attr] = tensor
            touched.append(module)
    resized = set(touched)
    attentions = [(name, m) for name, m in model.named_modules() if has_heads(m) and heads_resized(m, resized)]
    for _, attention in attentions:  # convs whose groups follow the heads (LiteMLA's): groups before the sizes
        for conv, groups in head_conv_groups(attention).items():
            conv.groups = groups
    for module in dict.fromkeys(touched):
        name = _module_name(model, module)
        _fix_module(module, name)
        if conv_groups and name in conv_groups and isinstance(module, nn.modules.conv._ConvNd):
            _regroup(module, name, int(conv_groups[name]))
    for name, module in attentions:  # attention modules re-derive num_heads etc. from their tensors
        refresh_heads(module, name or "the model")
    for block, attr, conv, conv_attr, factor in links:
        setattr(block, attr, getattr(conv, conv_attr) * factor)
    for blur in (m for m in model.modules() if isinstance(m, BlurPool2d) and m.channels is not None):
        # F.conv2d(x, filt, groups=channels), one identical filter row per channel: timm's channels=None form takes
        # the channels from the input (filt expanded), so the blur follows the width reaching it (TResNet, ResNetBlur)
        blur.channels, blur.filt = None, blur.filt[:1]
    for block, sums, convs in split_links:
        block.splits = [conv.in_channels for conv in convs]
        for attr in sums:
            setattr(block, attr, sum(getattr(conv, attr) for conv in convs))
    if before is not None:
        _refresh_timm_attrs(model, before, _measure(model, strict=True))


def _set_data(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """Swap a parameter's data for a tensor of another shape. PyTorch keeps the parameter's cached gradient
    accumulator (with the old shape) unless the dtype changes, and while any autograd graph that reached it is
    alive (a loss kept across steps, a traced graph) the next backward would then fail on the stale shape; a
    detour through another dtype drops the cache."""
    if param.shape != tensor.shape:
        other = torch.float64 if tensor.dtype != torch.float64 else torch.float32
        param.data = torch.empty(0, dtype=other, device=tensor.device)
    param.data = tensor


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__)


# ------------------------------------------------------------------------------------- module attributes

def _fix_module(module: nn.Module, name: str) -> None:
    """Re-derive a module's size attributes from its (resized) tensors; ValueError if they disagree."""
    if isinstance(module, nn.modules.conv._ConvNd):
        _fix_conv(module, name)
    elif isinstance(module, nn.Linear):
        _fix_linear(module, name)
    elif isinstance(module, _NORMS):
        module.num_features = _common_size(module, name, ("weight", "bias", "running_mean", "running_var"))
    elif isinstance(module, nn.GroupNorm):
        _fix_groupnorm(module, name)
    elif isinstance(getattr(module, "normalized_shape", None), tuple) and getattr(module, "weight", None) is not None:
        module.normalized_shape = tuple(module.weight.shape)  # LayerNorm, timm's RmsNorm / RmsNorm2d
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(getattr(module, "shape", None), tuple) and isinstance(getattr(module, "scale", None), nn.Parameter) \
            and module.scale.dim() == 1 and module.shape:
        module.shape = (module.scale.numel(), *module.shape[1:])  # MetaFormer's Scale: x * scale.view(self.shape)


_REPARAM_SIZES = {"in_chs": "in_channels", "out_chs": "out_channels", "groups": "groups", "dim": "in_channels",
                  "dim_out": "out_channels"}


def _block_size_links(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str, int]]:
    """Block attributes that repeat a conv's size, as (block, attribute, conv, conv attribute, factor), read before a
    resize so the attributes can follow the conv after it (attribute = factor x conv attribute): a split block's
    piece ``width`` (``self.convs[0]``'s input), a CSP stage's ``expand_chs`` (its ``conv_exp`` output, split in
    halves), an HSM-SSD's ``d_inner`` (its conv ``out_proj``'s input; ``hz_proj``'s output is split in two such
    pieces), a multi-path block's ``in_channels`` / ``out_channels`` (SelectiveKernel's
    ``torch.split(x, self.in_channels // self.num_paths)``: ``num_paths`` times the first path's input when each
    path takes a piece) and the sizes a re-parameterisable block (one with ``reparameterize``) builds its fused conv
    and identity kernel from (``in_chs``, ``out_chs``, ``groups``, ``dim``, ``dim_out``): the first conv inside it
    whose sizes all equal them, else (a block with only an identity BatchNorm: FastViT's ``RepMixer.norm``) its norm."""
    links = []
    for block in model.modules():
        convs = getattr(block, "convs", None)
        if isinstance(getattr(block, "width", None), int) and isinstance(convs, nn.ModuleList) and len(convs) and \
                isinstance(convs[0], nn.modules.conv._ConvNd) and convs[0].in_channels == block.width:
            links.append((block, "width", convs[0], "in_channels", 1))  # torch.split(x, self.width): Res2Net, EdgeNeXt
        expand = getattr(block, "conv_exp", None)
        if isinstance(getattr(block, "expand_chs", None), int) and isinstance(expand, nn.Module):
            conv = next((m for m in expand.modules() if isinstance(m, nn.modules.conv._ConvNd)
                         and m.out_channels == block.expand_chs), None)  # x.split(self.expand_chs // 2): CSP stages
            links += [(block, "expand_chs", conv, "out_channels", 1)] if conv is not None else []
        if isinstance(getattr(block, "d_inner", None), int) and isinstance(getattr(block, "out_proj", None), nn.Module):
            inner = next((m for m in block.out_proj.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
            if inner is not None and inner.in_channels == block.d_inner:  # split(hz_proj(h), [d_inner] * 2)
                links.append((block, "d_inner", inner, "in_channels", 1))
        links += _path_links(block)
        if not callable(getattr(block, "reparameterize", None)):
            continue
        sizes = {a: c for a, c in _REPARAM_SIZES.items() if isinstance(getattr(block, a, None), int)}
        conv = next((m for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd) and sizes and
                     all(getattr(m, c) == getattr(block, a) for a, c in sizes.items())), None)
        if conv is not None:
            links += [(block, a, conv, c, 1) for a, c in sizes.items()]
            continue
        norm = next((m for m in block.modules() if isinstance(m, _NORMS) and sizes and  # identity-only (FastViT)
                     all(m.num_features == getattr(block, a) for a in sizes)), None)
        links += [(block, a, norm, "num_features", 1) for a in sizes] if norm is not None else []
    return links


def _split_size_links(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...], list[nn.modules.conv._ConvNd]]]:
    """Modules that split their input over their child convs by a list of piece sizes, ``splits`` (timm's
    MixedConv2d, the MixNet blocks: ``torch.split(x, self.splits, 1)``, one conv per piece), with the attributes among
    ``in_channels`` / ``out_channels`` that are the sums over those convs, read before a resize so the sizes can
    follow the convs after it."""
    links = []
    for block in model.modules():
        convs = [m for m in block.children() if isinstance(m, nn.modules.conv._ConvNd)]
        if convs and getattr(block, "splits", None) == [conv.in_channels for conv in convs]:
            sums = tuple(a for a in ("in_channels", "out_channels")
                         if getattr(block, a, None) == sum(getattr(conv, a) for conv in convs))
            links.append((block, sums, convs))
    return links


def _path_links(block: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str, int]]:
    """A block with ``paths`` (one module per path, ``num_paths`` of them) and ``in_channels`` / ``out_channels``
    that its first path's first conv repeats, its input once or split over the paths (``in_channels`` divided by
    ``num_paths``)."""
    paths, count = getattr(block, "paths", None), getattr(block, "num_paths", None)
    if not isinstance(paths, nn.ModuleList) or not isinstance(count, int) or count != len(paths) or count < 2:
        return []
    conv = next((m for m in paths[0].modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return []
    links = []
    for attr, conv_attr in (("in_channels", "in_channels"), ("out_channels", "out_channels")):
        size = getattr(block, attr, None)
        factor = next((f for f in (1, count) if isinstance(size, int) and size == f * getattr(conv, conv_attr)), None)
        links += [(block, attr, conv, conv_attr, factor)] if factor else []
    return links


def _fix_conv(conv: nn.modules.conv._ConvNd, name: str) -> None:
    """Conv in/out channels and ``groups``; a depthwise conv stays depthwise."""
    shape = conv.weight.shape
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        conv.in_channels = conv.out_channels = conv.groups = shape[0]
    elif conv_multiplier(conv):  # channels leave a whole group (1 input, k outputs) at a time
        conv.in_channels = conv.groups = shape[0] * conv.in_channels // conv.out_channels
        conv.out_channels = shape[0]
    elif conv.transposed:
        conv.in_channels, conv.out_channels = shape[0], shape[1] * conv.groups
    else:
        conv.in_channels, conv.out_channels = shape[1] * conv.groups, shape[0]
    if conv.in_channels % conv.groups or conv.out_channels % conv.groups:
        raise ValueError(f"{name}: {conv.in_channels}->{conv.out_channels} channels do not split into "
                         f"{conv.groups} equal groups")
    if conv.bias is not None and conv.bias.shape[0] != conv.out_channels:
        raise ValueError(f"{name}.bias has {conv.bias.shape[0]} entries for {conv.out_channels} output channels")


def _regroup(conv: nn.modules.conv._ConvNd, name: str, groups: int) -> None:
    """A depthwise-multiplier conv with ``groups`` groups of one input each (a width plan says how many)."""
    rows = conv.weight.shape[0]
    if groups < 1 or rows % groups:
        raise ValueError(f"width plan: {name} has {rows} output channels, which do not split into {groups} groups")
    conv.groups = conv.in_channels = groups
    conv.out_channels = rows


def _fix_linear(linear: nn.Linear, name: str) -> None:
    linear.out_features, linear.in_features = linear.weight.shape
    if linear.bias is not None and linear.bias.shape[0] != linear.out_features:
        raise ValueError(f"{name}.bias has {linear.bias.shape[0]} entries for {linear.out_features} outputs")


def _fix_groupnorm(norm: nn.GroupNorm, name: str) -> None:
    if norm.weight is None:
        return
    channels = _common_size(norm, name, ("weight", "bias"))
    if norm.num_groups == norm.num_channels:
        norm.num_groups = channels  # per-channel normalisation stays per-channel
    elif channels % norm.num_groups:
        raise ValueError(f"{name}: {channels} channels do not split into {norm.num_groups} groups")
    norm.num_channels = channels


def _common_size(module: nn.Module, name: str, attrs: Sequence[str]) -> int:
    sizes = {a: getattr(module, a).shape[0] for a in attrs if getattr(module, a, None) is not None}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: inconsistent channel counts {sizes}")
    return next(iter(sizes.values()))


# ------------------------------------------------------------------------------------ timm model widths

def _head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """timm head blocks (ClassifierHead, NormMlpClassifierHead, ...) that store their input width."""
    return {name: m for name, m in model.named_modules()
            if name and isinstance(getattr(m, "in_features", None), int) and not isinstance(m, nn.Linear)}


def _has_timm_widths(model: nn.Module) -> bool:
    """Whether the model carries any timm width attribute worth re-measuring."""
    return any(hasattr(model, a) for a in ("num_features", "head_hidden_size", "feature_info")) or bool(
        _head_modules(model))


def meta_clone(model: nn.Module) -> nn.Module:
    """Shape-only copy of the model on the meta device (no tensor data is copied)."""
    memo = {}
    for name, tensor in named_tensors(model):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return deepcopy_model(model, memo)


def _measure(model: nn.Module, strict: bool = False) -> Optional[dict[str, tuple]]:
    """Shapes of forward_features, pre-logits, every feature_info module output and head input.

    Runs on a meta clone (free) and falls back to a real forward; ``None`` if neither runs. With ``strict``
    a failing forward is a ValueError naming the module it failed in (an inconsistent width plan).
    """
    errors = []
    on_meta = all(t.is_meta for _, t in named_tensors(model))  # e.g. a base built on meta: measure it as is
    for meta in (True, False):
        target = model if on_meta else meta_clone(model) if meta else model
        try:
            return _shapes(target, meta)
        except _ForwardError as err:
            errors.append(err)
    if strict:
        raise ValueError(f"resized model does not run: {errors[-1]}")
    warnings.warn(f"could not measure timm feature widths ({errors[-1]}); num_features/feature_info left as is")
    return None


class _ForwardError(RuntimeError):
    """A forward pass failed inside a named module."""


def _shapes(model: nn.Module, meta: bool) -> dict[str, tuple]:
    """Run forward_features / forward_head(pre_logits=True) once, recording output and hooked shapes."""
    shapes: dict[str, tuple] = {}
    modules = dict(model.named_modules())
    stack: list[str] = []
    hooks = [m.register_forward_pre_hook(_pusher(stack, n)) for n, m in modules.items()]
    hooks += [m.register_forward_hook(_popper(stack)) for m in modules.values()]
    for i, info in enumerate(_feature_infos(model)):
        if info.get("module") in modules:
            hooks.append(modules[info["module"]].register_forward_hook(_recorder(shapes, f"feature:{i}")))
    for name, head in _head_modules(model).items():
        hooks.append(head.register_forward_hook(_head_recorder(shapes, name)))
    flags = {m: m.training for m in modules.values()}
    x = default_example_input(model)
    try:
        model.eval()
        with torch.no_grad():
            x = x.to("meta") if meta else x
            features = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
            _record(shapes, "features", features)
            if hasattr(model, "forward_head"):
                _record(shapes, "pre_logits", model.forward_head(features, pre_logits=True))
            if any(f"feature:{i}" not in shapes for i in range(len(_feature_infos(model)))):
                _record_intermediates(model, x, shapes, stack)  # e.g. HRNet stages return lists
    except Exception as err:
        raise _ForwardError(f"in module {stack[-1]!r}: {err}" if stack else str(err)) from err
    finally:
        for hook in hooks:
            hook.remove()
        for m, flag in flags.items():
            m.training = flag
    return shapes


def _record_intermediates(model: nn.Module, x: torch.Tensor, shapes: dict, stack: list) -> None:
    """timm's own feature maps (aligned with feature_info), when the model implements them."""
    depth = len(stack)
    try:
        features = model.forward_intermediates(x, intermediates_only=True)
    except Exception:  # not implemented / unsupported options: module hooks are the fallback
        del stack[depth:]
        return
    for i, feature in enumerate(features):
        _record(shapes, f"intermediate:{i}", feature)


def _feature_infos(model: nn.Module) -> list[dict]:
    return [i for i in getattr(model, "feature_info", None) or [] if isinstance(i, dict) and "num_chs" in i]


def _pusher(stack: list, name: str):
    def hook(module, args):
        stack.append(name)
    return hook


def _popper(stack: list):
    def hook(module, args, output):
        stack.pop()
    return hook


def _recorder(shapes: dict, key: str):
    def hook(module, args, output):
        _record(shapes, key, output)
    return hook


def _head_recorder(shapes: dict, name: str):
    """A head's input width (``in_features``) and, under pre_logits=True, its output (``num_features``)."""
    def hook(module, args, output):
        if args:
            _record(shapes, f"head_in:{name}", args[0])
        _record(shapes, f"head_out:{name}", output)
    return hook


def _record(shapes: dict, key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        shapes[key] = tuple(value.shape)


def _channel_dim(shape: Optional[tuple], channels: int) -> Optional[int]:
    """Which dim of ``shape`` holds ``channels``: NCHW dim 1 first, then the last dim (NLC / NHWC)."""
    if not shape:
        return None
    for dim in (1, len(shape) - 1, *range(len(shape))):
        if 0 <= dim < len(shape) and shape[dim] == channels:
            return dim
    return None


def _rescaled(old: Any, key: str, before: dict, after: dict) -> Any:
    """``old`` width re-read at the same dim of the re-measured shape (unchanged if it can't be located)."""
    if not isinstance(old, int) or key not in before or key not in after:
        return old
    dim = _channel_dim(before[key], old)
    return old if dim is None or len(after[key]) != len(before[key]) else after[key][dim]


def _refresh_timm_attrs(model: nn.Module, before: dict, after: dict) -> None:
    """num_features, a token model's embed_dim (reset_classifier builds the classifier on it: the head's input,
    i.e. the pre-logits width, which an attention-pool head's own stream makes differ from the features'),
    head_hidden_size, feature_info num_chs and head in_features/num_features/hidden_size."""
    if hasattr(model, "num_features"):
        model.num_features = _rescaled(model.num_features, "features", before, after)
    if hasattr(model, "embed_dim"):  # the pre-logits width where embed_dim is one of its dims, else the features'
        located = "pre_logits" in before and _channel_dim(before["pre_logits"], model.embed_dim) is not None
        model.embed_dim = _rescaled(model.embed_dim, "pre_logits" if located else "features", before, after)
    if hasattr(model, "head_hidden_size"):
        model.head_hidden_size = _rescaled(model.head_hidden_size, "pre_logits", before, after)
    infos = _feature_infos(model)
    source = "intermediate" if sum(k.startswith("intermediate:") for k in after) == len(infos) else "feature"
    for i, info in enumerate(infos):
        info["num_chs"] = _rescaled(info["num_chs"], f"{source}:{i}", before, after)
    for name, head in _head_modules(model).items():
        head.in_features = _rescaled(head.in_features, f"head_in:{name}", before, after)
        for attr in ("num_features", "hidden_size"):  # the head's pre-logits width
            if getattr(head, attr, None):
                setattr(head, attr, _rescaled(getattr(head, attr), f"head_out:{name}", before, after))
