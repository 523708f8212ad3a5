"""Run timm's own model test functions (its sdist's tests/test_models.py) on ``hf-hub:`` names; print JSON results.

    HF_HUB_OFFLINE=1 HF_HUB_CACHE=... python timm_suite_worker.py TIMM_TESTS_DIR hf-hub:ORG/A hf-hub:ORG/B ...

Run in a fresh process: the HF_* variables are read when huggingface_hub is imported. timm's backward,
torchscript and FX-backward tests look the input size up in timm's registry by model name, which knows no
hub names; that lookup is resolved through the created model's own ``pretrained_cfg`` instead.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import sys
import time
import traceback

import _pytest.outcomes
import timm

import chase_timm  # noqa: F401  (registers chase_slim)

FUNCTIONS = [("test_model_default_cfgs", {"batch_size": 1, "cfg_device": "meta"}),
             ("test_model_forward", {"batch_size": 1}), ("test_model_backward", {"batch_size": 2}),
             ("test_model_forward_features", {"batch_size": 1}),
             ("test_model_forward_intermediates", {"batch_size": 1}),
             ("test_model_forward_intermediates_features", {"batch_size": 1}),
             ("test_model_forward_torchscript", {"batch_size": 1}), ("test_model_forward_fx", {"batch_size": 1}),
             ("test_model_backward_fx", {"batch_size": 2})]


def cfg_value_from_model(model_name: str, key: str):
    """``get_pretrained_cfg_value`` for any name create_model accepts (hub names included)."""
    return timm.create_model(model_name, pretrained=False, device="meta").pretrained_cfg.get(key)


def main(tests_dir: str, names: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("timm_test_models", f"{tests_dir}/test_models.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    suite.get_pretrained_cfg_value = cfg_value_from_model
    results = []
    for name in names:
        base = timm.create_model(name, pretrained=False, device="meta")._model_args["chase"]["base_architecture"]
        non_std = any(fnmatch.fnmatch(base, pattern) for pattern in suite.NON_STD_FILTERS)
        for function, kwargs in FUNCTIONS:
            if non_std and function == "test_model_default_cfgs":
                function += "_non_std"  # timm runs this variant for ViT-style models (no pool_size)
            start = time.perf_counter()
            try:
                getattr(suite, function)(model_name=name, **kwargs)
                outcome, detail = "passed", ""
            except _pytest.outcomes.Skipped as skip:
                outcome, detail = "skipped", str(skip)
            except Exception:
                outcome, detail = "failed", traceback.format_exc(limit=-4)
            results.append({"model": name, "base": base, "test": function, "outcome": outcome, "detail": detail,
                            "seconds": round(time.perf_counter() - start, 2)})
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
