"""Attention heads as channel groups: whole heads are removed exactly, on the fused and the eager attention path.

For every timm family in ``SMALL`` (ViT, Swin V1/V2/V2-CR, Hiera, SAM2's Hiera, LeViT, EVA, BEiT, CaiT, XCiT, EdgeNeXt,
PVT-v2, Twins, TinyViT, EfficientFormer (V1, V2), DaViT, SAM ViT, MaxViT, CoAtNet, ViT-RelPos, ConViT, NesT, MViTv2,
GCViT, MobileNetV5's multi-query attention, byoanet's HaloAttn / BottleneckAttn / LambdaLayer) and its ``VARIANTS``: a
float64 shrinking run equals its masking twin (``recipes/shrink_equivalence.py`` at ``TOLERANCE = 1e-9``) with heads
actually removed from each attention class of the case; the float32 export matches the masked model (<= 1e-4 relative);
``save_pretrained`` -> ``local-dir:`` reloads the same outputs with the same ``num_heads`` per block; and the slim
model's fused (SDPA) and eager attention paths agree. torch's ``nn.MultiheadAttention`` (on a ``test_vit`` backbone, as
users wrap timm models): the same twin and export checks, a width plan + state_dict round trip, and the module itself
under every mask and ``need_weights`` option.
"""
import copy
import json
import math
import pickle
import re

import pytest
import timm
import timm.utils
import torch

import chase_timm
from chase_timm import heads as heads_module
from chase_timm._timm import named_tensors
from chase_timm.adapters import multihead
from chase_timm.adapters.timm import record_model_args, recorded_model_args
from chase_timm.adapters.attention import REFUSED, SLIM, edited, slim_subclass, timm_class, use_slim_forward
from chase_timm.adapters.multihead import SlimMultiheadAttention, SlimTransformerEncoder, SlimTransformerEncoderLayer
from chase_timm.channels import ChannelState, select_channels
from chase_timm.cli import main
from chase_timm.graph import ChannelGroup, find_channel_groups, tensor_removals
from chase_timm.heads import head_counts, head_spec, refresh_heads
from chase_timm.hub import slim_summary
from chase_timm.slim import apply_width_plan, slice_in_place, slim_copy, width_plan
import shrink_equivalence
import zoo_coverage
from helpers import zero_removed
from prunability_table import roundtrip
from shrink_equivalence import compare, float64
from timm.layers import (Attention, AttentionPoolLatent, AttentionRope, DiffAttention,
                         MultiQueryAttention2d)
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.layers.lambda_layer import LambdaLayer
from timm.models import (beit, cait, coat, crossvit, davit, edgenext, efficientformer, efficientformer_v2, eva, hiera,
                         hieradet_sam2 as sam2, maxxvit, pvt_v2, swin_transformer_v2, swin_transformer_v2_cr as swin_cr,
                         tiny_vit, tnt, twins, visformer, vision_transformer_relpos as relpos,
                         vision_transformer_sam as sam, volo, xcit)
from timm.models import (build_model_with_cfg, byoanet, convit, efficientvit_mit, fastvit, gcvit, metaformer, mvitv2,
                         mobilevit, nest, nextvit)
from timm.models.byobnet import ByoBlockCfg, ByoModelCfg
from timm.models.mobilenetv5 import decode_arch_def  # timm builds its arch strings with it

# small variants of each family at 32 px (Swin: windows of 4 on 8x8 and 4x4 maps, so stage 0 has shifted windows);
# layer scales at 1 so no block's output vanishes under the shortcut in float32 (the export check could not fail)
SMALL = {
    "vit_tiny_patch16_224": {"img_size": 32, "depth": 4},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": (2, 2),
                                     "num_heads": (2, 4)},
    "levit_128s": {"img_size": 32, "depth": (1, 1, 1)},
    "eva02_tiny_patch14_224": {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 96},  # rope, SwiGLU
    "edgenext_xx_small": {"depths": (1, 1, 1, 1), "ls_init_value": 1.0},  # XCA in stages 1-3
    "beit_base_patch16_224": {"img_size": 32, "depth": 2, "embed_dim": 96, "num_heads": 3, "init_values": 1.0},
    "swinv2_tiny_window16_256": {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": (2, 2),
                                 "num_heads": (2, 4)},
    # Swin V2-CR: scaled cosine attention, a logit scale and a meta-MLP bias row per head (windows of 4 as above)
    "swinv2_cr_tiny_224": {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4)},
    # Hiera: mask-unit attention on 64-token units, then with q pooling (stride 4) into 16, then global attention
    "hiera_tiny_224": {"img_size": 32, "embed_dim": 32, "num_heads": 2, "stages": (1, 2), "q_pool": 1,
                       "mask_unit_attn": (True, False), "mlp_ratio": 2.0},
    # SAM2's Hiera: windows of 4 on the 8x8 map, then q pooling (stride 2) into windows of 2 on 4x4, then global
    "sam2_hiera_tiny": {"embed_dim": 32, "num_heads": 2, "stages": (1, 2), "q_pool": 1, "window_spec": (4, 2),
                        "global_att_blocks": (2,)},
    # EfficientFormer: its attention biases are fixed at 7x7 tokens, so 2 stages at 56 px, the last block attention
    "efficientformer_l1": {"depths": (1, 2), "embed_dims": (16, 32), "num_vit": 1, "img_size": 56,
                           "layer_scale_init_value": 1.0},
    # EfficientFormer-V2 at 64 px: stage 2's attention (talking heads) with its stride-2 conv on a 4x4 map (2x2
    # tokens, upsampled back), stage 3's downsampling attention (16 keys, 4 queries) and attention on 2x2 tokens
    "efficientformerv2_s0": {"depths": (1, 1, 2, 2), "embed_dims": (16, 16, 32, 32), "num_vit": 1, "mlp_ratios": 2,
                             "img_size": 64, "layer_scale_init_value": 1.0},
    "cait_xxs24_224": {"img_size": 32, "depth": 1, "depth_token_only": 2, "embed_dim": 96, "num_heads": 3,
                       "init_values": 1.0},  # heads of TalkingHeadAttn (proj_l / proj_w) and the class attention
    "xcit_nano_12_p16_224": {"img_size": 32, "depth": 2, "embed_dim": 96, "num_heads": 3, "eta": 1.0},  # XCA
    "pvt_v2_b0": {"depths": (1, 1, 1), "embed_dims": (32, 64, 96), "num_heads": (2, 2, 3), "sr_ratios": (4, 2, 1),
                  "mlp_ratios": (2, 2, 2)},  # spatial reduction (sr conv + norm) on stages 0-1
    # Twins-SVT: locally grouped (windows of 4 on 8x8 and 4x4 maps) and global sub-sampled attention alternate;
    # Twins-PCPVT: global sub-sampled attention only (sr on stage 0)
    "twins_svt_small": {"img_size": 32, "embed_dims": (32, 64), "depths": (2, 2), "num_heads": (2, 4),
                        "wss": (4, 4), "sr_ratios": (4, 2), "mlp_ratios": (2, 2)},
    "twins_pcpvt_small": {"img_size": 32, "embed_dims": (32, 64), "depths": (1, 1), "num_heads": (2, 4),
                          "sr_ratios": (4, 1), "mlp_ratios": (2, 2)},
    # TinyViT: LeViT-like heads (q, k, v interleaved, attention_biases) on windows of 2 over a 4x4 map, then 2x2, 1x1
    "tiny_vit_5m_224": {"embed_dims": (32, 48, 64, 96), "depths": (1, 1, 1, 1), "num_heads": (2, 3, 4, 3),
                        "window_sizes": (4, 2, 2, 1), "mlp_ratio": 2.0},
    # DaViT: spatial window attention (windows of 3 on 8x8 and 4x4 maps: padded) and channel attention
    "davit_tiny": {"depths": (1, 1), "embed_dims": (32, 48), "num_heads": (2, 3), "window_size": 3, "mlp_ratio": 2},
    # SAM ViT: windows of 2 on a 4x4 map, then global attention; decomposed relative positions shared by the heads
    "samvit_base_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 96, "num_heads": 3,
                                "window_size": 2, "global_attn_indexes": (1,), "mlp_ratio": 2.0},
    # MaxViT: channels-last block and grid attention (windows and grids of 2 on 8x8 and 4x4 maps), heads of 16;
    # the rw model's q, k, v rows grouped per head (head_first) with RelPosBias, the tf model's q | k | v blocks with
    # RelPosBiasTf
    "maxvit_pico_rw_256": {"img_size": 32, "depths": (1, 1), "embed_dim": (32, 64), "transformer_dim_head": 16,
                           "transformer_window_size": (2, 2)},
    "maxvit_tiny_tf_224": {"img_size": 32, "depths": (1, 1), "embed_dim": (32, 64), "transformer_dim_head": 16,
                           "transformer_window_size": (2, 2)},
    # CoAtNet: NCHW attention (1x1 convs) over the whole 2x2 and 1x1 maps of stages 2-3, RelPosBias
    "coatnet_nano_rw_224": {"img_size": 32, "depths": (1, 1, 1, 1), "embed_dim": (16, 32, 48, 64),
                            "transformer_dim_head": 16},
    # vision_transformer_relpos: a RelPosMlp per block (its last Linear outputs one bias per head)
    "vit_relpos_small_patch16_224": {"img_size": 32, "depth": 2, "embed_dim": 96, "num_heads": 3},
    # ConViT: two GPSA blocks (gated positional attention on a 4x4 map, no class token), then an MHSA block with the
    # class token; embed_dim is per head (3 heads of 16)
    "convit_tiny": {"img_size": 32, "patch_size": 8, "depth": 3, "local_up_to_layer": 2, "embed_dim": 16,
                    "num_heads": 3},
    # NesT: attention within image blocks (16 blocks of 1 token, 4 of 1, 1 of 4 at 32 px with patches of 8); its
    # heads' output is ordered (head_dim, heads), so a head's proj columns are strided. nest_tiny's entrypoint fixes
    # its widths and depths (it takes no overrides), so the MLPs are narrowed instead
    "nest_tiny": {"img_size": 32, "patch_size": 8, "mlp_ratio": 1.0},
    # MViTv2: pooled attention (q pooled by 2 entering stages 1-3, k/v pooled to 2x2 / 1x1 maps) with residual
    # pooling and decomposed relative positions; built from MVITV2_TINY (below: its entrypoint takes no widths)
    "mvitv2_tiny": {"img_size": 32},
    # GCViT: local window attention (RelPosBias) alternating with global-query blocks, whose heads stay; windows of 4
    # on the 8x8 and 4x4 maps, 2 on 2x2 (gcvit_xxtiny's entrypoint fixes depths and heads: 2, 4, 8, 16 of 16 channels)
    "gcvit_xxtiny": {"img_size": 32, "embed_dim": 32, "mlp_ratio": 2.0, "window_size": (4, 4, 2, 1)},
    # CrossViT: two branches (patches of 8 and 16: 4x4 and 2x2 tokens), each with timm's Attention, and the fusion's
    # CrossAttention (wq / wk / wv: the class token attends to the other branch's tokens), two multi-scale blocks
    "crossvit_tiny_240": {"img_size": 32, "img_scale": (1.0, 1.0), "patch_size": (8, 16), "embed_dim": (48, 96),
                          "depth": ((1, 1, 0), (1, 1, 0)), "num_heads": (3, 3), "mlp_ratio": (2, 2, 1)},
    # Visformer: NCHW attention (1x1 conv qkv and projection) in stages 2-3 on 4x4 and 2x2 maps, 3 heads of 16 and 32
    "visformer_tiny": {"img_size": 32, "embed_dim": 48, "depth": (1, 1, 1), "mlp_ratio": 2.0},
    # TNT: inner attention over each patch's 4x4 pixels (4 heads of 6) and outer attention over the 2x2 patches and
    # the class token (3 heads: q and k of 32, v of 32)
    "tnt_s_legacy_patch16_224": {"img_size": 32, "embed_dim": 96, "inner_dim": 24, "depth": 2, "num_heads_outer": 3,
                                 "num_heads_inner": 4, "mlp_ratio": 2.0},
    # FastViT-SA: RepMixer stages 0-2, then stage 3's Attention (NCHW maps flattened to tokens, 4 heads of 32) on the
    # 2x2 map at 64 px; each downsampling is a depthwise conv with channel multiplier 2
    "fastvit_sa12": {"layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128), "mlp_ratios": (2, 2, 2, 2)},
    # EfficientViT (MIT): one LiteMLA block in each of stages 3-4 (4 and 8 heads of 16 channels, a 5x5 aggregation
    # scale each: 2 x 16 proj columns per head) on the 4x4 and 2x2 maps at 64 px, a narrow classifier head
    "efficientvit_b0": {"depths": (1, 1, 1, 1, 1), "head_widths": (64, 80)},
    # MobileNetV5: multi-query attention (4 query heads of 8 on one shared k/v head) in stages 2-3 at 64 px, stage 2's
    # with kv_stride 2 (k/v down_conv + norm: 4 keys on its 4x4 map), stage 3's on the 2x2 map; timm's entrypoint
    # takes the block definitions (decoded arch strings, plain data), so the local-dir: reload rebuilds them
    "mobilenetv5_base": {"block_args": decode_arch_def([
        ["er_r1_k3_s2_e2_c16"], ["uir_r1_a3_k3_s2_e2_c24"],
        ["uir_r1_a3_k3_s2_e2_c32", "mqa_r1_k3_h4_v2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
        ["uir_r1_a3_k3_s2_e2_c48", "mqa_r1_k3_h4_s1_d8_c48", "uir_r1_a0_k0_s1_e2_c48"]]),
        "stem_size": 16, "num_features": 64, "msfa_output_resolution": 4, "layer_scale_init_value": 1.0},
    # byoanet: one SelfAttnBlock of each attention (BYOANET_SMALL below, swapped in for halonet26t's cfg)
    "halonet26t": {"img_size": 32},
    # CAFormer: MetaFormer's Attention (heads of 32) in stages 2-3; its entrypoint fixes depths and widths, so the
    # export test runs caformer_s18 (9 blocks of 10 heads on the 2x2 map at 32 px, 3 of 16 on 1x1), the twin
    # CAFORMER_SMALL below
    "caformer_s18": {},
    # NextViT: E-MHSA (separate q, k, v; k and v over an AvgPool1d spatial reduction, sr 4 / 2 / 1 in stages 1-3) in
    # one NTB block of each of stages 1-3 (depths 1, 1, 5, 1), heads of 32 on the 4x4, 2x2 and 1x1 maps at 64 px
    "nextvit_small": {"depths": (1, 1, 5, 1)},
    # differential attention (timm.layers' DiffAttention): 4 heads of two q / two k sub-heads of 32 and a v of 64
    "vit_dwee_patch16_reg1_gap_256": {"img_size": 32, "depth": 2},
    # MobileViT-v2's LinearSelfAttention: one query row and 64 / 80 / 96 key-value channel pairs (the entries) in
    # stages 2-4, over 2x2 patches of the 8x8, 4x4 and 2x2 maps at 64 px
    "mobilevitv2_050": {},
}
# input side where it is not 32 px
SIZES = {"efficientformer_l1": 56, "efficientformerv2_s0": 64, "fastvit_sa12": 64, "efficientvit_b0": 64,
         "mobilenetv5_base": 64, "nextvit_small": 64, "mobilevitv2_050": 64}
# EfficientFormer-V2's convs have biases ahead of a training-mode BatchNorm, which cancels them: their gradients are
# rounding noise, which AdamW normalises into full steps (float64 twin 2e-8 apart with its heads left whole); SGD
# Visformer likewise (its patch embeddings' conv biases ahead of a BatchNorm2d): 6.6e-10 apart with AdamW and its
# heads whole, 1e-15 with SGD
# MobileViT at 32 px: stages 3-4 attend over one patch (4 pixel positions, 1 token), so their q and k get rounding-noise
# gradients, which AdamW normalises into full steps (5.6e-4 apart at S_c = 0.75, 1.5e-11 at 0.6); SGD: 9.7e-13
OPTIMIZER = {"efficientformerv2_s0": "sgd", "visformer_tiny": "sgd", "mobilevit_xxs": "sgd"}
# mvitv2_tiny's entrypoint reads its widths from timm's model_cfgs: the fixture swaps in this cfg (2, 4, 8, 16 heads
# of 8 channels, a stage with two blocks), for the reload through local-dir: too
MVITV2_TINY = mvitv2.MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=16, num_heads=2, mlp_ratio=2.0)
# byoanet's entrypoints read their cfg from byoanet.model_cfgs: the fixture swaps this in for halonet26t's, one
# SelfAttnBlock (16 or 32 channels in the middle, 4 heads) of each attention: HaloAttn (blocks of 4, halo 1, on the
# 16x16 map), BottleneckAttn (stride 2 by its pool, 8x8 map) and LambdaLayer (q and k of 4 per head, r=9 lambda conv)
BYOANET_SMALL = ByoModelCfg(
    blocks=(ByoBlockCfg(type="self_attn", d=1, c=32, s=1, gs=0, br=0.5, self_attn_layer="halo",
                        self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=4)),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5, self_attn_layer="bottleneck",
                        self_attn_kwargs=dict(num_heads=4)),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=1, gs=0, br=0.5, self_attn_layer="lambda",
                        self_attn_kwargs=dict(num_heads=4, dim_head=4))),
    stem_chs=16, stem_type="tiered", stem_pool="", fixed_input_size=True)
