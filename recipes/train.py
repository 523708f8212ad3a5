#!/usr/bin/env python
"""Train any timm model with Chase and export a physically smaller dense network.

    accelerate launch recipes/train.py --model resnet50                 # embedded digits, a few minutes on CPU
    python recipes/train.py --model resnet18 --epochs 3                 # plain python works too
    accelerate launch recipes/train.py --config recipes/configs/resnet50_imagenet.yaml

Reads top to bottom: parse config -> build data, model, optimizer -> ``accelerator.prepare`` -> attach Chase ->
train loop -> evaluate the masked model -> export, recalibrate BN, evaluate the slim model -> save artifacts.
``--batch-size`` is the global batch (split across processes), so a run's steps and schedule do not depend on
how many processes run it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, NoReturn, Optional, Tuple

import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import save_model
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import chase_timm
from chase_timm.data import DigitsDataset
from chase_timm.metrics import count_flops, sparse_flops
from chase_timm.slim import recalibrate_batchnorm, width_plan

# `chase:` keys given in epochs, mapped onto ChaseConfig step fields (scaled to the run, so --max-steps keeps their shape)
EPOCH_KEYS = {"channel_end_epoch": "channel_end_step", "phase_b_epoch": "phase_b_start_step",
              "channel_interval_epochs": "channel_interval"}
CHASE_FLAGS = ("density", "channel_sparsity", "min_channel_ratio")


# ----------------------------------------------------------------------------------------------- configuration
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default unless it is None or the help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Command line; every option can also be a key of the --config YAML (dashes or underscores)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML of training keys plus a `chase:` section of ChaseConfig fields; "
                                    "command-line flags override it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet50", help="any timm model name")
    g.add_argument("--data", default="digits", help="'digits' (embedded, offline), 'imagefolder:PATH' "
                   "(PATH/train and PATH/val class folders) or a timm dataset spec such as 'hfds/NAME'")
    g.add_argument("--data-dir", help="root directory handed to timm.data.create_dataset for timm dataset specs")
    g.add_argument("--train-split", help="train split name (default: train)")
    g.add_argument("--val-split", help="validation split name (default: val for folders, validation otherwise)")
    g.add_argument("--num-classes", type=int, help="number of classes (default: inferred from the dataset)")
    g.add_argument("--img-size", type=int, default=32, help="square input size (digits are upsampled to it)")
    g.add_argument("--crop-pct", type=float, help="eval center-crop fraction (default: the model's; 1.0 for digits)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=6, help="training epochs")
    t.add_argument("--batch-size", type=int, default=64, help="global batch per optimizer micro-step")
    t.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=5e-5, help="not applied to norm and bias parameters")
    t.add_argument("--opt", default="momentum", help="timm optimizer name; 'momentum' is SGD with momentum 0.9 "
                   "and no Nesterov (the paper's), timm's 'sgd' is Nesterov SGD")
    t.add_argument("--sched", default="cosine", help="timm scheduler name, stepped per optimizer update")
    t.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up (fractions allowed)")
    t.add_argument("--decay-milestones", type=float, nargs="+", default=[], help="epochs of lr decay (multistep)")
    t.add_argument("--decay-rate", type=float, default=0.1, help="lr factor at each milestone (multistep)")
    t.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (0 = plain cross-entropy)")
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-steps per update")
    t.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                   help="passed to Accelerator (default: whatever `accelerate launch` configured)")
    t.add_argument("--seed", type=int, default=0, help="seed of model init, data order, augmentation and masks")
    t.add_argument("--max-steps", type=int, help="cap on optimizer steps; all schedules are compressed to fit")
    c = p.add_argument_group("chase (override the YAML `chase:` section; other ChaseConfig fields go there)")
    c.add_argument("--density", type=float, help="overall weight density d (ChaseConfig default 0.1)")
    c.add_argument("--channel-sparsity", type=float, help="fraction S_c of prunable channels removed (default 0.4)")
    c.add_argument("--min-channel-ratio", type=float, help="per-group channel floor ratio beta (default 0.2)")
    o = p.add_argument_group("output")
    o.add_argument("--output", help="output directory (default: outputs/<model>-chase)")
    o.add_argument("--resume", help="accelerate checkpoint directory to continue from (<output>/checkpoints/epoch_N)")
    o.add_argument("--checkpoint-every", type=int, default=0, help="save an accelerate checkpoint every N epochs")
    o.add_argument("--recal-batches", type=int, default=10, help="augmented train batches used to recompute the slim model's BN statistics")
    o.add_argument("--log-with", help="accelerate tracker (tensorboard, wandb, ...) for per-epoch metrics")
    return p


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """Defaults < YAML < command line; returns the arguments and the merged `chase:` section."""
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    config_path = parser.parse_known_args(argv)[0].config
    chase: Dict[str, Any] = {}
    if config_path:
        cfg = load_yaml(config_path, parser)
        chase = dict(cfg.pop("chase", None) or {})
        unknown = sorted(set(cfg) - set(actions) | set(cfg) & set(CHASE_FLAGS))
        if unknown:
            parser.error(f"{config_path}: unknown training key(s) {unknown}. Valid keys: "
                         f"{sorted(set(actions) - set(CHASE_FLAGS))}; Chase knobs belong under `chase:`.")
        parser.set_defaults(**{k: coerce(actions[k], v, parser) for k, v in cfg.items()})
    args = parser.parse_args(argv)
    chase.update({k: getattr(args, k) for k in CHASE_FLAGS if getattr(args, k) is not None})
    valid = {f.name for f in dataclasses.fields(chase_timm.ChaseConfig)} - {"total_steps"} | set(EPOCH_KEYS)
    if set(chase) - valid:
        parser.error(f"unknown `chase:` key(s) {sorted(set(chase) - valid)}; valid keys: {sorted(valid)}. "
                     "(total_steps is computed from epochs and the data.)")
    check_model_name(args.model, parser)
    if args.resume and not os.path.isdir(args.resume):
        parser.error(f"--resume {args.resume!r} is not a directory (expected <output>/checkpoints/epoch_N)")
    args.output = args.output or os.path.join("outputs", f"{args.model.replace('/', '_')}-chase")
    return args, chase


def load_yaml(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """A YAML mapping with dashes in keys normalised to underscores."""
    if not os.path.isfile(path):
        parser.error(f"config file {path!r} not found")
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(cfg, dict):
        parser.error(f"{path}: expected a mapping of keys to values, got {type(cfg).__name__}")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def coerce(action: argparse.Action, value: Any, parser: argparse.ArgumentParser) -> Any:
    """Apply an option's type to a YAML string (PyYAML reads `1e-4` as a string)."""
    if action.type is None or not isinstance(value, str):
        return value
    try:
        return action.type(value)
    except ValueError:
        parser.error(f"config key {action.dest}: {value!r} is not a valid {action.type.__name__}")


