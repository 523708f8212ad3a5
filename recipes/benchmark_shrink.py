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
with its own Chase at the same density. With ``--checkpoint DIR`` (a recipe checkpoint taken after the last
shrink, ``<output>/checkpoints/epoch_N``) the shrunk side is that run itself: its Chase state (widths, masks,
hooks) restored into a fresh model built as the run built it (model name, input size and class count from the
checkpoint), timed at the run's input size unless ``--img-size`` says otherwise, with no dense-shaped masked
side. ``--plain`` adds the dense model and the shrunk one trained without Chase (plain steps); the dense one is
then what the ratios are taken against, the issue's "dense step". ``--opt adamw`` uses the default run's
optimizer (timm's AdamW, lr 2e-3, weight decay 0.05).

    OMP_NUM_THREADS=1 python recipes/benchmark_shrink.py                 # resnet50 and efficientnet_b0
    python recipes/benchmark_shrink.py --models resnet50 --img-size 160 --batch-size 32 --repeats 5
    python recipes/benchmark_shrink.py --models resnet50 --slim outputs/resnet50-chase   # the default run's widths
    python recipes/benchmark_shrink.py --checkpoint outputs/resnet50-chase/checkpoints/epoch_20 \
        --batch-size 64 --opt adamw --plain                               # the default run, as it trains
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

from chase_timm import Chase, ChaseConfig
from chase_timm.metrics import count_flops, resolve_input_size
from chase_timm.training import create_timm_model
import train_flags  # recipes/train_flags.py: how recipes/train.py reads a checkpoint's run
from benchmark import load_slim  # recipes/benchmark.py (this folder), not torch.utils.benchmark
from synthetic_run import LAYOUTS, plain_sgd, synthetic_config, synthetic_run, training_step




def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="timm model names (default: resnet50 efficientnet_b0; with "
                   "--checkpoint: the run's)")
    p.add_argument("--img-size", type=int, help="square input size of the timed batches (default: 128; with "
                   "--checkpoint: the size the run trained at)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channel-sparsity", type=float, default=0.4, help="S_c (the paper's ImageNet value)")
    p.add_argument("--min-channel-ratio", type=float, default=0.2, help="beta (the paper's ImageNet value)")
    p.add_argument("--prune-skip", action="store_true", help="also prune residual streams (ChaseConfig.prune_skip)")
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["nchw", "channels_last"],
                   help="memory layouts of model and batch, each timed as its own masked/shrunk pair")
    p.add_argument("--slim", metavar="SOURCE", help="time the final widths of this trained slim model (base: the one "
                   "--models name) instead of a synthetic schedule's")
    p.add_argument("--density", type=float, default=0.1, help="d of both sides' Chase with --slim")
    p.add_argument("--checkpoint", metavar="DIR", help="the shrunk side is the run saved in this recipe checkpoint "
                   "(after its last shrink), rebuilt as the run built it (model, size, classes: its run file) and "
                   "restored with its Chase state")
    p.add_argument("--opt", choices=("sgd", "adamw"), default="sgd",
                   help="optimizer of every side: SGD with momentum, or the default run's AdamW")
    p.add_argument("--plain", action="store_true", help="also time the dense model and the shrunk one without "
                   "Chase; the dense one becomes the reference of the ratios")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model and round")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step of each side (torch.profiler) and print the N aten ops "
                        "with the most self CPU time, side by side")
    p.add_argument("--json", default="outputs/benchmark_shrink.json")
    args = p.parse_args(argv)
    if args.checkpoint and args.slim:
        p.error("--checkpoint and --slim each name the shrunk side's widths: pass one")
    return args


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


def make_optimizer(kind: str):
    """``model -> optimizer`` of ``--opt``: SGD with momentum, or the default run's AdamW (timm's, as train.py)."""
    if kind == "adamw":
        return lambda model: timm.optim.create_optimizer_v2(model, "adamw", lr=2e-3, weight_decay=0.05)
    return plain_sgd


def synthetic_pair(name: str, args: argparse.Namespace) -> Dict[str, tuple]:
    """A run after a synthetic channel schedule, masked, and a copy of it shrunk (``chase.shrink()``)."""
    config = synthetic_config(channel_sparsity=args.channel_sparsity, min_channel_ratio=args.min_channel_ratio,
                              prune_skip=args.prune_skip)
    masked = synthetic_run(name, config, make_optimizer=make_optimizer(args.opt))
    shrunk = copy.deepcopy(masked)
    shrunk[2].shrink()
    return {"masked": masked, "shrunk": shrunk}


