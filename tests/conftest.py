"""Test-session setup: one BLAS/OpenMP thread per process, and the recipes (scripts) importable.

The suite runs on two cores with two pytest-xdist workers, and several tests start further processes
(two-rank DDP, resume, the recipe); more than one thread per process only oversubscribes the cores.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import torch  # noqa: E402  (after OMP_NUM_THREADS so child processes and this one agree)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
