"""recipes/train.py as a product, run for real: a loadable slim-model folder, exact resume after SIGKILL,
2-process DDP on streamed data, reusable run configs, the shipped configs."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import timm
import yaml
from safetensors.torch import load_file
from timm.data import resolve_data_config

import chase_timm
from hub_server import HubServer
from recipe_helpers import (ROOT, TINY, TRAIN, folder_top1, free_port, fresh_accelerate, launch, load_recipe,
                            metrics, run, tensors_equal, write_parquet_dataset)

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
MODEL_FILES = ("config.json", "model.safetensors", "README.md")


@pytest.mark.slow
def test_output_folder_is_the_slim_model_and_reproduces_its_accuracy(tiny_run):
    out, stdout = tiny_run
    for name in (*MODEL_FILES, "metrics.json", "run_config.yaml", "training.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "checkpoints" / "epoch_3" / "run_config.yaml").exists()  # the final checkpoint
    final = metrics(out)["final"]
    # the run says where everything is
    for line in (f"slim model:  {out}", f"metrics:     {out / 'metrics.json'}", f"plot:        {out / 'training.png'}",
                 f"checkpoint:  {out / 'checkpoints' / 'epoch_3'}"):
        assert line in stdout
    # a user loads the folder with timm and gets the reported accuracy with the saved data config
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert sum(p.numel() for p in model.parameters()) == final["slim_params"] < final["base_params"]
    assert resolve_data_config(model=model)["input_size"] == (3, 16, 16)
    assert folder_top1(out) == pytest.approx(final["slim_top1"], abs=1e-6)
    # the model card carries the measured figures
    card = (out / "README.md").read_text()
    assert f"{final['slim_top1']:.2f}" in card and f"{final['masked_top1']:.2f}" in card
    assert f"{final['slim_throughput']:.1f}" in card and f"{final['base_params']:,}" in card
    # training FLOPs integrated over the run (the paper's accounting), below the dense model's, in the card too
    assert 0 < final["train_flops"] < final["dense_train_flops"] and final["samples"] == 66 * 64
    assert f"{final['train_flops']:.3g}" in card and f"{final['dense_train_flops']:.3g}" in card


@pytest.mark.slow
def test_raw_export_equals_the_masked_model(tiny_run):
    final = metrics(tiny_run[0])["final"]
    assert final["export_max_abs_diff"] < 1e-4
    assert final["slim_top1_before_recal"] == pytest.approx(final["masked_top1"], abs=1e-6)
    assert final["slim_dense_flops"] < final["base_dense_flops"]
    epochs = metrics(tiny_run[0])["epochs"]
    assert [e["step"] for e in epochs] == [22, 44, 66] and all(e["chase_step"] == e["step"] for e in epochs)
    assert epochs[-1]["channel_sparsity"] == pytest.approx(0.4, abs=0.02)  # S_c reached, then 20 % to recover


@pytest.mark.slow
def test_run_config_is_reusable_with_config(tiny_run, tmp_path):
    out = tiny_run[0]
    text = (out / "run_config.yaml").read_text()
    top_keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert len(top_keys) == len(set(top_keys)) and "output" not in top_keys and "resume" not in top_keys
    recipe = load_recipe()
    args, section = recipe.parse_args(["--config", str(out / "run_config.yaml"), "--output", str(tmp_path / "again")])
    assert recipe.run_config(args, section) == yaml.safe_load(text)
    assert args.output == str(tmp_path / "again")  # reusing it never points at the first run's folder
    # with a Chase flag on the command line the section is merged, not duplicated
    args, section = recipe.parse_args(["--config", str(out / "run_config.yaml"), "--density", "0.2"])
    dumped = yaml.safe_dump(recipe.run_config(args, section))
    assert yaml.safe_load(dumped)["chase"]["density"] == 0.2 and "\ndensity:" not in dumped


@pytest.mark.slow
@pytest.mark.network
def test_sigkill_after_a_shrunk_checkpoint_then_resume_equals_the_uninterrupted_run(tiny_run, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(TRAIN), *TINY, "--checkpoint-every", "1", "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    # epoch 2 ends after the first shrink (step 33): the checkpoint holds the shrunk model and optimizer state
    marker = out / "checkpoints" / "epoch_2" / "run_config.yaml"  # written after accelerate.save_state
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and marker.exists() and not (out / "model.safetensors").exists()
    hub = HubServer().start()  # the resumed run also publishes (--push-to-hub) to a local Hub server
    try:
        resumed = run([sys.executable, str(TRAIN), *TINY, "--checkpoint-every", "1", "--output", str(out),
                       "--resume", str(out / "checkpoints" / "epoch_2"), "--push-to-hub", "chase-test/digits-r18"],
                      HF_ENDPOINT=hub.url, HF_TOKEN="hf_test", HF_HUB_OFFLINE="0")
    finally:
        hub.stop()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "epoch 2, step 44" in resumed.stdout
    assert metrics(tiny_run[0])["shrinks"][0]["step"] < 44  # so the resume started from a shrunk model
    assert tensors_equal(load_file(out / "model.safetensors"), load_file(tiny_run[0] / "model.safetensors"))
    for key in ("slim_top1", "train_flops", "dense_train_flops"):  # the FLOPs integral resumes exactly too
        assert metrics(out)["final"][key] == metrics(tiny_run[0])["final"][key], key
    repo = hub.repos["chase-test/digits-r18"]
    published = repo.commits[repo.resolve("main")]
    assert "published:" in resumed.stdout and sorted(published) == sorted(MODEL_FILES)
    assert all(published[name] == (out / name).read_bytes() for name in MODEL_FILES)


def refusal(argv, capsys) -> str:
    """The recipe run in-process must stop with status 2 and one line on stderr; returns that line."""
    with fresh_accelerate(), pytest.raises(SystemExit) as exc:
        load_recipe().main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_a_checkpoint_from_before_shrinking_was_the_default_resumes_masking_only(tiny_run, tmp_path):
    """Its run_config.yaml records neither `channels_last` nor `chase.shrink`: it resumes as the masking run it was."""
    recipe = load_recipe()
    old = tmp_path / "epoch_1"
    old.mkdir()
    saved = yaml.safe_load((tiny_run[0] / "checkpoints" / "epoch_1" / "run_config.yaml").read_text())
    del saved["channels_last"], saved["chase"]["shrink"], saved["chase"]["channel_budget"]
    (old / "run_config.yaml").write_text(yaml.safe_dump(saved))
    args, section = recipe.parse_args([*TINY, "--checkpoint-every", "1", "--resume", str(old)])
    assert section["shrink"] == "off" and section["channel_budget"] == "pooled"  # one ranking, as it was then
    recipe.check_resume(args, recipe.run_config(args, section))  # no refusal
    new = recipe.parse_args([*TINY, "--resume", str(tiny_run[0] / "checkpoints" / "epoch_1")])[1]
    assert new["shrink"] == "events" and new["channel_budget"] == "per_kind"


@pytest.mark.slow
def test_resume_from_another_run_is_refused(tiny_run, tmp_path, capsys):
    checkpoint = tiny_run[0] / "checkpoints" / "epoch_1"
    line = refusal([*TINY, "--density", "0.2", "--output", str(tmp_path / "x"), "--resume", str(checkpoint)], capsys)
    assert "is from another run" in line
    assert ("'chase': ({'shrink': 'events', 'mask_init': 'random', 'channel_budget': 'per_kind'}, {'shrink': "
            "'events', 'channel_budget': 'per_kind', 'density': 0.2, 'mask_init': 'random'})") in line
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_output_holding_a_run_is_not_touched_without_overwrite(tiny_run, capsys):
    out = tiny_run[0]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    line = refusal([*TINY, "--output", str(out)], capsys)
    assert f"--output {out} already holds a previous run" in line and "--overwrite" in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    assert "not a run of this recipe" in refusal([*TINY, "--output", str(tmp_path), "--overwrite"], capsys)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_two_processes_on_a_streamed_hf_dataset(tmp_path):
    """Real gloo DDP: the streamed train split is sharded per rank, masks agree, the slim folder loads."""
    data = write_parquet_dataset(tmp_path / "pq", {"train": 256, "validation": 64})
    out = tmp_path / "ddp"
    proc = launch(["--model", "resnet18", "--img-size", "16", "--batch-size", "32", "--epochs", "2",
                   "--grad-accum-steps", "2", "--recal-batches", "2", "--data", f"hf:{data}", "--streaming",
                   "--output", str(out)], free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 256 images / 32 per micro-step = 8 micro-steps, 2 per update -> 4 optimizer steps per epoch
    assert "2 process(es)" in proc.stdout and "8 optimizer steps" in proc.stdout
    assert "streaming, 2 shard(s)" in proc.stdout
    m = metrics(out)
    assert [(e["step"], e["chase_step"]) for e in m["epochs"]] == [(4, 4), (8, 8)]
    digests = m["final"]["rank_mask_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert m["final"]["slim_top1_before_recal"] == pytest.approx(m["final"]["masked_top1"], abs=1e-6)
    slim = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert sum(p.numel() for p in slim.parameters()) == m["final"]["slim_params"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_parse_and_build_their_chase_config(path):
    recipe = load_recipe()
    args, section = recipe.parse_args(["--config", str(path)])
    steps_per_epoch = {"digits": 22, "torch/cifar100": 450}.get(args.data, 2502)
    config = chase_timm.ChaseConfig.from_epochs(epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                                                **{"seed": args.seed, **section})
    assert config.total_steps == args.epochs * steps_per_epoch
    assert config.channel_end_step < config.total_steps  # channel pruning ends before the run: the model recovers
    if args.data != "digits":
        assert config.update_interval == 1000  # the paper's Delta T_p


def test_readme_imagenet_command_gives_the_papers_schedule():
    args, section = load_recipe().parse_args(["--config", str(ROOT / "recipes/configs/resnet50_imagenet.yaml"),
                                              "--data", "imagefolder:/data/imagenet", "--output", "outputs/x"])
    assert args.data == "imagefolder:/data/imagenet" and args.batch_size == 512
    config = chase_timm.ChaseConfig.from_epochs(epochs=args.epochs, steps_per_epoch=1_281_167 // args.batch_size,
                                                **{"seed": args.seed, **section})
    assert (config.update_interval, config.channel_interval, config.channel_offset) == (1000, 5004, 500)
    assert config.channel_end_step == config.phase_b_start_step == 200_160 and config.scope == "layerwise"


def test_cifar100_config_validates_on_held_out_train_images():
    args, _ = load_recipe().parse_args(["--config", str(ROOT / "recipes/configs/resnet50_cifar100.yaml")])
    assert args.val_fraction == 0.1 and args.val_split is None  # never CIFAR's test split


def test_digits_config_is_the_default():
    recipe = load_recipe()
    args, section = recipe.parse_args(["--config", str(ROOT / "recipes/configs/resnet50_digits.yaml")])
    defaults, default_section = recipe.parse_args([])
    assert {**vars(args), "config": None} == vars(defaults)
    build = lambda chase: chase_timm.ChaseConfig.from_epochs(epochs=args.epochs, steps_per_epoch=22, **chase)
    assert build(section) == build(default_section)


@pytest.mark.slow
def test_recipe_shrinks_by_default_and_a_yaml_or_flag_turns_it_off(tmp_path):
    recipe = load_recipe()
    assert recipe.parse_args([])[1]["shrink"] == "events"
    config = tmp_path / "masking.yaml"
    config.write_text("chase:\n  shrink: off\n")  # YAML 1.1 reads a bare off as false
    assert recipe.parse_args(["--config", str(config)])[1]["shrink"] == "off"
    assert recipe.parse_args(["--config", str(config), "--shrink", "end"])[1]["shrink"] == "end"
    assert recipe.parse_args(["--shrink", "off"])[1]["shrink"] == "off"