def trained_pair(name: str, args: argparse.Namespace) -> Dict[str, tuple]:
    """``name`` at its dense widths and the slim model ``args.slim`` (a real run's final widths), each with SGD and
    its own Chase at ``args.density`` (what a training step costs does not depend on which weights are masked)."""
    slim = load_slim(args.slim)
    runs = {}
    for key, model in (("masked", timm.create_model(name, num_classes=slim.num_classes)), ("shrunk", slim)):
        optimizer = make_optimizer(args.opt)(model)
        config = ChaseConfig(total_steps=10 ** 6, density=args.density, channel_sparsity=0.0)
        runs[key] = (model, optimizer, Chase(model, config, optimizer=optimizer,
                                             example_inputs=torch.randn(1, 3, 32, 32)))
    return runs


def checkpoint_build(folder: str) -> Dict[str, Any]:
    """How recipes/train.py built the model of the run saved in recipe checkpoint ``folder``: its ``model`` name,
    ``img_size`` (its run file's, None: the model's own size), ``num_classes`` (rows of the saved classifier, which
    shrinking never changes) and the ``input_size`` (C, H, W) it trained at. Raises SystemExit if ``folder`` is not a
    recipe checkpoint."""
    weights = Path(folder) / "model.safetensors"  # accelerate's save_state
    if not (Path(folder) / train_flags.RUN_FILE).is_file() or not weights.is_file():
        raise SystemExit(f"--checkpoint {folder} is not a checkpoint of recipes/train.py (expected "
                         f"<output>/checkpoints/epoch_N holding {train_flags.RUN_FILE} and {weights.name})")
    run = train_flags.checkpoint_run(folder)
    img_size = train_flags.model_img_size(run.get("img_size"), run["data"])
    probe = create_timm_model(run["model"], img_size)
    heads = probe.pretrained_cfg["classifier"]  # a name, or a tuple of them (distilled DeiT: head, head_dist)
    with safe_open(str(weights), "pt") as f:
        num_classes = f.get_slice(f"{heads if isinstance(heads, str) else heads[0]}.weight").get_shape()[0]
    return {"model": run["model"], "img_size": img_size, "num_classes": num_classes,
            "input_size": resolve_input_size(probe, img_size)}


def checkpoint_run(name: str, build: Dict[str, Any], args: argparse.Namespace) -> Dict[str, tuple]:
    """The run saved in the recipe checkpoint ``args.checkpoint``: a fresh ``name`` built as the run built it
    (``build``, from ``checkpoint_build``) with the optimizer of ``--opt`` and Chase restored from the saved state,
    which shrinks it to the run's widths and masks (the weights are not loaded: step time does not depend on them)."""
    saved = torch.load(Path(args.checkpoint) / "chase_timm_state.pt", weights_only=True)["chase"]
    model = create_timm_model(name, build["img_size"], num_classes=build["num_classes"])
    optimizer = make_optimizer(args.opt)(model)
    chase = Chase(model, ChaseConfig.from_dict(saved["config"]), optimizer=optimizer,
                  example_inputs=torch.randn(1, *build["input_size"]))
    chase.load_state_dict(saved)
    return {"shrunk": (model, optimizer, chase)}


def with_plain(name: str, runs: Dict[str, tuple], args: argparse.Namespace,
               img_size: Optional[int] = None) -> Dict[str, tuple]:
    """``runs`` plus ``"dense"`` (``name`` at its dense widths, built for ``img_size``) and ``"slim"`` (the shrunk
    model exported), both trained without Chase, each with a new optimizer of ``--opt``."""
    dense = create_timm_model(name, img_size, num_classes=runs["shrunk"][0].num_classes)
    slim = runs["shrunk"][2].export()  # a clean copy: none of Chase's hooks
    return {"dense": (dense, make_optimizer(args.opt)(dense), None), **runs,
            "slim": (slim, make_optimizer(args.opt)(slim), None)}


def profile_steps(runs: Dict[str, tuple], x: torch.Tensor, y: torch.Tensor, top: int) -> Dict[str, Dict[str, float]]:
    """Self CPU ms per aten op of one training step of each run (taking turns, one step each), printed for the
    ``top`` ops that cost the most on any side."""
    ops: Dict[str, Dict[str, float]] = {}
    for key, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            training_step(*run, x, y)
        ops[key] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    names = sorted({op for v in ops.values() for op in v}, key=lambda op: -max(v.get(op, 0) for v in ops.values()))
    print(f"{'self CPU ms':<44}" + "".join(f"{k:>10}" for k in runs))
    for op in names[:top]:
        print(f"{op[:43]:<44}" + "".join(f"{ops[k].get(op, 0):>10.1f}" for k in runs))
    print(f"{'total':<44}" + "".join(f"{sum(ops[k].values()):>10.1f}" for k in runs))
    return ops


