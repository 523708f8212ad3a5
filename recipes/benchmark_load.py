"""Load time of a slim model through ``hf-hub:`` against its dense base loaded the same way, side by side.

Both are published into an offline Hugging Face cache exactly as the Hub would serve them (the dense base with
timm's own ``save_for_hf``, the slim one with ``chase_timm.save_pretrained``), then
``timm.create_model("hf-hub:...", pretrained=True)`` is timed alternately; the ratio of the medians is printed.

    python recipes/benchmark_load.py                      # resnet50, 7 alternating loads each
    python recipes/benchmark_load.py --model efficientnet_b0 --repeats 11
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="resnet50")
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--channel-sparsity", type=float, default=0.4)
args = parser.parse_args()
cache = Path(tempfile.mkdtemp(prefix="chase-load-bench-"))
os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))  # read when huggingface_hub is imported

import timm  # noqa: E402

import chase_timm  # noqa: E402
from synthetic_run import synthetic_config, synthetic_run  # noqa: E402


def publish(folder: Path, repo_id: str) -> None:
    """Place a saved folder in the offline cache as the snapshot of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chase-load-bench-folders-"))
    try:
        dense = timm.create_model(args.model)
        timm.models.save_for_hf(dense, str(work / "dense"), safe_serialization=True)
        slim = synthetic_run(args.model, synthetic_config(channel_sparsity=args.channel_sparsity))[2].export()
        chase_timm.save_pretrained(slim, work / "slim")
        publish(work / "dense", f"bench/{args.model}")
        publish(work / "slim", f"bench/chase-{args.model}")
        times = {"dense": [], "slim": []}
        for _ in range(args.repeats):
            for kind, repo in (("dense", f"bench/{args.model}"), ("slim", f"bench/chase-{args.model}")):
                start = time.perf_counter()
                timm.create_model(f"hf-hub:{repo}", pretrained=True)
                times[kind].append(time.perf_counter() - start)
        dense_s, slim_s = statistics.median(times["dense"]), statistics.median(times["slim"])
        params = [sum(p.numel() for p in m.parameters()) for m in (dense, slim)]
        print(f"{args.model}: dense {params[0]:,} params, slim {params[1]:,} params ({params[1] / params[0]:.2f}x)")
        print(f"hf-hub load, median of {args.repeats}: dense {dense_s * 1000:.0f} ms, slim {slim_s * 1000:.0f} ms")
        print(f"load-time ratio slim/dense: {slim_s / dense_s:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
