"""Attention heads under Chase: slim/dense FLOPs and heads left per block after the synthetic schedule.

Runs ``synthetic_run`` (every channel event of ``synthetic_config`` on random batches at the model's own input
size), exports, and prints one row per model and prune_skip setting: slim/dense FLOPs (``chase_timm.metrics``) and
``num_heads`` per attention block before -> after (``chase_timm.heads.head_counts``). The figures in docs/heads.md:

    python recipes/attention_heads.py --models deit_small_patch16_224 swin_tiny_patch4_window7_224
    python recipes/attention_heads.py --channel-cost flops   # rank by UMM per FLOP saved (docs/speed.md)
    python recipes/attention_heads.py --export-check --models crossvit_tiny_240 pit_ti_224   # small inputs, S_c=0.6

``--export-check`` instead trains a few Chase steps at the small input and build arguments the prunability table
(docs/prunability.csv) uses for the model, exports, and checks the export and a save_pretrained -> local-dir: reload.
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Dict, List

import timm
import torch

import chase_timm
from chase_timm.heads import head_counts
from chase_timm.metrics import count_flops
from synthetic_run import synthetic_config, synthetic_run
from zoo_coverage import check_model

TABLE = Path(__file__).resolve().parent.parent / "docs" / "prunability.csv"


def measure(name: str, prune_skip: bool, channel_sparsity: float = 0.4, steps: int = 4,
            channel_cost: str = "none") -> Dict:
    """Slim/dense FLOPs and heads per attention block of ``name`` after the synthetic schedule at S_c."""
    size = timm.get_pretrained_cfg_value(name, "input_size")[-1]
    config = synthetic_config(steps, channel_sparsity=channel_sparsity, prune_skip=prune_skip, channel_cost=channel_cost)
    model, _, chase = synthetic_run(name, config, size=size)
    slim = chase.export()
    before, after = head_counts(model), head_counts(slim)
    return {"model": name, "prune_skip": prune_skip, "channel_cost": channel_cost,
            "flops_ratio": count_flops(slim) / count_flops(model),
            "channel_sparsity": chase.stats()["channel_sparsity"],
            "heads": {block: f"{before[block]}->{after[block]}" for block in before},
            "heads_ratio": sum(after.values()) / max(1, sum(before.values()))}


def export_check(name: str, channel_sparsity: float = 0.6) -> Dict:
    """Export and reload a small build of ``name`` (input size and build arguments from the prunability table)."""
    rows = {r["model"]: r for r in csv.DictReader(TABLE.open())}
    if name not in rows:
        raise SystemExit(f"--export-check: {name!r} is not in {TABLE.name}; pick a model the table lists")
    size, kwargs = int(rows[name]["input_size"]), json.loads(rows[name]["build_args"] or "{}")
    row = check_model(name, False, channel_sparsity=channel_sparsity, size=size, keep_models=True, **kwargs)
    slim = row["slim"].eval()
    with tempfile.TemporaryDirectory() as folder:
        chase_timm.save_pretrained(slim, folder)
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        roundtrip = float((loaded(x) - slim(x)).abs().max())
    before, after = head_counts(row["chase"].module), head_counts(slim)
    return {"model": name, "export_rel_diff": row["rel_diff"], "roundtrip_diff": roundtrip,
            "heads": f"{sum(before.values())}->{sum(after.values())}", "reloaded_heads_equal": head_counts(loaded) == after,
            "flops_ratio": row["flops_ratio"]}


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--prune-skip", choices=["on", "off", "both"], default="both")
    parser.add_argument("--channel-sparsity", type=float, default=None, help="S_c (default 0.4; 0.6 with --export-check)")
    parser.add_argument("--channel-cost", default="none", choices=("none", "flops", "latency"),
                        help="ChaseConfig.channel_cost: none (UMM alone), flops or latency (UMM per cost saved)")
    parser.add_argument("--export-check", action="store_true", help="export + reload check at the table's small input")
    args = parser.parse_args(argv)
    if args.export_check:
        for name in args.models:
            print(json.dumps(export_check(name, args.channel_sparsity or 0.6)), flush=True)
        return
    skips = {"on": [True], "off": [False], "both": [False, True]}[args.prune_skip]
    for name in args.models:
        for skip in skips:
            print(json.dumps(measure(name, skip, args.channel_sparsity or 0.4, channel_cost=args.channel_cost)), flush=True)


if __name__ == "__main__":
    main()