def compare(name: str, pair: Dict[str, tuple], layout: str, args: argparse.Namespace) -> Dict:
    """Masked vs shrunk training steps in one memory layout, timed side by side."""
    runs = copy.deepcopy(pair)
    for model, optimizer, chase in runs.values():
        model.to(memory_format=LAYOUTS[layout])  # in place: the optimizer keeps its parameters
        for state in optimizer.state.values():  # momentum in the layout a run built in it would have (as its grads)
            state.update({k: v.contiguous(memory_format=LAYOUTS[layout]) for k, v in state.items()
                          if torch.is_tensor(v) and v.dim() == 4})
        if chase is not None:  # no updates
            chase.config = dataclasses.replace(chase.config, total_steps=10 ** 6, update_interval=10 ** 6)
    size = (3, args.img_size, args.img_size)
    flops = {k: count_flops(run[0], size) for k, run in runs.items()}
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, *size, generator=generator).contiguous(memory_format=LAYOUTS[layout])
    y = torch.randint(0, runs["shrunk"][0].num_classes, (args.batch_size,), generator=generator)
    for run in runs.values():
        run[0].train()
        training_step(*run, x, y)  # warm-up: allocator, optimizer state
    memory = {k: training_memory(run[0], run[1], x, y) for k, run in runs.items()}
    times: Dict[str, List[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.repeats):
        for key in order[r % len(order):] + order[:r % len(order)]:
            start = benchmark.timer()
            for _ in range(args.steps):
                training_step(*runs[key], x, y)
            times[key].append((benchmark.timer() - start) / args.steps)
    profiled = profile_steps(runs, x, y, args.profile) if args.profile else None
    step = {k: statistics.median(v) for k, v in times.items()}
    quartiles = {k: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for k, v in times.items()}
    spread = {k: (q[2] - q[0]) / step[k] for k, q in quartiles.items()}  # interquartile range / median
    reference = "dense" if "dense" in runs else "masked"
    flops_ratio = flops["shrunk"] / flops[reference]
    time_ratio = step["shrunk"] / step[reference]
    return {"model": name, "widths": args.checkpoint or args.slim or "synthetic schedule", "layout": layout,
            "prune_skip": args.prune_skip, "img_size": args.img_size, "batch_size": args.batch_size,
            "optimizer": args.opt, "threads": torch.get_num_threads(), "reference": reference,
            "step_s": step, "step_s_all": times, "spread": spread, "time_ratio": time_ratio,
            "flops_ratio": flops_ratio, "time_over_flops": time_ratio / flops_ratio,
            "target_met": time_ratio <= 1.15 * flops_ratio,
            "time_over_flops_all": {k: step[k] / step[reference] / (flops[k] / flops[reference]) for k in runs},
            "memory": memory, **({"profile_ms": profiled} if profiled else {})}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    rows = []
    if args.slim and len(args.models or ()) != 1:
        raise SystemExit("--slim times one trained run: give its base architecture as the one --models name")
    if args.checkpoint and not args.plain:
        raise SystemExit("--checkpoint has no masked dense-shaped side to compare with: add --plain (dense reference)")
    build = checkpoint_build(args.checkpoint) if args.checkpoint else {"img_size": None}
    if args.checkpoint and args.models not in (None, [build["model"]]):
        raise SystemExit(f"--checkpoint {args.checkpoint} is a run of {build['model']}: drop --models or pass "
                         f"--models {build['model']}")
    args.models = [build["model"]] if args.checkpoint else args.models or ["resnet50", "efficientnet_b0"]
    args.img_size = args.img_size or (build["input_size"][-1] if args.checkpoint else 128)
    for name in args.models:
        pair = (checkpoint_run(name, build, args) if args.checkpoint else trained_pair(name, args) if args.slim
                else synthetic_pair(name, args))
        if args.plain:
            pair = with_plain(name, pair, args, build["img_size"])
        for layout in args.layouts:
            row = compare(name, pair, layout, args)
            rows.append(row)
            mem, ref = row["memory"], row["reference"]
            print(f"{name}{' (prune_skip)' if args.prune_skip else ''} {layout}: step "
                  + ", ".join(f"{k} {v:.3f}s (IQR {100 * row['spread'][k]:.0f} %)" for k, v in row["step_s"].items())
                  + f"; shrunk/{ref} {row['time_ratio']:.2f}, dense FLOPs ratio {row['flops_ratio']:.2f}, "
                  f"time/FLOPs {row['time_over_flops']:.2f} (all: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["time_over_flops_all"].items())
                  + f"), target <= 1.15: {'met' if row['target_met'] else 'MISSED'}; weights+grads+state "
                  f"{mem[ref]['weights_grads_state_mib']:.0f} -> {mem['shrunk']['weights_grads_state_mib']:.0f} MiB, "
                  f"saved activations {mem[ref]['saved_activations_mib']:.0f} -> "
                  f"{mem['shrunk']['saved_activations_mib']:.0f} MiB", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
