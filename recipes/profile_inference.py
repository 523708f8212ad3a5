"""Where a slim model's inference time goes, op kind by op kind, next to the dense model's (torch.profiler).

One forward pass per model and layout (after warm-up), profiled with input shapes; self CPU time is summed
per kind of work (convolution by kernel shape, BatchNorm, add/ReLU, pooling, layout copies, classifier) and
printed as dense ms, slim ms, slim/dense, next to the FLOPs ratio of the convolutions. Slim models are built as
in ``benchmark.py`` (``--chase S_c=0.4``: the widths a synthetic schedule run reaches) or loaded (``--slim``).

    python recipes/profile_inference.py --chase S_c=0.4 --batch-size 32 --threads 2
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Sequence

import timm
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from benchmark import build_slim, load_slim, parse_chase_spec, prepare
from synthetic_run import LAYOUTS

KINDS = (("classifier", ("addmm", "linear", "mm")),
         ("conv", ("convolution", "conv2d", "mkldnn_convolution", "_convolution")),
         ("batchnorm", ("batch_norm",)),
         ("add/relu", ("add", "relu", "clamp", "hardtanh", "silu", "hardswish", "sigmoid", "mul")),
         ("pooling", ("pool",)),
         ("layout copy", ("copy_", "contiguous", "to_dense", "clone", "empty_strided")))


def kind_of(op: str) -> str:
    """The kind of work an aten op name stands for (first match in KINDS), else ``other``."""
    name = op.removeprefix("aten::")
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def profile_models(models: Dict[str, nn.Module], x: torch.Tensor, rounds: int = 3,
                   warmup: int = 2) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per model: self CPU ms per forward by op kind, and by conv weight shape (``(out, in, kh, kw)``); the
    models take turns for ``rounds`` forwards each (a shared machine slows them alike), times are averaged."""
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        profiles = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    model(x)
                profiles[name].append(prof)
    return {name: summarize(profs) for name, profs in profiles.items()}


def summarize(profs: list) -> Dict[str, Dict[str, float]]:
    """Mean self CPU ms per forward by op kind and by conv weight shape over the profiled forwards."""
    kinds: Dict[str, float] = defaultdict(float)
    convs: Dict[str, float] = defaultdict(float)
    for event in (e for prof in profs for e in prof.key_averages(group_by_input_shape=True)):
        ms = event.self_cpu_time_total / 1e3 / len(profs)
        kind = kind_of(event.key)
        kinds[kind] += ms
        if kind == "conv" and ms > 0 and len(event.input_shapes) > 1 and len(event.input_shapes[1]) == 4:
            convs[str(tuple(event.input_shapes[1]))] += ms
    return {"kinds": dict(kinds), "convs": dict(convs)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--chase", default="S_c=0.4", help="ChaseConfig overrides of the slim model (as benchmark.py)")
    p.add_argument("--slim", help="a saved slim model instead of --chase")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["channels_last", "nchw"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm first (as benchmark.py --fold-bn)")
    p.add_argument("--rounds", type=int, default=3, help="profiled forwards per model (taking turns)")
    p.add_argument("--top", type=int, default=12, help="conv shapes to list (largest dense time first)")
    p.add_argument("--json", default="outputs/profile.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    slim = load_slim(args.slim) if args.slim else build_slim(args.model, 1000, parse_chase_spec(args.chase), 32, 8, 0)
    models = {"dense": timm.create_model(args.model, num_classes=slim.num_classes), "slim": slim}
    report = {"command": "python recipes/profile_inference.py " + " ".join(argv or __import__("sys").argv[1:]),
              "threads": args.threads, "layouts": {}}
    for layout in args.layouts:
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(memory_format=LAYOUTS[layout])
        prof = profile_models({name: prepare(m, torch.device("cpu"), layout, None, args.fold_bn)
                               for name, m in models.items()}, x, args.rounds)
        report["layouts"][layout] = prof
        d, s = prof["dense"]["kinds"], prof["slim"]["kinds"]
        print(f"\n{layout}, batch {args.batch_size}, {args.threads} threads: self CPU ms of one forward")
        print(f"{'kind':<14}{'dense':>9}{'slim':>9}{'ratio':>7}")
        for kind in sorted(set(d) | set(s), key=lambda k: -d.get(k, 0)):
            print(f"{kind:<14}{d.get(kind, 0):>9.1f}{s.get(kind, 0):>9.1f}{s.get(kind, 0) / max(d.get(kind, 0), 1e-9):>7.2f}")
        print(f"{'total':<14}{sum(d.values()):>9.1f}{sum(s.values()):>9.1f}{sum(s.values()) / sum(d.values()):>7.2f}")
        for name in ("dense", "slim"):
            convs = sorted(prof[name]["convs"].items(), key=lambda kv: -kv[1])[:args.top]
            print(f"{name} convs, largest first: " + "; ".join(f"{k} {v:.1f}" for k, v in convs))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
