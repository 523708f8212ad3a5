"""timm attention forwards that reshape the heads' output back to the *input* width, made to follow the heads left.

``EvaAttention`` (EVA, EVA-02), BEiT's ``Attention``, Swin V2's ``WindowAttention``, CaiT's ``ClassAttn``, PVT-v2's
``Attention``, Twins' ``GlobalSubSampleAttn`` and ``LocallyGroupedAttn``, DaViT's ``ChannelAttention`` (V1 and V2)
and ``WindowAttention`` and the cross-covariance attention of EdgeNeXt and XCiT end with
``x.transpose(1, 2).reshape(B, N, C)`` where ``B, N, C = x.shape`` (CaiT, XCiT, Twins and DaViT also split heads
with ``C // self.num_heads``, DaViT's V2 with ``C // self.groups``), so a module that lost a head (or whose input
stream lost a channel) no longer runs. Each gets a *slim* subclass whose ``forward`` is timm's own, compiled from
timm's source with a short edit list (``reshape(B, N, C)`` -> ``reshape(B, N, -1)``, ...): the same computation,
with the widths taken from the heads left. Every edit must match its expected number of times; when a timm release
changed the forward and one does not, the class gets no slim subclass and :data:`REFUSED` says why (its heads then
stay whole).

Nothing in timm is patched: only a resized instance changes class (``module.__class__ = slim``, done by
:func:`chase_timm.heads.refresh_heads`), to a subclass, so ``isinstance`` still holds, parameters (and optimizer
state) are untouched and state_dict keys are unchanged. The subclasses are module-level names here, so deep
copies, pickling and ``torch.compile`` see ordinary classes.
"""
from __future__ import annotations

import inspect
import linecache
import textwrap
from typing import Optional, Sequence, Union

import timm
import torch.nn as nn
from timm.models import beit, cait, davit, edgenext, eva, pvt_v2, swin_transformer_v2, twins, xcit

from . import require

__all__ = ["check_version", "SLIM", "REFUSED", "slim_subclass", "use_slim_forward", "timm_class",
           "SlimEvaAttention", "SlimBeitAttention", "SlimWindowAttentionV2", "SlimClassAttn",
           "SlimCrossCovarianceAttn", "SlimXCA", "SlimPvtV2Attention",
           "SlimGlobalSubSampleAttn", "SlimLocallyGroupedAttn", "SlimChannelAttention",
           "SlimChannelAttentionV2", "SlimDavitWindowAttention"]

Edit = tuple[str, str, int]  # (timm's text, replacement, how many times it must occur)

SLIM: dict[type, type] = {}  # timm class -> its slim subclass
REFUSED: dict[type, str] = {}  # timm class -> why it has no slim subclass (timm changed its forward)


def check_version(found: str = timm.__version__) -> None:
    """ImportError (one line) unless ``found`` is a timm version this adapter was written for."""
    require("timm", found)


check_version()


def slim_subclass(base: type, name: str, edits: Sequence[Edit]) -> Union[type, str]:
    """A subclass of ``base`` named ``name`` (in this module) whose forward is ``base.forward`` with ``edits``
    applied, or why there is none: its source is unavailable (a timm installed without .py files), an edit does
    not occur exactly its count of times (timm changed the forward), or the forward is a closure or decorated
    (its source alone would not rebuild it)."""
    forward, where = base.forward, f"{base.__module__}.{base.__qualname__}.forward"
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError) as err:
        return f"has no slim forward: the source of {where} is unavailable ({err})"
    if forward.__code__.co_freevars or source.lstrip().startswith("@"):
        return f"has no slim forward: {where} is a closure or decorated"
    for old, new, count in edits:
        found = source.count(old)
        if found != count:
            return f"has no slim forward: {where} holds {old!r} {found} times, not {count} (this timm changed it)"
        source = source.replace(old, new)
    filename = f"<chase_timm slim forward of {where}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show it
    namespace: dict = {}
    try:  # names resolve as in timm's module; no __future__ flags inherited from this file
        exec(compile(source, filename, "exec", dont_inherit=True), forward.__globals__, namespace)
    except SyntaxError as err:
        return f"has no slim forward: {where} does not compile on its own ({err})"
    slim_forward = namespace["forward"]
    slim_forward.__qualname__, slim_forward.__module__ = f"{name}.forward", __name__
    slim_forward.__doc__ = forward.__doc__
    return type(name, (base,), {"forward": slim_forward, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"timm's {base.__qualname__} with its output width following its heads."})


