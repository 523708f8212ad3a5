"""Dense vs slim inference, side by side in one process: FLOPs the paper's way and measured speed.

Every model gets the same treatment (eval mode, ``torch.inference_mode``, memory layout, optional Conv-BN
folding and ``torch.compile``) and is timed in interleaved rounds (``chase_timm.metrics.interleaved_timings``),
so a shared or throttling machine slows all of them alike. Slim models come from a saved folder or hub name
(``--slim``), or are built from ``--model`` plus a Chase config (``--chase``) without training: masks, the
channel schedule run on a few synthetic steps at a small size (channel groups do not depend on
resolution), export. Such a slim model has the widths the config produces from a random initialisation,
not from a trained run; speed depends only on the widths.

    python recipes/benchmark.py                                            # resnet50 at 224 px, the paper's setting
    python recipes/benchmark.py --chase S_c=0.4 --chase S_c=0.3 --chase S_c=0.4,prune_skip=true
    python recipes/benchmark.py --slim outputs/resnet50-chase --img-size 32   # a model the recipe trained
    python recipes/benchmark.py --device cuda --batch-sizes 2 256 --compile   # inductor; or --compile BACKEND

Prints a table (params, dense and sparse FLOPs, img/s, latency, speedup, FLOPs limit, efficiency =
speedup / FLOPs limit, where the limit is dense FLOPs of the dense model / dense FLOPs of the slim one) and
writes it as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import yaml

import chase_timm
from chase_timm.metrics import flop_counts, interleaved_timings, resolve_input_size
from synthetic_run import LAYOUTS, synthetic_config, synthetic_run

ALIASES = {"d": "density", "S_c": "channel_sparsity", "beta": "min_channel_ratio"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="timm name of the dense model (and of the base of --chase)")
    p.add_argument("--num-classes", type=int, help="classifier size (default: the first --slim model's, else 1000)")
    p.add_argument("--slim", action="append", default=[], metavar="SOURCE",
                   help="a slim model: folder saved by save_pretrained / the recipe, 'local-dir:PATH' or "
                        "'hf-hub:ORG/NAME'")
    p.add_argument("--chase", action="append", default=[], metavar="KEY=VALUE,...",
                   help="build a slim model from ChaseConfig fields (aliases d, S_c, beta); default: the paper's "
                        "ImageNet setting d=0.1, S_c=0.4, beta=0.2 when no --slim is given")
    p.add_argument("--img-size", type=int, help="square input size (default: the model's pretrained_cfg size)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["nchw", "channels_last"])
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile every model, dense and slim alike (backend default: inductor)")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNorm into the preceding convs (chase_timm.fold_batchnorm), dense and slim alike")
    p.add_argument("--save-dir", metavar="DIR",
                   help="save every slim model (folded with --fold-bn) with save_pretrained into DIR/<name>, its "
                        "measured speedups in the metrics (model card, `chase-timm info`)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes per model and setting")
    p.add_argument("--block-seconds", type=float, default=0.5, help="approximate length of one timed block")
    p.add_argument("--build-size", type=int, help="input size of the synthetic --chase schedule run (default: 32 px, "
                   "or the model's own size where its patch embedding fixes it, as for ViTs)")
    p.add_argument("--build-steps", type=int, default=8, help="optimizer steps of the synthetic --chase run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="outputs/benchmark.json", help="where to write the results")
    args = p.parse_args(argv)
    if not args.chase and not args.slim:
        args.chase = ["paper"]
    return args


def parse_chase_spec(spec: str) -> Dict[str, object]:
    """``"S_c=0.3,prune_skip=true"`` -> ChaseConfig overrides (``"paper"`` = none: the defaults are the paper's)."""
    if spec == "paper":
        return {}
    fields = {f.name for f in dataclasses.fields(chase_timm.ChaseConfig)}
    overrides = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep or key not in fields:
            raise SystemExit(f"--chase {spec!r}: {item!r} is not KEY=VALUE with a ChaseConfig field "
                             f"(or d, S_c, beta); fields: {', '.join(sorted(fields))}.")
        overrides[key] = yaml.safe_load(value)
    return overrides


def build_slim(model_name: str, num_classes: int, overrides: Dict[str, object], size: Optional[int], steps: int,
               seed: int) -> nn.Module:
    """A slim model with the widths a Chase config produces: masks, the channel schedule over ``steps``
    synthetic SGD steps at ``size`` px (a channel event every step, ``synthetic_run``), then ``export()``."""
    try:
        config = synthetic_config(steps, **overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--chase: {e}")
    return synthetic_run(model_name, config, num_classes, size, seed)[2].export()


def load_slim(source: str) -> nn.Module:
    """A saved slim model: a folder (as ``local-dir:``), ``local-dir:PATH`` or ``hf-hub:ORG/NAME``."""
    if not source.startswith(("local-dir:", "hf-hub:")):
        if not Path(source).is_dir():
            raise SystemExit(f"--slim {source!r}: no such folder; give a save_pretrained folder, "
                             "'local-dir:PATH' or 'hf-hub:ORG/NAME'.")
        source = f"local-dir:{source}"
    return timm.create_model(source, pretrained=True)


def prepare(model: nn.Module, device: torch.device, layout: str, backend: Optional[str],
            fold_bn: bool) -> nn.Module:
    """The same speed settings for every model: eval mode, optional Conv-BN folding, device, memory layout,
    optional torch.compile."""
    model = model.eval()
    if fold_bn:
        try:
            model = chase_timm.fold_batchnorm(model)
        except ValueError as e:  # torch.fx cannot trace every model, or there is nothing to fold
            raise SystemExit(f"--fold-bn: {e}; run without --fold-bn.")
    model = model.to(device=device, memory_format=LAYOUTS[layout])
    return torch.compile(model, backend=backend) if backend else model


def model_facts(model: nn.Module, size: Sequence[int]) -> dict:
    """Parameters and FLOPs of one image: dense (every weight) and sparse (non-zero weights only)."""
    return {"params": sum(p.numel() for p in model.parameters()), **flop_counts(model, None, size)}


def format_table(facts: Dict[str, dict], results: List[dict]) -> str:
    """A plain-text table with one row per model, batch size and layout."""
    w = max(len(name) for name in facts) + 2
    head = (f"{'model':<{w}}{'batch':>6} {'layout':<14}{'params M':>9}{'dense GF':>10}{'sparse GF':>10}"
            f"{'img/s':>10}{'latency ms':>12}{'IQR %':>7}{'speedup':>9}{'FLOPs lim':>10}{'effic.':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        f = facts[r["model"]]
        lines.append(f"{r['model']:<{w}}{r['batch_size']:>6} {r['layout']:<14}{f['params'] / 1e6:>9.2f}"
                     f"{f['dense_flops'] / 1e9:>10.3f}{f['sparse_flops'] / 1e9:>10.3f}{r['img_per_s']:>10.1f}"
                     f"{r['latency_ms']:>12.2f}{100 * r['iqr_ms'] / r['latency_ms']:>7.1f}{r['speedup']:>9.3f}"
                     f"{r['flops_limit']:>10.3f}{r['efficiency']:>8.3f}")
    return "\n".join(lines)


def speed_metrics(name: str, results: List[dict], machine: dict) -> dict:
    """``save_pretrained`` metrics of one slim model: its measured speedups over the dense model (one row per batch
    size and layout) and the machine they were measured on."""
    rows = [{k: r[k] for k in ("batch_size", "layout", "speedup", "img_per_s", "efficiency")}
            for r in results if r["model"] == name]
    return {"measured_speed": rows, "throughput_device": f"{machine['device']}: {machine['device_name']}"}


def save_slims(models: Dict[str, nn.Module], saved: Dict[str, nn.Module], results: List[dict], report: dict,
               directory: str) -> None:
    """``save_pretrained`` every slim model of the run into ``directory/<name>`` with its measured speed."""
    for name in list(models)[1:]:
        folder = Path(directory) / "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        chase_timm.save_pretrained(saved[name], folder, metrics=speed_metrics(name, results, report["machine"]),
                                   overwrite=True)
        print(f"saved {name} to {folder}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    slims = {source: load_slim(source) for source in args.slim}
    num_classes = args.num_classes or next((m.num_classes for m in slims.values()), 1000)
    for spec in args.chase:
        slims[f"chase:{spec}"] = build_slim(args.model, num_classes, parse_chase_spec(spec), args.build_size,
                                            args.build_steps, args.seed)
    models = {f"dense:{args.model}": timm.create_model(args.model, num_classes=num_classes), **slims}
    size = resolve_input_size(next(iter(slims.values())), args.img_size)
    facts = {name: model_facts(model, size) for name, model in models.items()}
    dense_name = next(iter(models))

    results, prepared_models = [], {}
    for layout in args.layouts:
        prepared = {name: prepare(model, device, layout, args.compile, args.fold_bn)
                    for name, model in models.items()}
        prepared_models = prepared
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, *size, device=device).contiguous(memory_format=LAYOUTS[layout])
            timings = interleaved_timings(prepared, x, args.repeats, args.warmup, args.block_seconds)
            dense_time = timings[dense_name].median
            for name, measurement in timings.items():
                speedup = dense_time / measurement.median
                limit = facts[dense_name]["dense_flops"] / facts[name]["dense_flops"]
                results.append({"model": name, "batch_size": batch_size, "layout": layout,
                                "img_per_s": batch_size / measurement.median,
                                "latency_ms": measurement.median * 1e3, "iqr_ms": measurement.iqr * 1e3,
                                "speedup": speedup, "flops_limit": limit, "efficiency": speedup / limit})
            print(f"measured batch {batch_size}, {layout}: speedups "
                  + ", ".join(f"{r['speedup']:.2f}" for r in results[-len(timings):]), flush=True)

    report = {"command": " ".join(["python", "recipes/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": {"device": str(device), "device_name": chase_timm.latency.device_name(device),
                          "cpu": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__},
              "settings": {"input_size": list(size), "compile": args.compile, "fold_bn": args.fold_bn,
                           "repeats": args.repeats,
                           "build_size": args.build_size, "build_steps": args.build_steps},
              "models": facts, "results": results}
    print("\n" + format_table(facts, results))
    if args.save_dir:
        save_slims(models, prepared_models if args.fold_bn and not args.compile else models, results, report, args.save_dir)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