# NesT, GCViT and CAFormer for the twin test, built by timm's builder from the class: their entrypoints fix the depths
# (NesT's and CAFormer's widths too), and the twin needs one NesT block per level, one local + one global-query GCViT
# block per stage (12 of each before) and one CAFormer block per stage (2 and 3 heads of 32 in stages 2-3). The export
# test keeps the entrypoints' models: its reload through local-dir: calls them
CAFORMER_SMALL = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 96),
                  "token_mixers": (metaformer.SepConv, metaformer.SepConv, metaformer.Attention, metaformer.Attention),
                  "norm_layers": (metaformer.LayerNorm2dNoBias,) * 2 + (metaformer.LayerNormNoBias,) * 2}
TWIN_CLASSES = {"nest_tiny": (nest.Nest, {"embed_dims": (48, 96, 192), "num_heads": (3, 6, 12), "depths": (1, 1, 1)}),
                "gcvit_xxtiny": (gcvit.GlobalContextVit, {"depths": (2, 2, 2, 2), "num_heads": (2, 4, 8, 16)}),
                "caformer_s18": (metaformer.MetaFormer, CAFORMER_SMALL)}
# the same models built another way: name -> (model, extra kwargs)
VARIANTS = {"eva02_tiny_patch14_224-qkv_split": ("eva02_tiny_patch14_224", {"qkv_fused": False}),
            "davit_tiny-v2": ("davit_tiny", {"channel_attn_v2": True}),  # the *_fl models' ChannelAttentionV2
            # grouped-query attention (Sapiens2): 6 query heads read 3 k/v heads, an entry is a k/v head with its 2
            # query heads; and scale_norm: a LayerNorm over all heads' outputs before the projection (EVA-02 CLIP)
            "eva02_tiny_patch14_224-gqa": ("eva02_tiny_patch14_224", {"attn_type": "rope", "qkv_fused": False,
                                                                      "num_heads": 6, "num_kv_heads": 3,
                                                                      "scale_attn_inner": True}),
            "samvit_base_patch16_224-rope": ("samvit_base_patch16_224",
                                             {"use_rel_pos": False, "use_rope": True, "qk_norm": True}),
            # q | k | v blocks (head_first=False) in the NCHW attention, with RelPosMlp (a Linear's row per head)
            "coatnet_nano_rw_224-mlp": ("coatnet_nano_rw_224", {"transformer_head_first": False,
                                                                "transformer_rel_pos_type": "mlp",
                                                                "transformer_rel_pos_dim": 16}),
            # a class token (RelPosBias with a prefix token: 3 more table rows) and qk_norm
            "vit_relpos_small_patch16_224-bias": ("vit_relpos_small_patch16_224",
                                                  {"rel_pos_type": "bias", "class_token": True,
                                                   "global_pool": "token", "qk_norm": True}),
            "tnt_s_legacy_patch16_224-new": ("tnt_s_legacy_patch16_224", {"legacy": False}),  # tnt_s_patch16_224
            # the MAP head (SigLIP, PE): an AttentionPoolLatent's latent query attends to the tokens (3 heads of 64)
            "vit_tiny_patch16_224-map": ("vit_tiny_patch16_224", {"global_pool": "map", "depth": 1})}
# no slim_summary / `chase-timm info`: timm builds SAM's rope tables without its device argument, so on "meta" they
# stay on the CPU and the FLOPs count fails (no registered SAM model uses rope)
NO_META = {"samvit_base_patch16_224-rope"}


