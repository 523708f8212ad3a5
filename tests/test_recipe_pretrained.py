"""recipes/train.py from pretrained weights: --pretrained / --initial-checkpoint switch to magnitude masks under the
density ramp and say so first; the card names the start; one-shot masks recalibrate BN; timm's
logit distillation from a frozen dense teacher; bad starts are one line."""
from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import chase_timm
import chase_timm.slim
import chase_timm.training
from recipe_helpers import ROOT, TINY, load_recipe, metrics
from test_recipe_errors import error_of
from test_recipe_flags import train_in_process

FINETUNE_CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*finetune*.yaml")) + \
    [ROOT / "recipes" / "configs" / "resnet50_cifar100_transfer.yaml"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Dense resnet18 weights for 10 classes (the digits) and for 1000 (an ImageNet-shaped start)."""
    root = tmp_path_factory.mktemp("start")
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), str(root / "dense10.safetensors"))
    save_file(timm.create_model("resnet18").state_dict(), str(root / "dense1000.safetensors"))
    return root


def test_initial_checkpoint_starts_dense_under_the_ramp_says_so_and_names_the_checkpoint(checkpoints, tmp_path):
    start = checkpoints / "dense10.safetensors"
    seen = {}
    wrap = chase_timm.Chase.__init__

    def spy_wrap(self, model, *args, **kwargs):
        wrap(self, model, *args, **kwargs)
        seen["density_at_wrap"], seen["config"] = self.stats()["density"], self.config

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chase_timm.Chase, "__init__", spy_wrap)
        printed = train_in_process([*TINY, "--epochs", "2", "--max-steps", "6", "--initial-checkpoint", str(start),
                                    "--output", str(out)])
    config = seen["config"]
    assert config.mask_init == "magnitude" and config.ramp_steps == 4 and seen["density_at_wrap"] == 1.0
    assert printed.splitlines()[0] == (
        f"starting from the local checkpoint {start}: mask_init=magnitude, density ramp 1 -> 0.1 over 4 steps "
        "(cubic), channel events from step 3; lr 0.002; no KD")
    history = metrics(out)["steps"]
    assert history[0]["density"] == 1.0 and history[-1]["density"] == pytest.approx(0.1, abs=0.01)
    run = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run["chase"]["mask_init"] == "magnitude"
    card = (out / "README.md").read_text()
    sha = hashlib.sha256(start.read_bytes()).hexdigest()[:12]
    body = card.split("## Usage")[0]  # named in the card's opening paragraph, not only in the recipe's YAML
    assert f"\nFine-tuned from the local checkpoint dense10.safetensors (sha256 {sha}).\n" in body
    assert "base_model" not in card.split("---")[1]  # a local start has no Hub id: named in the body only


def test_pretrained_names_the_hub_checkpoint_and_its_new_classifier_and_the_card_cites_it(tmp_path):
    """--pretrained on a timm checkpoint whose pretrained_cfg has an hf_hub_id (a local-dir: copy: nothing can be
    downloaded here) for 1000 classes, trained on the 10 digits: the first line names both, the card's base_model
    is the Hub id."""
    from timm.models import save_for_hf
    save_for_hf(timm.create_model("resnet18"), str(tmp_path / "r18"), safe_serialization=True)
    config = json.loads((tmp_path / "r18" / "config.json").read_text())
    config["pretrained_cfg"]["hf_hub_id"] = "timm/resnet18.a1_in1k"
    (tmp_path / "r18" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    printed = train_in_process([*TINY, "--model", f"local-dir:{tmp_path / 'r18'}", "--pretrained", "--epochs", "1",
                                "--max-steps", "2", "--recal-batches", "1", "--output", str(out)])
    assert printed.startswith("starting from pretrained weights timm/resnet18.a1_in1k (classifier re-initialised "
                              "for 10 classes: fc.bias, fc.weight): mask_init=magnitude, density ramp 1 -> 0.1 over 2 "
                              "steps")
    card = (out / "README.md").read_text()
    assert "base_model: timm/resnet18.a1_in1k" in card.split("---")[1]
    assert "Fine-tuned from the pretrained checkpoint [`timm/resnet18.a1_in1k`]" in card.split("## Usage")[0]


def test_pretrained_weights_without_a_hub_id_are_named_in_the_card_body(tmp_path):
    from timm.models import save_for_hf
    save_for_hf(timm.create_model("resnet18", num_classes=10), str(tmp_path / "r18"), safe_serialization=True)
    out = tmp_path / "run"
    train_in_process([*TINY, "--model", f"local-dir:{tmp_path / 'r18'}", "--pretrained", "--epochs", "1",
                      "--max-steps", "2", "--recal-batches", "1", "--output", str(out)])
    card = (out / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]
    assert "\nFine-tuned from the pretrained weights in the local folder r18.\n" in card.split("## Usage")[0]


def test_starting_weights_switch_defaults_unless_set(checkpoints, tmp_path):
    recipe = load_recipe()
    start = ["--initial-checkpoint", str(checkpoints / "dense10.safetensors")]
    args, chase = recipe.parse_args(start)
    assert chase["mask_init"] == "magnitude" and args.kd_model_name is None  # KD stays off by default
    args, chase = recipe.parse_args([*start, "--mask-init", "random", "--ramp-steps", "0"])
    assert chase["mask_init"] == "random" and chase["ramp_steps"] == 0
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"chase": {"mask_init": "random"}}))
    args, chase = recipe.parse_args([*start, "--config", str(tmp_path / "c.yaml")])
    assert chase["mask_init"] == "random"  # YAML values count as set
    args, chase = recipe.parse_args([])  # from scratch: the paper's draw
    assert chase["mask_init"] == "random"


