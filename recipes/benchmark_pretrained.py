"""Chase from a pretrained model, measured offline: does ``ChaseConfig(mask_init="magnitude")`` keep what the
checkpoint knows, and does fine-tuning to a slim model pay?

    python recipes/benchmark_pretrained.py --output docs        # resnet18 at 32 px

Pretrained weights cannot be downloaded here, so the script makes its own "pretrained" model in two stages:
resnet18 (timm, 32 px) is pretrained dense on rendered glyphs (the first ``--classes`` letters drawn with a
random DejaVu font, size, rotation, shift, brightness and noise; ``--glyph-images`` train images), its
classifier is re-initialised for 10 classes and it is fine-tuned dense on the embedded digits (``--val-images``
validation images, the rest of the 1,797 train) — the dense starting checkpoint of the digits task, as a zoo
checkpoint fine-tuned on a user's data would be. From that checkpoint, on the digits, it measures

* (a) top-1 right after wrapping (no BN recalibration, before any step) for random masks (the paper's
  ERK-random draw), magnitude masks one-shot (within ERK budgets and with one global threshold) and
  magnitude masks with the default ramp;
* (b) validation top-1 every ``--eval-every`` steps while fine-tuning, during and after the ramp;
* (c) after the same ``--steps`` fine-tuning steps and seeds: the slim export of Chase-from-pretrained,
  continued dense training, and Chase from scratch (fresh initialisation, random masks).

Writes ``pretrained.json`` and ``pretrained.png`` (top-1 against fine-tuning step) to ``--output``.
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
from chase_timm.data import digits_splits

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10, help="glyph classes (the first N letters)")
    parser.add_argument("--glyph-images", type=int, default=2000, help="glyph (pretraining) train images")
    parser.add_argument("--glyph-val-images", type=int, default=520)
    parser.add_argument("--val-images", type=int, default=1000, help="digits validation images (the rest train)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="dense epochs on the glyphs")
    parser.add_argument("--dense-epochs", type=int, default=3, help="dense epochs on the digits (the checkpoint)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of every compared run")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between validation passes")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine) of the pretraining stages")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="peak learning rate (cosine) of the compared runs")
    parser.add_argument("--ramp-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="ramp lengths (fractions of --steps) of the Chase-from-pretrained runs")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--channel-sparsity", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
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
          seed: int, chase_config: Optional[chase_timm.ChaseConfig] = None,
          on_eval: Optional[Callable[[int, nn.Module], None]] = None) -> Optional[chase_timm.Chase]:
    """``steps`` SGD steps (momentum 0.9, cosine lr from ``lr``), batches drawn with ``seed``; Chase if a
    config is given; ``on_eval(step, model)`` every ``args.eval_every`` steps and at the end."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    chase = None
    if chase_config is not None:
        chase = chase_timm.Chase(model, chase_config, optimizer=optimizer,
                                 example_inputs=torch.zeros(1, 3, args.img_size, args.img_size))
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for step in range(1, steps + 1):
        if order.numel() < args.batch_size:
            order = torch.randperm(len(y), generator=generator)
        idx, order = order[:args.batch_size], order[args.batch_size:]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if chase is not None:
            chase.step()
        optimizer.zero_grad()
        scheduler.step()
        if on_eval is not None and (step % args.eval_every == 0 or step == steps):
            on_eval(step, model)
    return chase


