"""Per-device latency model of a model's prunable layers, and the "fast neighbour" rounding of channel widths.

Chase decides widths by UMM alone; the hardware then runs some widths faster than their FLOPs say (kernels
block channels by 8/16/32; an odd width pays for the padded one). :class:`LatencyTable` measures, on the
device and at the batch size and memory layout the user runs, how long each prunable Conv/Linear layer takes
(forward, or forward + backward for training) at a few candidate widths around the proposed ones, with
``torch.utils.benchmark``; only the unique layer shapes are timed, and the results are cached in a JSON file
keyed by device, model, batch size, input size, layout and pass. :func:`fast_widths` then moves every group to
the nearby candidate that runs fastest for its size (least time beyond what its width accounts for,
:func:`excess_costs`; never below its floor, never above what it still has) while the total number of removed
channels stays within ``[budget, budget + slack]`` (an exact multiple-choice knapsack over the width changes). :class:`LatencyRounding` ties both to :class:`~chase_timm.channels.ChannelState`: it runs at the
final channel event when ``ChaseConfig(width_rounding="latency")``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils import benchmark

from ._timm import model_input_size
from .channels import class_step
from .graph import ChannelGroup
from .slim import meta_clone

__all__ = ["LatencyTable", "LatencyRounding", "LatencyCosts", "candidate_widths", "excess_costs", "seconds_per_channel",
           "slope_widths", "marginal_seconds", "fast_widths", "device_name", "LAYOUTS"]

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
ALIGNMENTS = (8, 16, 32)  # widths kernels block channels by; candidates are the nearest multiples either side


def device_name(device: Union[str, torch.device]) -> str:
    """A readable name of the hardware ``device`` stands for (GPU model, or CPU model and torch threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def candidate_widths(width: int, low: int, high: int, alignments: Sequence[int] = ALIGNMENTS, unit: int = 1,
                     round_to: int = 1) -> list[int]:
    """``width`` and the nearest widths below and above it whose channels are multiples of each alignment (and of
    ``round_to``), within ``[low, high]``; widths count entries of ``unit`` channels (a class of tied channels)."""
    found = {width}
    for a in alignments:
        step = class_step(math.lcm(a, round_to), unit)
        found.update({width // step * step, -(-width // step) * step})
    step = class_step(round_to, unit)
    return sorted(c for c in found if low <= c <= high and c > 0 and (c % step == 0 or c == width))


def excess_costs(costs: Mapping[int, float], proposed: int) -> Dict[int, float]:
    """A group's ``costs`` ({width: seconds}) less the time its width accounts for, ``s·(width - proposed)``, with
    ``s`` the least-squares seconds per channel of a line through the origin (time proportional to width, as
    FLOPs say): what a width costs beyond its size. A dip below that line is a width the kernels run fast;
    :func:`fast_widths` on these costs prefers such widths rather than merely smaller ones."""
    slope = seconds_per_channel(costs)
    return {w: t - slope * (w - proposed) for w, t in costs.items()}


def seconds_per_channel(costs: Mapping[int, float]) -> float:
    """The least-squares slope of ``costs`` ({width: seconds}) on a line through the origin: seconds per channel."""
    return sum(w * t for w, t in costs.items()) / max(sum(w * w for w in costs), 1)


def slope_widths(width: int) -> list[int]:
    """The widths :class:`LatencyCosts` times for a group of ``width`` alive channels: ``width``, about 3/4 and
    1/2 of it: a range wide enough for a slope, in three shapes per layer to time at each event."""
    return sorted({width, max(1, width * 3 // 4), max(1, width // 2)})


def marginal_seconds(costs: Mapping[int, float]) -> float:
    """Seconds one channel saves: the least-squares slope of ``costs`` ({width: seconds}) on a line with an
    intercept (a layer's fixed per-call time is not saved by removing channels), at least 0; with one width
    only, the slope through the origin (:func:`seconds_per_channel`)."""
    if len(costs) < 2:
        return seconds_per_channel(costs)
    mean_w, mean_t = sum(costs) / len(costs), sum(costs.values()) / len(costs)
    slope = (sum((w - mean_w) * (t - mean_t) for w, t in costs.items())
             / sum((w - mean_w) ** 2 for w in costs))
    return max(slope, 0.0)


def fast_widths(costs: Mapping[str, Mapping[int, float]], proposed: Mapping[str, int], slack: int,
                units: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
    """One width per group from its ``costs`` ({width: cost}), minimising the summed cost while the total
    removed channels stay within ``[proposed, proposed + slack]`` (kept = Σ unit·width between Σ unit·proposed −
    slack and Σ unit·proposed): an exact dynamic programme over the summed width change. Groups without costs
    keep their proposed width."""
    units = units or {}
    names = list(costs)
    stages = [{0: (0.0, 0, 0)}]  # per group processed: summed width change -> (cost, previous change, width)
    for name in names:
        unit, base, nxt = units.get(name, 1), proposed[name], {}
        for delta, (cost, _, _) in stages[-1].items():
            for width, seconds in costs[name].items():
                d = delta + unit * (width - base)
                if d not in nxt or cost + seconds < nxt[d][0]:
                    nxt[d] = (cost + seconds, delta, width)
        stages.append(nxt)
    feasible = [d for d in stages[-1] if -slack <= d <= 0]  # 0 is always there: every proposed width is an option
    delta, widths = min(feasible, key=lambda d: stages[-1][d][0]), dict(proposed)
    for name, stage in zip(reversed(names), reversed(stages[1:])):
        _, delta, widths[name] = stage[delta]
    return widths


class LatencyTable:
    """Measured seconds of single Conv/Linear layers on one device, batch size, input size, layout and pass.

    ``key`` names the setting; ``seconds`` maps a layer shape (JSON text) to its median time. ``cache``: a JSON
    file holding tables of any number of settings (one entry per key), read on creation (an unreadable file counts
    as empty, with a warning) and replaced atomically after every :meth:`measure` that timed something new.
    """

    def __init__(self, model: nn.Module, batch_size: int = 32, img_size: Optional[int] = None,
                 layout: str = "channels_last", device: Union[str, torch.device, None] = None, backward: bool = False,
                 cache: Union[str, os.PathLike, None] = None, min_run_time: float = 0.02, rounds: int = 3) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {sorted(LAYOUTS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        param = next(model.parameters(), None)
        self.device = torch.device(device if device is not None else param.device if param is not None else "cpu")
        self.batch_size, self.layout, self.backward = batch_size, layout, backward
        channels, height, width = model_input_size(model)
        self.input_size = (channels, img_size or height, img_size or width)
        self.min_run_time, self.rounds = min_run_time, rounds
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        self.key = (f"{device_name(self.device)}|{arch}|batch {batch_size}|{'x'.join(map(str, self.input_size))}|"
                    f"{layout}|{'forward+backward' if backward else 'forward'}|torch {torch.__version__}")
        self.cache = Path(cache) if cache is not None else None
        self.seconds: Dict[str, float] = dict(self._tables().get(self.key, {}))
        self._spatial = _input_spatial(model, self.input_size)

    def layers(self, model: nn.Module) -> Dict[str, nn.Module]:
        """The model's Conv2d/Linear layers that ran in the recorded forward, by weight tensor name."""
        return {f"{n}.weight": m for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and n in self._spatial}

    def shape(self, name: str, layer: nn.Module, in_features: int, out_features: int) -> str:
        """The JSON key of ``layer`` (a weight named ``name``) resized to ``in_features`` → ``out_features``."""
        spatial = self._spatial[name.rsplit(".", 1)[0]]
        if isinstance(layer, nn.Linear):
            return json.dumps(["linear", in_features, out_features, layer.bias is not None, spatial])
        depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
        groups = in_features if depthwise else layer.groups
        return json.dumps(["conv", in_features, out_features, list(layer.kernel_size), list(layer.stride),
                           list(layer.padding) if not isinstance(layer.padding, str) else layer.padding,
                           list(layer.dilation), groups, layer.bias is not None, spatial])

    def measure(self, shapes: Sequence[str]) -> None:
        """Time every shape not yet in the table: ``rounds`` rounds over all of them in shuffled order (a shared
        machine slows them alike), the median per shape kept; then write the cache."""
        todo = sorted(set(shapes) - set(self.seconds))
        if not todo:
            return
        runs = {s: _runner(json.loads(s), self.batch_size, self.device, LAYOUTS[self.layout], self.backward)
                for s in todo}
        times: Dict[str, list] = {s: [] for s in todo}
        order = list(todo)
        for r in range(self.rounds):
            random.Random(r).shuffle(order)
            for s in order:
                timer = benchmark.Timer("run()", globals={"run": runs[s]}, num_threads=torch.get_num_threads())
                times[s].append(timer.blocked_autorange(min_run_time=self.min_run_time).median)
        self.seconds.update({s: sorted(t)[len(t) // 2] for s, t in times.items()})
        if self.cache is not None:
            tables = self._tables()
            tables[self.key] = self.seconds
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            # atomic: a temporary file in the same directory renamed over the cache, so a reader (another job on
            # the same cache) sees the old or the new file, never a partial one
            with tempfile.NamedTemporaryFile("w", dir=self.cache.parent, prefix=f".{self.cache.name}.",
                                             suffix=".tmp", delete=False) as tmp:
                tmp.write(json.dumps(tables, indent=1))
            os.replace(tmp.name, self.cache)

    def _tables(self) -> dict:
        """The cache file's tables ({key: {shape: seconds}}); empty, with a warning, if it is not such JSON (a
        partial or foreign file: it is re-calibrated and overwritten)."""
        if self.cache is None or not self.cache.is_file():
            return {}
        try:
            tables = json.loads(self.cache.read_text())
            problem = "" if isinstance(tables, dict) and all(isinstance(t, dict) for t in tables.values()) else (
                f"a JSON {type(tables).__name__} of other values")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problem = str(err)
        if not problem:
            return tables
        warnings.warn(f"latency cache {self.cache} is not a JSON object of tables ({problem}); ignoring it and "
                      "re-calibrating (it will be overwritten)")
        return {}

    def group_costs(self, model: nn.Module, groups: Sequence[ChannelGroup], proposed: Mapping[str, int],
                    candidates: Mapping[str, Sequence[int]]) -> Dict[str, Dict[int, float]]:
        """Seconds of the layers each group's width touches (producers: out-features, consumers: in-features), per
        candidate width, the layers' other width held at its proposed value; groups touching no timed layer are
        left out. Measures what the table lacks first."""
        layers = self.layers(model)
        by_name = {g.name: g for g in groups}
        dims: Dict[str, Dict[int, Tuple[str, int]]] = {}  # layer -> {dim: (group, channels per group channel)}
        for g in groups:
            for piece in g.slices:
                if piece.tensor in layers and piece.dim in (0, 1):
                    dims.setdefault(piece.tensor, {})[piece.dim] = (g.name, len(piece.index[0]))
        wanted: Dict[str, Dict[int, list]] = {}
        for name in candidates:
            for layer_name, ds in dims.items():
                if not any(g == name for g, _ in ds.values()):
                    continue
                for c in candidates[name]:
                    wanted.setdefault(name, {}).setdefault(c, []).append(
                        self._resized(layer_name, layers[layer_name], ds, {**proposed, name: c}, by_name))
        self.measure([s for per in wanted.values() for shapes in per.values() for s in shapes])
        return {name: {c: sum(self.seconds[s] for s in shapes) for c, shapes in per.items()}
                for name, per in wanted.items()}

    def _resized(self, name: str, layer: nn.Module, dims: Mapping[int, Tuple[str, int]], widths: Mapping[str, int],
                 groups: Mapping[str, ChannelGroup]) -> str:
        """The shape key of ``layer`` with each grouped dim at ``widths`` (scaled by positions per channel)."""
        weight = layer.weight
        size = {}
        for dim in (0, 1):
            if dim in dims:
                group, per = dims[dim]
                size[dim] = widths[group] * per if group in widths else weight.shape[dim]
            else:
                size[dim] = weight.shape[dim]
        if isinstance(layer, nn.Conv2d):
            depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
            out_features = size[0]
            in_features = out_features if depthwise else size[1] * layer.groups
            return self.shape(name, layer, in_features, out_features)
        return self.shape(name, layer, size[1], size[0])


class LatencyRounding:
    """The width policy of ``ChaseConfig(width_rounding="latency")``: at the final channel event, each group's
    UMM width moves to the nearby candidate (:func:`candidate_widths`) with the least latency beyond its size's
    trend (:func:`excess_costs`) by the model's measured layer latencies (:class:`LatencyTable`), the total removed channels kept within ``[budget, budget + slack]``
    (:func:`fast_widths`). In a distributed run only rank 0 measures and its widths are broadcast, so every rank
    removes the same."""

    def __init__(self, model: nn.Module, table: LatencyTable, slack: Optional[int] = None, round_to: int = 1) -> None:
        self.model, self.table, self.slack, self.round_to = model, table, slack, round_to

    def __call__(self, groups: Sequence[ChannelGroup], proposed: Mapping[str, int], high: Mapping[str, int],
                 floors: Mapping[str, int], units: Mapping[str, int]) -> Dict[str, int]:
        """New widths of ``groups`` (``proposed``: UMM's; ``high``: the most each may keep; ``floors``)."""
        def widths() -> Dict[str, int]:
            rounded = [g for g in groups if not g.heads]  # attention heads keep UMM's count
            candidates = {g.name: candidate_widths(proposed[g.name], floors[g.name], high[g.name], unit=g.unit,
                                                   round_to=self.round_to) for g in rounded}
            costs = self.table.group_costs(self.model, groups, proposed, candidates)
            costs = {name: excess_costs(c, proposed[name]) for name, c in costs.items()}
            total = sum(g.width * units.get(g.name, 1) for g in groups)
            slack = self.slack if self.slack is not None else max(1, math.ceil(0.005 * total))
            return fast_widths(costs, proposed, slack, units)
        return _on_rank0(widths)


class LatencyCosts:
    """The cost model of ``ChaseConfig(channel_cost="latency")``: the seconds one channel (one head) of each group
    saves on the measured device: the least-squares slope with intercept (:func:`marginal_seconds`; a layer's
    fixed per-call time is not saved) of its layers' time over its alive width and about 3/4 and 1/2 of it
    (:func:`slope_widths`), the other groups at their alive widths
    (:meth:`LatencyTable.group_costs`; new widths are timed at each event). Attention matmuls are not timed (only
    Conv/Linear layers). In a distributed run only rank 0 measures and its costs are broadcast, so every rank
    removes the same."""

    def __init__(self, model: nn.Module, table: LatencyTable) -> None:
        self.model, self.table = model, table

    def __call__(self, groups: Sequence[ChannelGroup], alive: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """Seconds one more removed channel of each of ``groups`` saves (0 for groups touching no timed layer)."""
        def costs() -> Dict[str, float]:
            widths = {g.name: int(alive[g.name].sum()) for g in groups}
            candidates = {n: slope_widths(w) for n, w in widths.items() if w > 0}
            times = self.table.group_costs(self.model, groups, widths, candidates)
            return {g.name: marginal_seconds(times[g.name]) if g.name in times else 0.0 for g in groups}
        return _on_rank0(costs)


_T = TypeVar("_T")


def _on_rank0(compute: Callable[[], _T]) -> _T:
    """``compute()`` here; in a distributed run on rank 0 only (one rank measures, and writes the cache), its
    result broadcast to every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _input_spatial(model: nn.Module, input_size: Sequence[int]) -> Dict[str, list]:
    """Per Conv2d/Linear module name: its input's shape without batch and channel dims, from one forward of a
    shape-only (meta) copy of ``model`` at ``input_size``."""
    clone = meta_clone(model).eval()
    spatial: Dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=n: spatial.__setitem__(
        name, list(args[0].shape[2:]) if isinstance(m, nn.Conv2d) else list(args[0].shape[1:-1])))
        for n, m in clone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            clone(torch.empty(1, *input_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return spatial


def _runner(spec: list, batch_size: int, device: torch.device, layout: torch.memory_format, backward: bool):
    """A zero-argument callable running one layer of shape ``spec`` on a random batch (forward, or forward +
    backward with gradients for the weights and the input)."""
    if spec[0] == "linear":
        _, in_f, out_f, bias, spatial = spec
        layer = nn.Linear(in_f, out_f, bias=bias, device=device)
        x = torch.randn(batch_size, *spatial, in_f, device=device)
    else:
        _, in_f, out_f, kernel, stride, padding, dilation, groups, bias, spatial = spec
        layer = nn.Conv2d(in_f, out_f, tuple(kernel), tuple(stride), padding if isinstance(padding, str) else
                          tuple(padding), tuple(dilation), groups, bias, device=device).to(memory_format=layout)
        x = torch.randn(batch_size, in_f, *spatial, device=device).contiguous(memory_format=layout)
    if not backward:
        layer.requires_grad_(False)

        def run():
            with torch.inference_mode():
                layer(x)
            _sync(device)
        return run
    x.requires_grad_(True)
    grad = torch.randn_like(layer(x))

    def run():
        layer(x).backward(grad)
        _sync(device)
    return run


def _sync(device: torch.device) -> None:
    """Wait for queued kernels (asynchronous devices) so the timer sees their run time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
