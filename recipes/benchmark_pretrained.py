"""Chase from a pretrained model, measured offline: does ``ChaseConfig(mask_init="magnitude")`` keep what the
checkpoint knows, and does fine-tuning to a slim model pay?

    OMP_NUM_THREADS=1 python recipes/benchmark_pretrained.py --output docs        # resnet18 at 32 px

Pretrained weights cannot be downloaded here, so the script makes its own: resnet18 (timm, 32 px) trained dense
for ``--pretrain-steps`` on ``--pretrain-images`` rendered glyphs (the first ``--classes`` letters in a random
DejaVu face, size, rotation, shift, brightness and noise) is the checkpoint a user starts from. The user's data
are new glyphs of the same letters: ``--finetune-images`` to fine-tune on, ``--val-images`` to validate on (the
embedded digits are not used). From that checkpoint it measures, for every seed in ``--seeds``:

* (a) top-1 right after wrapping (no BN recalibration, before any step) for random masks (the paper's
  ERK-random draw), magnitude masks one-shot (within ERK budgets and with one global threshold) and
  magnitude masks with the default ramp;
* (b) validation top-1 after every epoch of the fine-tuning set (and every ``--eval-every`` steps for Chase
  from pretrained), during and after the ramp, for the default and the ``--ramp-variants`` schedules;
* (c) after the same ``--steps`` fine-tuning steps and seeds: the slim export of Chase-from-pretrained,
  continued dense training, and Chase from scratch (fresh initialisation, random masks);
* (d) Chase from pretrained with logit distillation from the frozen dense checkpoint (timm's
  ``LogitDistillationTask``) at each of ``--kd-temperatures``;
* (e) Chase from scratch with one-shot magnitude masks of the fresh initialisation, against random masks.

Writes ``pretrained.json`` and ``pretrained.png`` (mean top-1 over seeds against fine-tuning step) to ``--output``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import chase_timm
from chase_timm.sparsity import magnitude_masks
from timm.task import LogitDistillationTask

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10, help="glyph classes (the first N letters)")
    parser.add_argument("--pretrain-images", type=int, default=6000, help="glyph images of the pretraining set")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="dense pretraining steps (the checkpoint)")
    parser.add_argument("--finetune-images", type=int, default=800, help="new glyph images of the fine-tuning set")
    parser.add_argument("--val-images", type=int, default=1000, help="new glyph images of the validation set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of every compared run")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="steps between extra validation passes of the Chase-from-pretrained runs (all runs are "
                             "also evaluated after every epoch of the fine-tuning set)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine) of the pretraining")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="peak learning rate (cosine) of the compared runs")
    parser.add_argument("--ramp-variants", nargs="*", default=["0.5:0.5", "0.75:0.75"],
                        help="RAMP:CHANNEL_START fractions of --steps for Chase-from-pretrained runs besides the default")
    parser.add_argument("--kd-temperatures", type=float, nargs="*", default=[1.0, 4.0],
                        help="logit-distillation runs (timm.task.LogitDistillationTask, teacher = the frozen dense "
                             "checkpoint, timm's default loss weights) of Chase from pretrained")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--channel-sparsity", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the pretraining")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="fine-tuning seeds (batch order, Chase's generator, fresh initialisation)")
    parser.add_argument("--output", default="outputs/pretrained")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data
def font_files() -> List[Path]:
    """The DejaVu fonts matplotlib ships (present wherever matplotlib is, independent of the system's fonts)."""
    import matplotlib

    fonts = sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf"))
    if not fonts:
        raise FileNotFoundError("matplotlib's DejaVu fonts (mpl-data/fonts/ttf) are missing; reinstall matplotlib.")
    return fonts


def render_glyphs(n: int, classes: int, size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` greyscale glyph images (uint8, n x size x size) of the first ``classes`` letters and their labels.

    Each image: one letter in a random DejaVu face at a random size, rotated by up to 15 degrees, shifted,
    on a random-brightness background with Gaussian noise; balanced labels in random order.
    """
    rng = np.random.default_rng(seed)
    fonts = font_files()
    labels = rng.permutation(np.arange(n) % classes)
    canvas = 2 * size
    images = np.empty((n, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(canvas * 9 // 20, canvas * 7 // 10)))
        img = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(img).text((canvas / 2, canvas / 2), LETTERS[label], fill=255, font=font, anchor="mm")
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR,
                         translate=tuple(int(v) for v in rng.integers(-canvas // 6, canvas // 6 + 1, 2)))
        glyph = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        background = rng.uniform(0.0, 0.4)
        ink = rng.uniform(0.6, 1.0)
        pixels = background + (ink - background) * glyph + rng.normal(0.0, 0.08, glyph.shape)
        images[i] = np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def to_inputs(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 greyscale images -> normalised 3-channel float inputs at ``size`` px (timm's 0.5/0.5 normalisation)."""
    x = images.float().div(255.0).unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 520) -> float:
    """Top-1 (percent) in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return 100.0 * correct / len(y)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, args: argparse.Namespace,
          seed: int, chase_config: Optional[chase_timm.ChaseConfig] = None, teacher: Optional[nn.Module] = None,
          temperature: float = 1.0, eval_steps: Sequence[int] = (),
          on_eval: Optional[Callable[[int, nn.Module], None]] = None) -> Optional[chase_timm.Chase]:
    """``steps`` SGD steps (momentum 0.9, cosine lr from ``lr``), batches drawn with ``seed``; Chase if a
    config is given; logit distillation from ``teacher`` (timm's ``LogitDistillationTask``) if one is given;
    ``on_eval(step, model)`` after every step in ``eval_steps``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    chase = None
    if chase_config is not None:
        chase = chase_timm.Chase(model, chase_config, optimizer=optimizer,
                                 example_inputs=torch.zeros(1, 3, args.img_size, args.img_size))
    task = None
    if teacher is not None:
        task = LogitDistillationTask(model, teacher, temperature=temperature, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    if task is not None:
        task.train()  # the teacher stays in eval mode
    for step in range(1, steps + 1):
        if order.numel() < args.batch_size:
            order = torch.randperm(len(y), generator=generator)
        idx, order = order[:args.batch_size], order[args.batch_size:]
        loss = task(x[idx], y[idx])["loss"] if task is not None else F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if chase is not None:
            chase.step()
        optimizer.zero_grad()
        scheduler.step()
        if on_eval is not None and step in eval_steps:
            on_eval(step, model)
    return chase


def chase_config(args: argparse.Namespace, mask_init: str, seed: int, **overrides) -> chase_timm.ChaseConfig:
    """The compared runs' ChaseConfig: default settings but for d, S_c, the seed and ``overrides``."""
    return chase_timm.ChaseConfig(total_steps=args.steps, density=args.density,
                                  channel_sparsity=args.channel_sparsity, seed=seed, mask_init=mask_init,
                                  **overrides)


def step0_top1(model: nn.Module, config: chase_timm.ChaseConfig, x: torch.Tensor, y: torch.Tensor,
               global_threshold: bool = False) -> float:
    """Top-1 of a copy of ``model`` right after wrapping with Chase (no step, no BN recalibration).

    ``global_threshold``: replace the masks by one global magnitude threshold at the same budget (the
    alternative to magnitude within ERK budgets, measured here only).
    """
    clone = copy.deepcopy(model)
    chase = chase_timm.Chase(clone, config, example_inputs=x[:1])
    if global_threshold:
        clone.load_state_dict(model.state_dict())  # undo the ERK masking, then mask with the global threshold
        masks = magnitude_masks(chase.weights, None, torch.Generator().manual_seed(0), total=chase.budget)
        with torch.no_grad():
            for name, mask in masks.items():
                chase.weights[name].mul_(mask.to(chase.weights[name].dtype))
    return evaluate(clone, x, y)


# ----------------------------------------------------------------------------- main
def summary(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and the values themselves (over seeds)."""
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    # 1. "pretrained": dense on a large glyph set (the checkpoint a user starts from); the fine-tuning set and the
    # validation set are new glyphs of the same letters (the user's data)
    sets = [render_glyphs(n, args.classes, args.img_size, seed=args.seed + 10_000 * i)
            for i, n in enumerate((args.pretrain_images, args.finetune_images, args.val_images))]
    (px, py), (fx, fy), (vx, vy) = [(to_inputs(images, args.img_size), labels) for images, labels in sets]
    model = timm.create_model(args.model, num_classes=args.classes)
    train(model, px, py, args.pretrain_steps, args.lr, args, seed=args.seed)
    dense_top1 = evaluate(model, vx, vy)
    pretrained = copy.deepcopy(model.state_dict())
    print(f"pretrained: top-1 {dense_top1:.1f} % ({len(vy)} val) after {args.pretrain_steps} dense steps on "
          f"{len(py)} glyphs [{time.perf_counter() - start:.0f} s]", flush=True)

    # (a) top-1 right after wrapping
    default = chase_config(args, "magnitude", args.seed)
    at_wrap = {
        "dense": dense_top1,
        "random": step0_top1(model, chase_config(args, "random", args.seed), vx, vy),
        "magnitude_one_shot_erk": step0_top1(model, chase_config(args, "magnitude", args.seed, ramp_steps=0), vx, vy),
        "magnitude_one_shot_global": step0_top1(model, chase_config(args, "magnitude", args.seed, ramp_steps=0),
                                                vx, vy, global_threshold=True),
        "magnitude_default_ramp": step0_top1(model, default, vx, vy),
    }
    print("top-1 right after wrapping:", json.dumps({k: round(v, 1) for k, v in at_wrap.items()}), flush=True)

    # (b)-(e): the same fine-tuning steps and batches per seed from the same checkpoint
    epoch = math.ceil(len(fy) / args.batch_size)
    epoch_steps = sorted({min(s, args.steps) for s in range(epoch, args.steps + epoch, epoch)})
    fine_steps = sorted(set(epoch_steps) | set(range(args.eval_every, args.steps + 1, args.eval_every)))
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen dense checkpoint
    variants: Dict[str, dict] = {"dense": {}, "chase_pretrained_default": dict(mask_init="magnitude")}
    for variant in args.ramp_variants:
        ramp, channel = (float(v) for v in variant.split(":"))
        variants[f"chase_pretrained_ramp{ramp:g}_channels{channel:g}"] = dict(
            mask_init="magnitude", ramp_steps=round(ramp * args.steps), channel_start_step=round(channel * args.steps))
    for temperature in args.kd_temperatures:
        variants[f"chase_pretrained_kd_T{temperature:g}"] = dict(mask_init="magnitude", kd=temperature)
    variants["chase_scratch_random"] = dict(mask_init="random", scratch=True)
    variants["chase_scratch_magnitude_one_shot"] = dict(mask_init="magnitude", ramp_steps=0, scratch=True)

    runs: Dict[str, dict] = {}
    for name, spec in variants.items():
        spec = dict(spec)
        scratch, kd, mask_init = spec.pop("scratch", False), spec.pop("kd", None), spec.pop("mask_init", None)
        from_pretrained_chase = mask_init is not None and not scratch
        per_seed = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            net = timm.create_model(args.model, num_classes=args.classes)
            if not scratch:
                net.load_state_dict(pretrained)
            config = None if mask_init is None else chase_config(args, mask_init, seed, **spec)
            curve = [(0, evaluate(net, vx, vy))]
            t0 = time.perf_counter()
            chase = train(net, fx, fy, args.steps, args.finetune_lr, args, seed=seed + 2, chase_config=config,
                          teacher=teacher if kd is not None else None, temperature=kd or 1.0,
                          eval_steps=fine_steps if from_pretrained_chase else epoch_steps,
                          on_eval=lambda step, m: curve.append((step, evaluate(m, vx, vy))))
            result = {"seed": seed, "curve": [{"step": s, "top1": a} for s, a in curve], "final_top1": curve[-1][1],
                      "seconds": round(time.perf_counter() - t0, 1)}
            if chase is not None:
                slim = chase.export()
                result.update(slim_top1=evaluate(slim, vx, vy), params_slim=sum(p.numel() for p in slim.parameters()),
                              stats={k: chase.stats()[k] for k in ("density", "channel_sparsity")})
                if from_pretrained_chase:  # the largest drop below the dense checkpoint inside the ramp
                    ramp = config.ramp_steps
                    result["ramp_gap_every_eval"] = max([dense_top1 - a for s, a in curve if 0 < s <= ramp] or [0.0])
                    result["ramp_gap_every_epoch"] = max([dense_top1 - a for s, a in curve if s in epoch_steps
                                                          and s <= ramp] or [0.0])
            per_seed.append(result)
            print(f"{name} seed {seed}: top-1 {result['final_top1']:.1f} %"
                  + (f", slim export {result['slim_top1']:.1f} %" if chase is not None else "")
                  + (f", ramp gap {result['ramp_gap_every_eval']:.1f} (every eval) "
                     f"{result['ramp_gap_every_epoch']:.1f} (every epoch)" if "ramp_gap_every_eval" in result else "")
                  + f" [{result['seconds']:.0f} s]", flush=True)
        final_key = "slim_top1" if "slim_top1" in per_seed[0] else "final_top1"
        runs[name] = {"config": None if config is None else {**config.to_dict(), "seed": None},  # per seed
                      "kd_temperature": kd,
                      "from_pretrained": not scratch, "seeds": per_seed,
                      "final": summary([r[final_key] for r in per_seed])}
        for key in ("ramp_gap_every_eval", "ramp_gap_every_epoch"):
            if key in per_seed[0]:
                runs[name][key] = summary([r[key] for r in per_seed])

    results = {
        "setup": {
            "model": args.model, "img_size": args.img_size, "classes": args.classes,
            "pretraining": f"{args.pretrain_steps} dense steps (batch {args.batch_size}, SGD lr {args.lr} cosine) on "
                           f"{len(py)} rendered glyphs",
            "validation_images": len(vy), "finetune_images": len(fy), "finetune_steps": args.steps,
            "steps_per_epoch": epoch, "epoch_eval_steps": epoch_steps, "fine_eval_steps": fine_steps,
            "batch_size": args.batch_size, "finetune_lr": args.finetune_lr, "density": args.density,
            "channel_sparsity": args.channel_sparsity, "data_seed": args.seed, "seeds": args.seeds,
            "default_ramp_steps": default.ramp_steps, "default_channel_start_step": default.channel_start_step,
            "default_channel_end_step": default.channel_end_step, "update_interval": default.update_interval,
            "kd": "timm.task.LogitDistillationTask, teacher = frozen dense checkpoint, task and distill weights 1.0",
        },
        "pretrained_top1": dense_top1,
        "at_wrap": at_wrap,
        "at_wrap_ratio_to_dense": {k: v / dense_top1 for k, v in at_wrap.items()},
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "pretrained.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "pretrained.png")
    print("final (slim export for Chase), mean over seeds:",
          json.dumps({k: round(r["final"]["mean"], 1) for k, r in runs.items()}))
    print(f"wrote {out / 'pretrained.json'} and {out / 'pretrained.png'} [{results['seconds']:.0f} s]")
    return results


def plot(results: dict, path: Path) -> None:
    """Mean top-1 over seeds against fine-tuning step: dense continued, Chase from pretrained (default, with
    distillation) and Chase from scratch, the default ramp shaded and the slim exports marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    labels = {"dense": "dense, continued", "chase_pretrained_default": "Chase from pretrained (magnitude, defaults)",
              "chase_scratch_random": "Chase from scratch (random masks)"}
    labels.update({name: f"Chase from pretrained + logit KD (T={run['kd_temperature']:g})"
                   for name, run in results["runs"].items() if run["kd_temperature"] is not None})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.axvspan(0, setup["default_ramp_steps"], color="0.92", label="default sparsity ramp")
    for name, label in labels.items():
        run = results["runs"][name]
        steps = [p["step"] for p in run["seeds"][0]["curve"]]
        mean = np.mean([[p["top1"] for p in r["curve"]] for r in run["seeds"]], axis=0)
        line, = ax.plot(steps, mean, marker="o", ms=3, label=label)
        if "slim_top1" in run["seeds"][0]:
            ax.plot([steps[-1]], [run["final"]["mean"]], marker="*", ms=12, color=line.get_color(), ls="none")
    ax.axhline(results["pretrained_top1"], color="0.5", ls=":", lw=1, label="dense checkpoint")
    ax.set_xlabel(f"fine-tuning step ({setup['finetune_images']} images, {setup['steps_per_epoch']} steps per epoch)")
    ax.set_ylabel(f"val top-1 % ({setup['validation_images']} images)")
    ax.set_title(f"{setup['model']} {setup['img_size']} px, d={setup['density']}, S_c={setup['channel_sparsity']}, "
                 f"mean of seeds {setup['seeds']} (star: slim export)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
