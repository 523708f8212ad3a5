"""Training step time and memory of a masking run vs the same run after Chase's final physical shrink.

For each model, Chase runs its channel schedule on a few synthetic steps (small images; channel groups do not
depend on resolution), then the run is copied: one copy keeps training the masked dense-shaped model
(``shrink="off"``, what every step cost before), the other is shrunk (``chase.shrink()``). Both copies then time
full training steps (forward, backward, ``optimizer.step()``, ``chase.step()``) on the same batch in
interleaved rounds, so a shared machine slows both alike. Printed per model: median step time of each, their
ratio next to the dense-FLOPs ratio (slim dense FLOPs / dense FLOPs) and the target ratio <= 1.15 x FLOPs
ratio, and training memory: parameters + gradients + optimizer state, and the activations autograd saves for
backward (counted with ``torch.autograd.graph.saved_tensors_hooks``), before vs after.

    OMP_NUM_THREADS=1 python recipes/benchmark_shrink.py                 # resnet50 and efficientnet_b0
    python recipes/benchmark_shrink.py --models resnet50 --img-size 160 --batch-size 32 --repeats 5
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch.utils import benchmark

from chase_timm import Chase, ChaseConfig
from chase_timm.metrics import count_flops


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"])
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channel-sparsity", type=float, default=0.4, help="S_c (the paper's ImageNet value)")
    p.add_argument("--min-channel-ratio", type=float, default=0.2, help="beta (the paper's ImageNet value)")
    p.add_argument("--prune-skip", action="store_true", help="also prune residual streams (ChaseConfig.prune_skip)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model and round")
    p.add_argument("--json", default="outputs/benchmark_shrink.json")
    return p.parse_args(argv)


def schedule_run(name: str, channel_sparsity: float, min_channel_ratio: float, prune_skip: bool) -> tuple:
    """A model, optimizer and Chase after the whole channel schedule (masked, not shrunk)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    events = 4
    config = ChaseConfig(total_steps=2 * events, update_interval=events, channel_interval=1, channel_offset=0,
                         channel_end_step=events, channel_sparsity=channel_sparsity,
                         min_channel_ratio=min_channel_ratio, prune_skip=prune_skip)
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    generator = torch.Generator().manual_seed(0)
    for _ in range(events):
        x = torch.randn(2, 3, 32, 32, generator=generator)
        F.cross_entropy(model(x), torch.randint(0, 1000, (2,), generator=generator)).backward()
        optimizer.step()
        chase.step()
        optimizer.zero_grad()
    return model, optimizer, chase


def training_step(model, optimizer, chase, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    chase.step()
    optimizer.zero_grad()


def training_memory(model, optimizer, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """MiB of parameters + gradients + optimizer state, and of the activations saved for backward."""
    saved: Dict[int, int] = {}
    params = {id(p): p for p in model.parameters()}
    weight_storages = {p.untyped_storage().data_ptr() for p in params.values()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        pointer = t.untyped_storage().data_ptr()
        if pointer and pointer not in weight_storages:  # activations, not the weights autograd also saves
            saved[pointer] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    state = sum(v.numel() * v.element_size() for p in params.values() for v in optimizer.state.get(p, {}).values()
                if torch.is_tensor(v))
    weights = sum(p.numel() * p.element_size() for p in params.values())
    del loss
    return {"weights_grads_state_mib": (2 * weights + state) / 2 ** 20,
            "saved_activations_mib": sum(saved.values()) / 2 ** 20}


def compare(name: str, args: argparse.Namespace) -> Dict:
    model, optimizer, chase = schedule_run(name, args.channel_sparsity, args.min_channel_ratio, args.prune_skip)
    chase.config = dataclasses.replace(chase.config, total_steps=10 ** 6, update_interval=10 ** 6)  # no updates
    shrunk = copy.deepcopy((model, optimizer, chase))
    shrunk[2].shrink()
    runs = {"masked": (model, optimizer, chase), "shrunk": shrunk}
    size = (3, args.img_size, args.img_size)
    flops = {k: count_flops(run[0], size) for k, run in runs.items()}
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, *size, generator=generator)
    y = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    for run in runs.values():
        run[0].train()
        training_step(*run, x, y)  # warm-up: allocator, optimizer state
    memory = {k: training_memory(run[0], run[1], x, y) for k, run in runs.items()}
    times: Dict[str, List[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.repeats):
        for key in order[r % 2:] + order[:r % 2]:
            start = benchmark.timer()
            for _ in range(args.steps):
                training_step(*runs[key], x, y)
            times[key].append((benchmark.timer() - start) / args.steps)
    step = {k: statistics.median(v) for k, v in times.items()}
    flops_ratio = flops["shrunk"] / flops["masked"]
    time_ratio = step["shrunk"] / step["masked"]
    return {"model": name, "prune_skip": args.prune_skip, "img_size": args.img_size, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "channel_sparsity": chase.stats()["channel_sparsity"],
            "step_s": step, "step_s_all": times, "time_ratio": time_ratio, "flops_ratio": flops_ratio,
            "time_over_flops": time_ratio / flops_ratio, "target_met": time_ratio <= 1.15 * flops_ratio,
            "memory": memory}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    rows = []
    for name in args.models:
        row = compare(name, args)
        rows.append(row)
        mem = row["memory"]
        print(f"{name}{' (prune_skip)' if args.prune_skip else ''}: step {row['step_s']['masked']:.3f}s masked -> {row['step_s']['shrunk']:.3f}s shrunk "
              f"(ratio {row['time_ratio']:.2f}, dense FLOPs ratio {row['flops_ratio']:.2f}, "
              f"time/FLOPs {row['time_over_flops']:.2f}, target <= 1.15: {'met' if row['target_met'] else 'MISSED'}); "
              f"weights+grads+state {mem['masked']['weights_grads_state_mib']:.0f} -> "
              f"{mem['shrunk']['weights_grads_state_mib']:.0f} MiB, saved activations "
              f"{mem['masked']['saved_activations_mib']:.0f} -> {mem['shrunk']['saved_activations_mib']:.0f} MiB",
              flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
