"""Shared pieces of the recipe tests: running recipes/train.py (subprocess or in-process) and tiny on-disk datasets."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

from PIL import Image

from chase_timm.data import digits_splits

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes" / "train.py"
# resnet18 at 16 px, batch 64: 22 optimizer steps per epoch of the 1437 training digits
TINY = ["--model", "resnet18", "--img-size", "16", "--batch-size", "64", "--epochs", "3", "--recal-batches", "2"]


def run(cmd: List[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run a command from the repo root, capturing text output; one thread per process (tiny models, shared CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(proc: subprocess.CompletedProcess) -> List[str]:
    """Non-empty stderr lines, minus torch's import-time "No CUDA runtime" notice on CPU machines."""
    return [line for line in proc.stderr.splitlines() if line.strip() and "No CUDA runtime is found" not in line]


def launch(args: List[str], port: int, processes: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N recipes/train.py ...` (gloo DDP on CPU)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(TRAIN), *args]
    return run(cmd, ACCELERATE_USE_CPU="1", **env)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a DDP rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_top1(out: Path) -> float:
    """Top-1 on the digits validation split of a slim folder, loaded the way a user loads it (timm local-dir)."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from chase_timm.data import DigitsDataset

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    val = DigitsDataset("val", transform=create_transform(**resolve_data_config(model=model)))
    x, y = torch.stack([v[0] for v in val]), torch.tensor([v[1] for v in val])
    with torch.no_grad():
        return 100.0 * int((model(x).argmax(-1) == y).sum()) / len(y)  # exact, as the recipe counts


def load_recipe():
    """Import recipes/train.py as a module (for in-process runs and argument checks); its sibling train_flags.py
    is importable as it is under `python recipes/train.py` (the script's folder on sys.path)."""
    if str(TRAIN.parent) not in sys.path:
        sys.path.insert(0, str(TRAIN.parent))
    spec = importlib.util.spec_from_file_location("chase_train_recipe", TRAIN)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def fresh_accelerate() -> Iterator[None]:
    """Reset Accelerate's process-wide singletons around an in-process recipe run."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def digits_images(split: str, count: int):
    """The first `count` digits of a split as (RGB PIL image, label) pairs."""
    images, labels = digits_splits()[split]
    return [(Image.fromarray(images[i]).convert("RGB"), int(labels[i])) for i in range(count)]


def write_image_folder(root: Path, counts: dict) -> Path:
    """root/<split>/<label>/<i>.png for {split: count} digits (a real class-folder dataset)."""
    for split, count in counts.items():
        for i, (img, label) in enumerate(digits_images("train" if split == "train" else "val", count)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            img.resize((16, 16)).save(folder / f"{i}.png")
    return root


def write_parquet_dataset(root: Path, counts: dict) -> Path:
    """A Hugging Face dataset on disk: root/data/<split>-00000-of-00001.parquet with Image and ClassLabel columns."""
    import datasets

    labels = datasets.ClassLabel(names=[str(i) for i in range(10)])
    features = datasets.Features({"image": datasets.Image(), "label": labels})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        pairs = digits_images("train" if split == "train" else "val", count)
        columns = {"image": [p[0] for p in pairs], "label": [p[1] for p in pairs]}
        ds = datasets.Dataset.from_dict(columns, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def tensors_equal(a: dict, b: dict) -> bool:
    """Same names, shapes, dtypes and bits."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


__all__ = ["ROOT", "TRAIN", "TINY", "run", "error_lines", "launch", "load_recipe", "fresh_accelerate", "metrics",
           "write_image_folder", "write_parquet_dataset", "tensors_equal", "digits_images"]
