"""recipes/zoo.py: the manifest is real (timm tags, recipe flags, Chase schedules) and the command runs end to end at
toy scale: tiny models from self-made "pretrained" weights, trained, measured, published to a local Hub server and
loaded back with timm, with a results CSV in timm's results/ shape.
"""
from __future__ import annotations

import csv
import math
import sys

import pytest
import timm
import yaml
from safetensors.torch import save_file

import chase_timm
import zoo
from hub_fixtures import run_python
from hub_server import HubServer
from recipe_helpers import ROOT, run
from train_flags import parse_args, run_config

MANIFEST = ROOT / "recipes" / "zoo.yaml"
IMAGENET_TRAIN = 1_281_167
TOY = {"defaults": {"data": "digits", "img_size": 32, "epochs": 1, "max_steps": 4, "batch_size": 64,
                    "recal_batches": 1, "lr": 0.01, "chase": {"density": 0.5, "channel_sparsity": 0.5}},
       "models": [{"name": "toy-resnet10t", "model": "resnet10t", "initial_checkpoint": "resnet10t.safetensors"},
                  {"name": "toy-mobilenetv3_small_050", "model": "mobilenetv3_small_050",
                   "initial_checkpoint": "mobilenetv3_small_050.safetensors"},
                  # another architecture's weights: train.py refuses them; the row says so and the zoo goes on
                  {"name": "toy-wrong-weights", "model": "resnet10t",
                   "initial_checkpoint": "mobilenetv3_small_050.safetensors"}]}


def manifest_entries() -> list:
    return zoo.entry_configs(yaml.safe_load(MANIFEST.read_text()), {"chase": {}}, None)


def test_manifest_names_the_issue_families_with_timm_pretrained_tags():
    entries = manifest_entries()
    tags = [e["model"] for e in entries]
    assert set(tags) <= set(timm.list_pretrained()), sorted(set(tags) - set(timm.list_pretrained()))
    for family in ("resnet50.", "convnext_tiny.", "vit_small_patch16_224."):
        assert any(t.startswith(family) for t in tags), family
    assert any(t.startswith(("efficientnet", "mobilenet")) for t in tags)
    assert len({e["name"] for e in entries}) == len(entries)  # one Hub repo and folder each
    assert all(0 < e["config"]["chase"]["channel_sparsity"] < 1 for e in entries)
    vit = next(e for e in entries if e["model"].startswith("vit_"))
    assert vit["config"]["layer_decay"] < 1


@pytest.mark.parametrize("entry", manifest_entries(), ids=lambda e: e["name"])
def test_manifest_entry_parses_with_the_recipe_and_gives_a_valid_chase_schedule(entry, tmp_path):
    """The recipe's own parser and checks accept the entry's flags (nothing runs), and its epoch-valued Chase
    schedule is a valid ChaseConfig on ImageNet's epoch size with the weight-based masks --pretrained uses."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(entry["config"]))
    args, chase = parse_args(zoo.train_argv(entry, config_file, tmp_path / "out", f"org/{entry['name']}", False))
    assert args.pretrained and args.model == entry["model"] and args.push_to_hub == f"org/{entry['name']}"
    assert run_config(args, chase)["chase"]["channel_sparsity"] == entry["config"]["chase"]["channel_sparsity"]
    steps_per_epoch = IMAGENET_TRAIN // args.batch_size  # as train.py computes it (no --grad-accum-steps here)
    config = chase_timm.ChaseConfig.from_epochs(epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                                                total_steps=math.floor(args.epochs * steps_per_epoch),
                                                **{"seed": args.seed, "mask_init": "magnitude", **chase})
    assert config.channel_start_step < config.channel_end_step <= config.phase_b_start_step <= config.total_steps


@pytest.mark.parametrize("argv, message", [
    (["--only", "no-such-model", "--no-push"], "not in the manifest"),
    ([], "--hub-org"),
    (["--no-push", "--override", "lr"], "expected KEY=VALUE"),
    (["--no-push", "--docs", str(ROOT / "docs" / "hub.md")], "zoo-table:start"),
    (["--no-push", "--manifest", str(ROOT / "recipes" / "configs" / "resnet50_imagenet.yaml")], "no `models:`"),
])
def test_bad_zoo_input_is_one_line_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        zoo.main([*argv, "--output", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "results.csv").exists()


@pytest.mark.slow  # three recipe runs in subprocesses: about 80 s on two shared cores
@pytest.mark.network
def test_zoo_runs_end_to_end_at_toy_scale_and_publishes_loadable_models(tmp_path):
    for arch in ("resnet10t", "mobilenetv3_small_050"):  # self-made "pretrained" dense weights
        save_file(timm.create_model(arch, num_classes=10).state_dict(), str(tmp_path / f"{arch}.safetensors"))
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(yaml.safe_dump(TOY, sort_keys=False))
    docs = tmp_path / "zoo.md"
    docs.write_text(f"# zoo\n\n{zoo.TABLE_START}\n{zoo.TABLE_END}\n\nafter\n")
    hub = HubServer().start()
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    try:
        proc = run([sys.executable, "recipes/zoo.py", "--manifest", str(manifest), "--output", str(tmp_path / "out"),
                    "--hub-org", "chase-test", "--docs", str(docs)], timeout=600, **env)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the wrong-weights entry failed
        rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
        assert list(rows[0]) == zoo.COLUMNS and [r["base"] for r in rows] == ["resnet10t", "mobilenetv3_small_050",
                                                                              "resnet10t"]
        good, bad = rows[:2], rows[2]
        assert "does not fit" in bad["error"] and not bad["top1"] and not bad["hub_id"]  # nothing published
        for row in good:
            assert not row["error"] and row["model"] == row["hub_id"] and row["hub_id"].startswith("chase-test/")
            top1, top5 = float(row["top1"]), float(row["top5"])
            assert 0 <= top1 <= top5 <= 100 and math.isclose(float(row["top1_err"]), 100 - top1, abs_tol=1e-3)
            assert row["img_size"] == "32" and int(row["val_images"]) == 360 and float(row["throughput"]) > 0
            assert 0 < float(row["dense_flops_ratio"]) < 1  # channels were removed
            assert 0 <= float(row["dense_top1"]) <= 100  # the starting weights have a 10-class head: measured
            folder = tmp_path / "out" / row["hub_id"].split("/")[1]
            slim = timm.create_model(f"local-dir:{folder}", pretrained=True)
            dense_params = sum(p.numel() for p in timm.create_model(row["base"], num_classes=10).parameters())
            assert math.isclose(float(row["param_count"]), sum(p.numel() for p in slim.parameters()) / 1e6,
                                abs_tol=0.005) and float(row["param_count"]) < dense_params / 1e6
            card = (folder / "README.md").read_text()  # names the starting checkpoint in its opening paragraph
            assert f"Fine-tuned from the local checkpoint {row['base']}.safetensors (sha256 " in card.split("## Usage")[0]
        assert "toy-resnet10t" in docs.read_text() and docs.read_text().endswith("after\n")
        code = "\n".join(["import chase_timm, timm, torch"] + [
            f"m = timm.create_model('hf-hub:{r['hub_id']}', pretrained=True).eval(); "
            f"assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)" for r in good])
        run_python(code, env)  # a fresh process and cache: downloads from the local server
    finally:
        hub.stop()