def test_a_run_from_weights_recorded_before_these_defaults_resumes_with_its_own_command(checkpoints, tmp_path):
    # its run_config has no mask_init (it drew random masks); resuming with the command the refusal suggests works
    recipe = load_recipe()
    old = tmp_path / "checkpoints" / "epoch_1"
    old.mkdir(parents=True)
    args, chase = recipe.parse_args(["--initial-checkpoint", str(checkpoints / "dense10.safetensors")])
    run = recipe.run_config(args, {k: v for k, v in chase.items() if k != "mask_init"})
    (old / "run_config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    args, chase = recipe.parse_args(["--config", str(old / "run_config.yaml"), "--resume", str(old)])
    assert chase["mask_init"] == "random"
    recipe.check_resume(args, recipe.run_config(args, chase))  # no "from another run" refusal


@pytest.mark.parametrize("argv, message", [
    (["--model", "botnet50ts_256", "--pretrained"],
     "--pretrained: timm has no pretrained weights for 'botnet50ts_256'; list the ones it has with "
     "timm.list_pretrained('botnet50ts_256*')"),
    (["--kd-model-name", "dense"], "--kd-model-name dense distils from the dense starting model: pass --pretrained"),
    (["--kd-model-name", "botnet50ts_256"], "--kd-model-name: timm has no pretrained weights for 'botnet50ts_256'"),
    (["--initial-checkpoint", "{root}/dense1000.safetensors", "--kd-model-name", "dense"],
     "--kd-model-name dense: the starting model's classifier was re-initialised (['fc.bias', 'fc.weight'])"),
    (["--mask-init", "gaussian"], "--mask-init: invalid choice: 'gaussian'"),
    (["--channel-cost", "flop"], "--channel-cost: invalid choice: 'flop' (choose from"),
    (["--ramp-steps", "-1"], "--ramp-steps must be >= 0"),
])
def test_bad_starts_are_one_line_before_any_work(checkpoints, tmp_path, capsys, argv, message):
    argv = [a.format(root=checkpoints) for a in argv]
    line = error_of([*TINY, *argv, "--output", str(tmp_path / "out")], capsys)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_a_teacher_for_other_classes_is_refused_before_training(checkpoints, tmp_path, capsys):
    from timm.models import save_for_hf
    save_for_hf(timm.create_model("resnet18"), str(tmp_path / "teacher"), safe_serialization=True)  # 1000 classes
    line = error_of([*TINY, "--initial-checkpoint", str(checkpoints / "dense10.safetensors"), "--kd-model-name",
                     f"local-dir:{tmp_path / 'teacher'}", "--output", str(tmp_path / "out")], capsys)
    assert line == (f"error: --kd-model-name local-dir:{tmp_path / 'teacher'}: the teacher predicts 1000 classes, "
                    "the data has 10; use a teacher fine-tuned on this data")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_teacher_for_another_input_size_is_refused_before_training(checkpoints, tmp_path, capsys):
    from timm.models import save_for_hf
    save_for_hf(timm.create_model("vit_tiny_patch16_224", num_classes=10), str(tmp_path / "teacher"),
                safe_serialization=True)  # built for 224 px; TINY runs at 16
    line = error_of([*TINY, "--initial-checkpoint", str(checkpoints / "dense10.safetensors"), "--kd-model-name",
                     f"local-dir:{tmp_path / 'teacher'}", "--output", str(tmp_path / "out")], capsys)
    assert line.startswith(f"error: --kd-model-name local-dir:{tmp_path / 'teacher'}: the teacher does not take this "
                           "data's (3, 16, 16) inputs (") and line.endswith("use a teacher built for this input size")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.stem)
