"""timm attention forwards that reshape the heads' output back to the *input* width, made to follow the heads left.

Many timm attention classes (the ``Slim*`` names below: EVA, BEiT, ViT-RelPos, Swin V2 and V2-CR, CaiT, PVT-v2, Twins,
DaViT, ConViT, NesT, GCViT, CrossViT, MetaFormer (CAFormer), NextViT, timm.layers' DiffAttention, VOLO (its outlook
attention also folds ``C * kernel_size ** 2`` channels back), EdgeNeXt's and XCiT's cross-covariance attention,
timm.layers' LambdaLayer) take a width from their *input* in the forward: they reshape the heads' output back to it
(``x.transpose(1, 2).reshape(B, N, C)`` where ``B, N, C = x.shape``), split heads with ``C // self.num_heads``, or
(PVT-v2, Twins' GSA) flatten the spatial reduction's output with it (``self.sr(x).reshape(B, C, -1)``). A module that
lost a head, or whose input stream or ``sr`` conv lost a channel, then no longer runs. Each gets a *slim* subclass whose
``forward`` (and any method it calls that does the same, e.g. ConViT's ``get_attention``) is timm's own, compiled from
timm's source with a short edit list (``reshape(B, N, C)`` -> ``reshape(B, N, -1)``, ``sr(x).reshape(B, C, -1)`` ->
``sr(x).flatten(2)``, ...): the same computation, with the widths taken from the tensors left. Every edit must match its
expected number of times; when a timm release changed the forward and one does not, the class gets no slim subclass and
:data:`REFUSED` says why (its heads, and its ``sr`` channels, then stay whole).

Nothing in timm is patched: only a resized instance changes class (``module.__class__ = slim``, done by
:func:`chase_timm.heads.refresh_heads`), to a subclass, so ``isinstance`` still holds, parameters (and optimizer
state) are untouched and state_dict keys are unchanged. The subclasses are module-level names here, so deep
copies, pickling and ``torch.compile`` see ordinary classes. :func:`edited` and :func:`register` also serve
:mod:`chase_timm.adapters.multihead`, which registers torch's ``nn.MultiheadAttention`` the same way.
"""
from __future__ import annotations

import inspect
import linecache
import textwrap
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import timm
import torch.nn as nn
from timm.layers import AttentionPoolLatent, DiffAttention, lambda_layer
from timm.models import (beit, cait, coat, convit, crossvit, davit, edgenext, eva, fastvit, gcvit, metaformer, nest,
                         nextvit, pvt_v2,
                         swin_transformer_v2, swin_transformer_v2_cr, twins, vision_transformer_relpos as relpos, volo,
                         xcit)

from . import require

__all__ = ["check_version", "SLIM", "REFUSED", "edited", "slim_subclass", "register", "use_slim_forward",
           "timm_class",
           "SlimEvaAttention", "SlimBeitAttention", "SlimWindowAttentionV2", "SlimClassAttn", "SlimTalkingHeadAttn",
           "SlimCrossCovarianceAttn", "SlimXCA", "SlimPvtV2Attention",
           "SlimGlobalSubSampleAttn", "SlimLocallyGroupedAttn", "SlimChannelAttention",
           "SlimChannelAttentionV2", "SlimDavitWindowAttention", "SlimWindowMultiHeadAttention",
           "SlimRelPosAttention", "SlimGPSA", "SlimMHSA", "SlimNestAttention",
           "SlimWindowAttentionGlobal", "SlimCrossAttention", "SlimVoloAttention",
           "SlimOutlookAttention", "SlimFastVitAttention", "SlimMetaFormerAttention", "SlimNextVitAttention",
           "SlimDiffAttention", "SlimAttentionPoolLatent",
           "SlimLambdaLayer",
           "SlimFactorAttnConvRelPosEnc"]

Edit = tuple[str, str, int]  # (the library's text, replacement, how many times it must occur)

SLIM: dict[type, type] = {}  # timm (or torch) class -> its slim subclass
_BASE: dict[type, type] = {}  # slim subclass -> its timm (or torch) class
REFUSED: dict[type, str] = {}  # timm (or torch) class -> why it has no slim subclass (the library changed its forward)


