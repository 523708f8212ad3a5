"""torch's ``nn.MultiheadAttention`` made to run with fewer heads: a slim subclass whose forward is torch's own.

torch's forward takes the attention width from the *input*: ``F.multi_head_attention_forward`` sets ``head_dim =
embed_dim // num_heads`` with ``embed_dim`` the query's width and reshapes the heads' output to it,
``F._in_projection_packed`` splits the packed projection at the query's width, ``F._in_projection`` checks the
separate q/k/v weights against it, and the fast path (``torch._native_multi_head_attention``) does the same in C++.
So a module that lost heads (``in_proj_weight`` of ``3 * heads' * head_dim`` rows, ``out_proj`` of ``heads' *
head_dim`` columns, its input still ``embed_dim`` wide) does not run.

``SlimMultiheadAttention``'s forward is ``nn.MultiheadAttention.forward`` compiled from torch's source with the fast
path off, calling copies of those three functions compiled from torch's source with a short edit list: the
attention width is ``out_proj_weight.size(1)`` (heads left times ``head_dim``) where torch uses the query's width,
and everything else (masks, ``is_causal``, ``need_weights``, ``add_bias_kv``, ``add_zero_attn``, dropout,
kdim/vdim, batch_first, unbatched inputs) is torch's code. ``head_dim``, hence the scale, does not change. Every
edit must match its expected number of times; when a torch release changed one of these functions, the class gets
no slim subclass and :data:`~chase_timm.adapters.attention.REFUSED` says why (its heads then stay whole).

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` compute inference on a fast path that bypasses the
attention module's forward (``torch._transformer_encoder_layer_fwd`` from ``self_attn``'s tensors and ``embed_dim //
num_heads``; nested tensors for padded batches): the layer's slim subclass is torch's forward with that fast path
off; the encoder's keeps torch's decision to pack a padded batch, runs it unpacked with its padding mask instead and
zeroes the padded positions, as torch's nested path returns them.

The classes are registered with the timm slim subclasses (:data:`~chase_timm.adapters.attention.SLIM`): only a
resized instance (a container: one whose MultiheadAttention lost heads) switches to its slim class
(``chase_timm.heads.refresh_heads``), parameters and state_dict keys unchanged. The slim functions resolve torch's
names in a copy of ``torch.nn.functional``'s namespace taken at import (later monkeypatches there are not seen).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import require
from .attention import REFUSED, edited, register

__all__ = ["check_version", "SlimMultiheadAttention", "SlimTransformerEncoderLayer", "SlimTransformerEncoder"]


def check_version(found: str = torch.__version__) -> None:
    """ImportError (one line) unless ``found`` is a torch version this adapter was written for."""
    require("torch", found)


check_version()


_PRIVATE = ("_in_projection_packed", "_in_projection")  # torch private names the slim functional rebuilds


def _slim_functional() -> Union[Callable, str]:
    """torch's multi-head attention (and its in-projections) with the attention width taken from
    ``out_proj_weight`` / the projection weights (heads left), or why one of them cannot be derived."""
    private = {name: getattr(F, name, None) for name in _PRIVATE}
    missing = [name for name, function in private.items() if function is None]
    if missing:
        return f"torch.nn.functional has no {', '.join(missing)} (this torch renamed or removed it)"
    packed = edited(private["_in_projection_packed"], [("E = q.size(-1)", "E = w.size(0) // 3", 1)])
    separate = edited(private["_in_projection"], [("Eq, Ek, Ev = q.size(-1),", "Eq, Ek, Ev = w_q.size(0),", 1),
                                                  ("w_q.shape != (Eq, Eq)", "w_q.shape != (Eq, q.size(-1))", 1),
                                                  ("{(Eq, Eq)}", "{(Eq, q.size(-1))}", 1)])
    for made in (packed, separate):
        if isinstance(made, str):
            return made
    forward = edited(F.multi_head_attention_forward, [
        ("tgt_len, bsz, embed_dim = query.shape", "tgt_len, bsz, embed_dim = query.shape\n"
                                                  "    attn_dim = out_proj_weight.size(1)", 1),
        ("head_dim = embed_dim // num_heads", "head_dim = attn_dim // num_heads", 1),
        ('head_dim = embed_dim.div(num_heads, rounding_mode="trunc")', "head_dim = attn_dim // num_heads", 1),
        ("if head_dim * num_heads != embed_dim:", "if head_dim * num_heads != attn_dim:", 1),
        ("reshape(tgt_len * bsz, embed_dim)", "reshape(tgt_len * bsz, attn_dim)", 1),
        ("reshape(bsz * tgt_len, embed_dim)", "reshape(bsz * tgt_len, attn_dim)", 1)],
        {"_in_projection_packed": packed, "_in_projection": separate})
    if not isinstance(forward, str):  # a __torch_function__ tensor subclass is handed this function, not torch's
        forward.__globals__["multi_head_attention_forward"] = forward
    return forward


_NO_FAST_PATH = ("is_fastpath_enabled = torch.backends.mha.get_fastpath_enabled()", "is_fastpath_enabled = False", 1)
_FUNCTIONAL = _slim_functional()
if isinstance(_FUNCTIONAL, str):
    REFUSED[nn.MultiheadAttention] = f"has no slim forward: {_FUNCTIONAL}"
    SlimMultiheadAttention: Optional[type] = None
else:
    SlimMultiheadAttention = register(nn.MultiheadAttention, "SlimMultiheadAttention", [
        _NO_FAST_PATH, ('"torch.backends.mha.get_fastpath_enabled() was not True"',
                        '"the module lost heads (its slim forward has no fast path)"', 1),
        ("F.multi_head_attention_forward(", "_slim_multi_head_attention_forward(", 2)],
        {"_slim_multi_head_attention_forward": _FUNCTIONAL}, __name__)


def _still_padded(output: torch.Tensor, keep: torch.Tensor, mask_check: bool = False) -> torch.Tensor:
    """Stands in for ``torch._nested_tensor_from_mask`` in the slim encoder: the padded batch goes on unpacked."""
    return output


# nn.TransformerEncoderLayer's inference fast path (torch._transformer_encoder_layer_fwd) reads its self_attn's
# tensors with embed_dim // num_heads without calling its forward: a layer whose attention lost heads runs torch's
# forward without it. nn.TransformerEncoder's packs a padded batch into a nested tensor for its layers (and returns
# zeros at the padded positions): the slim one keeps torch's decision, runs the padded batch with its padding mask
# instead, and zeroes the padded positions where torch would have packed
SlimTransformerEncoderLayer = register(nn.TransformerEncoderLayer, "SlimTransformerEncoderLayer", [_NO_FAST_PATH],
                                       module=__name__)
SlimTransformerEncoder = register(nn.TransformerEncoder, "SlimTransformerEncoder", [
    ("torch._nested_tensor_from_mask(", "_still_padded(", 1),
    ("src_key_padding_mask_for_layers = None", "src_key_padding_mask_for_layers = src_key_padding_mask", 1),
    ("output = output.to_padded_tensor(0.0, src.size())",
     "output = output.masked_fill(src_key_padding_mask.bool().unsqueeze(-1), 0.0)", 1)],
    {"_still_padded": _still_padded}, __name__)