def chase_config(args: argparse.Namespace, mask_init: str, **overrides) -> chase_timm.ChaseConfig:
    return chase_timm.ChaseConfig(total_steps=args.steps, density=args.density,
                                  channel_sparsity=args.channel_sparsity, seed=args.seed, mask_init=mask_init,
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
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    # 1. "pretrained": dense on rendered glyphs (the source task), then the classifier re-initialised and dense on
    # the digits (the target task): the dense starting checkpoint of the digits task
    gx, gy = render_glyphs(args.glyph_images, args.classes, args.img_size, seed=args.seed)
    gvx, gvy = render_glyphs(args.glyph_val_images, args.classes, args.img_size, seed=args.seed + 10_000)
    gx, gvx = to_inputs(gx, args.img_size), to_inputs(gvx, args.img_size)
    digits = digits_splits(val_fraction=args.val_images, seed=args.seed)  # an int: that many validation images
    dx, dy = to_inputs(torch.from_numpy(digits["train"][0]), args.img_size), torch.from_numpy(digits["train"][1])
    vx, vy = to_inputs(torch.from_numpy(digits["val"][0]), args.img_size), torch.from_numpy(digits["val"][1])

    model = timm.create_model(args.model, num_classes=args.classes)
    pretrain_steps = args.pretrain_epochs * math.ceil(len(gy) / args.batch_size)
    train(model, gx, gy, pretrain_steps, args.lr, args, seed=args.seed)
    glyphs_top1 = evaluate(model, gvx, gvy)
    model.reset_classifier(10)
    dense_steps = args.dense_epochs * math.ceil(len(dy) / args.batch_size)
    train(model, dx, dy, dense_steps, args.lr, args, seed=args.seed + 1)
    dense_top1 = evaluate(model, vx, vy)
    pretrained = copy.deepcopy(model.state_dict())
    print(f"pretrained: glyphs top-1 {glyphs_top1:.1f} % ({len(gvy)} val) after {pretrain_steps} steps, then digits "
          f"top-1 {dense_top1:.1f} % ({len(vy)} val) after {dense_steps} dense steps [{time.perf_counter() - start:.0f} s]",
          flush=True)

    # (a) top-1 right after wrapping
    default = chase_config(args, "magnitude")
    at_wrap = {
        "dense": dense_top1,
        "random": step0_top1(model, chase_config(args, "random"), vx, vy),
        "magnitude_one_shot_erk": step0_top1(model, chase_config(args, "magnitude", ramp_steps=0), vx, vy),
        "magnitude_one_shot_global": step0_top1(model, chase_config(args, "magnitude", ramp_steps=0), vx, vy,
                                                global_threshold=True),
        "magnitude_default_ramp": step0_top1(model, default, vx, vy),
    }
    print("top-1 right after wrapping:", json.dumps({k: round(v, 1) for k, v in at_wrap.items()}), flush=True)

    # (b) + (c) the same fine-tuning steps and batches from the same checkpoint
    runs: Dict[str, dict] = {}

    def run(name: str, config: Optional[chase_timm.ChaseConfig], from_pretrained: bool = True) -> None:
        torch.manual_seed(args.seed)
        net = timm.create_model(args.model, num_classes=10)
        if from_pretrained:
            net.load_state_dict(pretrained)
        curve: List[Tuple[int, float, Optional[float]]] = [
            (0, evaluate(net, vx, vy), None if config is None else config.density_at(0))]

        def on_eval(step: int, m: nn.Module) -> None:
            density = None if config is None else config.density_at(step)
            curve.append((step, evaluate(m, vx, vy), density))

        t0 = time.perf_counter()
        chase = train(net, dx, dy, args.steps, args.finetune_lr, args, seed=args.seed + 2, chase_config=config, on_eval=on_eval)
        result = {"curve": [{"step": s, "top1": a, "density_budget": d} for s, a, d in curve],
                  "final_top1": curve[-1][1], "seconds": round(time.perf_counter() - t0, 1)}
        if chase is not None:
            slim = chase.export()
            result.update(slim_top1=evaluate(slim, vx, vy), stats={k: chase.stats()[k] for k in (
                "density", "channel_sparsity")}, params_slim=sum(p.numel() for p in slim.parameters()),
                config=config.to_dict())
        runs[name] = result
        print(f"{name}: top-1 {result['final_top1']:.1f} %"
              + (f", slim export {result['slim_top1']:.1f} %" if chase is not None else "")
              + f" [{result['seconds']:.0f} s]", flush=True)

    run("dense", None)
    for fraction in args.ramp_fractions:
        run(f"chase_pretrained_magnitude_ramp{fraction:g}",
            chase_config(args, "magnitude", ramp_steps=round(fraction * args.steps)))
    run("chase_scratch", chase_config(args, "random"), from_pretrained=False)

    ramp_gaps = {}  # the worst top-1 gap to the dense model over the evaluations inside each ramp
    for name, result in runs.items():
        if name.startswith("chase_pretrained"):
            ramp_steps = result["config"]["ramp_steps"]
            ramp_gaps[name] = max(dense_top1 - p["top1"] for p in result["curve"] if p["step"] <= ramp_steps)
    results = {
        "setup": {
            "model": args.model, "img_size": args.img_size, "seed": args.seed,
            "pretraining": f"{pretrain_steps} dense steps on glyphs ({len(gy)} train, {args.classes} classes), then "
                           f"{dense_steps} dense steps on digits ({len(dy)} train)",
            "validation_images": len(vy), "train_images": len(dy), "finetune_steps": args.steps, "batch_size": args.batch_size,
            "eval_every": args.eval_every, "lr": args.lr, "finetune_lr": args.finetune_lr, "density": args.density,
            "channel_sparsity": args.channel_sparsity, "default_ramp_steps": default.ramp_steps,
            "update_interval": default.update_interval,
        },
        "pretrained": {"glyphs_top1": glyphs_top1, "glyphs_val_images": len(gvy), "digits_top1": dense_top1},
        "at_wrap": at_wrap,
        "at_wrap_ratio_to_dense": {k: v / dense_top1 for k, v in at_wrap.items()},
        "ramp_worst_gap_to_dense": ramp_gaps,
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "pretrained.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "pretrained.png")
    print(f"ramp: worst top-1 gap to dense (points) {json.dumps({k: round(v, 1) for k, v in ramp_gaps.items()})}; "
          f"wrote {out / 'pretrained.json'} and {out / 'pretrained.png'} [{results['seconds']:.0f} s]")
    return results


def plot(results: dict, path: Path) -> None:
    """Top-1 against fine-tuning step for every run, with the ramp shaded and the slim exports marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in results["runs"].items():
        steps = [p["step"] for p in run["curve"]]
        if name.startswith("chase_pretrained"):
            label = f"Chase from pretrained (magnitude, ramp {run['config']['ramp_steps']} steps)"
        else:
            label = {"dense": "dense, continued", "chase_scratch": "Chase from scratch"}[name]
        line, = ax.plot(steps, [p["top1"] for p in run["curve"]], marker="o", ms=3, label=label)
        if "slim_top1" in run:
            ax.plot([steps[-1]], [run["slim_top1"]], marker="*", ms=12, color=line.get_color(), ls="none")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"val top-1 % ({setup['validation_images']} images)")
    ax.set_title(f"{setup['model']} {setup['img_size']} px, d={setup['density']}, S_c={setup['channel_sparsity']}, "
                 f"seed {setup['seed']} (star: slim export)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