BUILD = zoo_coverage.build  # the fixture replaces it with _build
CLASS_BUILDS: dict = {}  # name -> (class, kwargs) that _build builds from the class (the twin test sets TWIN_CLASSES')


def _build(name: str, **overrides) -> torch.nn.Module:
    """zoo_coverage.build with the attention modules' weights at std fan_in ** -0.5: at timm's std 0.02 the small
    models' attention barely moves the logits (zeroing all of small DaViT's: 2%; at this std: 57%), so the export
    and fused-vs-eager checks could not see it computed wrong. Dropout off: Swin V2-CR's meta MLP has a fixed
    p = 0.125, and a run that shrank draws other random numbers than its masking twin (as any dropout would)."""
    if name not in CLASS_BUILDS:
        if "block_args" not in zoo_coverage.SMALLER.get(name, {}):
            return _attention_std(BUILD(name, **overrides))
        # timm's EfficientNet builder pops keys from the block_args dicts it builds from, and records those: build
        # from a copy and record the definitions as given (what save_pretrained writes for the local-dir: reload)
        block_args = zoo_coverage.SMALLER[name]["block_args"]
        model = BUILD(name, **{"block_args": copy.deepcopy(block_args), **overrides})
        record_model_args(model, {**recorded_model_args(model), "block_args": copy.deepcopy(block_args)})
        return _attention_std(model)
    cls, kwargs = CLASS_BUILDS[name]  # as timm.create_model builds it, its build arguments recorded as it does
    kwargs = {"num_classes": 10, **zoo_coverage.SMALLER.get(name, {}), **kwargs, **overrides}
    torch.manual_seed(0)
    model = build_model_with_cfg(cls, name, False, **kwargs)
    record_model_args(model, kwargs)
    return _attention_std(model)


def _attention_std(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with dropout off and its attention modules' weights at std fan_in ** -0.5 (:func:`_build`)."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    with torch.no_grad():
        for attention in [m for m in model.modules()
                          if head_spec(m) is not None or isinstance(m, coat.FactorAttnConvRelPosEnc)]:
            for layer in attention.modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    layer.weight.normal_(0.0, layer.weight[0].numel() ** -0.5)
    return model


@pytest.fixture(autouse=True)
def _small_models(monkeypatch):
    """The harnesses build models through zoo_coverage.build, which reads its SMALLER overrides per name."""
    for name, kwargs in SMALL.items():
        if kwargs:
            monkeypatch.setitem(zoo_coverage.SMALLER, name, kwargs)
    monkeypatch.setattr(zoo_coverage, "build", _build)
    monkeypatch.setattr(shrink_equivalence, "tiny_model", _build)
    size = zoo_coverage.input_size
    for harness in (zoo_coverage, shrink_equivalence):
        monkeypatch.setattr(harness, "input_size", lambda name: SIZES.get(name) or size(name))
    monkeypatch.setitem(mvitv2.model_cfgs, "mvitv2_tiny", MVITV2_TINY)
    monkeypatch.setitem(byoanet.model_cfgs, "halonet26t", BYOANET_SMALL)


def _model(case: str, monkeypatch) -> str:
    """The timm name of a test case, with a variant's kwargs added to its SMALLER entry."""
    name, extra = VARIANTS.get(case, (case, {}))
    monkeypatch.setitem(zoo_coverage.SMALLER, name, {**SMALL[name], **extra})
    return name


def _heads_removed(removed: dict) -> dict:
    """Removed channels of head groups (named after their attention module; byoanet's after its SelfAttnBlock)."""
    return {name: heads for name, heads in removed.items()
            if name.endswith((".attn", ".attn_downsample", ".xca", ".token_mixer", ".attn_in", ".attn_out",
                              ".context_module.main", "attn_pool", ".e_mhsa"))
            or re.fullmatch(r"stages\.\d+\.\d+", name)}


@pytest.mark.parametrize("case", ["vit_tiny_patch16_224", pytest.param("swin_tiny_patch4_window7_224"),
                                  pytest.param("levit_128s", marks=pytest.mark.slow), "eva02_tiny_patch14_224",
                                  "eva02_tiny_patch14_224-qkv_split", "eva02_tiny_patch14_224-gqa",
                                  "edgenext_xx_small", "beit_base_patch16_224",
                                  "swinv2_tiny_window16_256", "swinv2_cr_tiny_224", "hiera_tiny_224",
                                  "sam2_hiera_tiny", "efficientformer_l1", "efficientformerv2_s0",
                                  "cait_xxs24_224", "xcit_nano_12_p16_224",
                                  "pvt_v2_b0", "twins_svt_small", "twins_pcpvt_small", "tiny_vit_5m_224",
                                  "davit_tiny", "davit_tiny-v2", "samvit_base_patch16_224",
                                  "samvit_base_patch16_224-rope", "maxvit_pico_rw_256", "maxvit_tiny_tf_224",
                                  "coatnet_nano_rw_224", "coatnet_nano_rw_224-mlp", "vit_relpos_small_patch16_224",
                                  "vit_relpos_small_patch16_224-bias",
                                  "convit_tiny", "nest_tiny", "mvitv2_tiny", "gcvit_xxtiny",
                                  "crossvit_tiny_240", "visformer_tiny", "tnt_s_legacy_patch16_224",
                                  "tnt_s_legacy_patch16_224-new", "fastvit_sa12", "efficientvit_b0",
                                  "mobilenetv5_base", "vit_tiny_patch16_224-map", "halonet26t", "caformer_s18",
                                  "vit_dwee_patch16_reg1_gap_256", "mobilevitv2_050"])
def test_removing_heads_while_training_equals_masking_them(case, monkeypatch):
    name = _model(case, monkeypatch)
    if name in TWIN_CLASSES:
        monkeypatch.setitem(CLASS_BUILDS, name, TWIN_CLASSES[name])
    with float64():
        result = compare(name, OPTIMIZER.get(name, "adamw"), channel_sparsity=0.6)
    assert result.refused is None and result.error is None, (result.refused, result.error)
    _assert_each_class_lost_heads(case, result.run[0], _heads_removed(result.removed))
    assert result.removed == result.twin_removed and result.masks_equal
    assert result.worst()[1] <= 1e-9, (result.worst(), result.diffs)
    slim = result.run[2].export()
    assert all(n >= 1 for n in head_counts(slim).values())  # at least one head stays in every block


@pytest.mark.parametrize("case, prune_skip", [*((c, False) for c in [*SMALL, *VARIANTS] if c != "caformer_s18"),
                                              pytest.param("caformer_s18", False, marks=pytest.mark.slow),  # 9 s
                                              ("eva02_tiny_patch14_224", True), ("swinv2_tiny_window16_256", True),
                                              ("cait_xxs24_224", True), ("convit_tiny", True),
                                              ("vit_tiny_patch16_224-map", True)])
def test_slim_heads_export_reload_and_agree_on_fused_and_eager_attention(case, prune_skip, tmp_path, capsys,
                                                                          monkeypatch):
    name = _model(case, monkeypatch)
    row = zoo_coverage.check_model(name, prune_skip=prune_skip, channel_sparsity=0.6, keep_models=True)
    assert row["rel_diff"] <= 1e-4, row["rel_diff"]  # float32 export == masked training model
    chase, slim = row["chase"], row["slim"].eval()
    removed = _heads_removed(chase.removed_channels())
    _assert_each_class_lost_heads(case, chase.module, removed)
    if prune_skip:  # the residual stream from the patch embedding shrinks too
        assert chase.removed_channels().get("patch_embed.proj"), chase.removed_channels().keys()
    base_heads, slim_heads = head_counts(chase.module), head_counts(slim)
    # an entry of a head group: a head, or with grouped-query attention a k/v head with its query heads
    per = {b: getattr(chase.module.get_submodule(b), "num_kv_groups", 1) for b in slim_heads}
    for block, heads in removed.items():
        assert slim_heads[block] == base_heads[block] - len(heads) * per[block] >= 1
    rows = {r["group"]: r for r in chase.report()}
    assert {b: rows[b]["width_after"] * per[b] for b in slim_heads} == slim_heads  # report rows count entries

    x = torch.randn(2, 3, SIZES.get(name, 32), SIZES.get(name, 32))
    chase_timm.save_pretrained(slim, tmp_path / "slim")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'slim'}", pretrained=True).eval()
    assert head_counts(loaded) == slim_heads
    if case not in NO_META:
        assert slim_summary(str(tmp_path / "slim"))["heads"] == {b: (base_heads[b], slim_heads[b]) for b in removed}
        assert main(["info", str(tmp_path / "slim")]) == 0
        block = next(iter(removed))
        assert f"{block} {base_heads[block]} -> {slim_heads[block]}" in capsys.readouterr().out
    with torch.no_grad():
        expected = slim(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        outputs, paths = [], [m for m in slim.modules() if head_spec(m) is not None and hasattr(m, "fused_attn")]
        for fused in (True, False):
            for module in paths:
                module.fused_attn = fused
            outputs.append(slim(x))
    if paths:  # Swin V2's and EdgeNeXt's attention have one (eager) path
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    if name.startswith("twins"):  # 40 px: maps its windows of 4 do not divide, so the windowed attention pads
        x = torch.randn(2, 3, 40, 40)
        with torch.no_grad():
            masked = chase.module.eval()(x)
            torch.testing.assert_close(slim(x), masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))


@pytest.mark.parametrize("name, streams", [
    # Swin: the stage streams pass window partitions ((B, H, W, C) regrouped in front of C) and patch merging
    # ((..., 2, 2, C) -> 4C: channel c at c, C+c, 2C+c, 3C+c), channels-last reshapes that used to refuse them
    ("swin_tiny_patch4_window7_224", ("patch_embed.proj", "layers.1.downsample.reduction")),
    # DaViT: windows of 3 pad the 8x8 and 4x4 maps; the padded map is cropped back, x[:, :H, :W, :], a slice of
    # (B, H, W, C) along rows that used to be read as a channel slice
    ("davit_tiny", ("stem.conv", "stages.1.downsample.conv")),
    # Swin V2-CR: as Swin, and its attention split heads with the stream's width, C // num_heads (slim forward: -1)
    ("swinv2_cr_tiny_224", ("patch_embed.proj", "stages.1.downsample.reduction")),
    # MobileViT: each MobileVitBlock's transformer stream (conv_1x1 -> 2x2 patches -> ViT blocks -> conv_proj), whose
    # unfold/fold reshapes fold the channels into the batch: a group built from the block (chase_timm.streams)
    ("mobilevit_xxs", ("stages.2.1.conv_1x1", "stages.3.1.conv_1x1", "stages.4.1.conv_1x1")),
])
def test_windowed_stage_streams_shrink_with_prune_skip_exactly(name, streams, tmp_path):
    with float64():
        result = compare(name, OPTIMIZER.get(name, "adamw"), channel_sparsity=0.75, prune_skip=True)
    assert result.refused is None and result.error is None, (result.refused, result.error)
    assert set(streams) <= {g for g, c in result.removed.items() if c}, result.removed
    assert result.removed == result.twin_removed and result.worst()[1] <= 1e-9, (result.worst(), result.diffs)
    row = zoo_coverage.check_model(name, prune_skip=True, channel_sparsity=0.75, keep_models=True)
    assert row["rel_diff"] <= 1e-4 and set(streams) <= {g for g, c in row["chase"].removed_channels().items() if c}
    slim = row["slim"].eval()
    chase_timm.save_pretrained(slim, tmp_path / "slim")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'slim'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)


