"""Bad input to recipes/train.py: one clear line naming the problem and the fix, before any training or file."""
from __future__ import annotations

import sys

import pytest
import yaml

from recipe_helpers import TINY, TRAIN, error_lines, fresh_accelerate, load_recipe, run, write_image_folder


def error_of(argv, capsys) -> str:
    """Run the recipe in-process; it must exit with status 2 and print exactly one line to stderr."""
    with fresh_accelerate(), pytest.raises(SystemExit) as exc:
        load_recipe().main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, err
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "val").mkdir(parents=True)
    write_image_folder(root / "tiny", {"train": 6, "val": 3})
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnt50"], "unknown timm model 'resnt50'. Close matches: "),
    (["--data", "mnist"], "unknown dataset spec --data 'mnist'; use 'digits'"),
    (["--data", "imagefolder:{root}/missing"], "{root}/missing/train does not exist"),
    (["--data", "imagefolder:{root}/empty"], "Found 0 images in subfolders of {root}/empty/train"),
    (["--data", "hf:{root}/missing"], "could not find --data hf:{root}/missing"),
    (["--density", "1.5"], "bad Chase setting: ChaseConfig.density must be in (0, 1], got 1.5"),
    (["--channel-sparsity", "1.0"], "ChaseConfig.channel_sparsity must be in [0, 1)"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--batch-size", "2000"], "--batch-size 2000 is larger than the 1437 training images of --data digits"),
    (["--data", "imagefolder:{root}/tiny", "--batch-size", "8"], "--batch-size 8 is larger than the 6 training images"),
    (["--mixup", "0.2", "--batch-size", "63"], "into even per-process batches (mixup/cutmix pair images)"),
    (["--initial-checkpoint", "{root}/none.safetensors"],
     "--initial-checkpoint '{root}/none.safetensors' is not a file"),
    (["--resume", "{root}/tiny"], "is not a checkpoint of this recipe"),
    (["--data", "hf:{root}/tiny", "--streaming", "--workers", "2"], "--streaming reads with --workers 0"),
    (["--data", "hf:{root}/tiny", "--streaming", "--val-fraction", "0.2"], "cannot hold out --val-fraction"),
    (["--initial-checkpoint", "{root}/garbage.safetensors"], "is not a plain state dict of tensors"),
    (["--log-with", "nosuchtracker"], "--log-with 'nosuchtracker' is not one of: all"),
    (["--opt", "adamx"], "--opt 'adamx' is not a timm optimizer (close: adamax"),
    (["--sched", "plateau"], "--sched 'plateau' is not one of: cosine, tanh, step, multistep"),
    (["--clip-mode", "agc2"], "--clip-mode: invalid choice: 'agc2' (choose from 'norm', 'value', 'agc')"),
    (["--remode", "zero"], "--remode: invalid choice: 'zero' (choose from 'const', 'rand', 'pixel')"),
    (["--aa", "autoaug"], "--aa 'autoaug' is not a timm AutoAugment policy"),
    (["--drop-path", "1.5"], "--drop-path must be in [0, 1], got 1.5"),
    (["--grad-accum", "0"], "--grad-accum-steps must be >= 1, got 0"),
])
def test_bad_input_is_one_clear_line_before_any_work(folders, tmp_path, capsys, argv, message):
    argv = [a.format(root=folders) for a in argv]
    line = error_of([*TINY, *argv, "--output", str(tmp_path / "out")], capsys)
    assert message.format(root=folders) in line
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("other", ["resnet34", "resnet50"])  # extra tensors; tensors of other shapes
def test_initial_checkpoint_of_another_architecture_is_refused(tmp_path, capsys, other):
    import timm
    from safetensors.torch import save_file
    save_file(timm.create_model(other, num_classes=10).state_dict(), str(tmp_path / "other.safetensors"))
    line = error_of([*TINY, "--initial-checkpoint", str(tmp_path / "other.safetensors"), "--output",
                     str(tmp_path / "out")], capsys)
    assert "could not build resnet18 with its starting weights" in line and "another architecture" in line


@pytest.mark.parametrize("config, message", [
    ({"learning_rate": 0.1}, "unknown training key(s) ['learning_rate']"),
    ({"density": 0.1}, "unknown training key(s) ['density']"),
    ({"output": "runs/x"}, "unknown training key(s) ['output']"),
    ({"epochs": "ten"}, "epochs: 'ten' is not a valid int"),
    ({"chase": {"densty": 0.1}}, "unknown `chase:` key(s) ['densty']"),
    ({"clip_mode": "agc2"}, "--clip-mode 'agc2' is not one of: norm, value, agc"),  # argparse skips YAML values
    ({"mixed_precision": "fp8"}, "--mixed-precision 'fp8' is not one of: no, fp16, bf16"),
    ({"log_with": "nosuchtracker"}, "--log-with 'nosuchtracker' is not one of: all"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        load_recipe().parse_args(["--config", str(path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_under_accelerate_launch_the_error_is_the_only_output(tmp_path):
    """`accelerate launch -q` leaves the recipe's line alone (without -q Accelerate adds its CalledProcessError)."""
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN), *TINY, "--data", "mnist",
                "--output", str(tmp_path / "out")])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert lines == ["error: unknown dataset spec --data 'mnist'; use " + lines[0].split("; use ", 1)[1]], lines


def test_a_model_compiled_by_accelerate_cannot_shrink_and_the_error_says_what_to_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")  # what `accelerate launch --dynamo_backend eager` sets
    line = error_of([*TINY, "--output", str(tmp_path / "run")], capsys)
    assert "not OptimizedModule" in line and "--shrink off" in line and "--dynamo_backend no" in line
    assert not (tmp_path / "run").exists()


def test_an_optimizer_refused_for_shrinking_gets_the_recipes_own_switch(tmp_path, capsys):
    """Under the default --shrink events, a size-dependent optimizer is refused in one line naming --shrink off."""
    line = error_of([*TINY, "--opt", "cadamw", "--output", str(tmp_path / "run")], capsys)
    assert "timm.optim" in line and "--shrink off" in line and "--dynamo_backend" not in line
