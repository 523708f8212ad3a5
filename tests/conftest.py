"""Test-session setup: one BLAS/OpenMP thread per process, and the recipes (scripts) importable.

The suite runs on two cores with two pytest-xdist workers, and several tests start further processes
(two-rank DDP, resume, the recipe); more than one thread per process only oversubscribes the cores.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import pytest  # noqa: E402
import torch  # noqa: E402  (after OMP_NUM_THREADS so child processes and this one agree)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted recipe run with its defaults (so shrinking at every channel event) on resnet18 at 16 px and
    a checkpoint after every epoch, shared by the recipe and shrink tests: (output folder, stdout)."""
    from recipe_helpers import TINY, TRAIN, run

    out = tmp_path_factory.mktemp("tiny") / "run"
    proc = run([sys.executable, str(TRAIN), *TINY, "--checkpoint-every", "1", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
