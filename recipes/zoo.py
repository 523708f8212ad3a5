#!/usr/bin/env python
"""The zoo as one command: fine-tune each manifest entry from its timm pretrained checkpoint with recipes/train.py,
evaluate and benchmark the published slim model, publish it, and write a results CSV in the shape of timm's
``results/`` tables.

    python recipes/zoo.py --override data=imagefolder:/data/imagenet --hub-org my-org \
        --launcher "accelerate launch --multi_gpu --num_processes 8"
    python recipes/zoo.py --only chase-resnet50.a1_in1k-sc0.4 --no-push --override data=imagefolder:/data/in1k

Reads top to bottom: parse and check every entry with the recipe's own parser (before any work) -> for each
entry: train (recipes/train.py, which saves the slim folder and publishes it with chase_timm.push_to_hub) ->
load the folder with ``timm.create_model("local-dir:...")`` -> top-1/top-5 on the val split (timm.utils.accuracy)
-> the starting dense model's top-1 on the same images -> parameters, FLOPs ratio, throughput -> CSV row.
A model that fails records its error in its row; the command goes on and exits 1 at the end.
"""
from __future__ import annotations

import argparse
import csv
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
import yaml
from accelerate import PartialState
from timm.data import create_transform, resolve_data_config
from timm.utils import AverageMeter, accuracy
from torch.utils.data import DataLoader

import chase_timm  # noqa: F401  (registers the chase_slim architecture with timm)
from chase_timm.data import load_image_data, set_transform
from chase_timm.metrics import count_flops, throughput
from chase_timm.training import create_timm_model, load_initial_weights
from train_flags import RUN_FILE, fail, parse_args

TRAIN = Path(__file__).resolve().parent / "train.py"
# timm's results/*.csv columns, then ours
COLUMNS = ["model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count", "crop_pct", "interpolation",
           "base", "dense_top1", "throughput", "throughput_batch", "device", "dense_flops_ratio", "val_images",
           "hub_id", "error"]
ENTRY_KEYS = ("name", "model", "config", "initial_checkpoint")
TABLE_START, TABLE_END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
TABLE = re.compile(rf"^{TABLE_START}$.*?^{TABLE_END}$", re.S | re.M)  # the markers on lines of their own


