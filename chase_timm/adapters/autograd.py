"""torch internals the structure analysis reads (``chase_timm.graph``): what an autograd graph node saved for
backward, and the forward-hook and buffer bookkeeping of ``nn.Module`` that has no public query.

Torch-Pruning traces a model through its autograd graph; judging a reshape/slice/expand node needs the shapes
and dim it saved (``_saved_*`` attributes generated per backward function, ``_input_metadata``). Torch-Pruning
registers forward hooks while tracing and leaves them behind when the forward raises, and hooks have no public
"list" or "remove by key".
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from . import require

__all__ = ["check_version", "saved_input_shape", "result_shape", "input_shapes", "saved_dim", "saved_permutation",
           "new_forward_hooks_removed", "has_non_persistent_buffers", "non_persistent_buffer_names", "forward_hooks",
           "remove_forward_hooks", "with_parameters"]


def check_version(found: str = torch.__version__) -> None:
    """ImportError (one line) unless ``found`` is a torch version this adapter was written for."""
    require("torch", found)


check_version()


def saved_input_shape(fn: Any) -> tuple:
    """The input shape a view/reshape/slice/expand backward node saved (``()`` when it saved none)."""
    return tuple(getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None) or ())


def result_shape(fn: Any) -> tuple:
    """The shape of the tensor ``fn``'s forward produced (the gradient it receives); ``()`` when unknown."""
    metadata = getattr(fn, "_input_metadata", None)
    return tuple(metadata[0].shape) if metadata else ()


def input_shapes(fn: Any) -> list[tuple]:
    """The shapes of the tensors ``fn``'s forward took, read from the nodes that made them (``()`` where unknown,
    e.g. a leaf); ``torch.cat`` saves no input sizes."""
    shapes = []
    for source, nr in fn.next_functions:
        metadata = getattr(source, "_input_metadata", None)
        shapes.append(tuple(metadata[nr].shape) if metadata and nr < len(metadata) else ())
    return shapes


def saved_dim(fn: Any) -> int:
    """The dim a backward node (slice, split, cat) saved, signed: autograd stores a negative dim such as
    ``chunk(2, -1)``'s as an unsigned 64-bit value (18446744073709551615)."""
    dim = int(fn._saved_dim)
    return dim - (1 << 64) if dim >= 1 << 63 else dim


def saved_permutation(fn: Any) -> Optional[tuple]:
    """The dim order a transpose/permute backward node's forward produced (``None`` for other nodes)."""
    name = fn.name() if hasattr(fn, "name") else ""
    ndim = len(result_shape(fn))
    if name.startswith("TransposeBackward") and ndim:
        order = list(range(ndim))
        a, b = (int(d) - 2 ** 64 if int(d) >= 2 ** 63 else int(d) for d in (fn._saved_dim0, fn._saved_dim1))
        order[a], order[b] = order[b], order[a]  # negative dims are saved as unsigned 64-bit
        return tuple(order)
    if name.startswith("PermuteBackward") and ndim:
        return tuple(int(d) % ndim for d in fn._saved_dims)
    return None


@contextmanager
def new_forward_hooks_removed(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Remove, on exit (also after an exception), every forward hook registered on ``modules`` inside the block."""
    before = {m: set(m._forward_hooks) for m in modules}
    try:
        yield
    finally:
        for m, keys in before.items():
            for key in set(m._forward_hooks) - keys:
                del m._forward_hooks[key]


def non_persistent_buffer_names(model: nn.Module) -> set[str]:
    """Qualified names of the buffers registered with ``persistent=False`` (not in the state_dict)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, m in model.named_modules() for name in m._non_persistent_buffers_set}


def forward_hooks(module: nn.Module, kind: type) -> list:
    """The forward hooks of ``module`` that are instances of ``kind`` (hook objects survive deep copies)."""
    return [h for h in module._forward_hooks.values() if isinstance(h, kind)]


def remove_forward_hooks(module: nn.Module, kind: type) -> None:
    """Remove the forward hooks of ``module`` that are instances of ``kind``."""
    for key in [k for k, h in module._forward_hooks.items() if isinstance(h, kind)]:
        del module._forward_hooks[key]


def has_non_persistent_buffers(model: nn.Module) -> bool:
    """Whether any submodule holds a buffer registered with ``persistent=False`` (not in its state_dict)."""
    return bool(non_persistent_buffer_names(model))


def with_parameters(module: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of ``module`` whose parameters ``params`` are replaced (any tensors, e.g. slices of its own),
    ``module`` itself untouched (unlike ``torch.func.functional_call``, which swaps them on the module while it runs:
    another thread running the module would see them)."""
    clone = copy.copy(module)
    clone._parameters = {**module._parameters, **params}
    return clone
