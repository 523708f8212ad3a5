"""Attention heads as channel groups: which tensor positions belong to each head of timm's attention modules.

A head is removed whole: its q, k and v rows (with biases and per-row norms), the output projection's columns,
per-head tables (Swin's relative position bias column, the attention-bias row of LeViT, TinyViT and EfficientFormer
V1/V2, the head's slice of the ``rel_pos`` module of MaxViT / CoAtNet / ViT-RelPos: a table column or row, a bias-MLP
output), gate rows, EfficientFormer-V2's depthwise ``v_local`` rows and the head's row, column and bias of CaiT's
head-mixing ``proj_l`` / ``proj_w`` (talking heads; EfficientFormer-V2's ``talking_head1`` / ``talking_head2``).
Zeroing a head's v rows (and v bias) makes its attention output exactly zero whatever q and k (and q_norm / k_norm)
do (DaViT's channel attention, ``softmax(k^T v) q^T``: its q rows), and its projection columns are zero too, so the
masked model computes what the model without the head computes (talking heads: the zeroed ``proj_l`` column keeps its
logits out of the other heads, its zeroed ``proj_l`` row gives it a uniform softmax, which the zeroed ``proj_w``
column keeps out too, and its zeroed ``proj_w`` row and bias zero its attention map), on the fused
``scaled_dot_product_attention`` path and the eager path alike: ``head_dim`` does not change, so neither does the
scale (SDPA's default 1/sqrt(head_dim) and the stored ``self.scale``). Multi-query attention (MobileNetV5's
``MultiQueryAttention2d``) shares one k/v head among its query heads, which stays: a query head is its q rows and
projection columns, and those zeroed columns silence it (its zeroed q rows give it a uniform softmax). The byoanet
models' HaloAttn, BottleneckAttn and LambdaLayer have no projection: the byobnet ``SelfAttnBlock`` around one holds
its heads (their output channels are its ``post_attn`` BatchNorm channels and ``conv3_1x1`` columns); LambdaLayer's
one key and value serve every head, which is its query rows.

EVA, BEiT, ViT-RelPos, Swin V2 (V2-CR splits its heads with it), CaiT's class and talking-heads attention, PVT-v2,
Twins, DaViT, ConViT, NesT, GCViT, CrossViT's cross-attention, MetaFormer's (CAFormer), NextViT's, timm.layers'
DiffAttention, VOLO's self- and outlook attention and the cross-covariance attention of EdgeNeXt and XCiT and
timm.layers' LambdaLayer reshape their heads' output to the input width in timm's forward: resized, they switch to their
slim subclass (:mod:`chase_timm.adapters.attention`: timm's forward with that reshape taken from the heads left), as do
torch's ``nn.MultiheadAttention``, which takes its attention width from the input too
(:mod:`chase_timm.adapters.multihead`), and the ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` holding it
(torch's forward without the inference fast path that bypasses the attention's forward). Other forwards read their
widths from attributes, which :func:`refresh_heads` re-derives (Hiera: ``heads``, ``dim_out``; SAM2's Hiera:
``num_heads``; EfficientFormer: ``num_heads``, ``val_attn_dim``; EfficientFormer-V2: ``num_heads``, ``dh``; MViTv2:
``num_heads``, ``dim_out``; MaxViT / CoAtNet: ``num_heads``, ``dim_head``; MobileNetV5's ``MultiQueryAttention2d``:
``num_heads``; HaloAttn, BottleneckAttn: ``num_heads``, ``dim_out_qk``, ``dim_out_v``; MobileViT-v2's
LinearSelfAttention, whose entries are key / value channel pairs: ``embed_dim``). CoaT's ``FactorAttnConvRelPosEnc``
shares its ``ConvRelPosEnc`` (depthwise convs over v, one per window of heads) with the stage's other attention modules:
its heads go with theirs, in one group per ``ConvRelPosEnc`` named in the model (``HeadSpec.in_model``), and a resize
re-derives its ``channel_splits``. EfficientViT's ``LiteMLA`` reads only ``dim`` and ``-1``; the groups of its
aggregation convs follow its heads (:func:`head_conv_groups`).

Plain structure data: :func:`head_spec` describes a module's heads (or why they must stay), which
:mod:`chase_timm.graph` turns into a channel group with one channel per head; :func:`refresh_heads`, called by
:mod:`chase_timm.slim` on every resize, re-derives a resized module's attributes (``num_heads``, ``attn_dim``, ...)
from its tensor shapes as its class's row of ``_REFRESH`` says (a function for the few that need more).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch.nn as nn
from timm.layers import (Attention, AttentionPoolLatent, AttentionRope, DiffAttention, MultiQueryAttention2d,
                         RelPosBias, RelPosBiasTf, RelPosMlp)
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.layers.lambda_layer import LambdaLayer
from timm.models import (beit, byobnet, cait, coat, convit, crossvit, davit, edgenext, efficientformer,
                         efficientformer_v2, efficientvit_mit, eva, fastvit, gcvit, hiera, hieradet_sam2 as sam2, levit,
                         maxxvit, metaformer, mobilevit, mvitv2, nextvit,
                         nest, pvt_v2, swin_transformer, swin_transformer_v2, swin_transformer_v2_cr as swin_cr,
                         tiny_vit, tnt, twins, visformer, vision_transformer_relpos as relpos,
                         vision_transformer_sam as sam, volo, xcit)

from .adapters import multihead  # noqa: F401  registers nn.MultiheadAttention's slim forward (or why none)
from .adapters.attention import REFUSED, timm_class, use_slim_forward
from .norms import covers

__all__ = ["HeadSlice", "HeadSpec", "head_spec", "has_heads", "heads_resized", "head_conv_groups", "refresh_heads",
           "head_counts", "qkv_as_modules"]

# EfficientFormer-V2: separate q, k, v ConvNorms, a depthwise v_local, per-head attention biases (and talking heads)
_EFFICIENTFORMER_V2 = (efficientformer_v2.Attention2d, efficientformer_v2.Attention2dDownsample)
# torch containers whose inference fast path bypasses their MultiheadAttention's forward: resized, they switch to
# their slim subclass (torch's forward without that fast path), else their attention's heads stay
_CONTAINERS = (nn.TransformerEncoderLayer, nn.TransformerEncoder)
_XCA = (edgenext.CrossCovarianceAttn, xcit.XCA)  # cross-covariance attention: one temperature per head
_DAVIT = (davit.ChannelAttention, davit.WindowAttention)
_PLAIN_LEVIT = (tiny_vit.Attention, efficientformer.Attention)  # LeViT-like with a plain qkv Linear and projection
_LEVIT = (levit.Attention, levit.AttentionDownsample, *_PLAIN_LEVIT)  # q, k, v interleaved per head
_MAXXVIT = (maxxvit.Attention2d, maxxvit.AttentionCl)  # MaxViT, CoAtNet, MaxxViT: NCHW (1x1 convs), channels-last
_REL_POS = (RelPosBias, RelPosBiasTf, RelPosMlp)  # timm.layers' relative position modules (``rel_pos``)
_CONVIT = (convit.GPSA, convit.MHSA)  # ConViT: gated positional self-attention (qk and v apart), plain attention
_BYOA = (HaloAttn, BottleneckAttn, LambdaLayer)  # byoanet's self-attention, inside byobnet's SelfAttnBlock
# LambdaLayer without its slim forward: its block's spec says why its heads stay
_LEFT_WHOLE = {kind: reason for kind, reason in REFUSED.items() if kind not in (*_CONTAINERS, LambdaLayer)}
# modules whose input width is their attention width when their class has no slim forward: the stream feeding
# them stays whole too, and why
_INPUT_TIED = {
    edgenext.CrossCovarianceAttn: "its channels feed EdgeNeXt's CrossCovarianceAttn, which takes its attention width "
                                  "from the input width (reshape(B, N, C)) and softmaxes over each head's channels, "
                                  "so the stream can't lose a channel without the attention losing one",
}
_NARROW_MIXING = ("mixes its heads through fewer channels (proj_l rows) than it has heads, as a width plan of an "
                  "earlier chase_timm release left it, so a head has no mixing row of its own to go with it")
_SHARED_BIAS = ("shares BEiT's model-level relative position bias (use_shared_rel_pos_bias): one table of "
                "(num_heads, N, N) is added in every block, so one block can't lose a head")
_SHARED_REL_POS = ("shares the model-level relative position module (shared_rel_pos, the vit_srelpos models): one "
                   "(num_heads, N, N) bias is added in every block, so one block can't lose a head")


@dataclass(frozen=True)
class HeadSlice:
    """Positions of one tensor (named relative to the attention module) that belong to each head."""

    tensor: str
    dim: int
    role: str  # producer (scored by UMM), bias, norm, consumer or free, as in chase_timm.graph
    index: tuple[tuple[int, ...], ...]  # head h -> positions along ``dim``


@dataclass(frozen=True)
class HeadSpec:
    """An attention module's heads: how many, channels per head (the budget's unit) and their slices."""

    heads: int
    head_dim: int
    slices: tuple[HeadSlice, ...]
    reason: str = ""  # non-empty: the heads must stay, and why
    stream: str = ""  # non-empty: the channels the q/k/v producers read (the input stream) must stay too, and why
    shared: tuple[str, ...] = ()  # convs inside the module that act within head_dim on every head: no group's root
    in_model: bool = False  # the slices and shared layers are named in the model, not the module (CoaT's crpe)


def head_spec(module: nn.Module, model: Optional[nn.Module] = None) -> Optional[HeadSpec]:
    """The heads of a known timm attention module or ``nn.MultiheadAttention`` (``reason`` set when they must stay),
    else ``None``. ``model``: the model holding it, for what only the model knows (BEiT's shared relative position
    bias, the ``nn.TransformerEncoderLayer`` holding a MultiheadAttention)."""
    kind = timm_class(type(module))
    if kind is nn.MultiheadAttention:
        return _multihead(module, model)
    if kind in _LEFT_WHOLE:
        return _left_whole(module, _LEFT_WHOLE[kind])
    if kind in (Attention, AttentionRope, eva.EvaAttention):
        return _timm_attention(module)
    if kind is mobilevit.LinearSelfAttention:
        return _linear_self_attention(module)
    if kind is DiffAttention:  # a head: q, k and v blocks of 2 * head_dim (two q and two k sub-heads, a wide v)
        return _fused(module, 2 * module.head_dim, "" if isinstance(module.norm, nn.Identity) else
                      f"scale_norm ({type(module.norm).__name__}) normalises across all heads, so a zeroed head "
                      "changes the others")
    if kind in (swin_transformer.WindowAttention, swin_transformer_v2.WindowAttention, beit.Attention,
                cait.TalkingHeadAttn, twins.LocallyGroupedAttn, sam.Attention, davit.ChannelAttentionV2, *_DAVIT,
                *_XCA, swin_cr.WindowMultiHeadAttention, hiera.MaskUnitAttention,
                sam2.MultiScaleAttention):  # one fused qkv
        shared = kind is beit.Attention and model is not None and any(
            isinstance(m, beit.RelativePositionBias) for m in model.modules())
        return _fused(module, module.proj.in_features // _num_heads(module), _SHARED_BIAS if shared else "")
    if kind in (pvt_v2.Attention, twins.GlobalSubSampleAttn):  # q and kv
        return _q_kv(module, module.proj.in_features // module.num_heads)
    if kind in (*_MAXXVIT, relpos.RelPosAttention):
        return _rel_pos_attention(module, model)
    if kind in _LEVIT:
        return _levit(module)
    if kind in _EFFICIENTFORMER_V2:
        return _efficientformer_v2(module)
    if kind in (cait.ClassAttn, nextvit.EfficientAttention):  # separate q, k and v projections
        return _class_attention(module)
    if kind in _CONVIT:
        return _convit(module)
    if kind is nest.Attention:
        return _nest(module)
    if kind is mvitv2.MultiScaleAttention:
        return _mvitv2(module)
    if kind is gcvit.WindowAttentionGlobal:
        return _gcvit(module, model)
    if kind is crossvit.CrossAttention:  # CaiT's ClassAttn with wq, wk, wv
        return _class_attention(module, "w")
    if kind in (visformer.Attention, fastvit.Attention, metaformer.Attention):  # a fused qkv (q | k | v blocks):
        return _fused(module, module.head_dim)  # Visformer's 1x1 convs on NCHW maps; FastViT's, CAFormer's Linears
    if kind is volo.Attention:  # a fused qkv on channels-last maps
        return _fused(module, module.proj.in_features // module.num_heads)
    if kind is volo.ClassAttention:  # the class token's q, and kv (k block, then v block) over every token
        return _q_kv(module, module.head_dim)
    if kind is volo.OutlookAttention:
        return _outlook(module)
    if kind is tnt.Attention:
        return _tnt(module)
    if kind is efficientvit_mit.LiteMLA:
        return _lite_mla(module)
    if kind is MultiQueryAttention2d:
        return _multi_query(module)
    if kind is byobnet.SelfAttnBlock and timm_class(type(module.self_attn)) in _BYOA:
        return _self_attn_block(module)
    if kind is AttentionPoolLatent:
        return _attention_pool(module)
    if kind is coat.ConvRelPosEnc and model is not None:
        return _coat(module, model)
    return None


def has_heads(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module (or a torch Transformer container of one) :func:`refresh_heads`
    re-derives after a resize (or refuses: a class this timm or torch gives no slim forward)."""
    kind = timm_class(type(module))
    return kind in _REFRESH or kind in REFUSED