def test_fastvit_attention_loses_heads_and_its_stream_shrinks_with_prune_skip_exactly():
    """FastViT-SA's Attention reshapes its heads' output to the input width C (slim forward: -1), so the stream
    feeding it, tied to every stage's through the multiplier downsampling, shrinks under prune_skip; the slim model
    reloads and re-parameterizes (RepConditionalPosEnc's dim, dim_out and groups follow its conv)."""
    with float64():
        result = compare("fastvit_sa12", "sgd", channel_sparsity=0.6, prune_skip=True, steps=2)
    assert result.refused is None and result.error is None, (result.refused, result.error)
    assert result.removed == result.twin_removed and result.worst()[1] <= 1e-9, (result.worst(), result.diffs)
    assert _heads_removed(result.removed) and result.removed.get("stem.0.conv_kxk.0.conv"), result.removed.keys()
    row = zoo_coverage.check_model("fastvit_sa12", prune_skip=True, channel_sparsity=0.6, keep_models=True)
    assert row["rel_diff"] <= 1e-4, row["rel_diff"]
    slim = row["slim"].eval()
    stage = slim.stages[3]
    assert stage.pos_emb.dim == stage.pos_emb.dim_out == stage.pos_emb.groups < 128  # the stage-3 stream shrank
    assert stage.blocks[0].token_mixer.num_heads < 4 and roundtrip(slim, 64) == 0.0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = slim(x)
        output = timm.utils.reparameterize_model(slim)(x)
    assert float((output - reference).abs().max() / reference.abs().max()) <= 1e-5


SPATIAL_REDUCTION = [  # (model, build kwargs on top of SMALL, its attention modules with a spatial reduction)
    ("pvt_v2_b0", {}, ("stages.0.blocks.0.attn", "stages.1.blocks.0.attn")),  # sr_ratio 4 and 2: conv, LayerNorm
    ("pvt_v2_b0", {"linear": True},  # the *_li models: pool to 7x7, 1x1 sr conv, LayerNorm, GELU in every stage
     ("stages.0.blocks.0.attn", "stages.1.blocks.0.attn", "stages.2.blocks.0.attn")),
    ("twins_pcpvt_small", {}, ("blocks.0.0.attn",)),  # GlobalSubSampleAttn, sr_ratio 4
]


@pytest.mark.parametrize("name, kwargs, attentions", SPATIAL_REDUCTION, ids=["pvt_v2_b0", "pvt_v2_b0-linear",
                                                                         "twins_pcpvt_small"])
def test_spatial_reduction_widths_shrink_exactly_and_reload(name, kwargs, attentions, tmp_path, monkeypatch):
    # the sr conv's output channels, its LayerNorm and the kv columns reading them: a group inside the attention,
    # which timm's forward flattens with the input width, sr(x).reshape(B, C, -1)
    monkeypatch.setitem(zoo_coverage.SMALLER, name, {**SMALL[name], **kwargs})
    groups = [f"{a}.sr" for a in attentions]
    model = zoo_coverage.build(name)
    found = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    assert all(found[g].prunable for g in groups), {g: found[g].reason for g in groups}
    sr = groups[0]  # the sr width alone shrinks (heads whole): the module runs its slim forward
    plain = slim_copy(model, tensor_removals([found[sr]], {sr: [0, 2]}))
    assert type(plain.get_submodule(attentions[0])) is SLIM[type(model.get_submodule(attentions[0]))]
    assert plain.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with float64():
        result = compare(name, "adamw", channel_sparsity=0.6)
    assert result.refused is None and result.error is None, (result.refused, result.error)
    assert set(groups) <= {g for g, c in result.removed.items() if c}, result.removed
    assert result.removed == result.twin_removed and result.masks_equal
    assert result.worst()[1] <= 1e-9, (result.worst(), result.diffs)
    row = zoo_coverage.check_model(name, prune_skip=False, channel_sparsity=0.6, keep_models=True)
    assert row["rel_diff"] <= 1e-4, row["rel_diff"]  # float32 export == masked training model
    assert set(groups) <= {g for g, c in row["chase"].removed_channels().items() if c}
    slim = row["slim"].eval()
    for attention in map(slim.get_submodule, attentions):  # key/value input narrower than the stream
        assert attention.sr.out_channels == attention.norm.normalized_shape[0] == attention.kv.in_features
        assert attention.kv.in_features < attention.q.in_features
    chase_timm.save_pretrained(slim, tmp_path / "slim")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'slim'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)


LEFT_WHOLE = [  # (model, build kwargs on top of SMALL, module, entries of its head group, reason)
    ("eva02_tiny_patch14_224", {"attn_type": "rope", "qkv_fused": False, "num_kv_heads": 1}, "blocks.0.attn", 1,
     "multi-query attention: one key/value head serves every query head"),
    ("beit_base_patch16_224", {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}, "blocks.0.attn", 3,
     "shares BEiT's model-level relative position bias"),
    ("vit_relpos_small_patch16_224", {"shared_rel_pos": True}, "blocks.0.attn", 3,  # the vit_srelpos models
     "shares the model-level relative position module (shared_rel_pos"),
    ("gcvit_xxtiny", {}, "stages.0.blocks.1.attn", 2,  # a global block: its queries are the stage's stream
     "takes its queries from the stage's global query (GlobalContext)"),
]


@pytest.mark.parametrize("name, kwargs, block, width, reason", LEFT_WHOLE)
def test_heads_that_cannot_be_removed_exactly_are_left_whole_with_a_reason(name, kwargs, block, width, reason):
    model = zoo_coverage.build(name, **kwargs)
    groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    heads = groups[block]
    assert heads.width == width and not heads.prunable and reason in heads.reason, heads.reason
    assert f"{block}.qkv" not in groups and f"{block}.q_proj" not in groups  # the head group owns the q/k/v rows


@pytest.mark.parametrize("kwargs, reason", [
    ({"q_proj": False}, "takes its queries straight from its latent parameter (q_proj=False)"),
    ({"out_features": 0}, "has no output projection (out_features=0)")])
def test_an_attention_pool_without_its_q_or_proj_keeps_its_heads(kwargs, reason):
    model = zoo_coverage.build("vit_tiny_patch16_224", depth=1, global_pool="map")
    model.attn_pool = AttentionPoolLatent(192, num_heads=3, **kwargs)  # no timm model builds these
    groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32), prune_skip=True)}
    assert not groups["attn_pool"].prunable and reason in groups["attn_pool"].reason, groups["attn_pool"].reason
    assert "attn_pool.kv" not in groups  # the head group owns the k/v rows
    # its k/v input (the ViT's stream) and its MLP still shrink around the heads it keeps
    assert groups["patch_embed.proj"].prunable, groups["patch_embed.proj"].reason
    assert "attn_pool.mlp.fc1" not in groups or groups["attn_pool.mlp.fc1"].prunable, groups["attn_pool.mlp.fc1"].reason


class _PerHeadBias(torch.nn.Module):
    """A user's relative position module (not one of timm's): a learned (1, heads, N, N) bias."""

    def __init__(self, heads: int, tokens: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(1, heads, tokens, tokens))

    def get_bias(self) -> torch.Tensor:
        return self.bias

    def forward(self, attn: torch.Tensor, shared_rel_pos=None) -> torch.Tensor:
        return attn + self.bias


def test_an_attention_with_a_relative_position_module_chase_does_not_know_keeps_its_heads():
    model = zoo_coverage.build("vit_relpos_small_patch16_224")
    model.blocks[0].attn.rel_pos = _PerHeadBias(3, 4)  # 2x2 patches, no class token
    groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    assert not groups["blocks.0.attn"].prunable
    assert "its rel_pos (_PerHeadBias) is not one of timm's per-head" in groups["blocks.0.attn"].reason
    assert groups["blocks.1.attn"].prunable  # timm's RelPosMlp


def test_talking_heads_own_their_mixing_rows_and_columns_and_a_resize_checks_them():
    model = zoo_coverage.build("cait_xxs24_224")
    groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    heads = groups["blocks.0.attn"]
    assert heads.prunable and {"blocks.0.attn.proj_l", "blocks.0.attn.proj_w"}.isdisjoint(groups)  # no groups there
    mixing = {(s.tensor, s.dim): s.index for s in heads.slices if ".proj_l." in s.tensor or ".proj_w." in s.tensor}
    assert mixing == {(f"blocks.0.attn.{m}.{t}", d): ((0,), (1,), (2,))
                      for m in ("proj_l", "proj_w") for t, d in (("weight", 0), ("weight", 1), ("bias", 0))}
    with pytest.raises(ValueError, match=r"blocks.0.attn: proj_w columns \(3\) do not match proj_l rows \(2\)"):
        slice_in_place(copy.deepcopy(model), {"blocks.0.attn.proj_l.weight": {0: [1]},
                                              "blocks.0.attn.proj_l.bias": {0: [1]}})
    # a mixed head removed from proj_l's rows and proj_w's columns alone (plans of earlier releases) still runs
    x = torch.randn(1, 3, 32, 32)
    slice_in_place(model, {"blocks.0.attn.proj_l.weight": {0: [1]}, "blocks.0.attn.proj_l.bias": {0: [1]},
                           "blocks.0.attn.proj_w.weight": {1: [1]}})
    assert model.blocks[0].attn.num_heads == 3 and model.eval()(x).shape == (1, 10)
    regrouped = {g.name: g for g in find_channel_groups(model, x)}  # its heads stay whole; training goes on
    assert not regrouped["blocks.0.attn"].prunable and "earlier chase_timm release" in regrouped["blocks.0.attn"].reason
    optimizer = torch.optim.SGD(model.train().parameters(), lr=0.01)
    config = chase_timm.ChaseConfig(total_steps=3, update_interval=2, channel_interval=1, channel_offset=0,
                                    channel_end_step=2, channel_sparsity=0.9, min_channel_ratio=0.3)
    chase = chase_timm.Chase(model, config, optimizer=optimizer, example_inputs=x)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
        optimizer.step()
        chase.step()
        optimizer.zero_grad()
    assert chase.removed_channels()


