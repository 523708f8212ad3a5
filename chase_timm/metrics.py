"""Measurement: FLOPs the paper's way (``torch.utils.flop_counter``), training FLOPs over a run, and speed.

Definitions follow the paper's table (FLOPs = 2 x multiply-accumulates of Conv/Linear/matmul ops, as
``FlopCounterMode`` counts them; norms, activations and pooling are not counted):

- *dense FLOPs* (``count_flops``): every weight counted. Of a slim model these are the paper's
  *GPU-supported FLOPs*, which ordinary dense kernels realise.
- *sparse FLOPs* (``sparse_flops``): only non-zero weights of Conv/Linear layers count (the paper's
  *test FLOPs*, assuming sparse kernels).
- *training FLOPs* (``TrainingFlops``): 3 x the sparse forward FLOPs per sample at the density and widths of
  each step (backward = 2 x forward), plus, at every prune/regrow step, the dense weight gradient the
  regrowth ranks (RigL's convention: that step's backward costs f_sparse + f_dense instead of 2 f_sparse).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.benchmark as benchmark

from ._timm import default_example_input, unwrap_model
from .chase import Chase
from .cost import module_flops
from .sparsity import conv_linear_weights

__all__ = ["resolve_input_size", "conv_linear_weights", "count_flops", "sparse_flops", "flop_counts", "TrainingFlops",
           "throughput", "interleaved_timings"]

InputSize = Union[int, Sequence[int], Mapping[str, Any], None]


def resolve_input_size(model: nn.Module, input_size: InputSize = None) -> Tuple[int, int, int]:
    """(C, H, W) of one image: ``input_size`` as (C, H, W), an int (square, the model's channels) or a timm data
    config (its ``input_size``); by default the size the model was built at (``img_size=...``), else its own
    ``pretrained_cfg`` size (a saved slim model records the size it was trained at)."""
    if isinstance(input_size, Mapping):
        if "input_size" not in input_size:
            raise ValueError("input_size as a mapping must be a timm data config with an 'input_size' key, "
                             f"got keys {sorted(input_size)}; pass (C, H, W) instead.")
        input_size = input_size["input_size"]
    default = tuple(default_example_input(unwrap_model(model), 1).shape[1:])
    if input_size is None:
        return default
    if isinstance(input_size, int):
        return (default[0], input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) != 3:
        raise ValueError(f"input_size must be (C, H, W) or an int, got {input_size!r}.")
    return size


def _weight_flops(model: nn.Module, input_size: InputSize) -> Tuple[int, Dict[str, int]]:
    """Total FLOPs of one image and the FLOPs of every Conv/Linear weight (``"<module>.weight"``), one pass."""
    model = unwrap_model(model)
    size = resolve_input_size(model, input_size)
    with torch.inference_mode(False):
        example = default_example_input(model, 1).new_empty(1, *size).normal_()
    total, per_module = module_flops(model, (example,))
    return total, {name: per_module.get(name.rpartition(".")[0], 0) for name in conv_linear_weights(model)}


def count_flops(model: nn.Module, input_size: InputSize = None) -> int:
    """Dense FLOPs of one forward pass of one image (2 x MACs, as in the paper's table).

    ``input_size``: (C, H, W), an int, or a timm data config; default: the size the model was built at.
    """
    return _weight_flops(model, input_size)[0]


def _densities(source: Union[nn.Module, Chase],
               densities: Optional[Mapping[str, Any]]) -> Tuple[nn.Module, Dict[str, float]]:
    """The model to count and a density per weight name, from a mapping, a Chase's masks, or the weights' zeros."""
    if isinstance(source, Chase):
        model = source.module
        if densities is None:
            # masks, not zeros: regrown weights start at exactly 0 but are active and cost FLOPs; kept-dense
            # Conv/Linear weights (exclude, weight-standardised) lose the rows and columns of removed channels
            channel_masks = source.channels.channel_masks
            dense = {n: channel_masks[n] for n in conv_linear_weights(model) if n in channel_masks}
            densities = {n: float(m.count_nonzero()) / m.numel() for n, m in {**source.masks, **dense}.items()}
    else:
        model = unwrap_model(source)
        if densities is None:
            densities = {n: float(w.count_nonzero()) / w.numel() for n, w in conv_linear_weights(model).items()}
    # chase.stats()["layers"] maps names to {"density": ...}; a plain mapping maps them to numbers
    return model, {n: float(v["density"] if isinstance(v, Mapping) else v) for n, v in densities.items()}


def sparse_flops(model: Union[nn.Module, Chase], densities: Optional[Mapping[str, Any]] = None,
                 input_size: InputSize = None) -> int:
    """FLOPs of one image when Conv/Linear weights skip their zeros (the paper's theoretical "test FLOPs").

    ``model`` is a model (zeros are measured), or a ``Chase`` (its masks count: regrown weights that are still
    exactly 0 are active). ``densities`` optionally overrides: ``{"<module>.weight": density}`` or
    ``chase.stats()["layers"]``.
    """
    return flop_counts(model, densities, input_size)["sparse_flops"]


def flop_counts(model: Union[nn.Module, Chase], densities: Optional[Mapping[str, Any]] = None,
                input_size: InputSize = None) -> Dict[str, int]:
    """``{"dense_flops", "sparse_flops"}`` of one image from one counting forward (``count_flops`` and
    ``sparse_flops`` together at the cost of one; arguments as ``sparse_flops``'s)."""
    model, dens = _densities(model, densities)
    total, per_weight = _weight_flops(model, input_size)
    unknown = sorted(set(dens) - set(per_weight))
    if unknown:
        raise ValueError(f"sparse_flops: {unknown[:3]} are not Conv/Linear weights of {type(model).__name__}; "
                         "name them as '<module name>.weight'.")
    sparse = total - sum(per_weight[n] * (1.0 - d) for n, d in dens.items())
    return {"dense_flops": total, "sparse_flops": int(round(sparse))}


class TrainingFlops:
    """Training FLOPs integrated over a run, updated with one call after each ``chase.step()``.

    Per sample: 3 x forward FLOPs at the step's masks and channel widths; at every prune/regrow step the
    weight gradient is dense (+ f_dense - f_sparse, f_dense at the current widths). Masks are recounted only
    after steps that change them (prune/regrow updates and channel events), so the hot path is a few additions.
    ``dense_total`` is what the dense model would have cost on the same samples.

    Example::

        flops = TrainingFlops(chase, input_size=(3, 32, 32))
        ...  # in the loop, after chase.step():
        flops.step(x.shape[0])
        print(flops.total, flops.total / flops.dense_total)
    """

    def __init__(self, chase: Chase, input_size: InputSize = None) -> None:
        self.chase = chase
        total, self.per_weight = _weight_flops(chase.module, input_size)
        # FLOPs per weight element stay fixed when Chase.shrink() slices channels out (same spatial size / tokens)
        self.per_element = {n: f / chase.module.get_parameter(n).numel() for n, f in self.per_weight.items()}
        self.other = total - sum(self.per_weight.values())  # FLOPs not tied to a weight (e.g. attention matmuls)
        self.dense_forward = total
        self.total = 0.0
        self.dense_total = 0.0
        self.samples = 0
        self._seen_step: Optional[int] = None
        self._recount()

    def _recount(self) -> None:
        """Forward FLOPs per sample at the current masks (sparse) and widths (dense)."""
        chase, sparse, slim = self.chase, self.other, self.other
        for name, per_element in self.per_element.items():
            numel = chase.module.get_parameter(name).numel()
            mask = chase.masks.get(name, chase.channels.channel_masks.get(name))
            keep = chase.channels.allowed.get(name, chase.channels.channel_masks.get(name))
            sparse += per_element * (float(mask.count_nonzero()) if mask is not None else numel)
            slim += per_element * (float(keep.count_nonzero()) if keep is not None else numel)
        self.sparse_forward, self.slim_forward = sparse, slim
        self._seen_step = chase.step_count

    def step(self, samples: int) -> None:
        """Count one forward+backward of ``samples`` images (call after ``chase.step()``, every micro-step)."""
        t, config = self.chase.step_count, self.chase.config
        self.total += 3.0 * self.sparse_forward * samples
        self.dense_total += 3.0 * self.dense_forward * samples
        self.samples += samples
        if t != self._seen_step:
            update = config.runs_update(t)
            if update:  # the dense weight gradient of every micro-batch of this optimizer step
                self.total += (self.slim_forward - self.sparse_forward) * samples * self.chase.accumulation_steps
            if update or config.is_channel_step(t):
                self._recount()
            self._seen_step = t

    def summary(self) -> Dict[str, float]:
        """JSON-ready totals: training FLOPs, the dense reference, their ratio, and current per-sample forwards."""
        return {"train_flops": self.total, "dense_train_flops": self.dense_total,
                "train_flops_ratio": self.total / self.dense_total if self.dense_total else 0.0,
                "samples": self.samples, "forward_sparse_flops": self.sparse_forward,
                "forward_slim_flops": self.slim_forward, "forward_dense_flops": self.dense_forward}

    def state_dict(self) -> Dict[str, float]:
        """Running totals, for exact resume next to ``chase.state_dict()``."""
        return {"total": self.total, "dense_total": self.dense_total, "samples": self.samples}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore running totals (load the Chase state first: the masks are recounted from it)."""
        self.total, self.dense_total = float(state["total"]), float(state["dense_total"])
        self.samples = int(state["samples"])
        self._recount()


def _measure(model: nn.Module, x: torch.Tensor, number: int, label: str) -> benchmark.Measurement:
    """``number`` forward passes under inference mode, timed by ``torch.utils.benchmark.Timer.timeit``."""
    timer = benchmark.Timer("model(x)", globals={"model": model, "x": x}, label=label,
                            num_threads=torch.get_num_threads())
    with torch.inference_mode():
        return timer.timeit(number)


def interleaved_timings(models: Mapping[str, nn.Module], x: torch.Tensor, repeats: int = 5, warmup: int = 2,
                        block_seconds: float = 0.5) -> Dict[str, benchmark.Measurement]:
    """Seconds per forward of each model on ``x``, measured side by side: after ``warmup`` calls each, ``repeats``
    rounds time a block of about ``block_seconds`` of every model in turn (order rotated each round), so a noisy
    or shared machine slows all models alike. Models must already be in eval mode on ``x``'s device."""
    names = list(models)
    number = {}
    for name in names:
        if warmup:
            _measure(models[name], x, warmup, name)  # lazy init, allocator, compilation
        once = _measure(models[name], x, 1, name).mean
        number[name] = max(1, round(block_seconds / max(once, 1e-9)))
    raw: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            raw[name].append(_measure(models[name], x, number[name], name).raw_times[0])
    return {name: benchmark.Measurement(number_per_run=number[name], raw_times=raw[name],
                                        task_spec=benchmark.TaskSpec(stmt="model(x)", setup="", label=name,
                                                                     num_threads=torch.get_num_threads()))
            for name in names}


def throughput(model: nn.Module, batch_size: int = 64, input_size: InputSize = None,
               warmup: int = 3, iters: int = 10) -> float:
    """Images per second of eval-mode forward passes on the model's device (torch.utils.benchmark timing)."""
    size = resolve_input_size(model, input_size)
    x = default_example_input(unwrap_model(model), 1).new_empty(batch_size, *size).normal_()
    was_training = model.training
    model.eval()
    try:
        if warmup:
            _measure(model, x, warmup, "warmup")
        return batch_size / _measure(model, x, iters, "throughput").median
    finally:
        model.train(was_training)