def heads_resized(module: nn.Module, resized: set[nn.Module]) -> bool:
    """Whether resizing the modules in ``resized`` resized ``module``'s attention: one of its modules, or for a torch
    Transformer container, one of a MultiheadAttention inside it (its fast path reads only those with the heads)."""
    if timm_class(type(module)) not in _CONTAINERS:
        return not resized.isdisjoint(module.modules())
    return any(not resized.isdisjoint(m.modules()) for m in module.modules()
               if timm_class(type(m)) is nn.MultiheadAttention)


def head_conv_groups(module: nn.Module) -> dict[nn.Module, int]:
    """Grouped convs inside a (resized) attention module whose group count follows its heads, with that count:
    EfficientViT's LiteMLA aggregation 1x1 convs, three groups (q, k, v) of ``dim`` channels per head. Their weight's
    shape can't tell losing whole groups from losing channels in every group, so a resize sets these first."""
    if timm_class(type(module)) is not efficientvit_mit.LiteMLA:
        return {}
    groups = 3 * _lite_mla_heads(module)
    return {branch[1]: groups for branch in module.aggreg}


def refresh_heads(module: nn.Module, name: str = "attention") -> None:
    """Re-derive a (resized) attention module's head attributes from its tensor shapes; ValueError if they
    disagree. ``head_dim`` and ``scale`` never change (whole heads only); other modules are left alone. A module
    whose timm forward reshapes to the input width switches to its slim subclass (same tensors), whose output
    width follows the heads left; so does an ``nn.MultiheadAttention``, and a torch Transformer encoder (layer)
    holding one that lost heads switches to torch's forward without its fast path (call it on a container only
    then: see :func:`heads_resized`)."""
    kind = timm_class(type(module))
    if kind in REFUSED:  # a width plan made where the class had a slim forward, replayed where it has none
        raise ValueError(f"{name}: {kind.__name__} {REFUSED[kind]}, so it cannot run with the widths it was "
                         f"saved with; load it with the {kind.__module__.split('.')[0]} release it was saved with")
    if kind not in _REFRESH:
        return
    how = _REFRESH[kind]
    if isinstance(how, _Refresh):
        _refresh(module, name, how)
    elif how is not None:  # None: a torch Transformer container, which only switches forward
        how(module, name)
    use_slim_forward(module)


@dataclass(frozen=True)
class _Refresh:
    """Where an attention class's head attributes come from (a row of ``_REFRESH``, read by :func:`_refresh`)."""

    head_dim: str = "head_dim"  # attribute holding head_dim ("scale": only head_dim ** -0.5 is kept)
    count: str = "num_heads"  # attribute set to the head count: the projection's columns // head_dim
    count_from: Optional[tuple[str, int]] = None  # (tensor, dim): the head count is its size there instead
    rows: tuple[tuple[str, int], ...] = (("qkv", 3),)  # (layer, m): its rows are m x the projection's columns
    per_head: tuple[str, ...] = ()  # tensors with one row per head
    widths: tuple[tuple[str, str, int], ...] = ()  # (attribute, tensor, dim): set to the tensor's size there


