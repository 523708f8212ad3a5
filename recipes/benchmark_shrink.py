"""Training step time and memory of a masking run vs the same run after Chase's final physical shrink.

For each model, Chase runs its channel schedule on a few synthetic steps (small images; channel groups do not
depend on resolution), then the run is copied: one copy keeps training the masked dense-shaped model
(``shrink="off"``, what every step cost before), the other is shrunk (``chase.shrink()``). Both copies then time
full training steps (forward, backward, ``optimizer.step()``, ``chase.step()``) on the same batch in
interleaved rounds, so a shared machine slows both alike. Printed per model: median step time of each, their
ratio next to the dense-FLOPs ratio (slim dense FLOPs / dense FLOPs) and the target ratio <= 1.15 x FLOPs
ratio, and training memory: parameters + gradients + optimizer state, and the activations autograd saves for
backward (counted with ``torch.autograd.graph.saved_tensors_hooks``), before vs after. Each memory layout
(``--layouts``) is its own side-by-side pair; channels_last keeps a thin 1x1 convolution feeding a full-width
residual stream efficient on CPU (oneDNN), where NCHW makes it memory-bound.

With ``--slim SOURCE`` the shrunk side has the final widths of a real run instead (a folder the recipe or
``save_pretrained`` wrote, ``local-dir:`` or ``hf-hub:``; its base architecture is ``--models NAME``), each side
with its own Chase at the same density.

    OMP_NUM_THREADS=1 python recipes/benchmark_shrink.py                 # resnet50 and efficientnet_b0
    python recipes/benchmark_shrink.py --models resnet50 --img-size 160 --batch-size 32 --repeats 5
    python recipes/benchmark_shrink.py --models resnet50 --slim outputs/resnet50-chase   # the default run's widths
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
from benchmark import load_slim  # recipes/benchmark.py (this folder), not torch.utils.benchmark
from synthetic_run import LAYOUTS, synthetic_config, synthetic_run, training_step




def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"])
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channel-sparsity", type=float, default=0.4, help="S_c (the paper's ImageNet value)")
    p.add_argument("--min-channel-ratio", type=float, default=0.2, help="beta (the paper's ImageNet value)")
    p.add_argument("--prune-skip", action="store_true", help="also prune residual streams (ChaseConfig.prune_skip)")
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["nchw", "channels_last"],
                   help="memory layouts of model and batch, each timed as its own masked/shrunk pair")
    p.add_argument("--slim", metavar="SOURCE", help="time the final widths of this trained slim model (base: the one "
                   "--models name) instead of a synthetic schedule's")
    p.add_argument("--density", type=float, default=0.1, help="d of both sides' Chase with --slim")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model and round")
    p.add_argument("--json", default="outputs/benchmark_shrink.json")
    return p.parse_args(argv)


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


def synthetic_pair(name: str, args: argparse.Namespace) -> Dict[str, tuple]:
    """A run after a synthetic channel schedule, masked, and a copy of it shrunk (``chase.shrink()``)."""
    config = synthetic_config(channel_sparsity=args.channel_sparsity, min_channel_ratio=args.min_channel_ratio,
                              prune_skip=args.prune_skip)
    masked = synthetic_run(name, config)
    shrunk = copy.deepcopy(masked)
    shrunk[2].shrink()
    return {"masked": masked, "shrunk": shrunk}


def trained_pair(name: str, args: argparse.Namespace) -> Dict[str, tuple]:
    """``name`` at its dense widths and the slim model ``args.slim`` (a real run's final widths), each with SGD and
    its own Chase at ``args.density`` (what a training step costs does not depend on which weights are masked)."""
    slim = load_slim(args.slim)
    runs = {}
    for key, model in (("masked", timm.create_model(name, num_classes=slim.num_classes)), ("shrunk", slim)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        config = ChaseConfig(total_steps=10 ** 6, density=args.density, channel_sparsity=0.0)
        runs[key] = (model, optimizer, Chase(model, config, optimizer=optimizer,
                                             example_inputs=torch.randn(1, 3, 32, 32)))
    return runs


def compare(name: str, pair: Dict[str, tuple], layout: str, args: argparse.Namespace) -> Dict:
    """Masked vs shrunk training steps in one memory layout, timed side by side."""
    runs = copy.deepcopy(pair)
    for model, optimizer, chase in runs.values():
        model.to(memory_format=LAYOUTS[layout])  # in place: the optimizer keeps its parameters
        for state in optimizer.state.values():  # momentum in the layout a run built in it would have (as its grads)
            state.update({k: v.contiguous(memory_format=LAYOUTS[layout]) for k, v in state.items()
                          if torch.is_tensor(v) and v.dim() == 4})
        chase.config = dataclasses.replace(chase.config, total_steps=10 ** 6, update_interval=10 ** 6)  # no updates
    size = (3, args.img_size, args.img_size)
    flops = {k: count_flops(run[0], size) for k, run in runs.items()}
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, *size, generator=generator).contiguous(memory_format=LAYOUTS[layout])
    y = torch.randint(0, runs["masked"][0].num_classes, (args.batch_size,), generator=generator)
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
    return {"model": name, "widths": args.slim or "synthetic schedule", "layout": layout,
            "prune_skip": args.prune_skip, "img_size": args.img_size, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "step_s": step, "step_s_all": times, "time_ratio": time_ratio, "flops_ratio": flops_ratio,
            "time_over_flops": time_ratio / flops_ratio, "target_met": time_ratio <= 1.15 * flops_ratio,
            "memory": memory}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    rows = []
    if args.slim and len(args.models) != 1:
        raise SystemExit("--slim times one trained model: give its base architecture as the one --models name")
    for name in args.models:
        pair = trained_pair(name, args) if args.slim else synthetic_pair(name, args)
        for layout in args.layouts:
            row = compare(name, pair, layout, args)
            rows.append(row)
            mem = row["memory"]
            print(f"{name}{' (prune_skip)' if args.prune_skip else ''} {layout}: step {row['step_s']['masked']:.3f}s "
                  f"masked -> {row['step_s']['shrunk']:.3f}s shrunk (ratio {row['time_ratio']:.2f}, dense FLOPs ratio "
                  f"{row['flops_ratio']:.2f}, time/FLOPs {row['time_over_flops']:.2f}, target <= 1.15: "
                  f"{'met' if row['target_met'] else 'MISSED'}); weights+grads+state "
                  f"{mem['masked']['weights_grads_state_mib']:.0f} -> "
                  f"{mem['shrunk']['weights_grads_state_mib']:.0f} MiB, "
                  f"saved activations {mem['masked']['saved_activations_mib']:.0f} -> "
                  f"{mem['shrunk']['saved_activations_mib']:.0f} MiB", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