def build_parser() -> argparse.ArgumentParser:
    """Command line of the zoo command."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", default=str(Path(__file__).resolve().parent / "zoo.yaml"),
                   help="YAML: `defaults` (train.py --config keys) and `models` (name, model, config, "
                        "optionally initial_checkpoint)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these entries (by name)")
    p.add_argument("--output", default="outputs/zoo", help="folder of the slim model folders, logs and results.csv")
    p.add_argument("--hub-org", help="publish each slim model to HUB_ORG/<name> (chase_timm.push_to_hub)")
    p.add_argument("--no-push", action="store_true", help="only write the folders")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="train.py config keys for every entry, YAML values (chase.KEY for the chase: section), "
                        "e.g. data=imagefolder:/data/imagenet max_steps=3")
    p.add_argument("--launcher", default=shlex.join([sys.executable]),
                   help="command that runs recipes/train.py, e.g. 'accelerate launch --multi_gpu --num_processes 8'")
    p.add_argument("--overwrite", action="store_true", help="replace previous runs in the model folders")
    p.add_argument("--bench-batch", type=int, default=64, help="batch size of the throughput measurement")
    p.add_argument("--docs", help="markdown file whose table between the zoo-table markers is rewritten")
    return p


def entry_configs(manifest: Dict[str, Any], overrides: Dict[str, Any], only: Optional[List[str]]) -> List[dict]:
    """The selected entries, each with its merged train.py config (defaults < entry < overrides)."""
    entries, defaults = manifest.get("models") or [], manifest.get("defaults") or {}
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
        fail(f"the manifest has no `models:` list of entries ({', '.join(ENTRY_KEYS)}); see recipes/zoo.yaml")
    names = [e.get("name") for e in entries]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        fail(f"--only {unknown}: not in the manifest; its entries are {names}")
    if len(set(names)) < len(names):
        fail(f"manifest names {sorted({n for n in names if names.count(n) > 1})} more than once; each name is a Hub "
             "repo and an output folder, so names must be unique")
    for entry in entries:
        missing, extra = {"name", "model"} - set(entry), set(entry) - set(ENTRY_KEYS)
        if missing or extra:
            fail(f"manifest entry {entry.get('name', entry)}: missing {sorted(missing)}, unknown {sorted(extra)}; an "
                 f"entry's keys are {', '.join(ENTRY_KEYS)} (name and model required)")
    selected = []
    for entry in entries:
        if only and entry["name"] not in only:
            continue
        config = {**defaults, **(entry.get("config") or {}), **overrides}
        config["chase"] = {**(defaults.get("chase") or {}), **((entry.get("config") or {}).get("chase") or {}),
                           **overrides.get("chase", {})}
        selected.append({**entry, "config": config})
    return selected


def parse_overrides(pairs: List[str]) -> Dict[str, Any]:
    """KEY=VALUE pairs (YAML values) into a config mapping; chase.KEY lands in the chase: section."""
    out: Dict[str, Any] = {"chase": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--override {pair!r}: expected KEY=VALUE, e.g. data=imagefolder:/data/imagenet")
        section, _, field = key.rpartition(".")
        (out["chase"] if section == "chase" else out)[field.replace("-", "_")] = yaml.safe_load(value)
    return out


def train_argv(entry: dict, config_file: Path, folder: Path, repo_id: Optional[str], overwrite: bool) -> List[str]:
    """recipes/train.py's arguments for one entry: its config, its starting weights, its folder and Hub repo."""
    start = ["--initial-checkpoint", str(entry["initial_checkpoint"])] if entry.get("initial_checkpoint") \
        else ["--pretrained"]
    return ["--config", str(config_file), "--model", entry["model"], *start, "--output", str(folder),
            *(["--push-to-hub", repo_id] if repo_id else []), *(["--overwrite"] if overwrite else [])]


