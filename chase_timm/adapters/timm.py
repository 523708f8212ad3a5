"""timm internals ``chase_timm.hub`` needs: the model args ``timm.create_model`` records on a model.

timm keeps the keyword arguments a model was built with in ``model._model_args``; ``timm.models.get_model_args``
and ``save_for_hf`` read them back to write config.json's ``model_args``. A slim model records its base
architecture's args next to the width plan, and saving swaps in the base's args, so both reading and writing the
record are needed; timm's public ``update_model_args`` only merges into it.
"""
from __future__ import annotations

from typing import Any, Mapping

import timm
import torch.nn as nn

from . import require

__all__ = ["check_version", "recorded_model_args", "record_model_args"]


def check_version(found: str = timm.__version__) -> None:
    """ImportError (one line) unless ``found`` is a timm version this adapter was written for."""
    require("timm", found)


check_version()


def recorded_model_args(model: nn.Module) -> dict[str, Any]:
    """A copy of the keyword arguments timm recorded when it built ``model`` (empty when none were recorded)."""
    return dict(getattr(model, "_model_args", None) or {})


def record_model_args(model: nn.Module, args: Mapping[str, Any]) -> None:
    """Replace timm's record of ``model``'s build arguments (what ``save_for_hf`` exports as ``model_args``)."""
    model._model_args = dict(args)