def check_version(found: str = timm.__version__) -> None:
    """ImportError (one line) unless ``found`` is a timm version this adapter was written for."""
    require("timm", found)


check_version()


def edited(function: Callable, edits: Sequence[Edit], names: Optional[Mapping[str, Any]] = None
           ) -> Union[Callable, str]:
    """``function`` compiled again from its own source with ``edits`` applied, its names resolved in its own
    module (``names`` first: replacements for functions it calls), or why there is none: its source is
    unavailable (a library installed without .py files), an edit does not occur exactly its count of times (the
    library changed the function), or it is a closure or decorated (its source alone would not rebuild it)."""
    where = f"{function.__module__}.{function.__qualname__}"
    library = str(function.__module__).split(".")[0]
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as err:
        return f"the source of {where} is unavailable ({err})"
    if function.__code__.co_freevars or source.lstrip().startswith("@"):
        return f"{where} is a closure or decorated"
    for old, new, count in edits:
        found = source.count(old)
        if found != count:
            return f"{where} holds {old!r} {found} times, not {count} (this {library} changed it)"
        source = source.replace(old, new)
    filename = f"<chase_timm slim version of {where}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show it
    scope = function.__globals__ if names is None else {**function.__globals__, **names}
    namespace: dict = {}
    try:  # no __future__ flags inherited from this file
        exec(compile(source, filename, "exec", dont_inherit=True), scope, namespace)
    except SyntaxError as err:
        return f"{where} does not compile on its own ({err})"
    made = namespace[function.__name__]
    made.__module__, made.__doc__ = __name__, function.__doc__
    return made


def slim_subclass(base: type, name: str, edits: Sequence[Edit], names: Optional[Mapping[str, Any]] = None,
                  module: str = __name__, methods: Optional[Mapping[str, Sequence[Edit]]] = None
                  ) -> Union[type, str]:
    """A subclass of ``base`` named ``name`` (a module-level name of ``module``) whose forward is ``base.forward``
    :func:`edited` with ``edits`` (and ``names``), and each other method named in ``methods`` edited with its edits
    (helpers the forward calls, e.g. ConViT's ``get_attention``), or why there is none (``"has no slim forward:
    ..."``)."""
    if methods and "forward" in methods:
        raise ValueError(f"{name}: give the forward's edits as edits, not in methods")
    body = {}
    for method, method_edits in {"forward": edits, **(methods or {})}.items():
        made = edited(getattr(base, method), method_edits, names)
        if isinstance(made, str):
            return f"has no slim forward: {made}"
        made.__qualname__, made.__module__ = f"{name}.{method}", module
        body[method] = made
    doc = f"{base.__qualname__} running with its resized widths (its forward: the library's, edited)."
    return type(name, (base,), {**body, "__module__": module, "__qualname__": name, "__doc__": doc})


def register(base: type, name: str, edits: Sequence[Edit], names: Optional[Mapping[str, Any]] = None,
             module: str = __name__, methods: Optional[Mapping[str, Sequence[Edit]]] = None) -> Optional[type]:
    """:func:`slim_subclass`, recorded in :data:`SLIM` or (its reason) :data:`REFUSED`; at import only
    (:mod:`chase_timm.heads` reads both once, when it is imported)."""
    made = slim_subclass(base, name, edits, names, module, methods)
    if isinstance(made, str):
        REFUSED[base] = made
        return None
    SLIM[base], _BASE[made] = made, base
    return made


_TO_HEADS = ("reshape(B, N, C)", "reshape(B, N, -1)", 1)
SlimEvaAttention = register(eva.EvaAttention, "SlimEvaAttention", [_TO_HEADS])
SlimBeitAttention = register(beit.Attention, "SlimBeitAttention", [_TO_HEADS])
SlimRelPosAttention = register(relpos.RelPosAttention, "SlimRelPosAttention", [_TO_HEADS])  # vision_transformer_relpos
SlimWindowAttentionV2 = register(swin_transformer_v2.WindowAttention, "SlimWindowAttentionV2",
                                 [("reshape(B_, N, C)", "reshape(B_, N, -1)", 1)])
