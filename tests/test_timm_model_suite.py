"""timm's own model tests (tests/test_models.py of timm's source distribution) on ``hf-hub:`` slim models.

The sdist of the installed timm is downloaded once with pip into pytest's cache; the slim models are placed in
an offline Hugging Face cache, and timm's test functions run in a fresh process (see timm_suite_worker.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

from hub_fixtures import REPO_ORG, run_python, seed_hub_cache, slim_folders  # noqa: F401  (fixture)

FAMILIES = ["resnet18-skip", "mobilenetv3_small_050-skip", "convnext_atto-noskip", "vit_tiny_patch16_224-noskip"]


@pytest.fixture(scope="session")
def timm_tests_dir(pytestconfig, tmp_path_factory) -> Path:
    """tests/ of timm's sdist for the installed version (``pip download --no-binary :all: --no-deps``), kept in
    pytest's cache between runs."""
    name = f"timm-{timm.__version__}-sdist"
    store = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    cache = Path(store.mkdir(name) if store else tmp_path_factory.mktemp(name))
    tests = cache / f"timm-{timm.__version__}" / "tests"
    if not (tests / "test_models.py").exists():
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                                   f"timm=={timm.__version__}", "-d", str(cache)], capture_output=True, text=True)
        archives = sorted(cache.glob(f"timm-{timm.__version__}.tar.gz"))
        if download.returncode or not archives:
            pytest.skip(f"timm's sdist could not be downloaded (no index reachable?): {download.stderr[-300:]}")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(cache, filter="data")
    return tests


@pytest.mark.slow
@pytest.mark.network
def test_timm_model_tests_pass_on_hf_hub_slim_models(slim_folders, timm_tests_dir, tmp_path):
    cache = tmp_path / "hub-cache"
    for case in FAMILIES:
        seed_hub_cache(cache, f"{REPO_ORG}/{case}", slim_folders[case])
    worker = Path(__file__).with_name("timm_suite_worker.py")
    code = (f"import sys; sys.argv = ['worker', {str(timm_tests_dir)!r}] + {[f'hf-hub:{REPO_ORG}/{c}' for c in FAMILIES]!r}"
            f"\nexec(open({str(worker)!r}).read())")
    out = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}, timeout=600)
    results = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert len(results) == 9 * len(FAMILIES)
    bad = [f"{r['model']} {r['test']}: {r['outcome']}\n{r['detail']}" for r in results if r["outcome"] != "passed"]
    assert not bad, "\n".join(bad)
