"""Command line of recipes/train.py: flag definitions (timm's train.py names), YAML merging, up-front validation.

Every flag can also be a key of the --config YAML (dashes or underscores). Flags named as in timm's train.py
mean what they mean there, with one deliberate exception: ``--batch-size`` is the *global* batch (timm's ``-b`` is
per process), so it has no ``-b`` alias. Older names stay accepted as aliases (``--grad-accum``). Also the
checks of a run's settings that come before any work: the output folder, and that a checkpoint fits the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

import timm
import yaml
from accelerate.tracking import get_available_trackers
from timm.data import create_transform
from timm.optim import list_optimizers

import chase_timm
from chase_timm.data import DATA_SPEC_HELP

CHASE_FLAGS = ("density", "channel_sparsity", "min_channel_ratio", "channel_cost", "shrink", "mask_init",
               "ramp_steps")  # -> `chase:`
EPOCH_KEYS = ("update_interval_epochs", "channel_interval_epochs", "channel_end_epoch", "phase_b_epoch")
NOT_SAVED = ("config", "resume", "overwrite", "output", "push_to_hub")  # run_config.yaml must not redo these
FREE_ON_RESUME = ("checkpoint_every", "log_with", "workers", "recal_batches")  # may change when resuming
KEY_ALIASES = {"grad_accum": "grad_accum_steps"}  # older YAML / run_config.yaml keys -> today's
RUN_FILE = "run_config.yaml"
# timm schedulers that step per optimizer update (create_scheduler_v2 names; 'plateau' needs a metric, 'none' is none)
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "constant", "poly", "wsd", "rsqrt")
# The KD teacher of a run that starts from weights when --kd-model-name is not given: None (KD off), or "dense" (a
# frozen copy of the dense starting model) should measurement show that distillation helps.
KD_TEACHER_FROM_WEIGHTS: Optional[str] = None
DENSE_TEACHER = "dense"  # --kd-model-name value for the frozen dense starting model


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


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """Command line; every option can also be a key of the --config YAML (dashes or underscores)."""
    p = Parser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML of training keys plus a `chase:` section of ChaseConfig fields (and "
                                    f"{', '.join(EPOCH_KEYS)}); command-line flags override it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet50", help="any timm model name (or hf-hub:/local-dir: source)")
    g.add_argument("--pretrained", action="store_true", help="start from the model's pretrained dense weights "
                   "(timm/Hub download; the classifier is re-initialised for another class count); switches the default "
                   "--mask-init to magnitude")
    g.add_argument("--initial-checkpoint", help="start from dense weights in a local file (.safetensors, or a torch "
                   "checkpoint read with weights_only=True); a classifier of another class count is re-initialised; "
                   "switches the defaults as --pretrained does")
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
    g.add_argument("--drop", type=float, help="dropout rate (timm's drop_rate; default: the model's own)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate (timm's drop_path_rate; default: the "
                   "model's own)")
    a = p.add_argument_group("augmentation (timm's create_transform)")
    a.add_argument("--aa", help="AutoAugment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0")
    a.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    a.add_argument("--remode", default="pixel", choices=("const", "rand", "pixel"), help="random erasing fill")
    a.add_argument("--recount", type=int, default=1, help="random erasing count")
    a.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (0 = plain cross-entropy)")
    a.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off); uses SoftTargetCrossEntropy")
    a.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    o = p.add_argument_group("optimizer and schedule (timm's create_optimizer_v2 / create_scheduler_v2)")
    o.add_argument("--epochs", type=int, default=20, help="training epochs")
    o.add_argument("--batch-size", type=int, default=64,
                   help="GLOBAL batch per optimizer micro-step, split across processes (timm's -b is per process)")
    o.add_argument("--opt", default="adamw", help="timm optimizer name, optionally lookahead_<name> ('momentum' is "
                   "SGD with momentum and no Nesterov, the paper's; timm's 'sgd' is Nesterov SGD)")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    o.add_argument("--opt-eps", type=float, help="optimizer epsilon (default: the optimizer's)")
    o.add_argument("--momentum", type=float, default=0.9, help="momentum of optimizers that have one")
    o.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norm and bias parameters")
    o.add_argument("--layer-decay", type=float, help="layer-wise lr decay (models with a group_matcher: ViT, "
                   "ConvNeXt, ResNet, ...)")
    o.add_argument("--clip-grad", type=float, help="clip gradients at this value (see --clip-mode)")
    o.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"),
                   help="clip the global norm, each value, or adaptively per unit (AGC)")
    o.add_argument("--sched", default="cosine", help=f"timm scheduler, stepped per optimizer update: "
                   f"{', '.join(SCHEDULERS)}")
    o.add_argument("--min-lr", type=float, default=0.0, help="lower lr bound of cyclic schedules")
    o.add_argument("--warmup-lr", type=float, default=1e-5, help="lr the warm-up starts from")
    o.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up (fractions allowed)")
    o.add_argument("--decay-milestones", type=float, nargs="+", default=[], help="epochs of lr decay (multistep)")
    o.add_argument("--decay-rate", type=float, default=0.1, help="lr factor at each milestone (multistep)")
    k = p.add_argument_group("knowledge distillation (timm's train.py names and timm.task.LogitDistillationTask)")
    k.add_argument("--kd-model-name", help=f"teacher: '{DENSE_TEACHER}' (a frozen copy of the dense starting model; "
                   "needs --pretrained or --initial-checkpoint), a timm model name with pretrained weights, or 'none' "
                   f"(default: {KD_TEACHER_FROM_WEIGHTS or 'none'})")
    k.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature of the distillation loss")
    k.add_argument("--distill-loss-weight", type=float,
                   help="weight of the distillation loss (default 1.0, or 1 - --task-loss-weight when only that is set)")
    k.add_argument("--task-loss-weight", type=float, help="weight of the classification loss (default 1.0)")
    o.add_argument("--model-ema", action="store_true",
                   help="keep a masked timm ModelEmaV3 copy; publish its slim export")
    o.add_argument("--model-ema-decay", type=float, default=0.998, help="EMA decay per optimizer step")
    o.add_argument("--grad-accum-steps", "--grad-accum", type=int, default=1,
                   help="gradient accumulation micro-steps per optimizer update")
    o.add_argument("--channels-last", action="store_true",
                   help="train in channels_last memory format (timm's flag): faster convolutions on CPU (oneDNN) and "
                        "GPU, and it keeps thin shrunk layers efficient")
    o.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                   help="passed to Accelerator (default: whatever `accelerate launch` configured)")
    o.add_argument("--seed", type=int, default=0, help="seed of model init, data order, augmentation and masks")
    o.add_argument("--max-steps", type=int, help="cap on optimizer steps; all schedules are compressed to fit")
    c = p.add_argument_group("chase (override the YAML `chase:` section; other ChaseConfig fields go there)")
    c.add_argument("--density", type=float, help="overall weight density d (default 0.1; 1.0 with "
                   "--channel-sparsity 0 trains the dense baseline)")
    c.add_argument("--channel-sparsity", type=float, help="fraction S_c of prunable channels removed (default 0.4)")
    c.add_argument("--min-channel-ratio", type=float, help="per-group channel floor ratio beta (default 0.2)")
    c.add_argument("--channel-cost", choices=("none", "flops", "latency"),
                   help="channel ranking: the paper's UMM alone, or UMM per FLOP / per second a channel saves, for a "
                        "FLOPs target on hierarchical models such as Swin (default: none; docs/speed.md section 5)")
    c.add_argument("--mask-init", choices=("random", "magnitude"),
                   help="first masks: the paper's ERK-random draw, or the largest weights under a cubic density ramp "
                        "(default: magnitude with --pretrained / --initial-checkpoint, else random)")
    c.add_argument("--ramp-steps", type=int, help="optimizer steps of the density ramp from 1.0 to d (default: three "
                   "quarters of the run with --mask-init magnitude; 0 = one-shot, then BN statistics are recalibrated)")
    c.add_argument("--shrink", choices=("off", "events", "end"),
                   help="slice removed channels out of the training model after every channel event (default: "
                        "later steps run on the slim widths), once at the end of channel pruning, or never (off: "
                        "masking only, the library's default)")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="output folder, itself the slim model (default: outputs/<model>-chase)")
    out.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    out.add_argument("--resume", help="accelerate checkpoint to continue from (<output>/checkpoints/epoch_N)")
    out.add_argument("--checkpoint-every", type=int, default=0,
                     help="also save an accelerate checkpoint every N epochs (the final one is always saved)")
    out.add_argument("--recal-batches", type=int, default=10,
                     help="augmented train batches to recompute the slim model's BN statistics (0 = keep them)")
    out.add_argument("--log-with", help="accelerate tracker for per-epoch metrics: 'all' or an installed one "
                     "(tensorboard, wandb, ...)")
    out.add_argument("--push-to-hub", metavar="ORG/NAME", help="publish the slim model folder to this Hub repo")
    return p


def parse_args(argv: Optional[List[str]] = None, description: str = "") -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """Defaults < YAML < command line; returns the arguments and the merged `chase:` section."""
    parser = build_parser(description)
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
    if "channel_budget" not in chase:  # recorded, so that a resumed run keeps the ranking it started with
        chase["channel_budget"] = (checkpoint_run(args.resume)["chase"]["channel_budget"] if args.resume
                                   else next(f.default for f in dataclasses.fields(chase_timm.ChaseConfig)
                                           if f.name == "channel_budget"))
    chase.update({k: getattr(args, k) for k in CHASE_FLAGS if getattr(args, k) is not None})
    valid = {f.name for f in dataclasses.fields(chase_timm.ChaseConfig)} - {"total_steps"} | set(EPOCH_KEYS)
    if set(chase) - valid:
        parser.error(f"unknown `chase:` key(s) {sorted(set(chase) - valid)}; valid keys: {sorted(valid)}. "
                     "(total_steps is computed from epochs and the data.)")
    check_values(args, actions.values(), parser)
    if args.pretrained and args.initial_checkpoint:
        parser.error("--pretrained and --initial-checkpoint both name starting weights; pass one")
    if args.streaming and args.workers:  # each worker would cap its own share of the stream: ranks could drift apart
        parser.error("--streaming reads with --workers 0 (every rank must see the same number of rows); drop --workers")
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        parser.error(f"--initial-checkpoint {args.initial_checkpoint!r} is not a file")
    check_model_name(args.model, parser)
    start_defaults(args, chase, parser)
    if args.resume and not os.path.isfile(os.path.join(args.resume, RUN_FILE)):
        parser.error(f"--resume {args.resume!r} is not a checkpoint of this recipe (expected "
                     f"<output>/checkpoints/epoch_N holding {RUN_FILE})")
    args.output = args.output or os.path.join("outputs", f"{args.model.replace('/', '_').replace(':', '_')}-chase")
    return args, chase


def start_defaults(args: argparse.Namespace, chase: Dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """A run from weights gets magnitude masks under the density ramp unless `mask_init` is set (from scratch: the
    paper's random masks, whatever the library's default), and the default KD teacher; a resumed run gets what its
    checkpoint recorded (recipes before these defaults: random masks, no KD)."""
    from_weights = bool(args.pretrained or args.initial_checkpoint)
    if args.pretrained:
        check_has_weights("--pretrained", args.model, parser)
    saved = checkpoint_run(args.resume) if args.resume else None  # a resumed run keeps what it started with
    chase.setdefault("mask_init", saved["chase"]["mask_init"] if saved else  # random: the paper's, from scratch
                     "magnitude" if from_weights else "random")
    if args.kd_model_name is None and from_weights:
        args.kd_model_name = saved.get("kd_model_name") if saved else KD_TEACHER_FROM_WEIGHTS
    if args.kd_model_name in ("none", ""):
        args.kd_model_name = None
    if args.kd_model_name == DENSE_TEACHER and not from_weights:
        parser.error(f"--kd-model-name {DENSE_TEACHER} distils from the dense starting model: pass --pretrained or "
                     "--initial-checkpoint, or name a timm model with pretrained weights")
    if args.kd_model_name not in (None, DENSE_TEACHER):
        check_has_weights("--kd-model-name", args.kd_model_name, parser)


def check_has_weights(flag: str, name: str, parser: argparse.ArgumentParser) -> None:
    """Fail before any work when timm has no pretrained weights for the model `name` (hf-hub:/local-dir: aside)."""
    check_model_name(name, parser)
    if ":" not in name and not timm.models.is_model_pretrained(name):
        parser.error(f"{flag}: timm has no pretrained weights for {name!r}; list the ones it has with "
                     f"timm.list_pretrained('{name.split('.')[0]}*'), or start from a local file with "
                     "--initial-checkpoint")


def start_line(args: argparse.Namespace, config: "chase_timm.ChaseConfig", reinitialised: List[str],
               num_classes: int, hub_id: Optional[str]) -> str:
    """The first line of a run from weights: where they come from and what that switched (masks, ramp, KD)."""
    source = (f"pretrained weights {hub_id or args.model}" if args.pretrained else
              f"the local checkpoint {args.initial_checkpoint}")
    head = f" (classifier re-initialised for {num_classes} classes: {', '.join(reinitialised)})" if reinitialised else ""
    if config.mask_init == "random":
        masks = f"mask_init=random: ERK-random masks at density {config.density} from step 0"
    elif config.ramp_steps:
        masks = (f"mask_init=magnitude, density ramp {config.density_at(0):g} -> {config.density:g} over "
                 f"{config.ramp_steps} steps (cubic), channel events from step {config.channel_start_step}")
    else:
        masks = (f"mask_init=magnitude, one-shot at density {config.density:g}, BN statistics recalibrated on "
                 f"{args.recal_batches} train batches")
    kd = f"KD from {args.kd_model_name} (T={args.kd_temperature:g})" if args.kd_model_name else "no KD"
    return f"starting from {source}{head}: {masks}; lr {args.lr:g}; {kd}"


def card_start(args: argparse.Namespace, pretrained_cfg: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """The model card's starting point: the Hub id of --pretrained weights (``base_model``), or, for a start without
    one (a local checkpoint: its file name and the start of its SHA-256; a local-dir: or URL source), a sentence."""
    if args.initial_checkpoint:
        digest = hashlib.sha256()
        with open(args.initial_checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        name = Path(args.initial_checkpoint).name
        return None, f"Fine-tuned from the local checkpoint {name} (sha256 {digest.hexdigest()[:12]})"
    if not args.pretrained:
        return None, None
    if pretrained_cfg.get("hf_hub_id"):
        return pretrained_cfg["hf_hub_id"], None
    if args.model.startswith("local-dir:"):  # the folder's name, not this machine's path
        return None, f"Fine-tuned from the pretrained weights in the local folder {Path(args.model[10:]).name}"
    url = pretrained_cfg.get("url")
    return None, f"Fine-tuned from the pretrained weights of {args.model}" + (f" ({url})" if url else "")


def check_values(args: argparse.Namespace, actions: Sequence[argparse.Action], parser: argparse.ArgumentParser) -> None:
    """Ranges and choices of every flag, wherever it was set (argparse skips `choices` for YAML values)."""
    for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum_steps", 1), ("max_steps", 1), ("workers", 0),
                      ("recal_batches", 0), ("checkpoint_every", 0), ("recount", 1), ("ramp_steps", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("lr", "clip_grad", "img_size", "opt_eps", "layer_decay", "kd_temperature"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("drop", "drop_path", "reprob"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    choices = {a.dest: a.choices for a in actions if a.choices}
    choices["sched"] = SCHEDULERS
    choices["log_with"] = ["all"] + sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
    for name, allowed in choices.items():
        if getattr(args, name) is not None and getattr(args, name) not in allowed:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)!r} is not one of: {', '.join(allowed)}"
                         + (" (the installed trackers)" if name == "log_with" else ""))
    optimizers = list_optimizers()
    if args.opt.lower().removeprefix("lookahead_") not in optimizers:
        close = difflib.get_close_matches(args.opt.lower(), optimizers, n=5)
        parser.error(f"--opt {args.opt!r} is not a timm optimizer (close: {', '.join(close) or 'none'}); one of "
                     f"timm.optim.list_optimizers(), optionally as lookahead_<name>: {', '.join(optimizers)}")
    if args.aa:
        try:  # timm parses the policy string only when it builds the transform
            create_transform(32, is_training=True, auto_augment=args.aa)
        except Exception as e:  # timm raises AssertionError, KeyError or ValueError for a bad policy string
            parser.error(f"--aa {args.aa!r} is not a timm AutoAugment policy ({type(e).__name__}: {e}); use e.g. "
                         "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0")


def load_yaml(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """A YAML mapping with dashes in keys normalised to underscores and older key names to today's."""
    if not os.path.isfile(path):
        parser.error(f"config file {path!r} not found")
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(cfg, dict):
        parser.error(f"{path}: expected a mapping of keys to values, got {type(cfg).__name__}")
    return current_keys({k.replace("-", "_"): v for k, v in cfg.items()})


