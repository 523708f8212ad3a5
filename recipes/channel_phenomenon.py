"""The sparse-channel phenomenon, measured: train with unstructured DST (Chase with S_c = 0 by default) and
record, after every prune/regrow update, how many channels are far sparser than their layer.

    python recipes/channel_phenomenon.py --output docs      # resnet50, 32 px digits, 200 steps, ~4 min on 1 thread
    python recipes/channel_phenomenon.py --model resnet18 --steps 40 --output outputs/phenomenon-r18

Writes ``phenomenon.png`` (every channel's density relative to its layer, per layer; the pooled histogram;
density against UMM; the fractions below 0.5x / 0.7x / 0.8x over the updates) and ``phenomenon.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import timm
import timm.data
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import chase_timm
from chase_timm.analysis import channel_profile, plot_channel_profile, sparse_channel_fractions
from chase_timm.data import DigitsDataset


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=32, help="digits are upsampled to this size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (the whole schedule)")
    parser.add_argument("--update-interval", type=int, default=5, help="steps between prune/regrow updates")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--channel-sparsity", type=float, default=0.0, help="0 = plain unstructured DST")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/phenomenon", help="directory for phenomenon.png/.json")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=10)
    transform = timm.data.create_transform((3, args.img_size, args.img_size), is_training=False, crop_pct=1.0)
    loader = DataLoader(DigitsDataset("train", transform), batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    config = chase_timm.ChaseConfig(density=args.density, channel_sparsity=args.channel_sparsity,
                                    total_steps=args.steps, update_interval=args.update_interval, seed=args.seed)
    chase = chase_timm.Chase(model, config, optimizer=optimizer,
                             example_inputs=torch.randn(1, 3, args.img_size, args.img_size))

    def snapshot(updates: int) -> dict:
        return {"step": chase.step_count, "updates": updates,
                "overall": sparse_channel_fractions(channel_profile(chase))["overall"]}

    history, updates, start, step = [snapshot(0)], 0, time.perf_counter(), 0
    model.train()
    while step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            chase.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if config.is_update_step(step):
                updates += 1
                history.append(snapshot(updates))
                print(f"step {step} update {updates} loss {loss.item():.3f} below 0.5/0.7/0.8x: "
                      + " / ".join(f"{v:.3f}" for v in history[-1]["overall"].values()), flush=True)
            if step == args.steps:
                break

    profile = channel_profile(chase)
    out = Path(args.output)
    title = (f"{args.model}, {args.img_size}px digits, d={args.density}, S_c={args.channel_sparsity}: "
             f"{args.steps} steps, {updates} prune/regrow updates (every {args.update_interval} steps)")
    plot_channel_profile(profile, out / "phenomenon.png", title, history)
    result = {"args": vars(args), "updates": updates, "seconds": time.perf_counter() - start,
              "final_loss": loss.item(), "history": history, "fractions": sparse_channel_fractions(profile),
              "layer_density": {layer.name: layer.density for layer in profile}}
    (out / "phenomenon.json").write_text(json.dumps(result, indent=1))
    print(f"{updates} updates in {result['seconds']:.0f} s; fractions of channels below 0.5/0.7/0.8x their "
          f"layer's density: {result['fractions']['overall']}; wrote {out}/phenomenon.png")


if __name__ == "__main__":
    main()
