#!/usr/bin/env python
"""Train any timm model with Chase and publish a physically smaller dense network.

    accelerate launch recipes/train.py --model resnet50                 # embedded digits, a few minutes on CPU
    python recipes/train.py --model resnet18 --epochs 3                 # plain python works too
    accelerate launch recipes/train.py --config recipes/configs/resnet50_imagenet.yaml --data imagefolder:/data/in1k

Reads top to bottom like Accelerate's examples: parse -> build (data, model, optimizer) -> prepare -> attach
Chase -> train loop -> evaluate the masked model -> export, check and evaluate the slim model -> save.
``--batch-size`` is the global batch (split across processes), so steps and schedules do not depend on how many
processes run it. The output folder is itself the slim model (``timm.create_model("local-dir:<output>",
pretrained=True)``), with metrics.json, run_config.yaml, training.png and checkpoints/ beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Tuple

import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import chase_timm
from chase_timm.data import DATA_SPEC_HELP, DataSpecError, load_image_data, set_transform
from chase_timm.metrics import count_flops
from chase_timm.slim import recalibrate_batchnorm
from chase_timm.training import (ExportMismatchError, check_export, check_slim_accuracy, create_timm_model,
                                 load_initial_weights, mask_digest, plot_training, size_summary, speed_summary,
                                 summary_table, weight_digest)

CHASE_FLAGS = ("density", "channel_sparsity", "min_channel_ratio", "shrink")  # flags that land in `chase:`
EPOCH_KEYS = ("update_interval_epochs", "channel_interval_epochs", "channel_end_epoch", "phase_b_epoch")
NOT_SAVED = ("config", "resume", "overwrite", "output", "push_to_hub")  # run_config.yaml must not redo these
FREE_ON_RESUME = ("checkpoint_every", "log_with", "workers", "recal_batches")  # may change when resuming
RUN_FILE = "run_config.yaml"
STATE_FILE = "chase_timm_state.pt"  # Chase, loop state, training FLOPs, EMA: loaded with weights_only=True


# ----------------------------------------------------------------------------------------------- configuration
def fail(message: str) -> NoReturn:
    """Stop with a one-line error and exit status 2; every process checks the same inputs and stops alike, the
    first one (RANK 0 under a launcher) says why."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default unless it is None or the help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), like every other error of the recipe."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """Command line; every option can also be a key of the --config YAML (dashes or underscores)."""
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML of training keys plus a `chase:` section of ChaseConfig fields (and "
                                    f"{', '.join(EPOCH_KEYS)}); command-line flags override it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet50", help="any timm model name (or hf-hub:/local-dir: source)")
    g.add_argument("--pretrained", action="store_true", help="start from the model's pretrained dense weights "
                   "(timm/Hub download; the classifier is re-initialised for another class count)")
    g.add_argument("--initial-checkpoint", help="start from dense weights in a local file (.safetensors, or a torch "
                   "checkpoint read with weights_only=True); a classifier of another class count is re-initialised")
    g.add_argument("--data", default="digits", help=DATA_SPEC_HELP)
    g.add_argument("--data-dir", help="root folder for timm dataset specs, data_dir for hf: datasets")
    g.add_argument("--train-split", help="train split name (default: train)")
    g.add_argument("--val-split", help="validation split name (default: val / validation)")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the train split for validation instead of a validation split")
    g.add_argument("--streaming", action="store_true", help="stream an hf: dataset, sharded per process")
    g.add_argument("--num-classes", type=int, help="number of classes (default: from the dataset)")
    g.add_argument("--img-size", type=int,
                   help="square input size (default: the model's pretrained_cfg; 32 for digits)")
    g.add_argument("--crop-pct", type=float, help="eval center-crop fraction (default: the model's; 1.0 for digits)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=20, help="training epochs")
    t.add_argument("--batch-size", type=int, default=64, help="global batch per optimizer micro-step")
    t.add_argument("--opt", default="adamw", help="timm optimizer name ('momentum' is SGD with momentum 0.9 and "
                   "no Nesterov, the paper's; timm's 'sgd' is Nesterov SGD)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norm and bias parameters")
    t.add_argument("--sched", default="cosine", help="timm scheduler name, stepped per optimizer update")
    t.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up (fractions allowed)")
    t.add_argument("--decay-milestones", type=float, nargs="+", default=[], help="epochs of lr decay (multistep)")
    t.add_argument("--decay-rate", type=float, default=0.1, help="lr factor at each milestone (multistep)")
    t.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (0 = plain cross-entropy)")
    t.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off); uses SoftTargetCrossEntropy")
    t.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    t.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    t.add_argument("--model-ema", action="store_true",
                   help="keep a masked timm ModelEmaV3 copy; publish its slim export")
    t.add_argument("--model-ema-decay", type=float, default=0.998, help="EMA decay per optimizer step")
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-steps per update")
    t.add_argument("--channels-last", action="store_true",
                   help="train in channels_last memory format (timm's flag): faster convolutions on CPU (oneDNN) and "
                        "GPU, and it keeps thin shrunk layers efficient")
    t.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                   help="passed to Accelerator (default: whatever `accelerate launch` configured)")
    t.add_argument("--seed", type=int, default=0, help="seed of model init, data order, augmentation and masks")
    t.add_argument("--max-steps", type=int, help="cap on optimizer steps; all schedules are compressed to fit")
    c = p.add_argument_group("chase (override the YAML `chase:` section; other ChaseConfig fields go there)")
    c.add_argument("--density", type=float, help="overall weight density d (default 0.1; 1.0 with "
                   "--channel-sparsity 0 trains the dense baseline)")
    c.add_argument("--channel-sparsity", type=float, help="fraction S_c of prunable channels removed (default 0.4)")
    c.add_argument("--min-channel-ratio", type=float, help="per-group channel floor ratio beta (default 0.2)")
    c.add_argument("--shrink", choices=("off", "events", "end"),
                   help="slice removed channels out of the training model after every channel event (default: "
                        "later steps run on the slim widths), once at the end of channel pruning, or never (off: "
                        "masking only, the library's default)")
    o = p.add_argument_group("output")
    o.add_argument("--output", help="output folder, itself the slim model (default: outputs/<model>-chase)")
    o.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    o.add_argument("--resume", help="accelerate checkpoint to continue from (<output>/checkpoints/epoch_N)")
    o.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save an accelerate checkpoint every N epochs (the final one is always saved)")
    o.add_argument("--recal-batches", type=int, default=10,
                   help="augmented train batches to recompute the slim model's BN statistics (0 = keep them)")
    o.add_argument("--log-with", help="accelerate tracker for per-epoch metrics: tensorboard, wandb, ...")
    o.add_argument("--push-to-hub", metavar="ORG/NAME", help="publish the slim model folder to this Hub repo")
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
        unknown = sorted(set(cfg) - set(actions) | set(cfg) & set(CHASE_FLAGS + NOT_SAVED))
        if unknown:
            parser.error(f"{config_path}: unknown training key(s) {unknown}. Valid keys: "
                         f"{sorted(set(actions) - set(CHASE_FLAGS + NOT_SAVED))}; Chase knobs belong under `chase:`; "
                         "pass --output/--resume/--overwrite on the command line.")
        parser.set_defaults(**{k: coerce(actions[k], v, parser) for k, v in cfg.items()})
    args = parser.parse_args(argv)
    if chase.get("shrink") is False:  # YAML 1.1 reads a bare `shrink: off` as false
        chase["shrink"] = "off"
    if "shrink" not in chase and args.shrink is None:  # the recipe's default (it owns EMA, DDP and checkpoints),
        chase["shrink"] = checkpoint_run(args.resume)["chase"]["shrink"] if args.resume else "events"  # or the run's
    chase.update({k: getattr(args, k) for k in CHASE_FLAGS if getattr(args, k) is not None})
    valid = {f.name for f in dataclasses.fields(chase_timm.ChaseConfig)} - {"total_steps"} | set(EPOCH_KEYS)
    if set(chase) - valid:
        parser.error(f"unknown `chase:` key(s) {sorted(set(chase) - valid)}; valid keys: {sorted(valid)}. "
                     "(total_steps is computed from epochs and the data.)")
    for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("max_steps", 1), ("workers", 0),
                      ("recal_batches", 0), ("checkpoint_every", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("lr", "clip_grad", "img_size"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.pretrained and args.initial_checkpoint:
        parser.error("--pretrained and --initial-checkpoint both name starting weights; pass one")
    if args.streaming and args.workers:  # each worker would cap its own share of the stream: ranks could drift apart
        parser.error("--streaming reads with --workers 0 (every rank must see the same number of rows); drop --workers")
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        parser.error(f"--initial-checkpoint {args.initial_checkpoint!r} is not a file")
    check_model_name(args.model, parser)
    if args.resume and not os.path.isfile(os.path.join(args.resume, RUN_FILE)):
        parser.error(f"--resume {args.resume!r} is not a checkpoint of this recipe (expected "
                     f"<output>/checkpoints/epoch_N holding {RUN_FILE})")
    args.output = args.output or os.path.join("outputs", f"{args.model.replace('/', '_').replace(':', '_')}-chase")
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


def run_config(args: argparse.Namespace, chase_section: Dict[str, Any]) -> Dict[str, Any]:
    """What defines this run: the arguments (minus where it is written) and the `chase:` section; a valid --config."""
    run = {k: v for k, v in vars(args).items() if k not in NOT_SAVED + CHASE_FLAGS and v is not None}
    return {**run, "chase": dict(chase_section)}


def check_output(args: argparse.Namespace, run: Dict[str, Any]) -> None:
    """Refuse an output folder that holds anything unless resuming into it or --overwrite replaces a previous run."""
    out = Path(args.output)
    if out.is_file():
        fail(f"--output {out} is a file; pass a folder")
    if not out.is_dir() or not any(out.iterdir()) or args.resume:
        return
    previous = out / RUN_FILE
    if not args.overwrite:
        what = "a previous run" if previous.exists() else "files"
        fail(f"--output {out} already holds {what}; pass --overwrite to replace it, --resume "
             f"{out}/checkpoints/epoch_N to continue it, or choose another --output (nothing was changed)")
    if not previous.exists():
        fail(f"--output {out} holds files that are not a run of this recipe; --overwrite only replaces a previous "
             "run, choose another --output (nothing was changed)")


def checkpoint_run(resume: str) -> Dict[str, Any]:
    """A checkpoint's run config, with the values of settings that recipes older than them did not record."""
    path = Path(resume) / RUN_FILE
    saved = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    saved.setdefault("channels_last", False)
    saved["chase"] = {"shrink": "off", **(saved.get("chase") or {})}  # masking only, before shrinking was default
    return saved


def check_resume(args: argparse.Namespace, run: Dict[str, Any]) -> None:
    """A checkpoint continues only the run it came from: same model, data, schedule and Chase settings."""
    saved = checkpoint_run(args.resume)
    keys = (set(saved) | set(run)) - set(FREE_ON_RESUME)
    diff = {k: (saved.get(k), run.get(k)) for k in sorted(keys) if saved.get(k) != run.get(k)}
    if diff:
        fail(f"--resume {args.resume} is from another run; (checkpoint, now) differ in {diff}. Resume with the "
             f"checkpoint's settings: --config {Path(args.resume) / RUN_FILE}")


def tracker_config(args: argparse.Namespace, config: chase_timm.ChaseConfig) -> Dict[str, Any]:
    """Scalars only (TensorBoard's add_hparams rejects lists, dicts and None): the flags and the flat ChaseConfig."""
    flat = {**{k: v for k, v in vars(args).items()}, **{f"chase.{k}": v for k, v in config.to_dict().items()}}
    return {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in flat.items()
            if v is not None and not isinstance(v, dict)}


# ----------------------------------------------------------------------------------------------- loop state
@dataclass
class TrainState:
    """Loop position and history; registered with accelerate so checkpoints carry it."""
    epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    epochs: List[dict] = field(default_factory=list)
    steps: List[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__init__(**state)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
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


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(accelerator: Accelerator, folder: Path, run: Dict[str, Any], states: Dict[str, Any]) -> None:
    """accelerate.save_state (model, optimizer, RNG), our own states as plain tensors and numbers (Accelerate would
    pickle registered objects and unpickle them on load), then the run's settings (last: without them a
    checkpoint is incomplete)."""
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        torch.save({name: obj.state_dict() for name, obj in states.items()}, folder / STATE_FILE)
        (folder / RUN_FILE).write_text(yaml.safe_dump(run, sort_keys=False))
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> None:
    args, chase_section = parse_args(argv)
    run = run_config(args, chase_section)
    check_output(args, run)
    if args.resume:
        check_resume(args, run)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
        log_with=args.log_with, project_dir=args.output,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=args.seed))
    set_seed(args.seed)
    out = Path(args.output)

    # ---- build: data, model, optimizer, loss
    try:
        data = load_image_data(args.data, data_dir=args.data_dir, train_split=args.train_split,
                               val_split=args.val_split, val_fraction=args.val_fraction, streaming=args.streaming,
                               seed=args.seed, rank=accelerator.process_index, world_size=accelerator.num_processes)
    except (DataSpecError, ImportError) as e:
        fail(str(e))
    num_classes = args.num_classes or data.num_classes or fail(
        f"cannot infer the number of classes of --data {args.data!r}; pass --num-classes")
    per_process = args.batch_size // accelerator.num_processes
    if args.batch_size % accelerator.num_processes or (args.mixup or args.cutmix) and per_process % 2:
        fail(f"--batch-size {args.batch_size} must split evenly over {accelerator.num_processes} process(es)"
             + (" into even per-process batches (mixup/cutmix pair images)" if args.mixup or args.cutmix else ""))
    if args.batch_size > data.train_size:
        fail(f"--batch-size {args.batch_size} is larger than the {data.train_size} training images of "
             f"--data {args.data}; lower --batch-size")
    steps_per_epoch = math.ceil(data.train_size // args.batch_size / args.grad_accum)  # Accelerate syncs at the end
    total_steps = min(math.floor(args.epochs * steps_per_epoch), args.max_steps or math.inf)
    if chase_section.get("density") == 1.0:  # the dense baseline: nothing to regrow above density 1
        chase_section.setdefault("soft_bound", 0.0)
    try:  # a --max-steps cap compresses every schedule, so the run keeps its shape
        config = chase_timm.ChaseConfig.from_epochs(
            epochs=args.epochs, steps_per_epoch=total_steps / args.epochs, **{"seed": args.seed, **chase_section})
    except (TypeError, ValueError) as e:
        fail(f"bad Chase setting: {e}")

    digits = args.data == "digits"
    img_size = args.img_size or (32 if digits else None)  # None: the model's pretrained_cfg size
    try:
        model = create_timm_model(args.model, img_size, pretrained=args.pretrained, num_classes=num_classes)
        if args.initial_checkpoint:
            skipped = load_initial_weights(model, args.initial_checkpoint)
            accelerator.print(f"dense weights from {args.initial_checkpoint}" + (f" (re-initialised {skipped})"
                                                                                  if skipped else ""))
    except (RuntimeError, ValueError, OSError) as e:  # download refused, wrong architecture in the file
        fail(f"could not build {args.model} with its starting weights: {str(e).splitlines()[0]}")
    data_config = resolve_data_config({"input_size": (3, img_size, img_size) if img_size else None,
                                       "crop_pct": args.crop_pct or (1.0 if digits else None)}, model=model)
    input_size = data_config["input_size"]
    aug = dict(scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.0) if digits else {}  # a mirrored digit is another glyph
    set_transform(data.train, create_transform(**data_config, is_training=True, color_jitter=None, **aug))
    set_transform(data.val, create_transform(**data_config, is_training=False))
    streaming = isinstance(data.train, torch.utils.data.IterableDataset)
    train_loader = DataLoader(data.train, batch_size=per_process if streaming else args.batch_size,
                              shuffle=not streaming, drop_last=True, num_workers=args.workers)
    val_loader = DataLoader(data.val, batch_size=args.batch_size, num_workers=args.workers)
    calib_loader = DataLoader(data.train, batch_size=per_process, shuffle=not streaming, num_workers=args.workers,
                              generator=torch.Generator().manual_seed(args.seed))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # shrinking keeps the layout
    initial_params = count_params(model)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=0.9)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=num_classes) if args.mixup or args.cutmix else None
    criterion = (SoftTargetCrossEntropy() if mixup else
                 LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss())

    # ---- prepare (a streamed train split is already sharded per process), then attach Chase
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    train_loader = train_loader if streaming else accelerator.prepare(train_loader)
    scheduler, _ = create_scheduler_v2(  # in optimizer steps ("epochs" of one update), so --max-steps compresses it
        optimizer, sched=args.sched, num_epochs=total_steps, step_on_epochs=False, updates_per_epoch=1,
        warmup_epochs=round(args.warmup_epochs * total_steps / args.epochs),
        decay_milestones=[round(e * total_steps / args.epochs) for e in args.decay_milestones],
        decay_rate=args.decay_rate)
    try:
        chase = chase_timm.Chase(model, config, optimizer=optimizer,
                                 example_inputs=torch.zeros(1, *input_size, device=accelerator.device))
    except ValueError as e:  # e.g. a model compiled by `accelerate launch --dynamo_backend ...` cannot shrink
        fail(f"{e} In this recipe: --shrink off (masking only), or launch with --dynamo_backend no.")
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.model_ema_decay) if args.model_ema else None
    if ema is not None:
        chase.register(ema)  # shrinks along with the model
    train_flops = chase_timm.metrics.TrainingFlops(chase, input_size=input_size)  # the paper's training FLOPs
    state = TrainState()
    states = {"chase": chase, "loop": state, "train_flops": train_flops, **({"ema": ema} if ema else {})}
    if args.resume:
        saved = torch.load(Path(args.resume) / STATE_FILE, weights_only=True)
        chase_timm.training.load_checkpoint(chase, saved, states, lambda: accelerator.load_state(args.resume))
        accelerator.print(f"resumed from {args.resume}: epoch {state.epoch}, step {state.step}")
    elif accelerator.is_main_process and args.overwrite and out.is_dir():
        shutil.rmtree(out)  # check_output made sure it holds a previous run of this recipe
    accelerator.wait_for_everyone()
    scheduler.step_update(state.step)
    if args.log_with:
        accelerator.init_trackers("chase_timm", config=tracker_config(args, config))
    last_epoch = math.ceil(total_steps / steps_per_epoch)
    accelerator.print(f"{args.model} on {data.description}: {data.train_size} train / {len(data.val)} val images, "
                      f"{num_classes} classes, {accelerator.num_processes} process(es), {total_steps} optimizer steps "
                      f"({steps_per_epoch:g}/epoch), input {input_size}")

    # ---- train
    log_every = max(1, total_steps // 500)
    shrinks, width, step_times = [], count_params(model), []
    while state.step < total_steps:
        model.train()
        getattr(train_loader, "set_epoch", getattr(data.train, "set_epoch", lambda e: None))(state.epoch)
        started, loss_sum, batches = time.time(), 0.0, 0
        bar = tqdm(total=min(math.ceil(steps_per_epoch), total_steps - state.step),
                   desc=f"epoch {state.epoch + 1}/{last_epoch}", disable=not accelerator.is_local_main_process,
                   leave=False)
        step_started = time.perf_counter()  # step times leave out evaluation and checkpoints
        for x, y in train_loader:
            if streaming:
                x, y = x.to(accelerator.device), y.to(accelerator.device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mixup:
                x, y = mixup(x, y)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = criterion(model(x), y)
                accelerator.backward(loss)
                if args.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                chase.step()  # counts only synchronised, not-skipped steps, like the loop below
                train_flops.step(x.shape[0] * accelerator.num_processes)
                optimizer.zero_grad()
            loss_sum, batches = loss_sum + loss.item(), batches + 1
            if not accelerator.sync_gradients:
                continue
            if accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, so no step for lr or Chase
                state.skipped_steps += 1
                continue
            state.step += 1
            step_times.append(time.perf_counter() - step_started)
            step_started = time.perf_counter()
            if config.is_channel_step(state.step) and count_params(model) != width:  # Chase shrank the model
                before = sum(step_times) / len(step_times)
                shrinks.append({"step": state.step, "params_before": width, "params_after": count_params(model),
                                "mean_step_s_before": before})
                accelerator.print(f"shrunk at step {state.step}: {width:,} -> {shrinks[-1]['params_after']:,} "
                                  f"parameters; mean step time since the last shrink {before:.3f} s")
                width, step_times = shrinks[-1]["params_after"], []
            scheduler.step_update(state.step)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=state.step)  # after chase.step(), which masks it
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
        stats = chase.stats()
        record = {"epoch": state.epoch, "step": state.step, "chase_step": stats["step"],
                  "train_loss": accelerator.reduce(torch.tensor(loss_sum / max(batches, 1), device=accelerator.device),
                                                   "mean").item(),
                  "val_top1": evaluate(model, val_loader, accelerator), "lr": optimizer.param_groups[0]["lr"],
                  "density": stats["density"], "channel_sparsity": stats["channel_sparsity"],
                  "seconds": time.time() - started}
        if ema is not None:
            record["ema_val_top1"] = evaluate(ema.module, val_loader, accelerator)
        state.epochs.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=state.step)
        accelerator.print(f"epoch {state.epoch:>3}/{last_epoch}  step {state.step:>6}  "
                          f"loss {record['train_loss']:.4f}  "
                          f"val top-1 {record['val_top1']:5.1f}%  density {record['density']:.3f}  "
                          f"channel sparsity {record['channel_sparsity']:.3f}  ({record['seconds']:.1f} s)")
        if state.step >= total_steps or args.checkpoint_every and state.epoch % args.checkpoint_every == 0:
            save_checkpoint(accelerator, out / "checkpoints" / f"epoch_{state.epoch}", run, states)

    # ---- export the slim model (of the EMA copy with --model-ema), check it equals the masked one, recalibrate BN
    masked = ema.module if ema is not None else accelerator.unwrap_model(model)
    slim = chase.export(ema.module if ema is not None else None).to(accelerator.device).eval()
    final = {"masked_top1": evaluate(masked, val_loader, accelerator), "ema": ema is not None,
             "export_max_abs_diff": check_export(masked, slim, next(iter(val_loader))[0]),
             "slim_top1_before_recal": evaluate(slim, val_loader, accelerator), "skipped_steps": state.skipped_steps,
             **train_flops.summary(),
             "rank_mask_digests": accelerator.gather(
                 torch.tensor([mask_digest(chase)], device=accelerator.device)).tolist(),
             "rank_weight_digests": accelerator.gather(  # DDP kept every rank's (shrunk) weights identical
                 torch.tensor([weight_digest(accelerator.unwrap_model(model))], device=accelerator.device)).tolist()}
    if args.recal_batches:
        set_seed(args.seed)  # the same augmented batches on every rank
        recalibrate_batchnorm(slim, calib_loader, num_batches=args.recal_batches)
    final["slim_top1"] = evaluate(slim, val_loader, accelerator)
    try:
        check_slim_accuracy(final["masked_top1"], final["slim_top1_before_recal"],
                            final["slim_top1"] if args.recal_batches else None, len(data.val))
    except ExportMismatchError as e:
        fail(str(e))
    for name, m in (("base", masked), ("slim", slim)):
        final.update({f"{name}_{k}": v for k, v in size_summary(m, input_size, chase if m is masked else None).items()})
    shrunk = count_params(model) < initial_params
    if shrunk:
        final["mean_step_s_after_last_shrink"] = sum(step_times) / max(len(step_times), 1)
    accelerator.end_training()

    # ---- save (main process): the slim model folder, metrics, plot; publish
    if accelerator.is_main_process:
        dense = masked
        if shrunk:  # the training model was shrunk: sizes and speed of the dense widths it started at
            dense = create_timm_model(args.model, img_size, num_classes=num_classes).to(
                accelerator.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
            final.update(base_params=count_params(dense), base_dense_flops=count_flops(dense, input_size))
        final.update(speed_summary(dense, slim, input_size, batch_size=per_process))
        report = chase.report()
        slim = slim.cpu()
        chase_timm.save_pretrained(slim, out, chase_config=config, data_config=data_config, metrics=final,
                                   dataset=data.description, recipe=run, repo_id=args.push_to_hub, overwrite=True)
        (out / RUN_FILE).write_text(yaml.safe_dump(run, sort_keys=False))
        (out / "metrics.json").write_text(json.dumps(
            {"model": args.model, "data": args.data, "final": final, "epochs": state.epochs, "steps": state.steps,
             "shrinks": shrinks, "channel_groups": report}, indent=2))
        plot_training(out / "training.png", state.steps, state.epochs, config, report,
                      title=f"Chase on {args.model} ({data.description})")
        print("\n" + summary_table(final))
        print(f"\nslim model:  {out}  (timm.create_model('local-dir:{out}', pretrained=True))\n"
              f"metrics:     {out / 'metrics.json'}\nplot:        {out / 'training.png'}\n"
              f"checkpoint:  {out / 'checkpoints' / f'epoch_{state.epoch}'}  (--resume)")
        if args.log_with == "tensorboard" or args.log_with == "all":
            print(f"tensorboard: tensorboard --logdir {out}")
        if args.push_to_hub:
            try:
                print(f"published:   {chase_timm.push_to_hub(out, args.push_to_hub)}")
            except RuntimeError as e:  # network, token, server: all above is saved; the message says how to retry
                fail(str(e))


if __name__ == "__main__":
    main()
