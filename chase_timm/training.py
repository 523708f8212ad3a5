"""Helpers for a Chase training run: checking the export, sizing the models, plotting the run, loading weights.

What a training script needs around the :class:`~chase_timm.Chase` controller and that is not
Accelerate's job: prove the exported slim model computes what the masked training model computes, summarise
parameters / FLOPs / speed of both, draw the run, and start from dense weights in a local file. The recipe
(``recipes/train.py``) uses these; so can any custom loop.
"""
from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError

from ._timm import classifier_tensor_names
from .chase import Chase
from .config import ChaseConfig
from .metrics import flop_counts, throughput

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["ExportMismatchError", "check_export", "check_slim_accuracy", "mask_digest", "weight_digest", "size_summary",
           "speed_summary", "summary_table", "plot_training", "create_timm_model", "load_initial_weights",
           "reinitialised_classifier", "distillation_task",
           "load_checkpoint", "count_params", "evaluate", "clip_gradients", "tracker_config"]


class ExportMismatchError(RuntimeError):
    """The exported slim model does not compute what the masked training model computes."""


@torch.no_grad()
def check_export(masked: nn.Module, slim: nn.Module, inputs: torch.Tensor, rtol: float = 1e-4) -> float:
    """Largest |logit| difference of the two models in eval mode on ``inputs``; raises if it exceeds
    ``rtol`` times the logits' scale (float rounding only: the raw export must equal the masked model)."""
    masked_out, slim_out = masked.eval()(inputs), slim.eval()(inputs)
    diff = float((masked_out - slim_out).abs().max())
    scale = float(masked_out.abs().max()) + 1e-12
    if not math.isfinite(diff) or diff > rtol * max(1.0, scale):
        raise ExportMismatchError(
            f"the exported slim model differs from the masked model by {diff:.3g} (logit scale {scale:.3g}); "
            "the export must compute the same function. Please report this model with chase.report().")
    return diff


def mask_digest(chase: Chase) -> int:
    """A 60-bit fingerprint of every mask and removed channel: equal on every rank of a correct distributed run."""
    state = chase.state_dict()
    return _fingerprint((name, state[group][name].bool())
                        for group in ("masks", "alive") for name in sorted(state[group]))


def weight_digest(model: nn.Module) -> int:
    """A 60-bit fingerprint of the model's parameters (names and bytes): equal on every rank of a correct DDP run."""
    return _fingerprint(model.named_parameters())