def check_model_name(name: str, parser: argparse.ArgumentParser) -> None:
    """Fail before any work when `name` is not a timm model, listing close matches."""
    if ":" in name or timm.is_model(name):  # hf-hub: / local-dir: sources are resolved by create_model
        return
    close = timm.list_models(f"*{name}*")[:15] or difflib.get_close_matches(name, timm.list_models(), n=8)
    parser.error(f"unknown timm model {name!r}. Close matches: {', '.join(close) or 'none'} "
                 "(see timm.list_models('*pattern*')).")


def fail(message: str) -> NoReturn:
    """Exit with a one-line error instead of a traceback."""
    sys.exit(f"error: {message}")


def chase_config(section: Dict[str, Any], epochs: int, total_steps: int, seed: int) -> chase_timm.ChaseConfig:
    """ChaseConfig for a run of `total_steps`; epoch-valued keys become steps in proportion to `epochs`."""
    kwargs = dict(section)
    for key, step_field in EPOCH_KEYS.items():
        if key in kwargs:
            kwargs[step_field] = max(1, math.floor(kwargs.pop(key) * total_steps / epochs))
    kwargs.setdefault("seed", seed)
    try:
        return chase_timm.ChaseConfig(total_steps=total_steps, **kwargs)
    except (TypeError, ValueError) as e:
        fail(str(e))


