"""Attention heads under Chase: slim/dense FLOPs and heads left per block after the synthetic schedule.

Runs ``synthetic_run`` (every channel event of ``synthetic_config`` on random batches at the model's own input
size), exports, and prints one row per model and prune_skip setting: slim/dense FLOPs (``chase_timm.metrics``) and
``num_heads`` per attention block before -> after (``chase_timm.heads.head_counts``). The figures in docs/heads.md:

    python recipes/attention_heads.py --models deit_small_patch16_224 swin_tiny_patch4_window7_224
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

import timm

from chase_timm.heads import head_counts
from chase_timm.metrics import count_flops
from synthetic_run import synthetic_config, synthetic_run


def measure(name: str, prune_skip: bool, channel_sparsity: float = 0.4, steps: int = 4) -> Dict:
    """Slim/dense FLOPs and heads per attention block of ``name`` after the synthetic schedule at S_c."""
    size = timm.get_pretrained_cfg_value(name, "input_size")[-1]
    config = synthetic_config(steps, channel_sparsity=channel_sparsity, prune_skip=prune_skip)
    model, _, chase = synthetic_run(name, config, size=size)
    slim = chase.export()
    before, after = head_counts(model), head_counts(slim)
    return {"model": name, "prune_skip": prune_skip, "flops_ratio": count_flops(slim) / count_flops(model),
            "channel_sparsity": chase.stats()["channel_sparsity"],
            "heads": {block: f"{before[block]}->{after[block]}" for block in before},
            "heads_ratio": sum(after.values()) / max(1, sum(before.values()))}


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--prune-skip", choices=["on", "off", "both"], default="both")
    parser.add_argument("--channel-sparsity", type=float, default=0.4)
    args = parser.parse_args(argv)
    skips = {"on": [True], "off": [False], "both": [False, True]}[args.prune_skip]
    for name in args.models:
        for skip in skips:
            print(json.dumps(measure(name, skip, args.channel_sparsity)), flush=True)


if __name__ == "__main__":
    main()
