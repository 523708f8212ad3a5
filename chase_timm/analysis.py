"""The sparse-channel phenomenon: how unevenly unstructured sparsity spreads over a layer's output channels.

The paper's observation is that dynamic sparse training leaves some channels far sparser than the rest of
their layer; Chase removes those. Here, for every sparse Conv/Linear layer (the classifier excluded: its
outputs are classes, not removable channels):

- channel density  = non-zeros in the channel's filter (its output row, C_in·k·k weights) / row size;
- layer density    = non-zeros / weights of the layer, over its alive channels (channels Chase removed are
  left out of both);
- relative density = channel density / layer density (1 = as dense as its layer);
- UMM              = sum |w| of the filter / row size (the paper's unmasked mean magnitude, per layer).

A channel is *sparse at k* when its relative density is below k (k = 0.5, 0.7, 0.8); fractions are over all
alive channels of all layers whose density is below 1 (ERK keeps some small layers dense).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn

from ._timm import classifier_tensor_names, unwrap_model
from .chase import Chase
from .metrics import conv_linear_weights

__all__ = ["LayerChannels", "channel_profile", "sparse_channel_fractions", "plot_channel_profile"]

THRESHOLDS = (0.5, 0.7, 0.8)


@dataclass
class LayerChannels:
    """Per-channel statistics of one sparse layer (alive channels only, in channel order)."""

    name: str
    density: float
    relative_density: torch.Tensor
    umm: torch.Tensor


@torch.no_grad()
def channel_profile(source: Union[Chase, nn.Module]) -> List[LayerChannels]:
    """Per-layer channel densities (relative to the layer) and UMM, from a Chase's masks or a model's zeros.

    With a ``Chase`` the masks decide what is active (a regrown weight that is still exactly 0 counts);
    with a plain model (e.g. an exported one) every non-zero weight does.
    """
    if isinstance(source, Chase):
        model, weights, masks = source.module, source.weights, source.masks
        alive = {n: k.flatten(1).any(1) for n, k in source.channels.allowed.items()}
    else:
        model = unwrap_model(source)
        weights = conv_linear_weights(model)
        masks = {n: w != 0 for n, w in weights.items()}
        alive = {}
    head = classifier_tensor_names(model)
    layers = []
    for name, weight in weights.items():
        if name in head or weight.shape[0] < 2:
            continue
        rows = masks[name].flatten(1).float().cpu()
        keep = alive.get(name, torch.ones(rows.shape[0], dtype=torch.bool)).cpu()
        rows = rows[keep]
        density = float(rows.mean())
        if density >= 1.0 or density == 0.0:
            continue
        umm = (weight.detach().flatten(1).abs().float().cpu()[keep] * rows).mean(1)
        layers.append(LayerChannels(name, density, rows.mean(1) / density, umm))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse Conv/Linear layer below density 1 to profile; "
                         "profile a model trained with Chase (or pass the Chase object).")
    return layers


def sparse_channel_fractions(profile: Sequence[LayerChannels],
                             thresholds: Sequence[float] = THRESHOLDS) -> Dict[str, Dict[str, float]]:
    """Fraction of channels whose relative density is below each threshold: overall and per layer.

    Returns ``{"overall": {"0.5": f, ...}, "<layer>": {...}, ...}`` (threshold keys as strings, JSON-ready).
    """
    pooled = torch.cat([layer.relative_density for layer in profile])
    result = {"overall": {str(k): float((pooled < k).float().mean()) for k in thresholds}}
    for layer in profile:
        result[layer.name] = {str(k): float((layer.relative_density < k).float().mean()) for k in thresholds}
    return result


def plot_channel_profile(profile: Sequence[LayerChannels], path: Union[str, Path], title: str = "",
                         history: Sequence[Dict] = (), thresholds: Sequence[float] = THRESHOLDS) -> Path:
    """Save a figure of the whole distribution: every channel's relative density per layer, the pooled
    histogram, relative density against UMM, and (if given) the fractions over training ``history``
    (a list of ``{"updates": n, "overall": {threshold: fraction}}``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fractions = sparse_channel_fractions(profile, thresholds)["overall"]
    fig = Figure(figsize=(13, 8), layout="constrained")  # no pyplot: the user's backend stays as it is
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, :])
    generator = torch.Generator().manual_seed(0)
    for i, layer in enumerate(profile):
        jitter = (torch.rand(layer.relative_density.numel(), generator=generator) - 0.5) * 0.6
        ax.scatter((i + jitter).numpy(), layer.relative_density.numpy(), s=2, alpha=0.35, color="tab:blue")
    for k, color in zip(thresholds, ("tab:red", "tab:orange", "tab:olive")):
        ax.axhline(k, color=color, lw=0.8, ls="--",
                   label=f"{k}x layer density: {fractions[str(k)]:.1%} of channels below")
    ax.set_xticks(range(len(profile)))
    ax.set_xticklabels([layer.name.removesuffix(".weight") for layer in profile], rotation=90, fontsize=6)
    ax.set_ylabel("channel density / layer density")
    ax.set_title(title or "per-channel density relative to its layer (one dot per channel)")
    ax.legend(loc="upper right", fontsize=8)

    pooled = torch.cat([layer.relative_density for layer in profile]).numpy()
    ax = fig.add_subplot(grid[1, 0])
    ax.hist(pooled, bins=80, color="tab:blue")
    for k in thresholds:
        ax.axvline(k, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("channel density / layer density")
    ax.set_ylabel("channels (all layers)")

    ax = fig.add_subplot(grid[1, 1])
    umm_rel = torch.cat([layer.umm / layer.umm.mean().clamp_min(1e-12) for layer in profile]).numpy()
    ax.scatter(pooled, umm_rel, s=2, alpha=0.3)
    ax.set_xlabel("channel density / layer density")
    ax.set_ylabel("channel UMM / layer mean UMM")

    ax = fig.add_subplot(grid[1, 2])
    if history:
        updates = [h["updates"] for h in history]
        for k in thresholds:
            ax.plot(updates, [h["overall"][str(k)] for h in history], marker=".", label=f"below {k}x")
        ax.set_xlabel("prune/regrow updates")
        ax.set_ylabel("fraction of channels")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # renders to PNG without pyplot
    fig.savefig(path, dpi=110)
    return path