SLIM_CLASSES = {"eva02_tiny_patch14_224": eva.EvaAttention, "beit_base_patch16_224": beit.Attention,
                "swinv2_tiny_window16_256": swin_transformer_v2.WindowAttention,
                "swinv2_cr_tiny_224": swin_cr.WindowMultiHeadAttention,
                "cait_xxs24_224": (cait.ClassAttn, cait.TalkingHeadAttn),
                "edgenext_xx_small": edgenext.CrossCovarianceAttn, "xcit_nano_12_p16_224": xcit.XCA,
                "pvt_v2_b0": pvt_v2.Attention, "twins_svt_small": twins.LocallyGroupedAttn,
                "twins_pcpvt_small": twins.GlobalSubSampleAttn,
                "davit_tiny": (davit.ChannelAttention, davit.WindowAttention),
                "davit_tiny-v2": davit.ChannelAttentionV2,
                "vit_relpos_small_patch16_224": relpos.RelPosAttention,
                "convit_tiny": (convit.GPSA, convit.MHSA),
                "nest_tiny": nest.Attention,
                "gcvit_xxtiny": gcvit.WindowAttentionGlobal,
                "crossvit_tiny_240": crossvit.CrossAttention,
                "fastvit_sa12": fastvit.Attention, "halonet26t": LambdaLayer, "caformer_s18": metaformer.Attention,
                "nextvit_small": nextvit.EfficientAttention,
                "vit_dwee_patch16_reg1_gap_256": DiffAttention,
                "vit_tiny_patch16_224-map": AttentionPoolLatent}  # by case (a VARIANTS name or a model)
CASE_CLASSES = {**SLIM_CLASSES, "mobilevitv2_050": mobilevit.LinearSelfAttention,
                "tiny_vit_5m_224": tiny_vit.Attention, "samvit_base_patch16_224": sam.Attention,
                "hiera_tiny_224": hiera.MaskUnitAttention, "sam2_hiera_tiny": sam2.MultiScaleAttention,
                "efficientformer_l1": efficientformer.Attention,
                "efficientformerv2_s0": (efficientformer_v2.Attention2d, efficientformer_v2.Attention2dDownsample),
                "davit_tiny-v2": (davit.ChannelAttentionV2, davit.WindowAttention),
                "eva02_tiny_patch14_224-gqa": AttentionRope, "maxvit_pico_rw_256": maxxvit.AttentionCl,
                "maxvit_tiny_tf_224": maxxvit.AttentionCl,
                "coatnet_nano_rw_224": maxxvit.Attention2d,
                "mvitv2_tiny": mvitv2.MultiScaleAttention,
                "crossvit_tiny_240": (Attention, crossvit.CrossAttention),
                "visformer_tiny": visformer.Attention,
                "volo": (volo.OutlookAttention, volo.Attention, volo.ClassAttention),
                "tnt_s_legacy_patch16_224": tnt.Attention,
                "efficientvit_b0": efficientvit_mit.LiteMLA,
                "mobilenetv5_base": MultiQueryAttention2d,
                "halonet26t": (HaloAttn, BottleneckAttn, LambdaLayer)}  # by case, else by model


def _kinds(kinds) -> tuple:
    """A SLIM_CLASSES / CASE_CLASSES value as a tuple of classes."""
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _assert_each_class_lost_heads(case: str, model: torch.nn.Module, removed: dict) -> None:
    """Heads were removed (``removed``: :func:`_heads_removed`), from each attention class the case is for."""
    assert removed, "no attention head was removed"
    blocks = [model.get_submodule(b) for b in removed]  # byoanet's: the SelfAttnBlock holding the attention
    attentions = [getattr(block, "self_attn", block) for block in blocks]
    for kind in _kinds(CASE_CLASSES.get(case, CASE_CLASSES.get(VARIANTS.get(case, (case,))[0], ()))):
        assert any(isinstance(a, kind) for a in attentions), (kind, removed.keys())


# CoaT at 32 px: 8 heads of 4 channels (crpe windows 3, 5, 7 of 2, 3, 3 heads) on 8x8, 4x4, 2x2 and 1x1 maps; two
# serial blocks share stage 1's crpe, a serial block and the parallel block's attention share each of stages 2-4's
COAT = {"img_size": 32, "embed_dims": (32, 32, 32, 32), "mlp_ratios": (2, 2, 2, 2), "serial_depths": (2, 1, 1, 1),
        "parallel_depth": 1}


def test_coat_heads_leave_every_attention_sharing_their_crpe_exactly(tmp_path, monkeypatch):
    name = "coat_tiny"
    monkeypatch.setitem(zoo_coverage.SMALLER, name, COAT)
    model, x = zoo_coverage.build(name).eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # on an unshrunk model the slim forward computes what timm's does
        expected = model(x)
        for module in model.modules():
            use_slim_forward(module)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expected, rtol=0, atol=0)
    with float64():
        result = compare(name, "adamw", channel_sparsity=0.6)
    assert result.refused is None and result.error is None, (result.refused, result.error)
    assert all(result.removed.get(f"crpe{i}") for i in range(1, 5)), result.removed.keys()  # one group per crpe
    assert result.removed == result.twin_removed and result.masks_equal
    assert result.worst()[1] <= 1e-9, (result.worst(), result.diffs)
    row = zoo_coverage.check_model(name, prune_skip=False, channel_sparsity=0.6, keep_models=True)
    assert row["rel_diff"] <= 1e-4, row["rel_diff"]
    removed, slim = row["chase"].removed_channels(), row["slim"].eval()
    attentions = {n: m for n, m in slim.named_modules() if isinstance(m, coat.FactorAttnConvRelPosEnc)}
    for attention in attentions.values():
        crpe = attention.crpe
        assert type(attention) is SLIM[coat.FactorAttnConvRelPosEnc]
        stage = next(i for i in range(1, 5) if getattr(slim, f"crpe{i}") is crpe)
        assert attention.num_heads == 8 - len(removed[f"crpe{stage}"]) == sum(crpe.head_splits)
        assert min(crpe.head_splits) >= 1 and crpe.channel_splits == [c.out_channels for c in crpe.conv_list]
    heads = {n: m.num_heads for n, m in attentions.items()}
    assert head_counts(slim) == heads and head_counts(row["chase"].module) == dict.fromkeys(heads, 8)
    chase_timm.save_pretrained(slim, tmp_path / "slim")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'slim'}", pretrained=True).eval()
    assert {n: m.num_heads for n, m in loaded.named_modules() if n in attentions} == heads
    assert slim_summary(str(tmp_path / "slim"))["heads"] == {n: (8, h) for n, h in heads.items() if h != 8}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)
    # a timm whose FactorAttnConvRelPosEnc forward no longer matches the slim edits: every crpe's heads stay, saying so
    monkeypatch.setitem(REFUSED, coat.FactorAttnConvRelPosEnc, "has no slim forward: changed")
    groups = {g.name: g for g in find_channel_groups(zoo_coverage.build(name), torch.randn(1, 3, 32, 32))}
    assert all(groups[f"crpe{i}"].reason == "FactorAttnConvRelPosEnc has no slim forward: changed" for i in range(1, 5))


def test_coat_heads_stay_where_each_crpe_window_holds_one_head():
    # 3 heads in windows of one: the first head of each window stays, so none can go (it was a 0-wide group)
    model = timm.create_model("coat_lite_tiny", img_size=32, embed_dims=(24,) * 4, serial_depths=(1,) * 4,
                              mlp_ratios=(2,) * 4, num_heads=3, crpe_window={3: 1, 5: 1, 7: 1}, num_classes=10)
    groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    assert all(groups[f"crpe{i}"].reason == "each window of its ConvRelPosEnc holds one head, which the window keeps"
               for i in range(1, 5))


# VOLO: timm's volo_* functions fix their layers and widths, so the test builds the class (as the nn.MultiheadAttention
# models below): outlook attention on a 4x4 map (windows of 3, stride 2), self-attention on 2x2 tokens in stages
# 2-4, one class-attention block; 4 heads each (of 8 channels, then 16)
VOLO_SMALL = {"img_size": 32, "layers": (1, 1, 1, 1), "embed_dims": (32, 64, 64, 64), "num_heads": (4, 4, 4, 4),
              "post_layers": ("ca",), "mlp_ratio": 2.0, "num_classes": 10}


def _volo(*_, **__) -> torch.nn.Module:
    """The small VOLO, seeded as zoo_coverage.build seeds (so the twin runs start alike), weights as :func:`_build`."""
    torch.manual_seed(0)
    return _attention_std(volo.VOLO(**VOLO_SMALL))


def test_volo_outlook_self_and_class_attention_lose_whole_heads_exactly(monkeypatch):
    monkeypatch.setattr(shrink_equivalence, "tiny_model", _volo)
    monkeypatch.setattr(zoo_coverage, "build", _volo)
    x = torch.randn(2, 3, 32, 32)
    whole = _volo().eval()  # unshrunk, the slim forwards compute what timm's do, bit for bit, on both paths
    with torch.no_grad():
        expected = {fused: _with_fused(whole, fused)(x) for fused in (True, False)}
        for module in whole.modules():
            use_slim_forward(module)
        assert {type(m) for m in whole.modules()} >= {SLIM[volo.Attention], SLIM[volo.OutlookAttention]}
        whole = pickle.loads(pickle.dumps(whole))
        for fused in (True, False):
            torch.testing.assert_close(_with_fused(whole, fused)(x), expected[fused], rtol=0, atol=0)
    with float64():
        result = compare("volo", "adamw", channel_sparsity=0.6)
    assert result.refused is None and result.error is None, (result.refused, result.error)
    _assert_each_class_lost_heads("volo", result.run[0], _heads_removed(result.removed))
    assert result.removed == result.twin_removed and result.masks_equal
    assert result.worst()[1] <= 1e-9, (result.worst(), result.diffs)

    row = zoo_coverage.check_model("volo", prune_skip=False, channel_sparsity=0.6, keep_models=True)
    assert row["rel_diff"] <= 1e-4, row["rel_diff"]  # float32 export == masked training model
    chase, slim = row["chase"], row["slim"].eval()
    removed = _heads_removed(chase.removed_channels())
    _assert_each_class_lost_heads("volo", chase.module, removed)
    base_heads, slim_heads = head_counts(chase.module), head_counts(slim)
    for block, heads in removed.items():
        assert slim_heads[block] == base_heads[block] - len(heads) >= 1
    # no hub for a model timm can't build by name: the width plan (as JSON) + state_dict round trip
    plan = json.loads(json.dumps(width_plan(slim, volo.VOLO(**VOLO_SMALL))))
    loaded = apply_width_plan(volo.VOLO(**VOLO_SMALL), plan).eval()
    loaded.load_state_dict(slim.state_dict())
    assert head_counts(loaded) == slim_heads
    assert [type(m) for m in loaded.modules()] == [type(m) for m in slim.modules()]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)
        outputs = [_with_fused(slim, fused)(x) for fused in (True, False)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5 * float(outputs[1].abs().max()))


