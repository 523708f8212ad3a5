"""The ``chase-timm`` command line: inspect a published slim model, or push a saved folder to the Hub.

    chase-timm info hf-hub:ORG/NAME | local-dir:PATH | PATH
    chase-timm push DIR ORG/NAME [--private] [--revision BRANCH] [--message TEXT] [--token TOKEN]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .hub import push_to_hub, slim_summary


def _info(args: argparse.Namespace) -> None:
    """Widths per stage before/after, parameters, dense FLOPs and what was pruned (nothing is downloaded but
    config.json)."""
    s = slim_summary(args.source)
    m = s["metrics"]
    print(f"{s['source']}: {s['class']} slimmed from {s['base_architecture']} by Chase "
          f"(input {'x'.join(map(str, s['input_size']))})")
    print(f"{'stage':<22}{'reduction':>10}{'output channels':>18}{'Conv/Linear channels':>24}")
    for stage in s["stages"]:
        out = "" if stage["before"] is None else f"{stage['before']} -> {stage['after']}"
        layers = f"{stage['layers_before']} -> {stage['layers_after']}" if stage["layers_before"] else ""
        print(f"{stage['module']:<22}{stage['reduction'] or '':>10}{out:>18}{layers:>24}")
    print(f"parameters   {m['base_params']:>14,} -> {m['slim_params']:>14,}  ({m['slim_params'] / m['base_params']:.2f}x)")
    print(f"dense FLOPs  {m['base_dense_flops']:>14,} -> {m['slim_dense_flops']:>14,}  "
          f"({m['slim_dense_flops'] / m['base_dense_flops']:.2f}x)")
    print(f"pruned: {s['pruned_tensors']} of {s['total_tensors']} tensors changed shape, in "
          + ", ".join(f"{block} ({n})" for block, n in s["pruned_by_block"].items()))
    for label, value in s["speed"]:
        print(f"{label}: {value}")
    if s["heads"]:
        print("attention heads: " + ", ".join(f"{block} {n} -> {k}" for block, (n, k) in s["heads"].items()))


def _push(args: argparse.Namespace) -> None:
    """Upload config.json, model.safetensors and README.md of a saved folder."""
    url = push_to_hub(args.directory, args.repo_id, token=args.token, private=args.private or None,
                      revision=args.revision, commit_message=args.message)
    print(url)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``chase-timm`` console script; errors print one line and exit with status 1."""
    parser = argparse.ArgumentParser(prog="chase-timm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="describe a slim model: widths per stage, parameters, FLOPs")
    info.add_argument("source", help="hf-hub:ORG/NAME, local-dir:PATH or a folder written by save_pretrained")
    info.set_defaults(run=_info)
    push = commands.add_parser("push", help="upload a folder written by chase_timm.save_pretrained")
    push.add_argument("directory")
    push.add_argument("repo_id", help="ORG/NAME on the Hub (HF_ENDPOINT selects another hub)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    push.set_defaults(run=_push)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        print(f"chase-timm {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
