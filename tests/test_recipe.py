"""recipes/train.py, run for real: artifacts, export equivalence, 2-process DDP, exact resume, clear errors."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import chase_timm

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes" / "train.py"
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
# 1437 digits / batch 256 = 5 steps per epoch; 3 planned epochs capped at 10 optimizer steps of resnet18 at 16 px
TINY = ["--model", "resnet18", "--img-size", "16", "--batch-size", "256", "--epochs", "3", "--max-steps", "10",
        "--recal-batches", "2"]
ARTIFACTS = ("slim_model.safetensors", "width_plan.json", "chase_config.json", "metrics.json", "report.json",
             "run_config.yaml", "training.png")


def run(cmd: list, **env: str) -> subprocess.CompletedProcess:
    """Run a command from the repo root, capturing text output; one thread per process (tiny models, shared CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def load_recipe():
    """Import recipes/train.py as a module (for in-process argument checks)."""
    spec = importlib.util.spec_from_file_location("chase_train_recipe", TRAIN)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """One plain-python run with a checkpoint after every epoch."""
    out = tmp_path_factory.mktemp("plain")
    proc = run([sys.executable, str(TRAIN), *TINY, "--checkpoint-every", "1", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_plain_python_writes_artifacts_and_slim_matches_masked(plain_run):
    for name in ARTIFACTS:
        assert (plain_run / name).stat().st_size > 0, name
    m = metrics(plain_run)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2] and m["epochs"][-1]["step"] == 10
    final = m["final"]
    # before BN recalibration the exported slim model computes the same function as the masked model
    assert final["export_max_abs_diff"] < 1e-3
    assert final["slim_top1_before_recal"] == pytest.approx(final["masked_top1"], abs=1e-6)
    assert final["slim_params"] < final["base_params"] and final["slim_dense_flops"] < final["base_dense_flops"]
    config = chase_timm.ChaseConfig.from_dict(json.loads((plain_run / "chase_config.json").read_text()))
    assert config.total_steps == 10  # --max-steps compresses the whole schedule: channel sparsity reaches S_c
    assert m["epochs"][-1]["channel_sparsity"] == pytest.approx(config.channel_sparsity, abs=0.02)
    report = json.loads((plain_run / "report.json").read_text())
    assert any(g["width_after"] < g["width_before"] for g in report)
    assert all(torch.isfinite(t).all() for t in load_file(plain_run / "slim_model.safetensors").values())
    json.loads((plain_run / "width_plan.json").read_text())
    # the written run config is itself a valid --config
    recipe = load_recipe()
    args, chase = recipe.parse_args(["--config", str(plain_run / "run_config.yaml")])
    assert args.model == "resnet18" and args.img_size == 16


def test_resume_continues_exactly(plain_run, tmp_path):
    out = tmp_path / "resumed"
    proc = run([sys.executable, str(TRAIN), *TINY, "--output", str(out),
                "--resume", str(plain_run / "checkpoints" / "epoch_1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "epoch 1, step 5" in proc.stdout
    first, resumed = metrics(plain_run)["epochs"], metrics(out)["epochs"]
    assert [e["step"] for e in resumed] == [5, 10]
    assert resumed[0] == first[0]  # history carried in the checkpoint
    for key in ("train_loss", "val_top1", "density", "channel_sparsity", "lr", "chase_step"):
        assert resumed[1][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-6), key


def test_two_process_ddp_on_cpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(TRAIN), *TINY, "--epochs", "1", "--grad-accum", "2",
           "--output", str(out)]
    proc = run(cmd, ACCELERATE_USE_CPU="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 5 batches of 256 (128 per process), 2 micro-steps per update -> 3 optimizer steps, all seen by Chase
    assert "2 process(es)" in proc.stdout and "3 optimizer steps" in proc.stdout
    epoch = metrics(out)["epochs"][-1]
    assert epoch["step"] == epoch["chase_step"] == 3
    final = metrics(out)["final"]
    assert final["slim_top1_before_recal"] == pytest.approx(final["masked_top1"], abs=1e-6)
    assert (out / "slim_model.safetensors").exists()


def test_unknown_model_fails_before_training():
    proc = run([sys.executable, str(TRAIN), "--model", "resnt50"])
    assert proc.returncode != 0
    assert "unknown timm model 'resnt50'" in proc.stderr and "resnet50" in proc.stderr
    assert "optimizer steps" not in proc.stdout


@pytest.mark.parametrize("config, message", [
    ({"learning_rate": 0.1}, "unknown training key(s) ['learning_rate']"),
    ({"density": 0.1}, "unknown training key(s) ['density']"),
    ({"epochs": "ten"}, "epochs: 'ten' is not a valid int"),
    ({"chase": {"densty": 0.1}}, "unknown `chase:` key(s) ['densty']"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        load_recipe().parse_args(["--config", str(path)])
    assert exc.value.code != 0 and message in capsys.readouterr().err


def test_missing_resume_dir_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        load_recipe().parse_args(["--resume", "/nonexistent/epoch_1"])
    assert exc.value.code != 0 and "--resume '/nonexistent/epoch_1' is not a directory" in capsys.readouterr().err


def test_missing_dataset_folder_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        load_recipe().main(["--config", str(ROOT / "recipes/configs/resnet50_imagenet.yaml")])
    assert "imagefolder:/path/to/imagenet" in str(exc.value.code) and "train/ and val/" in str(exc.value.code)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_parse_and_build(path):
    recipe = load_recipe()
    args, section = recipe.parse_args(["--config", str(path)])
    steps_per_epoch = {"digits": 22, "torch/cifar100": 500}.get(args.data, 2502)
    config = recipe.chase_config(section, args.epochs, args.epochs * steps_per_epoch, args.seed)
    assert config.total_steps == args.epochs * steps_per_epoch


def test_digits_config_is_the_default():
    recipe = load_recipe()
    args, section = recipe.parse_args(["--config", str(ROOT / "recipes/configs/resnet50_digits.yaml")])
    defaults, default_section = recipe.parse_args([])
    assert {**vars(args), "config": None} == vars(defaults)
    build = lambda chase: recipe.chase_config(chase, args.epochs, args.epochs * 22, args.seed).to_dict()
    assert build(section) == build(default_section)
