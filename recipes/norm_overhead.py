"""Per-step training cost of computing norms (LayerNorm/RMSNorm/GroupNorm/GRN) and weight-standardised convs over the
alive channels (``chase_timm.norms`` hooks).

A Chase run that masks (``shrink="off"``) half of every prunable group, norm-coupled streams included, then times
training steps (forward, backward, optimizer step) with the hooks active and with them switched to the module's
own output, interleaved in one process so load drifts hit both alike. Prints the median step times per model.

    OMP_NUM_THREADS=1 python recipes/norm_overhead.py --models vit_tiny_patch16_224 convnextv2_atto --steps 30
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from chase_timm import Chase, ChaseConfig
from chase_timm.adapters.autograd import forward_hooks
from chase_timm.norms import AliveChannels
from zoo_coverage import build


def overhead(name: str, steps: int, batch: int, size: int = 32) -> dict:
    """Median step seconds with the hooks on and off, and how many norms are hooked."""
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = ChaseConfig(total_steps=1000, channel_interval=1, channel_offset=0, channel_end_step=1,
                         channel_sparsity=0.5, min_channel_ratio=0.5, prune_skip=True)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, size, size))
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        chase.step()
        optimizer.zero_grad()

    step()  # the channel event: removes half of every group and installs the hooks
    hooks = [h for m in model.modules() for h in forward_hooks(m, AliveChannels)]
    masks = [h.mask for h in hooks]
    times: dict[bool, list] = {True: [], False: []}
    for i in range(2 * steps):
        on = i % 2 == 0
        for hook, mask in zip(hooks, masks):
            hook.mask = mask if on else None
        start = time.perf_counter()
        step()
        times[on].append(time.perf_counter() - start)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"model": name, "hooked": len(hooks), "on": on, "off": off, "overhead": on / off - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "convnextv2_atto"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    for name in args.models:
        r = overhead(name, args.steps, args.batch)
        print(f"{r['model']}: {r['hooked']} norms hooked, step {r['off'] * 1e3:.1f} ms -> {r['on'] * 1e3:.1f} ms "
              f"({100 * r['overhead']:+.1f} %)", flush=True)


if __name__ == "__main__":
    main()
