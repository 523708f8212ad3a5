"""Slim models for the hub tests: trained a few Chase steps, exported, saved once per test session.

Every xdist worker asks for the same folders; the first one builds them under a file lock in the session's
shared temporary root and the others reuse them. Each folder gets ``reference.safetensors`` beside the model
files: a fixed input and the in-memory slim model's eval output on it, for bitwise comparisons after loading.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock
from safetensors.torch import load_file, save_file

import chase_timm
from chase_timm import Chase, ChaseConfig
from helpers import input_size, session_dir, tiny_model

# (base, prune_skip): every family the issue names, prune_skip where it changes the model
CASES = [("resnet18", False), ("resnet18", True), ("mobilenetv3_small_050", False),
         ("mobilenetv3_small_050", True), ("regnetx_002", False), ("regnetx_002", True),
         ("densenet121", False), ("densenet121", True), ("convnext_atto", False), ("vit_tiny_patch16_224", False)]
REPO_ORG = "chase-test"


def case_name(base: str, prune_skip: bool) -> str:
    return f"{base}-{'skip' if prune_skip else 'noskip'}"


# densenet121 with prune_skip ranks all channels in one pool, so its stem stream loses channels (test_hub checks the
# stem's input dim stays open for in_chans overrides); under the per-kind budget its stem keeps them
OVERRIDES = {("densenet121", True): {"channel_budget": "pooled"}}


def make_slim(base: str, prune_skip: bool, steps: int = 2):
    """A tiny real Chase run (channel event every step, S_c = 0.5) and its export."""
    model = tiny_model(base)
    size = input_size(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = ChaseConfig(total_steps=steps + 1, update_interval=2, channel_interval=1, channel_offset=0,
                         channel_end_step=steps, channel_sparsity=0.5, min_channel_ratio=0.5, prune_skip=prune_skip,
                         **OVERRIDES.get((base, prune_skip), {}))
    chase = Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, size, size))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(2, 3, size, size, generator=generator)
        F.cross_entropy(model(x), torch.randint(0, 10, (2,), generator=generator)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        chase.step()
        optimizer.zero_grad()
    return chase.export().eval(), config


def save_case(base: str, prune_skip: bool, folder: Path) -> None:
    """save_pretrained of a fresh slim model, plus its reference input/output."""
    slim, config = make_slim(base, prune_skip)
    size = input_size(base)
    chase_timm.save_pretrained(slim, folder, chase_config=config, data_config={"input_size": (3, size, size)},
                               metrics={"masked_top1": 11.0, "slim_top1": 11.0}, dataset="digits",
                               recipe={"model": base, "prune_skip": prune_skip}, license="apache-2.0",
                               repo_id=f"{REPO_ORG}/{case_name(base, prune_skip)}")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        save_file({"input": x, "output": slim(x)}, str(folder / "reference.safetensors"))


def reference(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(folder / "reference.safetensors"))
    return tensors["input"], tensors["output"]


def model_files(folder: Path) -> Path:
    """A copy of the folder with only what save_pretrained wrote (what a Hub repo holds)."""
    clean = folder.parent / f"{folder.name}-model-only"
    if not clean.exists():
        clean.mkdir()
        for name in chase_timm.hub.MODEL_FILES:
            shutil.copy(folder / name, clean / name)
    return clean


def seed_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0" * 40) -> None:
    """Place a saved folder into a Hugging Face cache as a downloaded snapshot (offline loading)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in chase_timm.hub.MODEL_FILES:
        shutil.copy(folder / name, snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def run_python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """A fresh Python process (huggingface_hub reads HF_* variables at import) running ``code``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    tests = str(Path(__file__).resolve().parent)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, str(Path(tests).parent / "recipes"),
                                                           full_env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="session")
def slim_folders(tmp_path_factory) -> dict[str, Path]:
    """case name -> saved chase folder (built once per session, shared by xdist workers)."""
    root = session_dir(tmp_path_factory, "chase-hub-models")
    folders = {}
    with FileLock(str(root / ".lock")):
        for base, prune_skip in CASES:
            folder = root / case_name(base, prune_skip)
            if not (folder / "reference.safetensors").exists():
                shutil.rmtree(folder, ignore_errors=True)
                save_case(base, prune_skip, folder)
            folders[case_name(base, prune_skip)] = folder
    return folders