SlimClassAttn = register(cait.ClassAttn, "SlimClassAttn",
                         [("C // self.num_heads", "-1", 3), ("reshape(B, 1, C)", "reshape(B, 1, -1)", 1)])
SlimTalkingHeadAttn = register(cait.TalkingHeadAttn, "SlimTalkingHeadAttn",  # proj_l / proj_w follow the heads left
                               [("C // self.num_heads", "-1", 1), _TO_HEADS])
SlimCrossCovarianceAttn = register(edgenext.CrossCovarianceAttn, "SlimCrossCovarianceAttn", [_TO_HEADS])
SlimXCA = register(xcit.XCA, "SlimXCA", [("C // self.num_heads", "-1", 1), _TO_HEADS])
# PVT-v2 and Twins' GSA flatten the spatial reduction's output with the input width C, sr(x).reshape(B, C, -1):
# flatten(2) takes the width sr has left (PVT-v2: its sr_ratio > 1 path and its linear_attn pool path)
_SR_WIDTH = "reshape(B, C, -1).permute(0, 2, 1)", "flatten(2).permute(0, 2, 1)"
SlimPvtV2Attention = register(pvt_v2.Attention, "SlimPvtV2Attention", [(*_SR_WIDTH, 2), _TO_HEADS])
# Twins split heads with C // self.num_heads, C being the input width (the kv split already has a -1)
SlimGlobalSubSampleAttn = register(twins.GlobalSubSampleAttn, "SlimGlobalSubSampleAttn",
                                   [("C // self.num_heads", "self.proj.in_features // self.num_heads", 2),
                                    (*_SR_WIDTH, 1), _TO_HEADS])
SlimLocallyGroupedAttn = register(twins.LocallyGroupedAttn, "SlimLocallyGroupedAttn",
                                  [("C // self.num_heads", "-1", 1), ("self.ws, self.ws, C)", "self.ws, self.ws, -1)",
                                   1), ("_w * self.ws, C)", "_w * self.ws, -1)", 1), _TO_HEADS])
# DaViT splits heads with C // self.num_heads too (its channel attention: softmax over each head's channels)
SlimChannelAttention = register(davit.ChannelAttention, "SlimChannelAttention",
                                [("C // self.num_heads", "-1", 1), _TO_HEADS])
SlimChannelAttentionV2 = register(davit.ChannelAttentionV2, "SlimChannelAttentionV2",  # its heads: self.groups
                                  [("C // self.groups", "-1", 1), _TO_HEADS])
SlimDavitWindowAttention = register(davit.WindowAttention, "SlimDavitWindowAttention",
                                    [("C // self.num_heads", "-1", 1), ("reshape(B_, N, C)", "reshape(B_, N, -1)", 1)])
# Swin V2-CR splits heads with C // self.num_heads (C: the input width; its output reshape already has a -1)
SlimWindowMultiHeadAttention = register(swin_transformer_v2_cr.WindowMultiHeadAttention,
                                        "SlimWindowMultiHeadAttention", [("C // self.num_heads", "-1", 1)])

# ConViT (convit): GPSA and MHSA split heads with C // self.num_heads (C: the input width) and reshape their output to
# C; GPSA splits its qk heads in get_attention, which its forward calls; MHSA's get_attention_map (a diagnostic) too
_HEADS_SPLIT = ("C // self.num_heads", "-1", 1)
SlimGPSA = register(convit.GPSA, "SlimGPSA", [_HEADS_SPLIT, _TO_HEADS], methods={"get_attention": [_HEADS_SPLIT]})
SlimMHSA = register(convit.MHSA, "SlimMHSA", [_HEADS_SPLIT, _TO_HEADS], methods={"get_attention_map": [_HEADS_SPLIT]})
# NesT (nest): its Attention splits heads with C // self.num_heads over (B, T, N, C) blocks and reshapes to C
SlimNestAttention = register(nest.Attention, "SlimNestAttention",
                             [_HEADS_SPLIT, ("reshape(B, T, N, C)", "reshape(B, T, N, -1)", 1)])