def _fingerprint(named: Iterable[Tuple[str, torch.Tensor]]) -> int:
    """The first 60 bits of a SHA-256 over names and tensor bytes (logical order, any device or layout)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int(digest.hexdigest()[:15], 16)


def check_slim_accuracy(masked_top1: float, raw_top1: float, recal_top1: Optional[float], num_samples: int,
                        recal_tolerance: float = 5.0) -> None:
    """Fail loudly when the slim model's accuracy is not the masked model's.

    The raw export may differ only by predictions that flip on float rounding (at most 0.5 % of the samples,
    one sample minimum); after BN recalibration a drop of up to ``recal_tolerance`` points is accepted.
    """
    allowed = max(100.0 / max(num_samples, 1), 0.5)
    if abs(raw_top1 - masked_top1) > allowed:
        raise ExportMismatchError(f"slim top-1 {raw_top1:.2f} % differs from the masked model's {masked_top1:.2f} % "
                                  "on the same data: the export is wrong.")
    if recal_top1 is not None and masked_top1 - recal_top1 > recal_tolerance:
        raise ExportMismatchError(
            f"BN recalibration dropped slim top-1 from {raw_top1:.2f} % to {recal_top1:.2f} % (more than "
            f"{recal_tolerance:g} points); use more --recal-batches, or --recal-batches 0 to keep the trained "
            "statistics.")


def size_summary(model: nn.Module, input_size: Sequence[int], sparsity: Optional[Chase] = None) -> Dict[str, int]:
    """Parameters (all, non-zero) and FLOPs of one image from one counting pass: dense, and skipping zero
    Conv/Linear weights (the masks of ``sparsity`` when given, so regrown weights that are still exactly 0 count as
    active; its FLOPs are those of ``sparsity.module``, which has ``model``'s shapes: ``model`` itself or a copy
    registered with it, such as an EMA model)."""
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params), "nonzero_params": sum(int(p.count_nonzero()) for p in params),
            **flop_counts(sparsity if sparsity is not None else model, None, tuple(input_size))}


def speed_summary(dense: nn.Module, slim: nn.Module, input_size: Sequence[int], batch_size: int = 32) -> Dict[str, Any]:
    """Eval-mode images/s of the dense-kernel training model and the slim model, same batch, same device."""
    device = next(slim.parameters()).device
    return {"dense_throughput": throughput(dense, batch_size=batch_size, input_size=tuple(input_size)),
            "slim_throughput": throughput(slim, batch_size=batch_size, input_size=tuple(input_size)),
            "throughput_batch_size": batch_size, "throughput_device": str(device)}


def summary_table(final: Mapping[str, Any]) -> str:
    """Plain-text table of the masked and slim models: size, FLOPs, accuracy, speed."""
    rows = [("masked (training)", "base", final["masked_top1"]),
            ("slim, raw export", "slim", final["slim_top1_before_recal"]),
            ("slim, published", "slim", final["slim_top1"])]
    lines = [f"{'model':<22}{'params':>10}{'non-zero':>10}{'dense MFLOPs':>14}{'sparse MFLOPs':>15}{'val top-1':>11}"]
    for label, key, top1 in rows:
        lines.append(f"{label:<22}{final[key + '_params'] / 1e6:>9.2f}M{final[key + '_nonzero_params'] / 1e6:>9.2f}M"
                     f"{final[key + '_dense_flops'] / 1e6:>14.1f}{final[key + '_sparse_flops'] / 1e6:>15.1f}"
                     f"{top1:>10.2f}%")
    lines.append(f"slim/base dense FLOPs {final['slim_dense_flops'] / final['base_dense_flops']:.2f}, "
                 f"throughput {final['dense_throughput']:.0f} -> {final['slim_throughput']:.0f} images/s "
                 f"(batch {final['throughput_batch_size']}, {final['throughput_device']}), "
                 f"export max |logit diff| {final['export_max_abs_diff']:.1e}")
    return "\n".join(lines)


def plot_training(path: Union[str, Path], steps: Sequence[Mapping[str, float]], epochs: Sequence[Mapping[str, float]],
                  config: ChaseConfig, report: Sequence[Mapping[str, Any]], title: str) -> None:
    """One PNG: loss and validation accuracy, weight density, channel sparsity against the cubic schedule,
    and the width of every prunable channel group before/after."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = [r["step"] for r in steps]
    fig = Figure(figsize=(16, 9), layout="constrained")  # no pyplot: the user's backend stays as it is
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, 0])
    ax.plot(x, [r["loss"] for r in steps], color="tab:blue", lw=0.8, label="train loss")
    ax.set(xlabel="optimizer step", ylabel="train loss", title="loss and validation accuracy")
    acc = ax.twinx()
    acc.plot([r["step"] for r in epochs], [r["val_top1"] for r in epochs], "o-", color="tab:orange",
             label="val top-1 (masked)")
    acc.set(ylabel="val top-1 (%)", ylim=(0, 100))
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), acc.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax = fig.add_subplot(grid[0, 1])
    ax.plot(x, [r["density"] for r in steps], color="tab:green")
    ax.axhline(config.density, ls="--", color="grey", label=f"target d = {config.density:g}")
    ax.set(xlabel="optimizer step", ylabel="density of sparse weights", title="overall weight density")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    ax.plot(x, [r["channel_sparsity"] for r in steps], color="tab:red", label="measured")
    ax.plot(x, [config.channel_sparsity_at(s) for s in x], ls="--", color="grey", label="cubic schedule")
    ax.set(xlabel="optimizer step", ylabel="fraction of prunable channels removed", title="channel sparsity",
           ylim=(0, max(0.05, config.channel_sparsity * 1.1)))
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    groups = [g for g in report if g["prunable"]]
    pos = list(range(len(groups)))
    ax.bar(pos, [g["width_before"] * g["unit"] for g in groups], color="lightgrey", label="before")
    ax.bar(pos, [g["width_after"] * g["unit"] for g in groups], color="tab:blue", label="after (slim)")
    ax.set_xticks(pos, [g["group"] for g in groups], rotation=90, fontsize=7 if len(groups) < 60 else 5)
    ax.set(ylabel="channels",
           title=f"width per prunable channel group ({len(groups)} of {len(report)} groups prunable)")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    FigureCanvasAgg(fig)  # renders to PNG without pyplot
    fig.savefig(path, dpi=110)


