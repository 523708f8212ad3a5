"""torch internals the structure analysis reads (``chase_timm.graph``): what an autograd graph node saved for
backward, and the forward-hook and buffer bookkeeping of ``nn.Module`` that has no public query.

Torch-Pruning traces a model through its autograd graph; judging a reshape/slice/expand node needs the shapes
and dim it saved (``_saved_*`` attributes generated per backward function, ``_input_metadata``). Torch-Pruning
registers forward hooks while tracing and leaves them behind when the forward raises, and hooks have no public
"list" or "remove by key".
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from . import require

__all__ = ["check_version", "saved_input_shape", "result_shape", "input_shapes", "saved_dim",
           "new_forward_hooks_removed", "has_non_persistent_buffers", "non_persistent_buffer_names"]


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
    """The dim a slice backward node saved."""
    return fn._saved_dim


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


def has_non_persistent_buffers(model: nn.Module) -> bool:
    """Whether any submodule holds a buffer registered with ``persistent=False`` (not in its state_dict)."""
    return bool(non_persistent_buffer_names(model))