def test_slim_forwards_are_timm_forwards_and_a_changed_timm_forward_gets_none(monkeypatch):
    # on an unshrunk model the slim subclass computes exactly what timm's class does, on both attention paths
    for case, kind in [(case, kind) for case, kinds in SLIM_CLASSES.items() for kind in _kinds(kinds)]:
        name = _model(case, monkeypatch)
        model, x = zoo_coverage.build(name).eval(), torch.randn(2, 3, 32, 32)
        modules = [m for m in model.modules() if type(m) is kind]
        assert modules, name
        with torch.no_grad():
            expected = {fused: _with_fused(model, fused)(x) for fused in (True, False)}
            for module in modules:
                use_slim_forward(module)
                assert type(module) is SLIM[kind] and isinstance(module, kind)
            model = pickle.loads(pickle.dumps(model))  # a module-level class: pickles (and deep-copies)
            for fused in (True, False):
                torch.testing.assert_close(_with_fused(model, fused)(x), expected[fused], rtol=0, atol=0)
        assert SLIM[kind].__module__ == "chase_timm.adapters.attention" and timm_class(SLIM[kind]) is kind
    # each edit must match exactly as often as written, else no subclass (and the class's heads stay whole)
    reason = slim_subclass(eva.EvaAttention, "Changed", [("reshape(B, N, C)", "reshape(B, N, -1)", 2)])
    assert reason == ("has no slim forward: timm.models.eva.EvaAttention.forward holds 'reshape(B, N, C)' 1 times, "
                      "not 2 (this timm changed it)")
    # a forward without source (a timm installed without .py files) gets none too, instead of breaking the import
    namespace: dict = {}
    exec("import torch.nn as nn\nclass NoSource(nn.Module):\n    def forward(self, x):\n        return x\n", namespace)
    reason = slim_subclass(namespace["NoSource"], "Changed", [])
    assert reason.startswith("has no slim forward: the source of") and "unavailable" in reason, reason


def test_a_slim_subclass_edits_the_methods_its_forward_calls_and_a_changed_one_names_itself():
    # ConViT's GPSA splits its q/k heads in get_attention (called by forward), MHSA in get_attention_map (a
    # diagnostic): a model that lost heads runs both
    model = zoo_coverage.build("convit_tiny").eval()
    found = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    attentions = ("blocks.0.attn", "blocks.2.attn")  # GPSA, MHSA
    slim = slim_copy(model, tensor_removals([found[a] for a in attentions], {a: [1] for a in attentions}))
    tokens = torch.randn(2, 16, 48)  # a 4x4 map (GPSA's relative positions) of the 48-wide stream
    for name in attentions:
        module = slim.get_submodule(name)
        assert type(module) is SLIM[timm_class(type(module))] and module.num_heads == 2
        assert module.get_attention_map(tokens).shape == (2,) and module(tokens).shape == (2, 16, 48)
    assert SLIM[convit.GPSA].get_attention.__qualname__ == "SlimGPSA.get_attention"
    reason = slim_subclass(convit.GPSA, "Changed", [("C // self.num_heads", "-1", 1)],
                           methods={"get_attention": [("C // self.num_heads", "-1", 2)]})
    assert reason == ("has no slim forward: timm.models.convit.GPSA.get_attention holds 'C // self.num_heads' 1 "
                      "times, not 2 (this timm changed it)")


def test_a_plan_resizing_a_class_this_timm_has_no_slim_forward_for_names_the_reason(monkeypatch):
    model = zoo_coverage.build("eva02_tiny_patch14_224")
    attn = model.blocks[0].attn
    head, width, heads = range(attn.head_dim), attn.proj.in_features, attn.num_heads  # fused qkv: head 0's rows
    slice_in_place(model, {"blocks.0.attn.qkv.weight": {0: [i + k * width for k in range(3) for i in head]},
                           **{f"blocks.0.attn.{b}_bias": {0: head} for b in "qkv"},
                           "blocks.0.attn.proj.weight": {1: head}})
    assert type(attn) is SLIM[eva.EvaAttention] and attn.num_heads == heads - 1  # resizable here
    monkeypatch.setitem(REFUSED, eva.EvaAttention, "has no slim forward: (a timm that changed it)")
    with pytest.raises(ValueError, match=r"blocks.0.attn: EvaAttention has no slim forward.*timm release it was saved"):
        refresh_heads(attn, "blocks.0.attn")


def test_crossvit_and_volo_heads_stay_whole_with_the_reason_where_this_timm_has_no_slim_forward(monkeypatch):
    # a timm whose CrossAttention / VOLO forwards no longer match their edits: the groups name the reason
    for kind in (crossvit.CrossAttention, volo.Attention, volo.OutlookAttention):
        monkeypatch.setitem(heads_module._LEFT_WHOLE, kind, "has no slim forward: (a timm that changed it)")
    for model, blocks in ((zoo_coverage.build("crossvit_tiny_240"), ("blocks.0.fusion.0.attn",)),
                          (_volo(), ("network.0.0.attn", "network.2.0.attn"))):
        groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
        for block in blocks:
            kind = type(model.get_submodule(block)).__name__
            assert not groups[block].prunable, block
            assert groups[block].reason == f"{kind} has no slim forward: (a timm that changed it)", groups[block].reason