def create_timm_model(name: str, img_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, built for ``img_size`` when the architecture fixes its input size at construction
    (ViT, Swin, ...: patch grid and position embeddings), so the size lands in its model args and a saved
    slim model rebuilds at that size; architectures without an ``img_size`` argument accept any size as they are."""
    import timm

    if img_size is not None and ":" not in name:  # hf-hub: / local-dir: sources carry their own size
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, **kwargs)


def load_initial_weights(model: nn.Module, path: Union[str, Path]) -> List[str]:
    """Load dense weights from a local file (safetensors, or a torch checkpoint read with ``weights_only=True``)
    into ``model``; a classifier of another class count is left at its initialisation. Returns the names
    skipped; raises ``ValueError`` if anything else does not fit (another architecture)."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except (pickle.UnpicklingError, SafetensorError) as err:  # pickled objects beyond tensors, or a corrupt file
        raise ValueError(f"{path} is not a plain state dict of tensors ({type(err).__name__}); save "
                         "model.state_dict() alone (safetensors or torch.save) and pass that file") from None
    own = model.state_dict()
    classifier = classifier_tensor_names(model)
    skipped = sorted(n for n in classifier if n in state and n in own and state[n].shape != own[n].shape)
    for name in skipped:
        del state[name]
    wrong_shape = [n for n in state if n in own and state[n].shape != own[n].shape]
    missing, unexpected = ([], []) if wrong_shape else model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - set(skipped))
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {missing[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}, shape mismatches {wrong_shape[:3]} (is it another architecture?)")
    return skipped


def reinitialised_classifier(model: nn.Module, num_classes: int) -> List[str]:
    """Names of the classifier tensors timm left at their initialisation when it loaded pretrained weights trained
    for another class count (``pretrained_cfg["num_classes"]``), so a run can say what it did not inherit."""
    trained = model.pretrained_cfg.get("num_classes")
    return sorted(classifier_tensor_names(model)) if trained not in (None, num_classes) else []


def distillation_task(student: nn.Module, teacher: Union[str, nn.Module], criterion: nn.Module, num_classes: int,
                      input_size: Sequence[int], device: torch.device, **kwargs: Any) -> nn.Module:
    """timm's ``LogitDistillationTask`` (``kwargs``: temperature, task/distill loss weights) around ``student`` (the
    prepared model) and a frozen teacher on ``device``: a module, or a timm name built with its pretrained weights.
    ``ValueError`` before any training unless the teacher takes ``input_size`` inputs and predicts ``num_classes``
    classes."""
    import timm
    from timm.task import DistillationTeacher, LogitDistillationTask

    teacher = timm.create_model(teacher, pretrained=True) if isinstance(teacher, str) else teacher
    teacher = teacher.to(device).eval().requires_grad_(False)
    try:
        with torch.no_grad():
            classes = teacher(torch.zeros(1, *input_size, device=device)).shape[-1]
    except (AssertionError, RuntimeError) as e:  # e.g. timm's PatchEmbed asserts its built image size
        raise ValueError(f"the teacher does not take this data's {tuple(input_size)} inputs ({str(e).splitlines()[0]}); "
                         "use a teacher built for this input size") from e
    if classes != num_classes:
        raise ValueError(f"the teacher predicts {classes} classes, the data has {num_classes}; use a teacher "
                         "fine-tuned on this data")
    return LogitDistillationTask(student, DistillationTeacher(teacher, device=device), criterion=criterion,
                                 device=device, verbose=False, **kwargs)


def load_checkpoint(chase: Chase, saved: Mapping[str, Any], objects: Mapping[str, Any],
                    load_framework_state: Optional[Callable[[], Any]] = None) -> None:
    """Resume from ``saved`` (``{"chase": chase.state_dict(), name: obj.state_dict(), ...}``) in the order that works.

    Chase's state goes first: saved after :meth:`Chase.shrink`, it shrinks the freshly built full-width model, its
    optimizer state and registered copies (an EMA) to the checkpoint's widths, which the saved model and
    optimizer tensors have. Then ``load_framework_state()`` (e.g. ``lambda: accelerator.load_state(folder)``:
    model, optimizer, scheduler, RNG), then ``objects[name].load_state_dict(saved[name])`` for every other entry in
    ``saved``'s order (``objects`` may also hold the Chase under ``"chase"``). Raises ValueError, loading nothing,
    when ``saved`` has no ``"chase"`` entry or one that ``objects`` does not name.
    """
    if "chase" not in saved:
        raise ValueError(f"the checkpoint has no 'chase' entry (it has {sorted(saved)}); save chase.state_dict() "
                         "under 'chase'.")
    unknown = sorted(set(saved) - {"chase"} - set(objects))
    if unknown:
        raise ValueError(f"checkpoint entries {unknown} have no object to load into; pass them in objects "
                         f"(it has {sorted(objects)}).")
    chase.load_state_dict(saved["chase"])
    if load_framework_state is not None:
        load_framework_state()
    for name, state in saved.items():
        if name != "chase":
            objects[name].load_state_dict(state)


def count_params(model: nn.Module) -> int:
    """Number of parameters (elements), the width measure a shrinking run reports."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator: Accelerator) -> float:
    """Top-1 accuracy (%) over the whole loader, sharded across processes (each sample counted once)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        with accelerator.autocast():
            pred = model(x).argmax(-1)
        pred, y = accelerator.gather_for_metrics((pred, y))
        correct += int((pred == y).sum())
        total += y.numel()
    return 100.0 * correct / total


def clip_gradients(accelerator: Accelerator, parameters: Iterable[torch.Tensor], value: float,
                   mode: str = "norm") -> None:
    """timm's ``--clip-grad``/``--clip-mode`` through Accelerate, which unscales fp16 gradients first: the global
    norm (``"norm"``) and each value (``"value"``) by Accelerate's calls, adaptive per-unit clipping (``"agc"``) by
    timm's ``dispatch_clip_grad`` on the unscaled gradients."""
    if mode == "norm":
        accelerator.clip_grad_norm_(parameters, value)
    elif mode == "value":
        accelerator.clip_grad_value_(parameters, value)
    elif mode == "agc":
        from timm.utils import dispatch_clip_grad

        accelerator.unscale_gradients()
        dispatch_clip_grad(parameters, value, mode="agc")
    else:
        raise ValueError(f"clip mode must be 'norm', 'value' or 'agc', got {mode!r}")


def tracker_config(flags: Mapping[str, Any], config: ChaseConfig) -> Dict[str, Any]:
    """The run's flags and the flat ChaseConfig (``chase.<field>``) as scalars, the only values every Accelerate
    tracker takes (TensorBoard's ``add_hparams`` rejects lists, dicts and None): lists are joined with commas."""
    flat = {**flags, **{f"chase.{k}": v for k, v in config.to_dict().items()}}
    return {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in flat.items()
            if v is not None and not isinstance(v, dict)}