# ----------------------------------------------------------------------------------------------- data
def load_datasets(args: argparse.Namespace) -> Tuple[Dataset, Dataset]:
    """Train and val datasets for --data, transforms attached later."""
    if args.data == "digits":
        return DigitsDataset("train"), DigitsDataset("val")
    folder = args.data.startswith("imagefolder:")
    name, root = ("", args.data.split(":", 1)[1]) if folder else (args.data, args.data_dir)
    splits = (args.train_split or "train", args.val_split or ("val" if folder else "validation"))
    if folder:
        missing = [s for s in splits if not os.path.isdir(os.path.join(root, s))]
        if missing:
            fail(f"--data {args.data}: expected class folders in {', '.join(os.path.join(root, s) for s in missing)}"
                 " (set --data imagefolder:PATH to a folder with train/ and val/ subfolders).")
        return tuple(create_dataset("", root=os.path.join(root, s), search_split=False) for s in splits)
    try:
        return tuple(create_dataset(name, root=root, split=s, download=False) for s in splits)
    except Exception as e:  # timm/datasets raise many types; report the spec instead of a traceback
        fail(f"could not load --data {args.data!r} (splits {splits}, root {root!r}): {type(e).__name__}: {e}")


def infer_num_classes(dataset: Dataset) -> Optional[int]:
    """Number of classes of a digits or timm dataset, if it says."""
    reader = getattr(dataset, "reader", dataset)
    classes = getattr(reader, "class_to_idx", None) or getattr(reader, "classes", None)
    return len(classes) if classes else None


def attach_transforms(args: argparse.Namespace, model: nn.Module, train_ds: Dataset, val_ds: Dataset) -> None:
    """Set timm transforms, with mean/std and interpolation from the model's pretrained_cfg."""
    digits = args.data == "digits"
    crop_pct = args.crop_pct or (1.0 if digits else None)
    data_cfg = resolve_data_config({"input_size": (3, args.img_size, args.img_size), "crop_pct": crop_pct},
                                   model=model)
    aug = dict(scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.0) if digits else {}  # a mirrored digit is another glyph
    train_ds.transform = create_transform(**data_cfg, is_training=True, color_jitter=None, **aug)
    val_ds.transform = create_transform(**data_cfg, is_training=False)


# ----------------------------------------------------------------------------------------------- loop state
@dataclass
class TrainState:
    """Loop position and history; registered with accelerate so checkpoints carry it."""
    epoch: int = 0
    step: int = 0
    epochs: List[dict] = field(default_factory=list)
    steps: List[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__init__(**state)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator: Accelerator) -> float:
    """Top-1 accuracy (%) over the whole (sharded) loader."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        with accelerator.autocast():
            pred = model(x).argmax(-1)
        pred, y = accelerator.gather_for_metrics((pred, y))
        correct += int((pred == y).sum())
        total += y.numel()
    return 100.0 * correct / total


@torch.no_grad()
def max_logit_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between two models' eval-mode outputs on one batch."""
    return float((a.eval()(x) - b.eval()(x)).abs().max())


def size_metrics(model: nn.Module, sparse_weights: Iterable[str], input_size: Tuple[int, int, int]) -> dict:
    """Parameters (all, non-zero) and FLOPs of one image (dense, and skipping zeros of the sparse weights)."""
    params = dict(model.named_parameters())
    densities = {n: float(params[n].count_nonzero() / params[n].numel()) for n in sparse_weights}
    return {"params": sum(p.numel() for p in params.values()),
            "nonzero_params": sum(int(p.count_nonzero()) for p in params.values()),
            "dense_flops": count_flops(model, input_size), "sparse_flops": sparse_flops(model, densities, input_size)}


