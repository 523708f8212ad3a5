"""Architecture coverage: train a few Chase steps on each timm model, export, and check the slim model.

Prints a Markdown table (the one in docs/coverage.md): prunable groups, channels removed, max |slim - masked|
relative to the output scale, and parameter / dense-FLOPs ratios of the exported model.

    python recipes/zoo_coverage.py                       # the coverage list, both prune_skip settings
    python recipes/zoo_coverage.py --models resnet50 convnext_atto --prune-skip off
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F

from chase_timm import Chase, ChaseConfig
from chase_timm.metrics import count_flops

# the coverage list: one model per family; the tests check every entry ("zoo" names published models only)
COVERAGE_LIST = ["resnet18", "resnet50", "seresnext26d_32x4d", "regnetx_002", "densenet121", "vgg11_bn", "mobilenetv2_050",
       "mobilenetv3_small_050", "efficientnet_b0", "ghostnet_050", "convnext_atto", "vit_tiny_patch16_224",
       "mixer_s16_224", "repvgg_a0", "dla34", "hrnet_w18_small", "inception_v3"]
FIXED_SIZE = ("vit", "mixer", "gmixer", "gmlp", "eva02")  # models whose input size is fixed at construction
SMALLER = {"vgg11_bn": {"mlp_ratio": 0.0625}}  # a 256-wide pre-logits MLP instead of 4096 (100M parameters)


def input_size(name: str) -> int:
    """Smallest convenient input: 75 px for Inception (its stem needs it), 32 px elsewhere."""
    return 75 if name.startswith("inception") else 32


def build(name: str, num_classes: int = 10, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised timm model sized for small inputs (``overrides`` go to ``timm.create_model``)."""
    kwargs = {"img_size": input_size(name)} if name.startswith(FIXED_SIZE) else {}
    kwargs.update(SMALLER.get(name, {}))
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **{**kwargs, **overrides})


def check_model(name: str, prune_skip: bool, steps: int = 4, channel_sparsity: float = 0.5, size: Optional[int] = None,
                keep_models: bool = False, **overrides: Any) -> Dict:
    """Train ``steps`` Chase steps with a channel event after each, export, and compare eval outputs.

    ``size``: input side (default :func:`input_size`); ``overrides`` go to :func:`build`; ``keep_models`` adds the
    ``chase`` wrapper and the exported ``slim`` model to the row (the prunability table reports and saves them)."""
    model = build(name, **overrides)
    size = size or input_size(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    config = ChaseConfig(total_steps=steps + 1, update_interval=2, channel_interval=1, channel_offset=0,
                         channel_end_step=steps, channel_sparsity=channel_sparsity, min_channel_ratio=0.5,
                         prune_skip=prune_skip)
    start = time.perf_counter()
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, size, size))
    setup = time.perf_counter() - start
    groups = list(chase.channels.groups)  # as found on the base model, before any training step
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(2, 3, size, size, generator=generator)
        F.cross_entropy(model(x), torch.randint(0, 10, (2,), generator=generator)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # batch-2 BN on 1x1 maps can explode (ghostnet)
        optimizer.step()
        chase.step()
        optimizer.zero_grad()
    start = time.perf_counter()
    slim = chase.export()
    export = time.perf_counter() - start
    model.eval(), slim.eval()
    x = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        reference, output = model(x), slim(x)
    stats = chase.stats()
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "prune_skip": prune_skip,
        "groups": len(chase.channels.prunable),
        "channels": stats["channels_total"],
        "removed": stats["channels_total"] - stats["channels_alive"],
        "rel_diff": float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-12)),
        "params_ratio": sum(p.numel() for p in slim.parameters()) / params,
        "flops_ratio": count_flops(slim, (3, size, size)) / count_flops(model, (3, size, size)),
        "setup_s": setup,
        "export_s": export,
        "channel_groups": groups,  # every group found, for reuse: discovery is the slow part of setup
        **({"chase": chase, "slim": slim} if keep_models else {}),
    }


def markdown(rows: List[Dict]) -> str:
    """The coverage table as Markdown."""
    lines = ["| model | prune_skip | prunable groups | channels removed | max rel. diff | params | dense FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        smaller = ", ".join(f"{k}={v}" for k, v in SMALLER.get(r["model"], {}).items())
        lines.append(f"| {r['model']}{f' ({smaller})' if smaller else ''} | {'on' if r['prune_skip'] else 'off'} | {r['groups']} | "
                     f"{r['removed']} / {r['channels']} | {r['rel_diff']:.1e} | {r['params_ratio']:.2f}x | "
                     f"{r['flops_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=COVERAGE_LIST)
    parser.add_argument("--prune-skip", choices=("off", "on", "both"), default="both")
    args = parser.parse_args()
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.prune_skip]
    rows = []
    for name in args.models:
        for prune_skip in settings:
            row = check_model(name, prune_skip)
            print(f"{name:24s} prune_skip={prune_skip!s:5s} groups={row['groups']:3d} removed={row['removed']:5d} "
                  f"rel_diff={row['rel_diff']:.1e} setup={row['setup_s']:.1f}s export={row['export_s']:.2f}s",
                  flush=True)
            rows.append(row)
    print(markdown(rows))


if __name__ == "__main__":
    main()