def _with_fused(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """``model`` with every attention module on the fused (SDPA) or the eager path."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def test_a_group_of_heads_counts_its_channels_in_the_budget():
    groups = {g.name: g for g in find_channel_groups(zoo_coverage.build("vit_tiny_patch16_224"))}
    heads = groups["blocks.0.attn"]
    assert (heads.width, heads.unit) == (3, 64)
    assert ChannelGroup.from_dict({**heads.to_dict(), "unit": 64}) == heads
    old = {k: v for k, v in heads.to_dict().items() if k != "unit"}  # a state saved before units existed
    assert ChannelGroup.from_dict(old).unit == 1
    state = ChannelState(zoo_coverage.build("vit_tiny_patch16_224"), list(groups.values()), 0.4, 0.5)
    assert state.total == 4 * 3 * 64 + 4 * 768  # 4 blocks (SMALL): heads in head_dim channels, MLP channels one each


def test_the_budget_counts_a_removed_head_as_its_channels_and_rounds_only_single_channels():
    scores = {"attn": torch.tensor([0.1, 0.5, 0.6], dtype=torch.float64),
              "fc1": torch.linspace(0.2, 0.4, 100, dtype=torch.float64)}
    alive = {n: torch.ones(len(s), dtype=torch.bool) for n, s in scores.items()}
    floors = {"attn": 1, "fc1": 1}
    # 64 channels due: the lowest-scored head alone pays them (without units it would count as one channel)
    removed = select_channels(scores, alive, floors, 64, torch.Generator().manual_seed(0), units={"attn": 64})
    assert removed["attn"].tolist() == [0] and "fc1" not in removed
    removed = select_channels(scores, alive, floors, 70, torch.Generator().manual_seed(0), round_to=4,
                              units={"attn": 64})
    # 6 channels due after the head: runs of 4 fc1 channels (a multiple of 4 stays); the second lands 2 beyond, as
    # near as stopping 2 short, and a tie reaches the count
    assert removed["attn"].tolist() == [0] and len(removed["fc1"]) == 8


@pytest.mark.parametrize("budget", ["per_kind", "pooled"])
def test_heads_mlp_channels_and_the_stream_each_reach_s_c_under_the_per_kind_budget(budget):
    model = zoo_coverage.build("vit_tiny_patch16_224")
    groups = find_channel_groups(model, prune_skip=True)
    state = ChannelState(model, groups, 0.4, 0.2, budget=budget)
    tensors = dict(named_tensors(model))
    assert state.remove_lowest(tensors, 0.4, "original", torch.Generator().manual_seed(0))
    pools = state.budget_pools()
    assert set(pools) == ({"heads", "streams", "channels"} if budget == "per_kind" else {"all"})
    share = {}
    for kind, names in pools.items():
        total = sum(state._base_width[n] * state.units[n] for n in names)
        removed = sum(int((~state.alive[n]).sum()) * state.units[n] for n in names)
        share[kind] = removed / total
    # heads to the nearest whole head, the stream to its own S_c; the channel pool takes up the heads' rounding,
    # so the total is exactly S_c's count
    due = math.ceil(0.4 * state.total)
    removed = state.total - state.alive_count()
    assert removed == due if budget == "per_kind" else 0 <= removed - due < 64  # pooled: a head may overshoot
    if budget == "per_kind":
        assert abs(share["heads"] - 0.4) <= 32 / (4 * 3 * 64) and 0.4 <= share["streams"] < 0.4 + 1 / 192, share
        assert abs(share["channels"] - 0.4) < 0.01, share


def test_heads_are_taken_to_the_nearest_whole_head():
    scores = {"attn": torch.tensor([0.1, 0.2, 0.6], dtype=torch.float64)}
    alive = {"attn": torch.ones(3, dtype=torch.bool)}
    pick = lambda n: select_channels(scores, alive, {"attn": 1}, n, torch.Generator().manual_seed(0),
                                     units={"attn": 64}).get("attn", torch.tensor([])).tolist()
    assert pick(90) == [0] and pick(97) == [0, 1] and pick(20) == [] and pick(33) == [0]


def test_latency_rounding_moves_channels_only_within_a_budget_pool():
    model = zoo_coverage.build("vit_tiny_patch16_224")
    groups = find_channel_groups(model, prune_skip=True)
    calls = []

    def shift_to_first(groups, proposed, high, floors, units):  # a policy that moves 8 channels between groups
        calls.append({g.name for g in groups})
        names = [g.name for g in groups if not g.heads]
        widths = dict(proposed)
        if len(names) > 1:
            widths[names[0]] = min(high[names[0]], proposed[names[0]] + 8)
            widths[names[-1]] = proposed[names[-1]] - (widths[names[0]] - proposed[names[0]])
        return widths

    removed = {}
    for policy in (None, shift_to_first):
        state = ChannelState(model, groups, 0.4, 0.2)
        state.width_policy = policy
        state.remove_lowest(dict(named_tensors(model)), 0.4, "original", torch.Generator().manual_seed(0))
        removed[policy] = {kind: sum(int((~state.alive[n]).sum()) for n in names)
                           for kind, names in state.budget_pools().items()}
    assert sorted(map(sorted, calls)) == sorted(map(sorted, state.budget_pools().values()))  # a call per pool
    assert removed[shift_to_first] == removed[None]  # the policy moved channels, but no pool paid for another


def test_attention_heads_recipe_refuses_an_unknown_channel_cost(capsys):
    import attention_heads

    for cost in ("none", "flops", "latency"):  # the recipe's choices are ChaseConfig's
        chase_timm.ChaseConfig(total_steps=1, channel_cost=cost)
    with pytest.raises(SystemExit):  # argparse, before any model is built
        attention_heads.main(["--models", "test_vit", "--channel-cost", "flop"])
    assert "invalid choice: 'flop'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ torch's nn.MultiheadAttention

class TokenAttention(torch.nn.Module):
    """A user's model on a timm backbone: ``test_vit``'s tokens through one ``nn.MultiheadAttention`` of 8 heads
    (self-attention, or keys/values projected to ``kdim``/``vdim``), mean-pooled into a classifier."""

    def __init__(self, batch_first: bool = True, padding: bool = False, **mha):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = timm.create_model("test_vit", pretrained=False, num_classes=0, global_pool="", img_size=32)
        width = self.backbone.num_features
        self.k = torch.nn.Linear(width, mha["kdim"]) if mha.get("kdim") else None
        self.v = torch.nn.Linear(width, mha["vdim"]) if mha.get("vdim") else None
        self.attn = torch.nn.MultiheadAttention(width, 8, batch_first=batch_first, **mha)
        self.fc = torch.nn.Linear(width, 10)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        mask = None
        if self.padding:  # the last token is padding
            mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, -1] = True
        q = tokens if self.attn.batch_first else tokens.transpose(0, 1)
        k, v = (q if layer is None else layer(q) for layer in (self.k, self.v))
        out = self.attn(q, k, v, key_padding_mask=mask, need_weights=False)[0]
        return self.fc((out if self.attn.batch_first else out.transpose(0, 1)).mean(1))


class TokenEncoder(torch.nn.Module):
    """``test_vit``'s tokens (the last one padding) through a 2-layer ``nn.TransformerEncoder`` of 8 heads, whose
    inference fast path packs the padded batch into a nested tensor and runs
    ``torch._transformer_encoder_layer_fwd``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = timm.create_model("test_vit", pretrained=False, num_classes=0, global_pool="", img_size=32)
        layer = torch.nn.TransformerEncoderLayer(64, 8, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=x.device)
        padding[:, -1] = True
        return self.fc(self.encoder(tokens, src_key_padding_mask=padding)[:, 0])


MHA_MODELS = {"batch_first": (TokenAttention, {}),
              "sequence_first-key_padding_mask": (TokenAttention, {"batch_first": False, "padding": True}),
              "kdim_vdim-bias_kv-zero_attn-no_bias": (TokenAttention, {"kdim": 48, "vdim": 40, "add_bias_kv": True,
                                                                       "add_zero_attn": True, "bias": False}),
              "transformer_encoder": (TokenEncoder, {})}


@pytest.mark.parametrize("case", MHA_MODELS)
def test_multihead_attention_loses_whole_heads_while_training_and_exports_exactly(case, monkeypatch):
    kind, kwargs = MHA_MODELS[case]
    build = lambda name, **_: kind(**kwargs)  # the harnesses build this model instead of a timm name
    monkeypatch.setattr(shrink_equivalence, "tiny_model", build)
    monkeypatch.setattr(zoo_coverage, "build", build)
    blocks = [n for n, m in build("").named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    with float64():
        result = compare("token_attention", "adamw", channel_sparsity=0.6)  # e.g. 8 -> 2 -> 1 heads: two shrinks
    assert result.refused is None and result.error is None, (result.refused, result.error)
    removed = {b: result.removed[b] for b in blocks if result.removed.get(b)}
    assert removed, result.removed.keys()
    assert result.removed == result.twin_removed and result.masks_equal
    assert result.worst()[1] <= 1e-9, (result.worst(), result.diffs)
    model = result.run[0]
    for block, heads in removed.items():
        module = model.get_submodule(block)
        assert type(module) is SlimMultiheadAttention and isinstance(module, torch.nn.MultiheadAttention)
        assert head_counts(model)[block] == 8 - len(heads) >= 1
    if kind is TokenEncoder:  # the containers whose fast path bypasses the attention's forward run torch's without it
        assert type(model.encoder) is SlimTransformerEncoder
        assert type(model.encoder.layers[0]) is SlimTransformerEncoderLayer

    row = zoo_coverage.check_model("token_attention", prune_skip=False, channel_sparsity=0.6, keep_models=True)
    assert row["rel_diff"] <= 1e-4, row["rel_diff"]  # float32 export == masked model (on torch's fast path)
    slim, removed = row["slim"].eval(), row["chase"].removed_channels()
    assert any(removed.get(b) for b in blocks)
    for block in blocks:
        module, heads = slim.get_submodule(block), head_counts(slim)[block]
        assert heads == 8 - len(removed.get(block, ())) and module.embed_dim == 64
        assert module.out_proj.weight.shape == (64, heads * module.head_dim) == (64, module.out_proj.in_features)
    # no hub for a model timm can't build by name: the width plan (as JSON) + state_dict round trip
    plan = json.loads(json.dumps(width_plan(slim, kind(**kwargs))))
    loaded = apply_width_plan(kind(**kwargs), plan).eval()
    loaded.load_state_dict(slim.state_dict())
    assert head_counts(loaded) == head_counts(slim)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in slim.modules()]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)


def _twins(model: torch.nn.Module, removals: dict) -> tuple:
    """The model with ``removals`` ({tensor: {dim: positions}}) masked (zeroed, as Chase masks them) and sliced out
    (``slice_in_place``, as ``shrink``/``export`` remove them)."""
    masked, slim = copy.deepcopy(model), copy.deepcopy(model)
    tensors = dict(named_tensors(masked))
    with torch.no_grad():
        for name, dims in removals.items():
            for dim, positions in dims.items():
                tensors[name].index_fill_(dim, torch.tensor(positions), 0.0)
    slice_in_place(slim, removals)
    return masked, slim


def _head_removals(module: torch.nn.MultiheadAttention, drop: list[int], name: str = "") -> dict:
    """Every slice of the module's head_spec for heads ``drop``, its tensors named under ``name``."""
    return {f"{name}.{piece.tensor}".lstrip("."): {piece.dim: [p for h in drop for p in piece.index[h]]}
            for piece in head_spec(module).slices}


def _mha_twins(module: torch.nn.MultiheadAttention, drop: list[int]) -> tuple:
    """The module with heads ``drop`` masked and with them sliced out (:func:`_twins`)."""
    return _twins(module, _head_removals(module, drop))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("options", [{}, {"bias": False, "add_bias_kv": True, "add_zero_attn": True},
                                     {"kdim": 12, "vdim": 10, "add_bias_kv": True}])
def test_the_slim_multihead_forward_computes_what_the_masked_module_computes(batch_first, options):
    with float64(), torch.no_grad():  # inference: the masked module takes torch's fast path where it can
        torch.manual_seed(0)
        module = torch.nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=batch_first, **options).eval()
        masked, slim = _mha_twins(module, [1, 3])
        assert type(slim) is SlimMultiheadAttention and slim.num_heads == 2 and slim.embed_dim == 16
        assert slim.head_dim == module.head_dim  # so the scale is the same
        batch, tgt, src = 3, 5, 6
        query = torch.randn(batch, tgt, 16)
        key, value = torch.randn(batch, src, options.get("kdim", 16)), torch.randn(batch, src, options.get("vdim", 16))
        if not batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        padding = torch.zeros(batch, src, dtype=torch.bool)
        padding[:, -2:] = True
        per_head = torch.rand(batch, tgt, src) > 0.7  # a 3-D mask has one (tgt, src) slice per head of the module
        calls = [{}, {"key_padding_mask": padding}, {"key_padding_mask": padding.double() * -1e4},
                 {"attn_mask": torch.rand(tgt, src) > 0.7}, {"attn_mask": torch.randn(tgt, src)},
                 {"attn_mask": (per_head.repeat_interleave(4, 0), per_head.repeat_interleave(2, 0))}]
        for call in calls:
            for weights, average in ((False, True), (True, True), (True, False)):
                masks = {k: v[0] if isinstance(v, tuple) else v for k, v in call.items()}, \
                    {k: v[1] if isinstance(v, tuple) else v for k, v in call.items()}
                expected, expected_weights = masked(query, key, value, need_weights=weights,
                                                    average_attn_weights=average, **masks[0])
                out, out_weights = slim(query, key, value, need_weights=weights, average_attn_weights=average,
                                        **masks[1])
                torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
                if weights and not average:  # the weights of the heads left are the masked module's
                    torch.testing.assert_close(out_weights, expected_weights[:, [0, 2]], rtol=1e-9, atol=1e-12)
        if "kdim" not in options:  # packed weights: keys as values (the encoder-decoder split), causal self-attention
            torch.testing.assert_close(slim(query, key, key)[0], masked(query, key, key)[0], rtol=1e-9, atol=1e-12)
            causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt)
            for weights in (False, True):
                expected = masked(query, query, query, attn_mask=causal, is_causal=True, need_weights=weights)[0]
                out = slim(query, query, query, attn_mask=causal, is_causal=True, need_weights=weights)[0]
                torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
            one = query[0] if batch_first else query[:, 0]  # unbatched
            torch.testing.assert_close(slim(one, one, one)[0], masked(one, one, one)[0], rtol=1e-9, atol=1e-12)
        # on an unshrunk module the slim forward is torch's, bit for bit
        whole = copy.deepcopy(module)
        use_slim_forward(whole)
        torch.testing.assert_close(whole(query, key, value)[0], module(query, key, value)[0], rtol=0, atol=0)
        assert timm_class(type(whole)) is torch.nn.MultiheadAttention
        pickle.loads(pickle.dumps(slim))  # a module-level class