# GCViT (gcvit): WindowAttentionGlobal reshapes its heads' output to the input width C
SlimWindowAttentionGlobal = register(gcvit.WindowAttentionGlobal, "SlimWindowAttentionGlobal", [_TO_HEADS])
# CrossViT's CrossAttention (separate wq / wk / wv, the class token attends to all tokens) splits heads with the
# input width and reshapes the class token's output to it, as CaiT's ClassAttn
SlimCrossAttention = register(crossvit.CrossAttention, "SlimCrossAttention",
                              [("C // self.num_heads", "-1", 3), ("reshape(B, 1, C)", "reshape(B, 1, -1)", 1)])
# VOLO's Attention (on channels-last maps) splits heads with C // self.num_heads and reshapes to (B, H, W, C); its
# OutlookAttention splits the unfolded v per head likewise and folds C * kernel_size ** 2 channels back
SlimVoloAttention = register(volo.Attention, "SlimVoloAttention",
                             [_HEADS_SPLIT, ("reshape(B, H, W, C)", "reshape(B, H, W, -1)", 1)])
SlimOutlookAttention = register(volo.OutlookAttention, "SlimOutlookAttention",
                                [_HEADS_SPLIT,
                                 ("reshape(B, C * self.kernel_size * self.kernel_size, h * w)", "reshape(B, -1, h * w)",
                                  1)])

# FastViT's Attention (stage 3 of the sa / ma models: NCHW maps flattened to tokens) reshapes its heads' output to
# the input width C before proj (its head split and its proj output, back to (B, C, H, W), already follow the widths)
SlimFastVitAttention = register(fastvit.Attention, "SlimFastVitAttention", [_TO_HEADS])

# MetaFormer's Attention (the token mixer of CAFormer's stages 2-3: heads of head_dim=32) reshapes its heads' output to
# the input width C before proj (its head split reads num_heads and head_dim)
SlimMetaFormerAttention = register(metaformer.Attention, "SlimMetaFormerAttention", [_TO_HEADS])

# NextViT's EfficientAttention (separate q, k, v Linears; k and v read the AvgPool1d spatial reduction) reshapes its
# heads' output to the input width C before proj (its head splits read num_heads and head_dim)
SlimNextVitAttention = register(nextvit.EfficientAttention, "SlimNextVitAttention", [_TO_HEADS])

# timm.layers' DiffAttention (differential attention: vit_dwee / vit_dlittle) reshapes its heads' output (num_heads x
# 2 * head_dim channels) to the input width C before proj
SlimDiffAttention = register(DiffAttention, "SlimDiffAttention", [_TO_HEADS])

# timm.layers' AttentionPoolLatent (the MAP head of global_pool="map" ViTs: SigLIP, PE) reshapes its heads' output for
# its latent queries to the input width C before proj (its head splits already read num_heads and head_dim)
SlimAttentionPoolLatent = register(AttentionPoolLatent, "SlimAttentionPoolLatent",
                                   [("reshape(B, self.latent_len, C)", "reshape(B, self.latent_len, -1)", 1)])

# timm.layers' LambdaLayer (the lambda_resnet models) reshapes its heads' output, num_heads x dim_v channels, to the
# input width C
SlimLambdaLayer = register(lambda_layer.LambdaLayer, "SlimLambdaLayer",
                           [("reshape(B, C, H, W)", "reshape(B, -1, H, W)", 1)])

# CoaT's FactorAttnConvRelPosEnc splits heads with the input width (C // self.num_heads) and reshapes its heads' output
# to it; its shared ConvRelPosEnc reads its widths from q and v and its split sizes from attributes (refresh_heads)
SlimFactorAttnConvRelPosEnc = register(coat.FactorAttnConvRelPosEnc, "SlimFactorAttnConvRelPosEnc",
                                       [_HEADS_SPLIT, _TO_HEADS])


def timm_class(kind: type) -> type:
    """The timm class a slim subclass stands for (any other class as it is)."""
    return _BASE.get(kind, kind)


def use_slim_forward(module: nn.Module) -> None:
    """Switch ``module`` to its slim subclass (same parameters and buffers), if its class has one."""
    slim = SLIM.get(type(module))
    if slim is not None:
        module.__class__ = slim