@torch.no_grad()
def top1_top5(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple:
    """Top-1 and top-5 accuracy (%) over the loader, with timm.utils.accuracy (top-5 capped at the class count)."""
    model.eval().to(device)
    top1, top5 = AverageMeter(), AverageMeter()
    for x, y in loader:
        output = model(x.to(device))
        acc1, acc5 = accuracy(output, y.to(device), topk=(1, min(5, output.shape[-1])))
        top1.update(acc1.item(), x.shape[0])
        top5.update(acc5.item(), x.shape[0])
    return top1.avg, top5.avg


def measure(entry: dict, folder: Path, device: torch.device, bench_batch: int) -> Dict[str, Any]:
    """What the published folder scores and costs: loaded as a user loads it, on the run's own val split."""
    run = yaml.safe_load((folder / RUN_FILE).read_text())
    slim = timm.create_model(f"local-dir:{folder}", pretrained=True)
    data_config = resolve_data_config(model=slim)
    data = load_image_data(run["data"], data_dir=run.get("data_dir"), train_split=run.get("train_split"),
                           val_split=run.get("val_split"), val_fraction=run.get("val_fraction", 0.0),
                           seed=run.get("seed", 0))
    set_transform(data.val, create_transform(**data_config, is_training=False))
    loader = DataLoader(data.val, batch_size=run.get("batch_size", 64), num_workers=run.get("workers", 0))
    top1, top5 = top1_top5(slim, loader, device)
    size = data_config["input_size"]
    # the starting dense model at the same size and class count; its top-1 only where its classifier loaded
    dense = create_timm_model(entry["model"], size[-1], pretrained=not entry.get("initial_checkpoint"),
                              num_classes=slim.num_classes)
    reinitialised = load_initial_weights(dense, entry["initial_checkpoint"]) if entry.get("initial_checkpoint") \
        else dense.pretrained_cfg.get("num_classes") != slim.num_classes
    return {"img_size": size[-1], "top1": round(top1, 3), "top1_err": round(100 - top1, 3), "top5": round(top5, 3),
            "top5_err": round(100 - top5, 3), "param_count": round(sum(p.numel() for p in slim.parameters()) / 1e6, 2),
            "crop_pct": data_config["crop_pct"], "interpolation": data_config["interpolation"],
            "dense_top1": None if reinitialised else round(top1_top5(dense, loader, device)[0], 3),
            "dense_flops_ratio": round(count_flops(slim, size) / count_flops(dense, size), 4),
            "throughput": round(throughput(slim.to(device), batch_size=bench_batch, input_size=size), 2),
            "throughput_batch": bench_batch, "device": str(device), "val_images": len(data.val)}


def write_table(path: Path, rows: List[dict]) -> None:
    """Rewrite the markdown table between the zoo-table markers of ``path``."""
    head = ["model", "base", "img_size", "top1", "top5", "dense_top1", "param_count", "dense_flops_ratio",
            "throughput", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in head) + " |" for r in rows]
    table = "\n".join([TABLE_START, *lines, TABLE_END])
    path.write_text(TABLE.sub(lambda _: table, path.read_text(), count=1))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_push and not args.hub_org:
        fail("pass --hub-org ORG to publish each model to ORG/<name>, or --no-push to only write the folders")
    if args.docs and not (Path(args.docs).is_file() and TABLE.search(Path(args.docs).read_text())):
        fail(f"--docs {args.docs}: needs a markdown file holding a line {TABLE_START} and, below it, {TABLE_END}")
    manifest_path = Path(args.manifest)
    if not manifest_path.is_file():
        fail(f"--manifest {manifest_path} not found")
    manifest = yaml.safe_load(manifest_path.read_text()) or {}
    entries = entry_configs(manifest, parse_overrides(args.override), args.only)
    out = Path(args.output)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)

    # ---- check every entry with the recipe's own parser before training any (one-line error, exit 2)
    plans = []
    for entry in entries:
        if entry.get("initial_checkpoint"):  # relative to the manifest's folder
            entry["initial_checkpoint"] = str((manifest_path.parent / entry["initial_checkpoint"]).resolve())
        config_file = out / "configs" / f"{entry['name']}.yaml"
        config_file.write_text(yaml.safe_dump(entry["config"], sort_keys=False))
        repo_id = None if args.no_push else f"{args.hub_org}/{entry['name']}"
        argv_ = train_argv(entry, config_file, out / entry["name"], repo_id, args.overwrite)
        parse_args(argv_)
        plans.append((entry, argv_, repo_id))

    # ---- train, measure, record each; a failure is recorded and the next model runs
    device = PartialState().device
    rows = []
    for entry, argv_, repo_id in plans:
        row = {"model": repo_id or entry["name"], "base": entry["model"], "hub_id": repo_id}
        log = out / "logs" / f"{entry['name']}.txt"
        print(f"[{entry['name']}] training {entry['model']} (log: {log})", flush=True)
        with log.open("w") as f:
            proc = subprocess.run([*shlex.split(args.launcher), str(TRAIN), *argv_], stdout=f,
                                  stderr=subprocess.STDOUT)
        if proc.returncode:
            errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
            row["error"] = (errors[-1] if errors else f"train.py exited {proc.returncode}; see {log}")
            row["hub_id"] = None  # nothing was published
        else:
            try:
                row.update(measure(entry, out / entry["name"], device, args.bench_batch))
            except Exception as e:  # noqa: BLE001 - recorded in the row, the next model still runs
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc()
        print(f"[{entry['name']}] " + (f"FAILED: {row['error']}" if row.get("error") else
              f"top-1 {row['top1']:.2f} %, top-5 {row['top5']:.2f} %, {row['param_count']} M params, "
              f"FLOPs x{row['dense_flops_ratio']}, {row['throughput']:.1f} img/s"), flush=True)
        rows.append(row)

    # ---- results: timm's results/ CSV shape, and the docs table
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if args.docs:
        write_table(Path(args.docs), rows)
    failed = [r["model"] for r in rows if r.get("error")]
    print(f"results: {out / 'results.csv'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