def _register(base: type, name: str, edits: Sequence[Edit]) -> Optional[type]:
    """:func:`slim_subclass`, recorded in :data:`SLIM` or (its reason) :data:`REFUSED`."""
    made = slim_subclass(base, name, edits)
    if isinstance(made, str):
        REFUSED[base] = made
        return None
    SLIM[base] = made
    return made


_TO_HEADS = ("reshape(B, N, C)", "reshape(B, N, -1)", 1)
SlimEvaAttention = _register(eva.EvaAttention, "SlimEvaAttention", [_TO_HEADS])
SlimBeitAttention = _register(beit.Attention, "SlimBeitAttention", [_TO_HEADS])
SlimWindowAttentionV2 = _register(swin_transformer_v2.WindowAttention, "SlimWindowAttentionV2",
                                  [("reshape(B_, N, C)", "reshape(B_, N, -1)", 1)])
SlimClassAttn = _register(cait.ClassAttn, "SlimClassAttn",
                          [("C // self.num_heads", "-1", 3), ("reshape(B, 1, C)", "reshape(B, 1, -1)", 1)])
SlimCrossCovarianceAttn = _register(edgenext.CrossCovarianceAttn, "SlimCrossCovarianceAttn", [_TO_HEADS])
SlimXCA = _register(xcit.XCA, "SlimXCA", [("C // self.num_heads", "-1", 1), _TO_HEADS])
SlimPvtV2Attention = _register(pvt_v2.Attention, "SlimPvtV2Attention", [_TO_HEADS])
# Twins split heads with C // self.num_heads, C being the input width (the kv split already has a -1)
SlimGlobalSubSampleAttn = _register(twins.GlobalSubSampleAttn, "SlimGlobalSubSampleAttn",
                                    [("C // self.num_heads", "self.proj.in_features // self.num_heads", 2), _TO_HEADS])
SlimLocallyGroupedAttn = _register(twins.LocallyGroupedAttn, "SlimLocallyGroupedAttn",
                                   [("C // self.num_heads", "-1", 1), ("self.ws, self.ws, C)", "self.ws, self.ws, -1)",
                                    1), ("_w * self.ws, C)", "_w * self.ws, -1)", 1), _TO_HEADS])
# DaViT splits heads with C // self.num_heads too (its channel attention: softmax over each head's channels)
SlimChannelAttention = _register(davit.ChannelAttention, "SlimChannelAttention",
                                 [("C // self.num_heads", "-1", 1), _TO_HEADS])
SlimChannelAttentionV2 = _register(davit.ChannelAttentionV2, "SlimChannelAttentionV2",  # its heads: self.groups
                                   [("C // self.groups", "-1", 1), _TO_HEADS])
SlimDavitWindowAttention = _register(davit.WindowAttention, "SlimDavitWindowAttention",
                                     [("C // self.num_heads", "-1", 1), ("reshape(B_, N, C)", "reshape(B_, N, -1)", 1)])


_BASE = {slim: base for base, slim in SLIM.items()}


def timm_class(kind: type) -> type:
    """The timm class a slim subclass stands for (any other class as it is)."""
    return _BASE.get(kind, kind)


def use_slim_forward(module: nn.Module) -> None:
    """Switch ``module`` to its slim subclass (same parameters and buffers), if its class has one."""
    slim = SLIM.get(type(module))
    if slim is not None:
        module.__class__ = slim