def current_keys(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Older key names (aliases) renamed to today's, so old configs and checkpoints keep working."""
    return {KEY_ALIASES.get(k, k): v for k, v in cfg.items()}


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


def checkpoint_run(resume: str) -> Dict[str, Any]:
    """A checkpoint's run config in today's keys, with the values of settings that recipes older than them did not
    record (their defaults are what those recipes did)."""
    path = Path(resume) / RUN_FILE
    saved = current_keys((yaml.safe_load(path.read_text()) or {}) if path.is_file() else {})
    recorded_since = {a.dest: a.default for a in build_parser()._actions
                      if a.default is not None and a.dest not in NOT_SAVED + CHASE_FLAGS + ("help",)}
    saved = {**recorded_since, **saved}
    saved["chase"] = {"shrink": "off", "mask_init": "random",  # masking only and random masks, before the defaults
                      "channel_budget": "pooled",                # became shrinking and magnitude masks from weights,
                      **(saved.get("chase") or {})}              # and one ranking before heads and streams had pools
    return saved


def model_img_size(img_size: Optional[int], data: str) -> Optional[int]:
    """The size a run builds its model at (``create_timm_model``): ``--img-size``, else 32 for digits, else None
    (the model's pretrained_cfg size)."""
    return img_size or (32 if data == "digits" else None)


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


def check_resume(args: argparse.Namespace, run: Dict[str, Any]) -> None:
    """A checkpoint continues only the run it came from: same model, data, schedule and Chase settings."""
    saved = checkpoint_run(args.resume)
    keys = (set(saved) | set(run)) - set(FREE_ON_RESUME)
    diff = {k: (saved.get(k), run.get(k)) for k in sorted(keys) if saved.get(k) != run.get(k)}
    if diff:
        fail(f"--resume {args.resume} is from another run; (checkpoint, now) differ in {diff}. Resume with the "
             f"checkpoint's settings: --config {Path(args.resume) / RUN_FILE}")