def test_finetune_configs_start_from_timm_weights_with_the_ramp(path):
    args, section = load_recipe().parse_args(["--config", str(path)])
    assert args.pretrained and timm.models.is_model_pretrained(args.model) and section["mask_init"] == "magnitude"
    steps_per_epoch = 1_281_167 // args.batch_size if "imagefolder" in args.data else 45_000 // args.batch_size
    config = chase_timm.ChaseConfig.from_epochs(epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                                                **{"seed": args.seed, **section})
    assert 0 < config.channel_start_step <= config.ramp_steps and config.channel_start_step < config.channel_end_step \
        < config.total_steps  # channels start late in the ramp (two thirds of it by default)
    assert args.epochs <= 30 and args.lr < 0.05
    if "vit" in args.model:
        assert args.layer_decay and hasattr(timm.create_model(args.model, pretrained=False), "group_matcher")


@pytest.mark.slow
def test_distillation_from_the_dense_start_trains_and_leaves_the_teacher_untouched(checkpoints, tmp_path):
    """--kd-model-name dense: timm's LogitDistillationTask with a frozen copy of the starting weights (its input
    normalisation an identity); one-shot masks (--ramp-steps 0) recalibrate BN right after wrapping."""
    start = checkpoints / "dense10.safetensors"
    seen = {"tasks": [], "recal": [], "kd": []}
    make, recal = chase_timm.training.distillation_task, chase_timm.slim.recalibrate_batchnorm

    def spy_task(*args, **kwargs):
        task = make(*args, **kwargs)
        seen["tasks"].append((task, kwargs))
        forward = task.forward

        def kd_forward(x, y):
            result = forward(x, y)
            seen["kd"].append(float(result["kd_loss"]))
            return result
        task.forward = kd_forward
        return task

    def spy_recal(model, batches, num_batches=None):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        seen["recal"].append(sum(int(w.count_nonzero()) for w in convs) / sum(w.numel() for w in convs))
        return recal(model, batches, num_batches)

    out = tmp_path / "kd"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chase_timm.training, "distillation_task", spy_task)
        mp.setattr(chase_timm.slim, "recalibrate_batchnorm", spy_recal)
        printed = train_in_process([*TINY, "--epochs", "1", "--max-steps", "4", "--initial-checkpoint", str(start),
                                    "--kd-model-name", "dense", "--kd-temperature", "2", "--distill-loss-weight",
                                    "0.5", "--ramp-steps", "0", "--output", str(out)])
    assert "mask_init=magnitude, one-shot at density 0.1, BN statistics recalibrated on 2 train batches" in printed
    assert "KD from dense (T=2)" in printed.splitlines()[0]
    (task, kwargs), = seen["tasks"]
    assert (task.temperature, task.distill_loss_weight, task.task_loss_weight) == (2.0, 0.5, 1.0)
    teacher = task.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(task.student_mean, task.teacher.mean_kd) and torch.equal(task.student_std, task.teacher.std_kd)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in load_file(str(start)).items())  # never trained
    assert len(seen["kd"]) == 4 and seen["kd"][-1] > 0  # the student moved away from its teacher
    assert len(seen["recal"]) == 2 and seen["recal"][0] < 0.2  # right after the one-shot masking; then the slim's
    assert metrics(out)["final"]["slim_top1"] > 0
