"""One place that knows an optimizer's per-parameter state, and which optimizers shrink exactly.

Masking (new weights start at zero with zero state), the shrinkability check, slicing and resume all read an
optimizer's state through :func:`param_states`, which looks through wrappers (Accelerate's
``AcceleratedOptimizer``, timm's ``Lookahead``, whose slow weights live in its base optimizer's state) and into
lists/tuples of tensors (e.g. Kron's ``Q``).

Shrinking removes channels that masking only zeroes. That is exact when an optimizer's update is element-wise, or
uses whole-tensor sums and norms (zero entries change neither); it is not when the update depends on the tensor's
size (means, RMS, ``numel``), on its matrix shape (orthogonalisation, per-dimension preconditioners) or on random
draws sized like it. :data:`SHRINK_EXACT` and :data:`SHRINK_REFUSED` / :data:`SHRINK_REFUSED_FLAGS` list what was
read and checked (float64 shrinking vs masking runs, see docs/optimizers.md); :func:`check_shrink_exact` refuses
the second list and warns about optimizers in neither.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Iterator, List, Mapping, Optional, Tuple

import torch

from .adapters.optim import unwrap_optimizer

__all__ = ["state_optimizer", "param_states", "states_like", "replace_param_states", "SHRINK_EXACT", "SHRINK_REFUSED",
           "SHRINK_REFUSED_FLAGS", "shrink_support", "check_shrink_exact"]

_ELEMENTWISE = "element-wise update"
_NORMS = "per-tensor norms only, which zero entries do not change"
# optimizer classes (public import paths) whose shrinking run equals the masking run up to float64 rounding
SHRINK_EXACT: Mapping[str, str] = {
    "torch.optim.SGD": _ELEMENTWISE, "torch.optim.Adam": _ELEMENTWISE, "torch.optim.AdamW": _ELEMENTWISE,
    "torch.optim.Adamax": _ELEMENTWISE, "torch.optim.Adadelta": _ELEMENTWISE, "torch.optim.Adagrad": _ELEMENTWISE,
    "torch.optim.NAdam": _ELEMENTWISE, "torch.optim.RAdam": _ELEMENTWISE, "torch.optim.RMSprop": _ELEMENTWISE,
    "timm.optim.AdaBelief": _ELEMENTWISE, "timm.optim.AdamWLegacy": _ELEMENTWISE, "timm.optim.Adan": _ELEMENTWISE,
    "timm.optim.Adopt": _ELEMENTWISE,
    "timm.optim.MADGRAD": _ELEMENTWISE, "timm.optim.NAdamLegacy": _ELEMENTWISE, "timm.optim.NAdamW": _ELEMENTWISE,
    "timm.optim.RAdamLegacy": _ELEMENTWISE, "timm.optim.RMSpropTF": _ELEMENTWISE, "timm.optim.SGDW": _ELEMENTWISE,
    "timm.optim.Lamb": _NORMS + " (trust ratio, global gradient clipping)",
    "timm.optim.Lars": _NORMS + " (trust ratio)",
    "timm.optim.Mars": _NORMS + " (clamp of the corrected gradient)",
    "timm.optim.NvNovoGrad": _NORMS + " (second moment of the gradient norm)",
}
# optimizer classes whose update depends on the tensor's size or shape: shrinking would change the run
SHRINK_REFUSED: Mapping[str, str] = {
    "torch.optim.Adafactor": "its factored second moments are row/column means and its step is scaled by RMS values "
                             "over the whole tensor (both divide by the tensor's size)",
    "timm.optim.Adafactor": "its factored second moments are row/column means and its update is clipped by an RMS "
                            "over the whole tensor (both divide by the tensor's size)",
    "timm.optim.AdafactorBigVision": "its factored second moments are row/column means (they divide by the tensor's "
                                     "size)",
    "timm.optim.Adahessian": "its Hessian estimate draws random signs sized like each tensor and keeps it on the "
                             "parameter (p.hess), outside the optimizer state",
    "timm.optim.AdamP": "its projection threshold scales with 1/sqrt(fan-in), which removed input channels change",
    "timm.optim.SGDP": "its projection threshold scales with 1/sqrt(fan-in), which removed input channels change",
    "timm.optim.Muon": "it orthogonalises each weight's update as a matrix (Newton-Schulz) and scales it by the "
                       "matrix's shape",
    "timm.optim.LaProp": "measured, not explained: its shrinking run differs from masking (5.5e-4 relative loss over "
                         "10 float64 steps on resnet18) although its update reads element-wise",
    "timm.optim.Lion": "measured: its update is the sign of the momentum blend, so rounding-level differences (the "
                       "sliced and the masked sums add in another order) flip whole +-lr steps; 1.3e-7 relative loss "
                       "and 2.5e-2 in exp_avg over 10 float64 steps on resnet18 (docs/optimizers.md)",
    "timm.optim.kron.Kron": "its Kronecker-factored preconditioners are matrices sized by each dimension of the tensor",
}
# param_group settings that make any optimizer's update depend on the tensor's size: (key, reason); set = truthy
SHRINK_REFUSED_FLAGS: Mapping[str, str] = {
    "caution": "the cautious mask is divided by its mean over the whole tensor, which counts removed channels "
               "(timm's c* optimizers: cadamw, clion, cnadamw, clamb, ...)",
    "clipping_threshold": "the update is clipped by its RMS over the whole tensor, which divides by the tensor's size",
}


def state_optimizer(optimizer: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
    """The optimizer that holds the per-parameter state (inside Accelerate's and timm's Lookahead wrappers)."""
    return None if optimizer is None else unwrap_optimizer(optimizer)


def param_states(optimizer: Optional[torch.optim.Optimizer], param: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """Every non-scalar state tensor of ``param`` as (key, tensor); entries of a list/tuple state are keyed
    ``"<name>.<index>"``. Lookahead's slow weights (``lookahead_slow_buff``) are among them."""
    holder = state_optimizer(optimizer)
    if holder is None:
        return []
    return list(_walk(holder.state.get(param, {})))