def test_a_multihead_slim_transformer_encoder_zeroes_padding_as_torchs_nested_path_and_ffn_keeps_torchs_class():
    with float64(), torch.no_grad():  # eval with a key padding mask: torch's encoder packs a nested tensor
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
        x, padding = torch.randn(3, 6, 16), torch.zeros(3, 6, dtype=torch.bool)
        padding[:, -2:] = True
        padding[1, 3:] = True
        ffn = {f"layers.{i}.{t}": {d: [1, 5, 7]} for i in (0, 1)
               for t, d in (("linear1.weight", 0), ("linear1.bias", 0), ("linear2.weight", 1))}
        masked, slim = _twins(encoder, ffn)  # a width trim of the FFN only: torch's classes and fast path stay
        assert [type(m) for m in slim.modules()] == [type(m) for m in encoder.modules()]
        out = slim(x, src_key_padding_mask=padding)
        assert not out[padding].any()
        torch.testing.assert_close(out, masked(x, src_key_padding_mask=padding), rtol=1e-9, atol=1e-12)
        heads = {**ffn, **_head_removals(encoder.layers[0].self_attn, [1, 3], "layers.0.self_attn")}
        masked, slim = _twins(encoder, heads)
        assert type(slim) is SlimTransformerEncoder and type(slim.layers[0]) is SlimTransformerEncoderLayer
        assert type(slim.layers[1]) is torch.nn.TransformerEncoderLayer
        assert not masked(x, src_key_padding_mask=padding)[padding].any()  # torch took its nested path
        causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
        for call in ({"src_key_padding_mask": padding}, {"src_key_padding_mask": padding.double() * -1e4}, {},
                     {"mask": causal, "is_causal": True}):
            expected, out = masked(x, **call), slim(x, **call)
            # every token, padding included: torch's nested path returns zeros there, and so does the slim encoder
            torch.testing.assert_close(out.mean(1), expected.mean(1), rtol=1e-9, atol=1e-12)


def test_multihead_attention_heads_that_cannot_be_removed_exactly_stay_whole_with_the_reason(monkeypatch):
    # a torch whose nn.TransformerEncoderLayer forward no longer matches: its fast path reads self_attn's tensors
    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    with monkeypatch.context() as patch:
        patch.setitem(REFUSED, torch.nn.TransformerEncoderLayer, "has no slim forward: (a torch that changed it)")
        heads = {g.name: g for g in find_channel_groups(layer, torch.randn(2, 5, 16))}["self_attn"]
    assert heads.width == 4 and not heads.prunable, heads.reason
    assert heads.reason == "is inside TransformerEncoderLayer, which has no slim forward: (a torch that changed it)"
    # a saved plan whose attention lost heads, replayed where its container has no slim forward: refused on load
    build = lambda: torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    plan = width_plan(_twins(layer, _head_removals(layer.self_attn, [1], "self_attn"))[1], build())
    ffn = {"linear1.weight": {0: [3]}, "linear1.bias": {0: [3]}, "linear2.weight": {1: [3]}}
    ffn = width_plan(_twins(layer, ffn)[1], build())
    with monkeypatch.context() as patch:
        patch.setitem(REFUSED, torch.nn.TransformerEncoderLayer, "has no slim forward: (a torch that changed it)")
        assert type(apply_width_plan(build(), ffn)) is torch.nn.TransformerEncoderLayer  # its FFN alone: loads
        with pytest.raises(ValueError, match=r"the model: TransformerEncoderLayer has no slim forward.*torch release"):
            apply_width_plan(build(), plan)
    # a model whose output reads the head-averaged weights (the masked module's mean counts its dead heads)
    class UsesWeights(TokenAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.backbone.forward_features(x)
            out, weights = self.attn(tokens, tokens, tokens, need_weights=True)
            return self.fc(out.mean(1)) + 10 * weights.amax((1, 2)).unsqueeze(1)

    heads = {g.name: g for g in find_channel_groups(UsesWeights(), torch.randn(1, 3, 32, 32))}["attn"]
    assert not heads.prunable and "numerical check" in heads.reason, heads.reason
    # a torch whose forward no longer matches the edits: heads whole, and a saved plan that resized one is refused
    assert edited(torch.nn.functional._in_projection_packed, [("E = q.size(-1)", "E", 2)]) == (
        "torch.nn.functional._in_projection_packed holds 'E = q.size(-1)' 1 times, not 2 (this torch changed it)")
    model = TokenAttention()
    monkeypatch.setitem(REFUSED, torch.nn.MultiheadAttention, "has no slim forward: (a torch that changed it)")
    groups = {g.name: g for g in find_channel_groups(model, torch.randn(1, 3, 32, 32))}
    assert not groups["attn"].prunable and "MultiheadAttention has no slim forward" in groups["attn"].reason
    with pytest.raises(ValueError, match=r"attn: MultiheadAttention has no slim forward.*torch release it was saved"):
        refresh_heads(model.attn, "attn")


def test_multihead_attention_without_a_private_torch_function_has_no_slim_forward(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "_in_projection_packed")
    assert multihead._slim_functional() == ("torch.nn.functional has no _in_projection_packed (this torch renamed or "
                                            "removed it)")


class _Traced(torch.Tensor):
    """A tensor subclass with ``__torch_function__``: torch's functions hand it the public function they were
    called as (``multi_head_attention_forward``), which the slim forward must route to its own copy."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_tensor_subclass_runs_the_slim_multihead_forward():
    with float64(), torch.no_grad():
        torch.manual_seed(0)
        masked, slim = _mha_twins(torch.nn.MultiheadAttention(16, 4, batch_first=True), [1])
        x = torch.randn(2, 5, 16)
        out, expected = slim(*[x.as_subclass(_Traced)] * 3)[0], masked(x, x, x)[0]
        assert type(out) is _Traced
        torch.testing.assert_close(out.as_subclass(torch.Tensor), slim(x, x, x)[0], rtol=0, atol=0)
        torch.testing.assert_close(out.as_subclass(torch.Tensor), expected, rtol=1e-9, atol=1e-12)


def test_a_levit_deep_copies_after_chase_and_count_flops():
    # LeViT caches its attention biases in eval mode; Chase's eval-mode trace and the FLOP count (grad on) left a
    # non-leaf tensor in that cache, which deepcopy refuses: timm's ModelEmaV3 failed after Chase(...)
    model = timm.create_model("levit_128s", num_classes=10, **SMALL["levit_128s"])
    chase_timm.Chase(model, chase_timm.ChaseConfig(total_steps=10), example_inputs=torch.randn(1, 3, 32, 32))
    chase_timm.metrics.count_flops(model, 32)
    ema = timm.utils.ModelEmaV3(model)  # deep-copies the model
    assert sum(p.numel() for p in ema.parameters()) == sum(p.numel() for p in model.parameters())


def test_byoanet_blocks_hold_their_heads_and_a_resize_rederives_what_the_attention_forwards_read():
    # HaloAttn, BottleneckAttn and LambdaLayer have no projection: a head's output channels are its SelfAttnBlock's
    # post_attn BatchNorm channels and conv3_1x1 columns, so the block's group holds the head; q/k/v get no group
    model = zoo_coverage.build("halonet26t").eval()
    x = torch.randn(2, 3, 32, 32)
    found = {g.name: g for g in find_channel_groups(model, x)}
    blocks = ("stages.0.0", "stages.1.0", "stages.2.0")  # HaloAttn, BottleneckAttn, LambdaLayer: 4 heads each
    assert [(found[b].prunable, found[b].heads, found[b].width, found[b].unit) for b in blocks] == [
        (True, True, 4, 4), (True, True, 4, 8), (True, True, 4, 8)]
    assert not [n for n in found if ".self_attn." in n]
    # the attention's input width (conv1_1x1's channels) shrinks too: HaloAttn's q and kv reading it are one branch,
    # not a fork into a block and its shortcut (the logits' position bias is an add), and LambdaLayer's slim forward
    # reshapes its output to its heads, not to that width
    assert all(found[f"{b}.conv1_1x1.conv"].prunable for b in blocks)
    head_1 = {(s.tensor, s.dim): s.index[1] for b in blocks for s in found[b].slices}
    r = lambda start, n: tuple(range(start, start + n))  # noqa: E731
    assert head_1[("stages.0.0.self_attn.q.weight", 0)] == r(4, 4)  # q rows of 4, kv: k then v rows, 4 + 4
    assert head_1[("stages.0.0.self_attn.kv.weight", 0)] == r(8, 8)
    assert head_1[("stages.1.0.self_attn.qkv.weight", 0)] == r(8, 8) + r(40, 8) + r(72, 8)  # q | k | v blocks of 32
    lam = ("stages.2.0.self_attn.qkv.weight", "stages.2.0.self_attn.norm_q.weight")  # query rows of 4 (and norm)
    assert head_1[(lam[0], 0)] == head_1[(lam[1], 0)] == r(4, 4)
    for block, width in zip(blocks, (4, 8, 8)):  # the head's output channels
        assert head_1[(f"{block}.post_attn.weight", 0)] == head_1[(f"{block}.conv3_1x1.conv.weight", 1)] == \
            r(width, width)
    # the lambda's shared key and value rows and its lambda conv are in no group
    assert ("stages.2.0.self_attn.conv_lambda.weight", 0) not in head_1
    masked = copy.deepcopy(model)  # heads 1 and 3 zeroed (in eval mode a zeroed BatchNorm weight and bias give 0)
    removals = tensor_removals([found[b] for b in blocks], {b: [1, 3] for b in blocks})
    zero_removed(masked, removals)
    with torch.no_grad():
        expected = masked(x)
    slim = slim_copy(model, removals)
    halo, bottleneck, lam = (slim.get_submodule(f"{b}.self_attn") for b in blocks)
    assert (halo.num_heads, halo.dim_out_qk, halo.dim_out_v) == (2, 8, 8)
    assert (bottleneck.num_heads, bottleneck.dim_out_qk, bottleneck.dim_out_v) == (2, 16, 16)
    assert lam.num_heads == 2 and type(lam) is SLIM[LambdaLayer]  # its output reshape follows the heads left
    with torch.no_grad():
        torch.testing.assert_close(slim(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(ValueError, match=r"stages.0.0.self_attn: kv rows \(15\) do not match the heads left \(16\)"):
        slice_in_place(slim, {"stages.0.0.self_attn.kv.weight": {0: [0]}})
