"""Test-session setup: one BLAS/OpenMP thread per process, and the recipe run the tests share.

The suite runs on two cores with two pytest-xdist workers, and several tests start further processes
(two-rank DDP, resume, the recipe); more than one thread per process only oversubscribes the cores.
"""
import os
import shutil
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (after OMP_NUM_THREADS so child processes and this one agree)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted recipe run with its defaults (so shrinking at every channel event) on resnet18 at 16 px and
    a checkpoint after every epoch, shared by the recipe and shrink tests: (output folder, stdout).

    Run once per test session: the first xdist worker runs it under a file lock, the others read its folder."""
    from filelock import FileLock

    from helpers import session_dir
    from recipe_helpers import TINY, TRAIN, run

    root = session_dir(tmp_path_factory, "tiny")
    out, printed = root / "run", root / "stdout.txt"
    with FileLock(str(root / ".lock")):
        if not printed.exists():
            shutil.rmtree(out, ignore_errors=True)
            proc = run([sys.executable, str(TRAIN), *TINY, "--checkpoint-every", "1", "--output", str(out)])
            assert proc.returncode == 0, proc.stderr[-3000:]
            printed.write_text(proc.stdout)
    return out, printed.read_text()


@pytest.fixture
def resnet18_one_block_per_stage(monkeypatch):
    """tiny_model("resnet18") with one BasicBlock per stage (forked DDP ranks inherit it): blocks with an identity and
    with a downsampling shortcut, residual and internal channels all there, at 4.9M parameters, not 11.2M, so
    float64 twins and short runs take 2-2.5x less time."""
    import zoo_coverage

    monkeypatch.setitem(zoo_coverage.SMALLER, "resnet18", {"layers": (1, 1, 1, 1)})


def pytest_collection_modifyitems(items):
    """Slow-marked tests first, otherwise collection order (a stable sort): under ``-n 2`` the workers take tests
    from the front, so the long ones start early and the run ends on short ones instead of one worker finishing a
    long test (the zoo run, last in collection order) while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