def states_like(optimizer: Optional[torch.optim.Optimizer], param: torch.Tensor) -> List[torch.Tensor]:
    """The state tensors of ``param`` shaped like it (momentum, Adam moments, slow weights, ...): what masking zeroes."""
    return [value for _, value in param_states(optimizer, param) if value.shape == param.shape]


def replace_param_states(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                         values: Mapping[str, torch.Tensor]) -> None:
    """Put new tensors under keys from :func:`param_states` (list/tuple entries replaced in their container)."""
    state = state_optimizer(optimizer).state[param]
    for key, value in values.items():
        if key in state:
            state[key] = value
            continue
        name, _, index = key.rpartition(".")
        container = list(state[name])
        container[int(index)] = value
        state[name] = type(state[name])(container)


def _walk(state: Mapping) -> Iterator[Tuple[str, torch.Tensor]]:
    for key, value in state.items():
        if torch.is_tensor(value):
            if value.dim() > 0:
                yield str(key), value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{key}.{i}", v) for i, v in enumerate(value) if torch.is_tensor(v) and v.dim() > 0)


def _class_path(cls: type) -> str:
    """The public import path under which a listed class is known (``torch.optim.SGD``), else module.qualname."""
    for path in (*SHRINK_EXACT, *SHRINK_REFUSED):
        module, _, name = path.rpartition(".")
        try:
            if getattr(importlib.import_module(module), name, None) is cls:
                return path
        except ImportError:
            continue
    return f"{cls.__module__}.{cls.__qualname__}"


def shrink_support(optimizer: torch.optim.Optimizer) -> Tuple[str, str]:
    """("exact" | "refused" | "unverified", why) for shrinking channels out of a model trained by ``optimizer``
    (judged on the optimizer inside any wrapper; Lookahead's own slow-weight update is element-wise)."""
    holder = state_optimizer(optimizer)
    for key, reason in SHRINK_REFUSED_FLAGS.items():
        if any(group.get(key) not in (None, False, 0) for group in holder.param_groups):
            return "refused", f"{key} is set: {reason}"
    path = _class_path(type(holder))
    if path in SHRINK_REFUSED:
        return "refused", SHRINK_REFUSED[path]
    if path in SHRINK_EXACT:
        return "exact", SHRINK_EXACT[path]
    return "unverified", f"{path} is in neither list of chase_timm.optim_state"


def check_shrink_exact(optimizer: Optional[torch.optim.Optimizer]) -> None:
    """ValueError (one line) for an optimizer that would make shrinking differ from masking; a warning for one
    that was never checked. Call when shrinking is on and channels will be removed."""
    if optimizer is None:
        return
    verdict, why = shrink_support(optimizer)
    name = _class_path(type(state_optimizer(optimizer)))
    if verdict == "refused":
        exact = ", ".join(path.rpartition(".")[2] for path in SHRINK_EXACT)
        raise ValueError(
            f"Chase cannot shrink channels exactly under {name}: {why}. Use ChaseConfig(shrink='off') (masking only; "
            f"the export is still slim) or an optimizer whose shrinking is exact ({exact}).")
    if verdict == "unverified":
        warnings.warn(f"Chase: shrinking under {name} is unverified ({why}); it may train differently from masking "
                      "only. See docs/optimizers.md, or use ChaseConfig(shrink='off').", UserWarning, stacklevel=3)