# ----------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> None:
    args, chase_section = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
        log_with=args.log_with, project_dir=args.output,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=args.seed))
    set_seed(args.seed)

    # ---- build: data, model, optimizer, loss
    train_ds, val_ds = load_datasets(args)
    num_classes = args.num_classes or infer_num_classes(train_ds) or fail(
        f"cannot infer the number of classes of --data {args.data!r}; pass --num-classes")
    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes)
    attach_transforms(args, model, train_ds, val_ds)
    input_size = (3, args.img_size, args.img_size)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size, num_workers=args.workers)
    calib_loader = DataLoader(train_ds, batch_size=args.batch_size // accelerator.num_processes, shuffle=True,
                              num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=0.9)
    criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()

    # ---- prepare, then size the run from the per-process loader
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    # schedule points in optimizer steps ("epochs" of one update), so a --max-steps cap compresses them
    to_steps = lambda epoch: round(epoch * total_steps / args.epochs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=total_steps, step_on_epochs=False, updates_per_epoch=1,
        warmup_epochs=to_steps(args.warmup_epochs), decay_milestones=[to_steps(e) for e in args.decay_milestones],
        decay_rate=args.decay_rate)
    config = chase_config(chase_section, args.epochs, total_steps, args.seed)
    chase = chase_timm.Chase(model, config, optimizer=optimizer,
                             example_inputs=torch.zeros(1, *input_size, device=accelerator.device))
    state = TrainState()
    accelerator.register_for_checkpointing(chase, state)
    if args.resume:
        accelerator.load_state(args.resume)
        accelerator.print(f"resumed from {args.resume}: epoch {state.epoch}, step {state.step}")
    scheduler.step_update(state.step)
    if args.log_with:
        accelerator.init_trackers("chase_timm", config={k: v for k, v in vars(args).items() if v is not None})
    accelerator.print(f"{args.model} on {args.data}: {len(train_ds)} train / {len(val_ds)} val images, "
                      f"{num_classes} classes, {accelerator.num_processes} process(es), "
                      f"{total_steps} optimizer steps ({steps_per_epoch}/epoch)")

    # ---- train
    log_every = max(1, total_steps // 500)
    last_epoch = math.ceil(total_steps / steps_per_epoch)
    while state.epoch < last_epoch and state.step < total_steps:
        model.train()
        train_loader.set_epoch(state.epoch)
        started, loss_sum, batches = time.time(), 0.0, 0
        bar = tqdm(total=min(steps_per_epoch, total_steps - state.step), desc=f"epoch {state.epoch + 1}/{last_epoch}",
                   disable=not accelerator.is_local_main_process, leave=False)
        for x, y in train_loader:
            with accelerator.accumulate(model):
                loss = criterion(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                chase.step()
                optimizer.zero_grad()
            loss_sum, batches = loss_sum + loss.item(), batches + 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            scheduler.step_update(state.step)
            if state.step % log_every == 0 or state.step == total_steps:
                stats = chase.stats()
                state.steps.append({"step": state.step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                                    "density": stats["density"], "channel_sparsity": stats["channel_sparsity"]})
                bar.set_postfix(loss=f"{loss.item():.3f}", d=f"{stats['density']:.3f}",
                                s_c=f"{stats['channel_sparsity']:.2f}")
            bar.update()
            if state.step >= total_steps:
                break
        bar.close()
        state.epoch += 1
        train_loss = accelerator.reduce(torch.tensor(loss_sum / batches, device=accelerator.device), "mean").item()
        stats = chase.stats()
        record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss,
                  "val_top1": evaluate(model, val_loader, accelerator), "lr": optimizer.param_groups[0]["lr"],
                  **{k: stats[k] for k in ("density", "channel_sparsity", "phase")}, "chase_step": stats["step"],
                  "seconds": time.time() - started}
        state.epochs.append(record)
        accelerator.log(record, step=state.step)
        accelerator.print(f"epoch {state.epoch:>3}/{last_epoch}  step {state.step:>6}  loss {train_loss:.4f}  "
                          f"val top-1 {record['val_top1']:5.1f}%  density {record['density']:.3f}  "
                          f"channel sparsity {record['channel_sparsity']:.3f}  ({record['seconds']:.1f} s)")
        if args.checkpoint_every and state.epoch % args.checkpoint_every == 0:
            accelerator.save_state(os.path.join(args.output, "checkpoints", f"epoch_{state.epoch}"))

    # ---- export the slim model, check it against the masked one, recalibrate BN
    base = accelerator.unwrap_model(model).eval()
    slim = chase.export().to(accelerator.device).eval()
    x_val = next(iter(val_loader))[0]
    final = {"masked_top1": state.epochs[-1]["val_top1"], "export_max_abs_diff": max_logit_diff(base, slim, x_val),
             "slim_top1_before_recal": evaluate(slim, val_loader, accelerator)}
    set_seed(args.seed)  # the same augmented batches on every rank
    recalibrate_batchnorm(slim, calib_loader, num_batches=args.recal_batches)
    final["slim_top1"] = evaluate(slim, val_loader, accelerator)
    sparse_weights = chase.stats()["layers"]
    for name, m in (("base", base), ("slim", slim)):
        final.update({f"{name}_{k}": v for k, v in size_metrics(m, sparse_weights, input_size).items()})
    accelerator.end_training()

    # ---- save (main process only)
    if accelerator.is_main_process:
        report = chase.report()
        save_artifacts(Path(args.output), args, chase_section, config, slim.cpu(), width_plan(slim, base), report,
                       state, final)
        print_summary(args, final, report)


def save_artifacts(out: Path, args: argparse.Namespace, chase_section: Dict[str, Any],
                   config: chase_timm.ChaseConfig, slim: nn.Module, plan: dict, report: List[dict],
                   state: TrainState, final: dict) -> None:
    """Write weights, width plan, configs, metrics, report and the training plot to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(slim, str(out / "slim_model.safetensors"))
    run = {k: v for k, v in vars(args).items() if k not in ("config", "resume") and v is not None}
    (out / "run_config.yaml").write_text(yaml.safe_dump({**run, "chase": chase_section}, sort_keys=False))
    for name, data in (("width_plan", plan), ("chase_config", config.to_dict()), ("report", report),
                       ("metrics", {"model": args.model, "data": args.data, "final": final,
                                    "epochs": state.epochs, "steps": state.steps})):
        (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    plot_training(state, report, config, out / "training.png", title=f"Chase on {args.model} ({args.data})")


def plot_training(state: TrainState, report: List[dict], config: chase_timm.ChaseConfig, path: Path,
                  title: str) -> None:
    """Loss/accuracy, density and channel sparsity over steps, and per-group widths before/after."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in state.steps]
    fig = plt.figure(figsize=(16, 9), constrained_layout=True)
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, 0])
    ax.plot(steps, [r["loss"] for r in state.steps], color="tab:blue", lw=0.8, label="train loss")
    ax.set(xlabel="optimizer step", ylabel="train loss", title="loss and validation accuracy")
    acc = ax.twinx()
    acc.plot([r["step"] for r in state.epochs], [r["val_top1"] for r in state.epochs], "o-", color="tab:orange",
             label="val top-1 (masked)")
    acc.set(ylabel="val top-1 (%)", ylim=(0, 100))
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), acc.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax = fig.add_subplot(grid[0, 1])
    ax.plot(steps, [r["density"] for r in state.steps], color="tab:green")
    ax.axhline(config.density, ls="--", color="grey", label=f"target d = {config.density:g}")
    ax.set(xlabel="optimizer step", ylabel="density of sparse weights", title="overall weight density")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    ax.plot(steps, [r["channel_sparsity"] for r in state.steps], color="tab:red", label="measured")
    ax.plot(steps, [config.channel_sparsity_at(s) for s in steps], ls="--", color="grey", label="cubic schedule")
    ax.set(xlabel="optimizer step", ylabel="fraction of prunable channels removed", title="channel sparsity",
           ylim=(0, max(0.05, config.channel_sparsity * 1.1)))
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    groups = [g for g in report if g["prunable"]]
    pos = range(len(groups))
    ax.bar(pos, [g["width_before"] for g in groups], color="lightgrey", label="before")
    ax.bar(pos, [g["width_after"] for g in groups], color="tab:blue", label="after (slim)")
    ax.set_xticks(list(pos), [g["group"] for g in groups], rotation=90, fontsize=7 if len(groups) < 60 else 5)
    ax.set(ylabel="channels", title=f"width per prunable channel group ({len(groups)} of {len(report)} groups "
                                    "prunable)")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(args: argparse.Namespace, final: dict, report: List[dict]) -> None:
    """Table of params, FLOPs and accuracy for the masked and slim models."""
    rows = [("masked (training)", "base", final["masked_top1"]),
            ("slim, raw export", "slim", final["slim_top1_before_recal"]),
            ("slim, BN recalibrated", "slim", final["slim_top1"])]
    print(f"\n{'model':<24}{'params':>10}{'non-zero':>10}{'dense MFLOPs':>14}{'sparse MFLOPs':>15}"
          f"{'val top-1':>11}")
    for label, key, top1 in rows:
        print(f"{label:<24}{final[key + '_params'] / 1e6:>9.2f}M{final[key + '_nonzero_params'] / 1e6:>9.2f}M"
              f"{final[key + '_dense_flops'] / 1e6:>14.1f}{final[key + '_sparse_flops'] / 1e6:>15.1f}"
              f"{top1:>10.1f}%")
    before = sum(g["width_before"] for g in report if g["prunable"])
    after = sum(g["width_after"] for g in report if g["prunable"])
    print(f"prunable channels {before} -> {after}; slim/base FLOPs "
          f"{final['slim_dense_flops'] / final['base_dense_flops']:.2f}; export check max |logit diff| "
          f"{final['export_max_abs_diff']:.2e}\nartifacts in {args.output}")


if __name__ == "__main__":
    main()