def _refresh(module: nn.Module, name: str, how: _Refresh) -> None:
    """Set ``module``'s head count and widths from its tensors as ``how`` says; check its q/k/v and per-head rows."""
    width = _columns(module.proj)  # the heads' width
    if how.count_from is None:
        head_dim = _scale_head_dim(module) if how.head_dim == "scale" else getattr(module, how.head_dim)
        heads = _heads(name, width, head_dim)
    else:
        heads = module.get_parameter(how.count_from[0]).shape[how.count_from[1]]
        _check(name, "proj columns", width, width // max(heads, 1) * heads)
    setattr(module, how.count, heads)
    for attribute, tensor, dim in how.widths:
        setattr(module, attribute, module.get_parameter(tensor).shape[dim])
    for layer, times in how.rows:
        _check(name, f"{layer} rows", _rows(getattr(module, layer)), times * width)
    for tensor in how.per_head:
        _check(name, f"{tensor} rows", module.get_parameter(tensor).shape[0], heads)
    if isinstance(getattr(module, "rel_pos", None), _REL_POS):
        _refresh_rel_pos(module.rel_pos, name, heads)


def _refresh_rel_pos(rel_pos: nn.Module, name: str, heads: int) -> None:
    """A relative position module's head count and bias shape (read by its ``get_bias``) from its resized table or
    bias MLP's last layer."""
    if isinstance(rel_pos, RelPosBiasTf):  # table (heads, vocab_h, vocab_w)
        _check(name, "rel_pos table rows", rel_pos.relative_position_bias_table.shape[0], heads)
        rel_pos.num_heads, rel_pos.bias_shape = heads, (heads, *rel_pos.bias_shape[1:])
        return
    if isinstance(rel_pos, RelPosMlp):
        _check(name, "rel_pos.mlp.fc2 rows", _rows(rel_pos.mlp.fc2), heads)
        rel_pos.num_heads = heads
    else:  # RelPosBias: table (positions, heads)
        _check(name, "rel_pos table columns", rel_pos.relative_position_bias_table.shape[1], heads)
    rel_pos.bias_shape = (*rel_pos.bias_shape[:2], heads)


def _refresh_timm_attention(module: nn.Module, name: str) -> None:
    """timm.layers' Attention / AttentionRope (and its k/v heads) and EVA's EvaAttention: fused or separate q/k/v."""
    kind = timm_class(type(module))
    attn_dim = module.proj.in_features
    module.num_heads = _heads(name, attn_dim, module.head_dim)
    if kind is not eva.EvaAttention:
        module.attn_dim = attn_dim
    if kind is AttentionRope:
        module.kv_dim = attn_dim if module.qkv is not None else module.k_proj.out_features
        module.num_kv_heads = _heads(name, module.kv_dim, module.head_dim)
        if module.qkv is None:
            _check(name, "v rows", module.v_proj.out_features, module.kv_dim)
        _check(name, "query heads (a multiple of its k/v heads)",
               module.num_heads // module.num_kv_heads * module.num_kv_heads, module.num_heads)
        module.num_kv_groups = module.num_heads // module.num_kv_heads
    q_rows = module.qkv.out_features // 3 if module.qkv is not None else module.q_proj.out_features
    _check(name, "q/k/v rows", q_rows, attn_dim)


def _refresh_talking_heads(module: nn.Module, name: str) -> None:
    """CaiT's TalkingHeadAttn: a fused qkv, and proj_l / proj_w mixing the heads before / after the softmax."""
    _refresh(module, name, _SCALED)
    _check(name, "proj_l columns", _columns(module.proj_l), module.num_heads)
    _check(name, "proj_w rows", _rows(module.proj_w), module.num_heads)
    # the mixed width between them may be narrower (plans of releases that removed proj_l rows as a channel group)
    if _columns(module.proj_w) != _rows(module.proj_l):
        raise ValueError(f"{name}: proj_w columns ({_columns(module.proj_w)}) do not match proj_l rows "
                         f"({_rows(module.proj_l)}); a mixed head is removed from both")


def _refresh_outlook(module: nn.Module, name: str) -> None:
    """VOLO's OutlookAttention: ``v`` rows, and ``kernel_size ** 4`` rows of ``attn`` (attention weights) per head."""
    _refresh(module, name, _Refresh(head_dim="scale", rows=(("v", 1),)))
    _check(name, "attn rows", _rows(module.attn), module.num_heads * module.kernel_size ** 4)


def _refresh_gcvit(module: nn.Module, name: str) -> None:
    """GCViT's WindowAttentionGlobal: a global block's qkv computes k and v only (its q comes from the stage)."""
    _refresh(module, name, _Refresh(rows=(("qkv", 2 if module.use_global else 3),)))


def _refresh_diff(module: nn.Module, name: str) -> None:
    """timm.layers' DiffAttention: ``num_heads`` from the projection's columns, 2 * head_dim per head."""
    module.num_heads = _heads(name, _columns(module.proj), 2 * module.head_dim)
    _check(name, "qkv rows", _rows(module.qkv), 3 * _columns(module.proj))


def _refresh_linear_self_attention(module: nn.Module, name: str) -> None:
    """MobileViT-v2's LinearSelfAttention: ``embed_dim`` (its split sizes) from ``out_proj``'s input channels."""
    module.embed_dim = module.out_proj.in_channels
    _check(name, "qkv_proj rows", _rows(module.qkv_proj), 1 + 2 * module.embed_dim)


def _refresh_tnt(module: nn.Module, name: str) -> None:
    """TNT's Attention: ``num_heads`` and ``hidden_dim`` from qk (q and k heads); v's heads may be wider."""
    module.num_heads = _heads(name, _rows(module.qk) // 2, module.head_dim)
    module.hidden_dim = _rows(module.qk) // 2
    _check(name, "v rows", _rows(module.v), _columns(module.proj))
    if _rows(module.v) % module.num_heads:
        raise ValueError(f"{name}: v rows ({_rows(module.v)}) are not {module.num_heads} whole heads")


def _refresh_multihead(module: nn.Module, name: str) -> None:
    """torch's nn.MultiheadAttention: ``num_heads``; embed_dim, kdim and vdim are the input widths, which stay."""
    module.num_heads = _heads(name, module.out_proj.in_features, module.head_dim)
    layers = ("in_proj_weight",) if module.in_proj_weight is not None else tuple(f"{p}_proj_weight" for p in "qkv")
    rows = sum(getattr(module, t).shape[0] for t in layers)
    _check(name, "q/k/v rows", rows, 3 * module.out_proj.in_features)
    if module.in_proj_bias is not None:
        _check(name, "q/k/v bias", module.in_proj_bias.shape[0], rows)


def _refresh_levit(module: nn.Module, name: str) -> None:
    """LeViT's, TinyViT's and EfficientFormer's attention: heads from ``attention_biases``, q/k/v interleaved."""
    kind = timm_class(type(module))
    heads = module.attention_biases.shape[0]
    module.num_heads = heads
    module.attention_bias_cache = {}  # eval-mode cache of the old (num_heads, N, N) biases
    per_head = module.val_dim + module.key_dim * (1 if kind is levit.AttentionDownsample else 2)
    if kind is tiny_vit.Attention:  # out_dim: the heads' output width
        module.out_dim = module.val_dim * heads
    else:  # EfficientFormer's forward reshapes its heads' output to val_attn_dim
        module.key_attn_dim, module.val_attn_dim = module.key_dim * heads, module.val_dim * heads
    if kind in _PLAIN_LEVIT:
        qkv, proj = module.qkv, module.proj
    else:
        qkv = (module.qkv if kind is levit.Attention else module.kv).linear
        proj = module.proj.ln.linear
    _check(name, "qkv rows", _rows(qkv), heads * per_head)
    _check(name, "proj columns", _columns(proj), module.val_dim * heads)


def _refresh_efficientformer_v2(module: nn.Module, name: str) -> None:
    """EfficientFormer-V2: heads from ``attention_biases``; ``dh`` (the heads' value width its forward reshapes to)."""
    heads = module.attention_biases.shape[0]
    module.num_heads, module.dh = heads, module.d * heads  # d: one head's value width
    module.attention_bias_cache = {}  # eval-mode cache of the old (num_heads, N2, N) biases
    q = module.q.proj if timm_class(type(module)) is efficientformer_v2.Attention2dDownsample else module.q
    for what, actual, expected in (("q rows", _rows(q.conv), module.key_dim * heads),
                                   ("k rows", _rows(module.k.conv), module.key_dim * heads),
                                   ("v rows", _rows(module.v.conv), module.dh),
                                   ("v_local rows", _rows(module.v_local.conv), module.dh),
                                   ("proj columns", _columns(module.proj.conv), module.dh)):
        _check(name, what, actual, expected)
    for mixing in (getattr(module, f"talking_head{i}", None) for i in (1, 2)):
        if mixing is not None:
            _check(name, "talking-head rows", _rows(mixing), heads)
            _check(name, "talking-head columns", _columns(mixing), heads)



def _refresh_lite_mla(module: nn.Module, name: str) -> None:
    """EfficientViT's LiteMLA: its forward reads only ``dim`` (one head's q, k or v) and reshapes with -1, so this
    only checks every scale's rows, the grouped convs' groups (three per head) and the proj columns."""
    heads = _heads(name, _rows(module.qkv.conv), 3 * module.dim)
    width = 3 * module.dim * heads
    for i, (spatial, grouped) in enumerate(module.aggreg):
        _check(name, f"aggreg.{i} depthwise rows", _rows(spatial), width)
        _check(name, f"aggreg.{i} grouped rows", _rows(grouped), width)
        _check(name, f"aggreg.{i} groups (three per head)", grouped.groups, 3 * heads)
    _check(name, "proj columns", _columns(module.proj.conv), (1 + len(module.aggreg)) * module.dim * heads)


def _refresh_halo(module: nn.Module, name: str) -> None:
    """HaloAttn: ``num_heads``, ``dim_out_qk`` and ``dim_out_v`` (read by its forward) from the q rows and kv rows
    (each head's k rows, then its v rows)."""
    module.num_heads = _heads(name, _rows(module.q), module.dim_head_qk)
    module.dim_out_qk, module.dim_out_v = _rows(module.q), module.num_heads * module.dim_head_v
    _check(name, "kv rows", _rows(module.kv), module.dim_out_qk + module.dim_out_v)


def _refresh_bottleneck(module: nn.Module, name: str) -> None:
    """BottleneckAttn: ``num_heads``, ``dim_out_qk`` and ``dim_out_v`` (read by its forward) from the qkv rows
    (q | k | v blocks)."""
    module.num_heads = _heads(name, _rows(module.qkv), 2 * module.dim_head_qk + module.dim_head_v)
    module.dim_out_qk, module.dim_out_v = module.num_heads * module.dim_head_qk, module.num_heads * module.dim_head_v


def _refresh_lambda(module: nn.Module, name: str) -> None:
    """LambdaLayer: ``num_heads`` (read by its forward) from the query rows of ``qkv`` (``dim_qk`` per head, then the
    shared k and v rows) and ``norm_q``'s channels."""
    module.num_heads = _heads(name, _rows(module.qkv) - module.dim_qk - module.dim_v, module.dim_qk)
    _check(name, "norm_q channels", module.norm_q.weight.shape[0], module.num_heads * module.dim_qk)


def _refresh_attention_pool(module: nn.Module, name: str) -> None:
    """timm.layers' AttentionPoolLatent (the MAP pool): ``q`` projects its latent queries, a ``kv`` projection; one
    without ``q`` or ``proj`` keeps its heads (:func:`_attention_pool`), so only its ``kv`` rows are checked."""
    if isinstance(module.q, nn.Linear) and isinstance(module.proj, nn.Linear):
        _refresh(module, name, _Refresh(rows=_Q_KV))
    else:
        _check(name, "kv rows", _rows(module.kv), 2 * module.num_heads * module.head_dim)


def _refresh_multi_query(module: nn.Module, name: str) -> None:
    """MultiQueryAttention2d: ``num_heads`` from the query rows (``key_dim`` each; the shared k/v head stays);
    its forward reads num_heads, key_dim and value_dim."""
    module.num_heads = _heads(name, _rows(module.query.proj), module.key_dim)
    _check(name, "output.proj columns", _columns(module.output.proj), module.num_heads * module.value_dim)


def _refresh_coat(module: nn.Module, name: str) -> None:
    """CoaT's FactorAttnConvRelPosEnc: ``num_heads`` (a fused qkv, head_dim from the scale), and its shared
    ``crpe``'s ``channel_splits`` / ``head_splits`` / ``window`` (read by its forward's split) from the widths of its
    depthwise convs, one per window, which must hold whole heads and all the heads left."""
    _refresh(module, name, _SCALED)
    crpe, head_dim = module.crpe, _scale_head_dim(module)
    widths = [conv.out_channels for conv in crpe.conv_list]
    _check(name, "crpe conv channels", sum(widths), module.num_heads * head_dim)
    if any(w % head_dim or w == 0 for w in widths):
        raise ValueError(f"{name}: crpe conv widths {widths} are not whole {head_dim}-channel heads, at least one "
                         "per window")
    crpe.channel_splits, crpe.head_splits = widths, [w // head_dim for w in widths]
    crpe.window = {conv.kernel_size[0]: w // head_dim for conv, w in zip(crpe.conv_list, widths)}


_SCALED = _Refresh(head_dim="scale")  # a fused qkv; head_dim from the scale
_Q_KV = (("q", 1), ("kv", 2))  # a q projection and a kv projection (k block, then v block)
_DIM_IS_OUTPUT = (("dim", "proj.weight", 0),)  # dim: the input width, which the projection gives back
_DIM_OUT = (("dim", "qkv.weight", 1), ("dim_out", "proj.weight", 1))  # dim_out: the heads' width (Hiera, SAM2)
# how refresh_heads re-derives each class: a table row, a function for the special ones, None for torch's
# Transformer containers. The classes whose timm forward reshapes the heads' output to the input width are resizable
# through their slim subclass (chase_timm.adapters.attention, SLIM) and refused where this timm's forward did not
# match its edits (REFUSED)
_REFRESH: dict[type, Union[_Refresh, Callable[[nn.Module, str], None], None]] = {
    **dict.fromkeys((Attention, AttentionRope, eva.EvaAttention), _refresh_timm_attention),
    swin_transformer.WindowAttention: _Refresh(count_from=("relative_position_bias_table", 1)),
    swin_transformer_v2.WindowAttention: _Refresh(count_from=("logit_scale", 0), per_head=("cpb_mlp.2.weight",),
                                                  widths=(("dim", "qkv.weight", 1),)),
    swin_cr.WindowMultiHeadAttention: _Refresh(count_from=("logit_scale", 0), per_head=("meta_mlp.fc2.weight",),
                                               widths=(("in_features", "qkv.weight", 1),)),  # the input width
    hiera.MaskUnitAttention: _Refresh(count="heads", widths=_DIM_OUT),
    sam2.MultiScaleAttention: _Refresh(head_dim="scale", widths=_DIM_OUT),
    davit.ChannelAttentionV2: _Refresh(count="groups"),
    davit.ChannelAttention: _SCALED,
    davit.WindowAttention: _Refresh(head_dim="scale", widths=_DIM_IS_OUTPUT),
    beit.Attention: _SCALED,
    cait.ClassAttn: _Refresh(head_dim="scale", rows=(("q", 1), ("k", 1), ("v", 1))),
    cait.TalkingHeadAttn: _refresh_talking_heads,
    twins.LocallyGroupedAttn: _Refresh(head_dim="scale", widths=_DIM_IS_OUTPUT),
    twins.GlobalSubSampleAttn: _Refresh(head_dim="scale", rows=_Q_KV, widths=_DIM_IS_OUTPUT),
    sam.Attention: _Refresh(),
    relpos.RelPosAttention: _Refresh(),
    **dict.fromkeys(_MAXXVIT, _Refresh(head_dim="dim_head")),
    pvt_v2.Attention: _Refresh(rows=_Q_KV, widths=_DIM_IS_OUTPUT),
    crossvit.CrossAttention: _Refresh(head_dim="scale", rows=(("wq", 1), ("wk", 1), ("wv", 1))),
    visformer.Attention: _Refresh(widths=(("dim", "qkv.weight", 1),)),
    volo.Attention: _SCALED,
    volo.OutlookAttention: _refresh_outlook,
    volo.ClassAttention: _Refresh(rows=_Q_KV),
    AttentionPoolLatent: _refresh_attention_pool,
    fastvit.Attention: _Refresh(),
    metaformer.Attention: _Refresh(widths=(("attention_dim", "proj.weight", 1),)),  # attention_dim: the heads' width
    nextvit.EfficientAttention: _Refresh(rows=(("q", 1), ("k", 1), ("v", 1)), widths=(("dim", "proj.weight", 1),)),
    tnt.Attention: _refresh_tnt,
    DiffAttention: _refresh_diff,
    mobilevit.LinearSelfAttention: _refresh_linear_self_attention,
    **dict.fromkeys(_XCA, _Refresh(count_from=("temperature", 0))),
    convit.MHSA: _SCALED,
    convit.GPSA: _Refresh(head_dim="scale", rows=(("qk", 2), ("v", 1)), per_head=("gating_param", "pos_proj.weight"),
                          widths=(("dim", "qk.weight", 1),)),  # dim: the input width, read by its local_init
    nest.Attention: _SCALED,
    gcvit.WindowAttentionGlobal: _refresh_gcvit,
    mvitv2.MultiScaleAttention: _Refresh(widths=(("dim_out", "proj.weight", 1),)),
    **dict.fromkeys(_LEVIT, _refresh_levit),
    **dict.fromkeys(_EFFICIENTFORMER_V2, _refresh_efficientformer_v2),
    efficientvit_mit.LiteMLA: _refresh_lite_mla,
    MultiQueryAttention2d: _refresh_multi_query,
    HaloAttn: _refresh_halo,
    BottleneckAttn: _refresh_bottleneck,
    LambdaLayer: _refresh_lambda,
    coat.FactorAttnConvRelPosEnc: _refresh_coat,
    nn.MultiheadAttention: _refresh_multihead,
    **dict.fromkeys(_CONTAINERS),
}


def head_counts(model: nn.Module) -> dict[str, int]:
    """``num_heads`` of every attention module :func:`head_spec` knows, by module name (e.g. heads left per block),
    and of every CoaT attention (its heads are in the spec of the ``crpe`` it shares, named in the model);
    MobileViT-v2's LinearSelfAttention counts its key / value channel pairs."""
    return {name: _num_heads(m) for name, m in model.named_modules()
            if head_spec(m) is not None or timm_class(type(m)) is coat.FactorAttnConvRelPosEnc}


@contextmanager
def qkv_as_modules(model: nn.Module) -> Iterator[None]:
    """While a trace runs: attention modules that compute their fused qkv as ``F.linear(x, qkv.weight,
    cat(q_bias, k_bias, v_bias))`` (EVA, BEiT, Swin V2) take timm's own ``qkv_bias_separate`` path instead,
    ``self.qkv(x) + cat(...)``, the same sum, so torch-pruning sees the qkv Linear (it reads a bare ``F.linear``
    weight as an elementwise op and would carry the input channels onto the heads' outputs)."""
    fused = [m for m in model.modules() if getattr(m, "qkv_bias_separate", None) is False
             and getattr(m, "q_bias", None) is not None and isinstance(getattr(m, "qkv", None), nn.Linear)]
    for module in fused:
        module.qkv_bias_separate = True
    try:
        yield
    finally:
        for module in fused:
            module.qkv_bias_separate = False


# ------------------------------------------------------------------------------------------------- specs

def _blocks(heads: int, size: int, offset: int = 0, stride: int = 0) -> tuple[tuple[int, ...], ...]:
    """Head h -> ``size`` consecutive positions from ``offset + h * (stride or size)``."""
    step = stride or size
    return tuple(tuple(range(offset + h * step, offset + h * step + size)) for h in range(heads))


def _cat(*parts: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(sum(per_head, ()) for per_head in zip(*parts))


def _linear_slices(prefix: str, layer: Optional[nn.Module], index: tuple, role: str = "producer") -> list[HeadSlice]:
    """Weight rows (+ bias) of a Linear/1x1 conv producing the heads' positions ``index``."""
    if layer is None:
        return []
    out = [HeadSlice(f"{prefix}.weight", 0, role, index)]
    if getattr(layer, "bias", None) is not None:
        out.append(HeadSlice(f"{prefix}.bias", 0, "bias", index))
    return out


def _qkv_rows(heads: int, hd: int) -> tuple[tuple[int, ...], ...]:
    """A fused qkv's rows of each head: q, k and v blocks of ``heads * hd`` rows."""
    return _cat(*(_blocks(heads, hd, i * heads * hd) for i in range(3)))


def _qkv_biases(module: nn.Module, heads: int, hd: int) -> list[HeadSlice]:
    """Separate q/k/v biases of a bias-free fused qkv (``q_bias``, ``v_bias`` and the zero buffer ``k_bias``)."""
    return [HeadSlice(f"{p}_bias", 0, "bias", _blocks(heads, hd)) for p in "qkv"
            if getattr(module, f"{p}_bias", None) is not None]


def _timm_attention(module: nn.Module) -> HeadSpec:
    """timm.layers Attention / AttentionRope and EVA's EvaAttention: fused qkv (q | k | v blocks, EVA's biases
    apart) or separate q/k/v projections. With grouped-query attention (query head h reads k/v head
    h // num_kv_groups) one entry is a k/v head with its query heads: ``num_kv_groups * head_dim`` channels."""
    hd, groups = module.head_dim, getattr(module, "num_kv_groups", 1)
    heads = module.num_heads // groups
    per_head = _blocks(heads, hd * groups)  # the query heads' channels of each entry
    if module.qkv is not None:
        slices = _linear_slices("qkv", module.qkv, _qkv_rows(heads, hd)) + _qkv_biases(module, heads, hd)
    else:
        kv = _blocks(heads, hd)
        slices = [s for p, index in (("q_proj", per_head), ("k_proj", kv), ("v_proj", kv))
                  for s in _linear_slices(p, getattr(module, p), index)]
    slices += _linear_slices("gate", module.gate, per_head)
    slices.append(HeadSlice("proj.weight", 1, "consumer", per_head))
    # scale_norm (EVA-02 CLIP, BEiT3): a covered norm computes over the alive heads' channels (chase_timm.norms)
    slices += [HeadSlice(f"norm.{t}", 0, "norm", per_head) for t in ("weight", "bias")
               if isinstance(getattr(module.norm, t, None), nn.Parameter)]
    reason = ""
    if heads == 1 and groups > 1:
        reason = "multi-query attention: one key/value head serves every query head, so no head can go alone"
    elif not isinstance(module.norm, nn.Identity) and not covers(module.norm):
        reason = (f"scale_norm ({type(module.norm).__name__}) normalises across all heads, so a zeroed head "
                  "changes the others")
    return HeadSpec(heads, hd * groups, tuple(slices), reason)


def _multihead(module: nn.MultiheadAttention, model: Optional[nn.Module]) -> HeadSpec:
    """torch's nn.MultiheadAttention: the packed ``in_proj_weight`` (q | k | v blocks) or separate
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (kdim/vdim), ``in_proj_bias`` (q | k | v), ``bias_k`` and
    ``bias_v`` (add_bias_kv: the last dim is the attention width), ``out_proj`` columns."""
    heads = module.num_heads
    hd = module.out_proj.in_features // heads
    per_head, qkv = _blocks(heads, hd), _qkv_rows(heads, hd)
    if module.in_proj_weight is not None:
        slices = [HeadSlice("in_proj_weight", 0, "producer", qkv)]
    else:
        slices = [HeadSlice(f"{p}_proj_weight", 0, "producer", per_head) for p in "qkv"]
    if module.in_proj_bias is not None:
        slices.append(HeadSlice("in_proj_bias", 0, "bias", qkv))
    slices += [HeadSlice(f"bias_{p}", 2, "bias", per_head) for p in "kv" if getattr(module, f"bias_{p}") is not None]
    slices.append(HeadSlice("out_proj.weight", 1, "consumer", per_head))
    reason = f"MultiheadAttention {REFUSED[nn.MultiheadAttention]}" if nn.MultiheadAttention in REFUSED else ""
    container = next((m for m in (model.modules() if model is not None else ()) if isinstance(m, _CONTAINERS)
                      and timm_class(type(m)) in REFUSED and any(c is module for c in m.modules())), None)
    if container is not None and not reason:  # its fast path reads the tensors with embed_dim // num_heads
        reason = f"is inside {type(container).__name__}, which {REFUSED[timm_class(type(container))]}"
    return HeadSpec(heads, hd, tuple(slices), reason)


def _fused(module: nn.Module, hd: int, reason: str = "") -> HeadSpec:
    """A fused qkv (with its bias or separate q/k/v biases) and a projection, plus per-head tables: Swin's
    relative position bias column (V1) or logit scale and bias-MLP output row (V2; V2-CR: its weight and bias),
    BEiT's relative position bias column, the temperature of EdgeNeXt's and XCiT's cross-covariance attention, the
    row, column and bias of CaiT's head-mixing proj_l / proj_w (Twins' LocallyGroupedAttn, DaViT's two classes,
    Hiera, SAM2's Hiera: none; SAM's rel_pos_h / rel_pos_w are (positions, head_dim), read by every head: they
    stay)."""
    heads = _num_heads(module)
    slices = _linear_slices("qkv", module.qkv, _qkv_rows(heads, hd)) + _qkv_biases(module, heads, hd)
    slices.append(HeadSlice("proj.weight", 1, "consumer", _blocks(heads, hd)))
    one = _blocks(heads, 1)
    if getattr(module, "relative_position_bias_table", None) is not None:
        slices.append(HeadSlice("relative_position_bias_table", 1, "free", one))
    if isinstance(module, swin_transformer_v2.WindowAttention):
        slices += [HeadSlice("logit_scale", 0, "free", one),
                   HeadSlice(f"cpb_mlp.{len(module.cpb_mlp) - 1}.weight", 0, "free", one)]
    if isinstance(module, swin_cr.WindowMultiHeadAttention):
        slices += [HeadSlice("logit_scale", 0, "free", one),
                   *(HeadSlice(f"meta_mlp.fc2.{t}", 0, "free", one) for t in ("weight", "bias")
                     if getattr(module.meta_mlp.fc2, t, None) is not None)]
    if isinstance(module, _XCA):
        slices.append(HeadSlice("temperature", 0, "free", one))
    if isinstance(module, cait.TalkingHeadAttn):
        if _rows(module.proj_l) != heads:  # fewer mixed heads than heads: a plan of an earlier release
            return HeadSpec(heads, hd, tuple(slices), _NARROW_MIXING)
        slices += _mixing(("proj_l", "proj_w"), one)
    return HeadSpec(heads, hd, tuple(slices), reason)


def _rel_pos_attention(module: nn.Module, model: Optional[nn.Module]) -> HeadSpec:
    """maxxvit's Attention2d / AttentionCl (MaxViT, CoAtNet, MaxxViT) and vision_transformer_relpos' RelPosAttention:
    a fused qkv (maxxvit with ``head_first``: each head's ``[q k v]`` rows together, else q | k | v blocks), the
    projection's columns, and the head's slice of its ``rel_pos``: column ``h`` of RelPosBias' table, row ``h`` of
    RelPosBiasTf's, row (and bias) ``h`` of RelPosMlp's last Linear (``mlp.fc2``)."""
    heads, hd = module.num_heads, _columns(module.proj) // module.num_heads
    rows = _blocks(heads, 3 * hd) if getattr(module, "head_first", False) else _qkv_rows(heads, hd)
    slices = _linear_slices("qkv", module.qkv, rows)
    slices.append(HeadSlice("proj.weight", 1, "consumer", _blocks(heads, hd)))
    one, rel_pos, reason = _blocks(heads, 1), module.rel_pos, ""
    if isinstance(rel_pos, RelPosMlp):
        slices += [HeadSlice(f"rel_pos.mlp.fc2.{t}", 0, "free", one) for t in ("weight", "bias")
                   if getattr(rel_pos.mlp.fc2, t, None) is not None]
    elif isinstance(rel_pos, _REL_POS):
        slices.append(HeadSlice("rel_pos.relative_position_bias_table", int(isinstance(rel_pos, RelPosBias)), "free",
                                one))
    elif rel_pos is not None:
        reason = f"its rel_pos ({type(rel_pos).__name__}) is not one of timm's per-head relative position modules"
    if model is not None and any(isinstance(getattr(m, "shared_rel_pos", None), nn.Module) for m in model.modules()):
        reason = _SHARED_REL_POS
    return HeadSpec(heads, hd, tuple(slices), reason)


def _convit(module: nn.Module) -> HeadSpec:
    """ConViT's GPSA: a qk projection (q | k blocks) and a v projection, the projection's columns, and per head one
    row (and bias) of ``pos_proj`` (its positional attention logits) and one ``gating_param`` (the mix of patch and
    positional attention); MHSA: a fused qkv and the projection."""
    heads = module.num_heads
    hd = _columns(module.proj) // heads
    per_head, one = _blocks(heads, hd), _blocks(heads, 1)
    if timm_class(type(module)) is convit.MHSA:
        slices = _linear_slices("qkv", module.qkv, _qkv_rows(heads, hd))
    else:
        slices = _linear_slices("qk", module.qk, _cat(per_head, _blocks(heads, hd, heads * hd)))
        slices += _linear_slices("v", module.v, per_head)
        slices += [HeadSlice("pos_proj.weight", 0, "free", one), HeadSlice("gating_param", 0, "free", one)]
        slices += [HeadSlice("pos_proj.bias", 0, "bias", one)] if module.pos_proj.bias is not None else []
    slices.append(HeadSlice("proj.weight", 1, "consumer", per_head))
    return HeadSpec(heads, hd, tuple(slices))


def _nest(module: nn.Module) -> HeadSpec:
    """NesT's Attention: a fused qkv (q | k | v blocks); its forward orders the heads' output (head_dim, heads), so
    head h's projection columns are h, h + heads, h + 2 * heads, ..."""
    heads = module.num_heads
    hd = _columns(module.proj) // heads
    slices = _linear_slices("qkv", module.qkv, _qkv_rows(heads, hd))
    interleaved = tuple(tuple(range(h, heads * hd, heads)) for h in range(heads))
    slices.append(HeadSlice("proj.weight", 1, "consumer", interleaved))
    return HeadSpec(heads, hd, tuple(slices))


def _mvitv2(module: nn.Module) -> HeadSpec:
    """MViTv2's MultiScaleAttention: a fused qkv (q | k | v blocks) and the projection's columns. Its pooling convs
    and norms (``mode="conv"``: ``head_dim`` channels, run on every head) and ``rel_pos_h`` / ``rel_pos_w``
    ((positions, ``head_dim``)) are shared by the heads and stay; ``conv_unshared`` pools all heads' channels at once
    (its convs' channels are the attention width): those heads stay."""
    heads, hd = module.num_heads, module.head_dim
    slices = _linear_slices("qkv", module.qkv, _qkv_rows(heads, hd))
    slices.append(HeadSlice("proj.weight", 1, "consumer", _blocks(heads, hd)))
    reason = "" if module.mode != "conv_unshared" else (
        "pools its heads with convs over the whole attention width (mode conv_unshared)")
    pools = tuple(p for p in ("pool_q", "pool_k", "pool_v") if isinstance(getattr(module, p), nn.Conv2d))
    return HeadSpec(heads, hd, tuple(slices), reason, shared=pools)


def _gcvit(module: nn.Module, model: Optional[nn.Module]) -> HeadSpec:
    """GCViT's WindowAttentionGlobal: a local block is a fused qkv with a RelPosBias (as MaxViT's); a global block
    computes only k and v (``qkv``: k block, then v block) and takes its queries from the stage's global query,
    which is the stage's stream split into heads: its heads and that stream stay."""
    if not module.use_global:
        return _rel_pos_attention(module, model)
    heads, hd = module.num_heads, module.head_dim
    kv = _linear_slices("qkv", module.qkv, _cat(_blocks(heads, hd), _blocks(heads, hd, heads * hd)))
    why = ("takes its queries from the stage's global query (GlobalContext), the stage's stream split into its "
           "heads, so neither a head nor a stream channel can go from one block alone")
    return HeadSpec(heads, hd, tuple(kv), why, why)


def _linear_self_attention(module: nn.Module) -> HeadSpec:
    """MobileViT-v2's LinearSelfAttention: one query row (a softmax over tokens that weighs every channel) and d key /
    value channel pairs, an entry each: key row 1 + i and value row 1 + d + i of ``qkv_proj``, ``out_proj`` column i
    (a zeroed value row zeroes its output, ``relu(value) * context``, whatever its key does). The query row stays."""
    d = module.out_proj.in_channels
    rows = tuple((1 + i, 1 + d + i) for i in range(d))
    slices = _linear_slices("qkv_proj", module.qkv_proj, rows)
    slices.append(HeadSlice("out_proj.weight", 1, "consumer", _blocks(d, 1)))
    return HeadSpec(d, 1, tuple(slices), shared=("qkv_proj",))  # its query row, no group's root: it serves every entry


def _class_attention(module: nn.Module, prefix: str = "") -> HeadSpec:
    """CaiT's ClassAttn and (``prefix`` "w": wq, wk, wv) CrossViT's CrossAttention: separate q (class token only),
    k and v projections; NextViT's EfficientAttention: separate q, k and v (k and v over the spatial reduction)."""
    heads = module.num_heads
    per_head = _blocks(heads, getattr(module, f"{prefix}q").out_features // heads)
    slices = [s for p in ("q", "k", "v") for s in _linear_slices(prefix + p, getattr(module, prefix + p), per_head)]
    slices.append(HeadSlice("proj.weight", 1, "consumer", per_head))
    return HeadSpec(heads, len(per_head[0]), tuple(slices))


def _q_kv(module: nn.Module, hd: int) -> HeadSpec:
    """PVT-v2's Attention and Twins' GlobalSubSampleAttn: a q projection and a kv projection (k block, then v
    block) that reads the key/value input, not heads: the input stream, or after a spatial reduction the ``sr``
    conv's output channels (with its ``norm`` and the kv columns: a channel group of their own)."""
    heads = module.num_heads
    per_head = _blocks(heads, hd)
    kv = _cat(per_head, _blocks(heads, hd, heads * hd))
    slices = _linear_slices("q", module.q, per_head) + _linear_slices("kv", module.kv, kv)
    slices.append(HeadSlice("proj.weight", 1, "consumer", per_head))
    return HeadSpec(heads, hd, tuple(slices))


def _attention_pool(module: nn.Module) -> HeadSpec:
    """timm.layers' AttentionPoolLatent (the MAP head, ``global_pool="map"``): as PVT-v2's attention, ``q`` rows (``q``
    projects the learned ``latent``, which stays), k and v rows of ``kv`` and ``proj`` columns; its heads stay
    without ``q`` (``q_proj=False``: the latent is the query) or ``proj`` (``out_features=0``)."""
    if isinstance(module.q, nn.Linear) and isinstance(module.proj, nn.Linear):
        return _q_kv(module, module.head_dim)
    heads, hd = module.num_heads, module.head_dim
    kv = _linear_slices("kv", module.kv, _cat(_blocks(heads, hd), _blocks(heads, hd, heads * hd)))
    why = ("takes its queries straight from its latent parameter (q_proj=False), which chase_timm does not slice"
           if not isinstance(module.q, nn.Linear) else
           "has no output projection (out_features=0): its heads' output is the pooled features")
    return HeadSpec(heads, hd, tuple(kv), f"AttentionPoolLatent {why}")


def _outlook(module: nn.Module) -> HeadSpec:
    """VOLO's OutlookAttention: the head's rows of ``v`` (its channels, unfolded over each k x k window), its
    ``kernel_size ** 4`` rows of ``attn`` (each position's k^2 x k^2 attention weights, computed from the pooled
    input, not from q and k), ``proj`` columns."""
    heads, window = module.num_heads, module.kernel_size ** 4
    per_head = _blocks(heads, module.v.out_features // heads)
    slices = _linear_slices("v", module.v, per_head) + _linear_slices("attn", module.attn, _blocks(heads, window))
    slices.append(HeadSlice("proj.weight", 1, "consumer", per_head))
    return HeadSpec(heads, len(per_head[0]), tuple(slices))


def _tnt(module: nn.Module) -> HeadSpec:
    """TNT's Attention (inner and outer): a qk projection (q block, then k block, of ``head_dim`` per head) and a
    v projection whose heads are ``v.out_features // num_heads`` wide, as are the projection's columns."""
    heads, hd = module.num_heads, module.head_dim
    values = _blocks(heads, _rows(module.v) // heads)
    slices = _linear_slices("qk", module.qk, _cat(_blocks(heads, hd), _blocks(heads, hd, heads * hd)))
    slices += _linear_slices("v", module.v, values)
    slices.append(HeadSlice("proj.weight", 1, "consumer", values))
    return HeadSpec(heads, len(values[0]), tuple(slices))


def _lite_mla(module: nn.Module) -> HeadSpec:
    """EfficientViT (MIT)'s LiteMLA: the head's ``[q k v]`` rows of the ``qkv`` conv (``3 * dim`` consecutive rows;
    timm builds it without norm or activation), the same rows of each aggregation scale (a depthwise conv, then a
    1x1 conv with three groups per head: the head's q, k and v), and its ``proj`` columns: the forward concatenates
    ``qkv`` and every scale's output and reshapes them to ``(B, -1, 3 * dim, H * W)``, so scale ``s`` of head ``h``
    is head ``s * heads + h`` of the ReLU linear attention, whose ``dim`` outputs are that head's ``proj``
    columns."""
    heads, d = _lite_mla_heads(module), module.dim
    rows = _blocks(heads, 3 * d)
    slices = _linear_slices("qkv.conv", module.qkv.conv, rows)
    for i, branch in enumerate(module.aggreg):
        slices += [s for j, conv in enumerate(branch) for s in _linear_slices(f"aggreg.{i}.{j}", conv, rows)]
    scales = 1 + len(module.aggreg)
    columns = _cat(*(_blocks(heads, d, s * heads * d) for s in range(scales)))
    slices.append(HeadSlice("proj.conv.weight", 1, "consumer", columns))
    return HeadSpec(heads, scales * d, tuple(slices))


def _lite_mla_heads(module: nn.Module) -> int:
    """LiteMLA's head count (it stores only ``dim``, one head's q, k or v width): its ``qkv`` rows over ``3 * dim``."""
    return _rows(module.qkv.conv) // (3 * module.dim)


def _multi_query(module: nn.Module) -> HeadSpec:
    """timm.layers' MultiQueryAttention2d (MobileNetV5, the MobileNetV4 hybrids): every query head reads one shared
    key/value head. A query head is its ``key_dim`` rows of ``query.proj`` (a 1x1 conv) and its ``value_dim`` columns
    of ``output.proj``; ``key.proj`` / ``value.proj`` (the shared head, ``key_dim`` / ``value_dim`` channels) and the
    strided ``down_conv`` / ``norm`` / ``down_pool`` on the input stay."""
    heads = module.num_heads
    slices = _linear_slices("query.proj", module.query.proj, _blocks(heads, module.key_dim))
    slices.append(HeadSlice("output.proj.weight", 1, "consumer", _blocks(heads, module.value_dim)))
    return HeadSpec(heads, module.value_dim, tuple(slices), shared=("key.proj", "value.proj"))


def _self_attn_block(block: nn.Module) -> HeadSpec:
    """byobnet's SelfAttnBlock (the byoanet models) with a HaloAttn, BottleneckAttn or LambdaLayer as its
    ``self_attn``, the bottleneck's middle layer: the attention has no projection, so its heads' output channels
    (``dim_head_v`` / ``dim_v`` each, the head's order) go through ``post_attn`` (a per-channel BatchNorm + act) into
    ``conv3_1x1``'s columns, and the block holds the head. HaloAttn: the head's ``dim_head_qk`` rows of ``q`` and its
    k rows then v rows of ``kv``; BottleneckAttn: its rows of the q, k and v blocks of ``qkv``. Their ``pos_embed``
    tables ((positions, ``dim_head_qk``)) are shared by the heads and stay. LambdaLayer: the head's ``dim_qk`` query
    rows of ``qkv`` and ``norm_q`` channels; the key and value rows (one k and v for all heads: the lambda), ``norm_v``
    and ``conv_lambda`` / ``pos_emb`` stay."""
    attn = block.self_attn
    kind, heads = timm_class(type(attn)), attn.num_heads
    if kind is HaloAttn:
        qk, v = attn.dim_head_qk, attn.dim_head_v
        slices = _linear_slices("self_attn.q", attn.q, _blocks(heads, qk))
        slices += _linear_slices("self_attn.kv", attn.kv, _blocks(heads, qk + v))
    elif kind is BottleneckAttn:
        qk, v = attn.dim_head_qk, attn.dim_head_v
        rows = _cat(_blocks(heads, qk), _blocks(heads, qk, heads * qk), _blocks(heads, v, 2 * heads * qk))
        slices = _linear_slices("self_attn.qkv", attn.qkv, rows)
    else:
        v, queries = attn.dim_v, _blocks(heads, attn.dim_qk)
        slices = _linear_slices("self_attn.qkv", attn.qkv, queries) + _norm("self_attn.norm_q", queries)
    outputs = _blocks(heads, v)
    reason = ""
    if isinstance(block.post_attn, nn.BatchNorm2d):  # timm's BatchNormAct2d: its act comes after the norm
        slices += _norm("post_attn", outputs)
    elif not isinstance(block.post_attn, nn.Identity):
        reason = f"its post_attn ({type(block.post_attn).__name__}) is not a per-channel BatchNorm"
    conv = getattr(block.conv3_1x1, "conv", None)
    if type(conv) is not nn.Conv2d or conv.groups != 1:  # e.g. a standardised conv, whose weight mixes its columns
        reason = reason or f"its conv3_1x1 ({type(conv).__name__}) is not a plain ungrouped Conv2d"
    else:
        slices.append(HeadSlice("conv3_1x1.conv.weight", 1, "consumer", outputs))
    why = f"LambdaLayer {REFUSED[LambdaLayer]}" if kind in REFUSED else ""
    shared = ("self_attn.qkv", *(("self_attn.conv_lambda",) if attn.conv_lambda is not None else ())) \
        if kind is LambdaLayer else ()
    return HeadSpec(heads, v, tuple(slices), reason or why, why, shared)


def _coat(crpe: nn.Module, model: nn.Module) -> Optional[HeadSpec]:
    """CoaT's ConvRelPosEnc (``crpe``), shared by a stage's FactorAttnConvRelPosEnc modules (its serial blocks and
    the parallel blocks' attention at its scale): their heads go together, named in the model. Head h is its q, k, v
    rows of every attention's ``qkv`` (q | k | v blocks) and bias, their ``proj`` columns, and its ``head_dim``
    channels of the crpe's depthwise conv of its window (weight rows and bias; a window is a run of heads sharing a
    kernel size). The first head of each window stays (a window's conv can't lose all its channels): it is no
    entry of the group, and every qkv and window conv is marked shared (no group's root). An entry counts
    ``head_dim`` channels per attention in the budget."""
    users = [(n, m) for n, m in model.named_modules() if timm_class(type(m)) is coat.FactorAttnConvRelPosEnc
             and m.crpe is crpe]
    if not users:
        return None
    hd, heads = _scale_head_dim(users[0][1]), sum(crpe.head_splits)
    why = ""
    if coat.FactorAttnConvRelPosEnc in REFUSED:
        why = f"FactorAttnConvRelPosEnc {REFUSED[coat.FactorAttnConvRelPosEnc]}"
    elif heads == len(crpe.head_splits):  # the first head of each window stays: no entry left
        why = "each window of its ConvRelPosEnc holds one head, which the window keeps"
    if why:
        return HeadSpec(heads, hd, tuple(_linear_slices(f"{users[0][0]}.qkv", users[0][1].qkv, _qkv_rows(heads, hd))),
                        why, in_model=True)
    starts = [sum(crpe.head_splits[:i]) for i in range(len(crpe.head_splits))]
    entries = [h for h in range(heads) if h not in starts]
    rows, columns = _qkv_rows(heads, hd), _blocks(heads, hd)
    slices = []
    for name, attention in users:
        slices += _linear_slices(f"{name}.qkv", attention.qkv, tuple(rows[h] for h in entries))
        slices.append(HeadSlice(f"{name}.proj.weight", 1, "consumer", tuple(columns[h] for h in entries)))
    crpe_name = next(n for n, m in model.named_modules() if m is crpe)
    for i, (conv, start) in enumerate(zip(crpe.conv_list, starts)):
        index = tuple(tuple(range((h - start) * hd, (h - start + 1) * hd)) if start <= h < start + crpe.head_splits[i]
                      else () for h in entries)
        slices += _linear_slices(f"{crpe_name}.conv_list.{i}", conv, index)
    shared = (*(f"{n}.qkv" for n, _ in users), *(f"{crpe_name}.conv_list.{i}" for i in range(len(crpe.conv_list))))
    # an entry is a head of every attention reading the crpe: head_dim channels of each in the budget
    return HeadSpec(len(entries), hd * len(users), tuple(slices), shared=shared, in_model=True)


def _levit(module: nn.Module) -> HeadSpec:
    """LeViT Attention / AttentionDownsample, TinyViT's and EfficientFormer's Attention: q, k, v interleaved per
    head, one attention-bias row per head. LeViT: one LinearNorm/ConvNorm (with its BatchNorm) and an activation
    with act(0) = 0 before the projection; TinyViT, EfficientFormer: a plain qkv Linear (with bias) and projection."""
    heads, kd, vd = module.num_heads, module.key_dim, module.val_dim
    kind = timm_class(type(module))
    bias = HeadSlice("attention_biases", 0, "free", _blocks(heads, 1))
    if kind in _PLAIN_LEVIT:
        slices = _linear_slices("qkv", module.qkv, _blocks(heads, 2 * kd + vd))
        slices += [HeadSlice("proj.weight", 1, "consumer", _blocks(heads, vd)), bias]
        return HeadSpec(heads, vd, tuple(slices))
    if kind is levit.Attention:
        slices = _norm_linear("qkv", _blocks(heads, 2 * kd + vd))
    else:
        slices = _norm_linear("kv", _blocks(heads, kd + vd)) + _norm_linear("q.ln", _blocks(heads, kd))
    slices += [HeadSlice("proj.ln.linear.weight", 1, "consumer", _blocks(heads, vd)), bias]
    reason = "" if _acts_keep_zero(module.proj.act) else (
        f"the projection's {type(module.proj.act).__name__} does not map 0 to 0")
    return HeadSpec(heads, vd, tuple(slices), reason)


def _mixing(layers: tuple[str, ...], one: tuple) -> list[HeadSlice]:
    """Talking heads (CaiT's proj_l / proj_w, EfficientFormer-V2's talking_head1/2: Linears or 1x1 convs over the
    heads axis): row, column and bias ``h`` of each go with head ``h``."""
    return [HeadSlice(f"{mix}.{t}", dim, role, one) for mix in layers
            for t, dim, role in (("weight", 0, "free"), ("weight", 1, "consumer"), ("bias", 0, "bias"))]


def _efficientformer_v2(module: nn.Module) -> HeadSpec:
    """EfficientFormer-V2's Attention2d / Attention2dDownsample: the head's rows of the q, k and v ConvNorms (1x1 conv
    with bias, then BatchNorm; the downsampling query's after its local and pooled sum, ``q.proj``) and of the
    depthwise ``v_local`` ConvNorm added to its output, ``proj`` columns (so whatever its activation gives a zeroed
    head, none of it reaches the output), row ``h`` of ``attention_biases``, and Attention2d's talking heads
    (``talking_head1`` / ``talking_head2``: 1x1 convs over the heads axis, as CaiT's)."""
    heads, kd, vd = module.num_heads, module.key_dim, module.d
    keys, values, one = _blocks(heads, kd), _blocks(heads, vd), _blocks(heads, 1)
    downsample = timm_class(type(module)) is efficientformer_v2.Attention2dDownsample
    slices = [*_conv_norm(module, "q.proj" if downsample else "q", keys), *_conv_norm(module, "k", keys),
              *_conv_norm(module, "v", values), *_conv_norm(module, "v_local", values),
              HeadSlice("proj.conv.weight", 1, "consumer", values), HeadSlice("attention_biases", 0, "free", one)]
    if not downsample:
        slices += _mixing(("talking_head1", "talking_head2"), one)
    return HeadSpec(heads, vd, tuple(slices))


def _conv_norm(module: nn.Module, prefix: str, index: tuple) -> list[HeadSlice]:
    """EfficientFormer-V2's ConvNorm: conv weight rows and bias plus the BatchNorm's per-channel tensors."""
    return [*_linear_slices(f"{prefix}.conv", module.get_submodule(prefix).conv, index), *_bn(prefix, index)]


def _bn(prefix: str, index: tuple) -> list[HeadSlice]:
    """A BatchNorm's per-channel tensors at ``index`` (LeViT's and EfficientFormer-V2's norms after q, k, v)."""
    return _norm(f"{prefix}.bn", index)


def _norm(prefix: str, index: tuple) -> list[HeadSlice]:
    """The per-channel tensors of the BatchNorm at ``prefix`` at ``index``."""
    return [HeadSlice(f"{prefix}.{t}", 0, "norm", index) for t in ("weight", "bias", "running_mean", "running_var")]


def _norm_linear(prefix: str, index: tuple) -> list[HeadSlice]:
    """LeViT's LinearNorm / ConvNorm: bias-free weight rows plus the BatchNorm's per-channel tensors."""
    return [HeadSlice(f"{prefix}.linear.weight", 0, "producer", index), *_bn(prefix, index)]


def _acts_keep_zero(act: nn.Module) -> bool:
    return isinstance(act, (nn.Hardswish, nn.SiLU, nn.GELU, nn.ReLU, nn.Identity))


def _left_whole(module: nn.Module, reason: str) -> HeadSpec:
    """A module whose heads stay: its q/k/v producer rows, so its group is reported with this reason."""
    heads = _num_heads(module)
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear):
        hd = qkv.out_features // 3 // heads
        slices = [HeadSlice("qkv.weight", 0, "producer", _qkv_rows(heads, hd))]
    else:
        names = ("q_proj", "k_proj", "v_proj", "q", "k", "v", "wq", "wk", "wv")  # wq, wk, wv: CrossViT
        layers = [(p, getattr(module, p, None)) for p in names]
        layers = [(p, m) for p, m in layers if isinstance(m, nn.Linear)]
        hd = layers[0][1].out_features // heads
        slices = [HeadSlice(f"{p}.weight", 0, "producer", _blocks(heads, hd)) for p, _ in layers]
    return HeadSpec(heads, hd, tuple(slices), f"{type(module).__name__} {reason}",
                    _INPUT_TIED.get(timm_class(type(module)), ""))


# ------------------------------------------------------------------------------------------------ checks

def _scale_head_dim(module: nn.Module) -> int:
    """``head_dim`` of a class that stores only its attention scale, ``head_dim ** -0.5``."""
    return round(module.scale ** -2)


def _num_heads(module: nn.Module) -> int:
    """An attention module's head count (Hiera calls it ``heads``, DaViT's ChannelAttentionV2 ``groups``; LiteMLA
    stores none)."""
    kind = timm_class(type(module))
    if kind is efficientvit_mit.LiteMLA:
        return _lite_mla_heads(module)
    if kind is mobilevit.LinearSelfAttention:  # its key / value channel pairs
        return int(module.embed_dim)
    if kind is byobnet.SelfAttnBlock:  # its self_attn's (HaloAttn, BottleneckAttn, LambdaLayer)
        return int(module.self_attn.num_heads)
    how = _REFRESH.get(kind)
    return int(getattr(module, how.count if isinstance(how, _Refresh) else "num_heads"))


def _rows(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def _columns(layer: nn.Module) -> int:
    return layer.weight.shape[1]


def _heads(name: str, width: int, head_dim: int) -> int:
    if head_dim <= 0 or width % head_dim:
        raise ValueError(f"{name}: attention width {width} is not a whole number of {head_dim}-wide heads")
    return width // head_dim


def _check(name: str, what: str, actual: int, expected: int) -> None:
    if actual != expected:
        raise ValueError(f"{name}: {what} ({actual}) do not match the heads left ({expected}); heads are removed whole")
