"""Every optional flag of recipes/train.py does what it says (in-process runs; spies only record real calls)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from safetensors.torch import save_file
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath

import chase_timm
import chase_timm.data
from chase_timm.data import set_transform
from recipe_helpers import TINY, fresh_accelerate, load_recipe, metrics, write_parquet_dataset

pytestmark = pytest.mark.slow  # nearly every test here runs the recipe in process

# timm train.py flags, each with a value its default does not have, checked where it lands
TIMM_FLAGS = ["--drop", "0.25", "--drop-path", "0.1", "--aa", "rand-m9-mstd0.5", "--reprob", "0.5", "--remode", "pixel",
              "--recount", "2", "--opt", "rmsprop", "--momentum", "0.8", "--opt-eps", "1e-4", "--layer-decay", "0.7",
              "--warmup-lr", "1e-4", "--min-lr", "5e-4"]


def train_in_process(argv, monkeypatch=None) -> str:
    """recipes/train.py's main() in this process; returns what it printed."""
    stdout = io.StringIO()
    with fresh_accelerate(), contextlib.redirect_stdout(stdout):
        load_recipe().main(argv)
    return stdout.getvalue()


@pytest.fixture(scope="module")
def flagged_run(tmp_path_factory):
    """One run with --log-with tensorboard --model-ema --mixup --cutmix --clip-grad/--clip-mode --initial-checkpoint
    --channels-last and timm's model, augmentation, optimizer and schedule flags."""
    root = tmp_path_factory.mktemp("flags")
    start = timm.create_model("resnet18")  # ImageNet-shaped (1000 classes): the classifier cannot be reused
    save_file(start.state_dict(), str(root / "start.safetensors"))
    seen = {"mixup": [], "clip": [], "stem_at_wrap": None, "transforms": []}
    mix, clip, wrap = Mixup.__call__, Accelerator.clip_grad_value_, chase_timm.Chase.__init__

    def spy_mix(self, x, target):
        x, target = mix(self, x, target)
        seen["mixup"].append((self.mixup_alpha, self.cutmix_alpha, tuple(target.shape)))
        return x, target

    def spy_clip(self, parameters, clip_value):
        seen["clip"].append(clip_value)
        return clip(self, parameters, clip_value)

    def spy_wrap(self, model, *args, **kwargs):
        seen["stem_at_wrap"] = dict(model.named_parameters())["conv1.weight"].detach().clone()
        seen["channels_last"] = all(p.is_contiguous(memory_format=torch.channels_last)
                                    for p in model.parameters() if p.dim() == 4)
        seen["model"], seen["optimizer"] = model, kwargs["optimizer"]
        wrap(self, model, *args, **kwargs)

    def spy_transform(dataset, transform):
        seen["transforms"].append(transform)
        return set_transform(dataset, transform)

    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Mixup, "__call__", spy_mix)
        mp.setattr(Accelerator, "clip_grad_value_", spy_clip)
        mp.setattr(chase_timm.Chase, "__init__", spy_wrap)
        mp.setattr(chase_timm.data, "set_transform", spy_transform)  # the recipe imports it when loaded
        printed = train_in_process([*TINY, "--epochs", "2", "--max-steps", "6", "--log-with", "tensorboard",
                                    "--model-ema", "--mixup", "0.2", "--cutmix", "0.3", "--clip-grad", "1.0",
                                    "--clip-mode", "value", "--initial-checkpoint", str(root / "start.safetensors"),
                                    "--channels-last", *TIMM_FLAGS, "--recal-batches", "0", "--output", str(out)])
    return out, printed, seen, start


def test_initial_checkpoint_starts_from_its_dense_weights(flagged_run):
    out, printed, seen, start = flagged_run
    assert torch.equal(seen["stem_at_wrap"], start.conv1.weight)  # loaded before Chase masked anything
    assert "classifier re-initialised for 10 classes: fc.bias, fc.weight" in printed  # 1000 -> 10


def test_channels_last_trains_in_that_layout_and_publishes_a_loadable_model(flagged_run):
    out, _, seen, _ = flagged_run
    assert seen["channels_last"]  # every 4-d weight, as Chase and the optimizer see it
    final = metrics(out)["final"]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)  # saved NCHW (safetensors), loads as timm's
    assert sum(p.numel() for p in loaded.parameters()) == final["slim_params"]


def test_mixup_and_cutmix_mix_every_batch_with_soft_targets(flagged_run):
    mixed = flagged_run[2]["mixup"]
    assert len(mixed) == 6 and all(m == (0.2, 0.3, (64, 10)) for m in mixed)


def test_clip_grad_clips_every_optimizer_step_in_the_clip_mode(flagged_run):
    assert flagged_run[2]["clip"] == [1.0] * 6  # --clip-mode value: Accelerate's clip_grad_value_


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clip_modes_clip_as_timm_does(mode):
    """clip_gradients(accelerator, ..., mode) leaves the gradients timm's dispatch_clip_grad leaves."""
    from timm.utils import dispatch_clip_grad

    from chase_timm.training import clip_gradients

    torch.manual_seed(0)
    model, reference = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    model(torch.randn(16, 8)).pow(2).sum().mul(50).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = p.grad.clone()
    unclipped = model.weight.grad.clone()
    with fresh_accelerate():
        accelerator = Accelerator(cpu=True)
        clip_gradients(accelerator, accelerator.prepare(model).parameters(), 0.05, mode)
    dispatch_clip_grad(reference.parameters(), 0.05, mode=mode)
    assert not torch.equal(model.weight.grad, unclipped)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))


def test_timm_model_flags_reach_the_model(flagged_run):
    model = flagged_run[2]["model"]
    assert model.drop_rate == 0.25  # --drop
    drop_paths = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert drop_paths and max(drop_paths) == pytest.approx(0.1)  # --drop-path: timm's per-block ramp up to it


def test_timm_augmentation_flags_reach_the_train_transform(flagged_run):
    train, val = flagged_run[2]["transforms"]
    steps = train.transforms
    assert any(isinstance(t, RandAugment) for t in steps)  # --aa rand-m9-mstd0.5
    erasing = [t for t in steps if isinstance(t, RandomErasing)]
    assert len(erasing) == 1 and (erasing[0].probability, erasing[0].mode, erasing[0].max_count) == (0.5, "pixel", 2)
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in val.transforms)


def test_timm_optimizer_flags_reach_the_optimizer(flagged_run):
    optimizer = flagged_run[2]["optimizer"].optimizer  # Accelerate's wrapper around timm's choice
    assert isinstance(optimizer, torch.optim.RMSprop)  # --opt rmsprop
    assert {(g["momentum"], g["eps"]) for g in optimizer.param_groups} == {(0.8, 1e-4)}  # --momentum, --opt-eps
    scales = sorted({round(g["lr_scale"], 6) for g in optimizer.param_groups})  # --layer-decay 0.7 per layer group
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[-2] == pytest.approx(0.7)


def test_timm_schedule_flags_reach_the_scheduler(flagged_run):
    """--warmup-lr starts the warm-up (3 of 6 steps), --min-lr ends the cosine; each group scaled by its lr_scale."""
    steps = metrics(flagged_run[0])["steps"]
    scale = flagged_run[2]["optimizer"].optimizer.param_groups[0]["lr_scale"]
    assert steps[0]["lr"] == pytest.approx((1e-4 + (2e-3 - 1e-4) / 3) * scale)
    assert steps[-1]["step"] == 6 and steps[-1]["lr"] == pytest.approx(5e-4 * scale)


def test_model_ema_is_masked_checkpointed_and_published(flagged_run):
    out = flagged_run[0]
    m = metrics(out)
    assert m["final"]["ema"] is True and "ema_val_top1" in m["epochs"][-1]
    assert m["final"]["masked_top1"] == m["epochs"][-1]["ema_val_top1"]  # the published slim model is the EMA's
    assert m["final"]["slim_top1_before_recal"] == pytest.approx(m["final"]["masked_top1"], abs=1e-6)
    checkpoint = out / "checkpoints" / "epoch_1"
    saved = torch.load(checkpoint / "chase_timm_state.pt", weights_only=True)  # no pickle beyond tensors/numbers
    assert sorted(saved) == ["chase", "ema", "loop", "train_flops"]
    ema_state, chase_state = saved["ema"], saved["chase"]
    for name, mask in chase_state["masks"].items():
        assert not ema_state[f"module.{name}"][~mask].any(), name  # the EMA copy is masked


def test_tensorboard_logs_scalars_and_the_flat_config(flagged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted((flagged_run[0] / "chase_timm").rglob("events.out.tfevents.*"))
    assert logs, "no TensorBoard event file"
    scalars = set()
    for log in logs:
        acc = EventAccumulator(str(log))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"val_top1", "train_loss", "density", "channel_sparsity", "ema_val_top1"} <= scalars
    raw = b"".join(log.read_bytes() for log in logs)
    assert b"hparams" in raw and b"chase.density" in raw and b"chase.exclude" in raw


def test_fp16_skipped_steps_advance_neither_the_schedule_nor_chase(tmp_path, monkeypatch):
    """An optimizer step skipped for overflow (what GradScaler reports) counts for neither the loop nor Chase."""
    calls = {"n": 0}
    step = AcceleratedOptimizer.step

    def skip_third(self, closure=None):
        if self.gradient_state.sync_gradients:
            calls["n"] += 1
            self._is_overflow = calls["n"] == 3
            if self._is_overflow:
                return None
        return step(self, closure)

    monkeypatch.setattr(AcceleratedOptimizer, "step", skip_third)
    out = tmp_path / "run"
    printed = train_in_process(["--model", "resnet18", "--batch-size", "64", "--epochs", "1", "--max-steps", "5",
                                "--recal-batches", "1", "--output", str(out)])
    assert "input (3, 32, 32)" in printed  # digits default to 32 px whatever the model's pretrained size
    m = metrics(out)
    assert m["final"]["skipped_steps"] == 1 and calls["n"] == 6
    assert m["epochs"][-1]["step"] == m["epochs"][-1]["chase_step"] == 5
    assert m["steps"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ended exactly at step 5


def test_hf_parquet_dataset_and_the_models_own_input_size(tmp_path):
    data = write_parquet_dataset(tmp_path / "pq", {"train": 32, "validation": 16})
    out = tmp_path / "run"
    printed = train_in_process(["--model", "mobilenetv3_small_050", "--data", f"hf:{data}", "--batch-size", "16",
                                "--epochs", "1", "--recal-batches", "1", "--output", str(out)])
    assert "input (3, 224, 224)" in printed and "32 train / 16 val images, 10 classes" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224] and config["num_classes"] == 10


def test_val_fraction_holds_out_part_of_train(tmp_path):
    data = write_parquet_dataset(tmp_path / "pq", {"train": 40})
    out = tmp_path / "run"
    printed = train_in_process(["--model", "resnet18", "--img-size", "16", "--data", f"hf:{data}", "--val-fraction",
                                "0.25", "--batch-size", "10", "--epochs", "1", "--recal-batches", "1",
                                "--output", str(out)])
    assert "(25% held out): 30 train / 10 val images" in printed


def test_dense_baseline_and_pretrained_weights_from_a_timm_folder(tmp_path):
    """--density 1 --channel-sparsity 0 trains the dense model; --pretrained loads a timm model's own weights
    (here from a local-dir: folder, the offline equivalent of a Hub name)."""
    from timm.models import save_for_hf
    start = timm.create_model("resnet18")
    save_for_hf(start, str(tmp_path / "r18"), safe_serialization=True)
    seen = {}
    wrap = chase_timm.Chase.__init__

    def spy_wrap(self, model, *args, **kwargs):
        seen["stem"] = dict(model.named_parameters())["conv1.weight"].detach().clone()
        wrap(self, model, *args, **kwargs)

    out = tmp_path / "dense"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chase_timm.Chase, "__init__", spy_wrap)
        train_in_process([*TINY, "--model", f"local-dir:{tmp_path / 'r18'}", "--pretrained", "--density", "1",
                          "--channel-sparsity", "0", "--max-steps", "3", "--output", str(out)])
    assert torch.equal(seen["stem"], start.conv1.weight)
    final = metrics(out)["final"]
    assert final["base_params"] == final["slim_params"] and final["base_sparse_flops"] == final["base_dense_flops"]
    assert final["slim_top1_before_recal"] == pytest.approx(final["masked_top1"], abs=1e-6)


def test_timm_hfds_spec_reads_a_local_dataset(tmp_path):
    from chase_timm.data import load_image_data
    data = load_image_data(f"hfds/{write_parquet_dataset(tmp_path / 'pq', {'train': 12, 'validation': 5})}")
    assert (data.train_size, len(data.val), data.num_classes) == (12, 5, 10)


def test_a_vit_is_built_for_the_digits_size_and_reloads_at_it(tmp_path):
    """ViTs fix their patch grid at construction: the recipe builds them for --img-size (32 px on digits), and
    the saved slim model rebuilds at that size; recipes/benchmark_shrink.py --checkpoint rebuilds the run as it was
    built (size, class count of a dense classifier) and times it at that size."""
    import benchmark_shrink

    out = tmp_path / "vit"
    (tmp_path / "dense_head.yaml").write_text("chase:\n  exclude: [head]\n")  # no mask names the class count
    printed = train_in_process(["--model", "vit_tiny_patch16_224", "--batch-size", "32", "--epochs", "1",
                                "--max-steps", "2", "--recal-batches", "1", "--checkpoint-every", "1",
                                "--config", str(tmp_path / "dense_head.yaml"), "--output", str(out)])
    assert "input (3, 32, 32)" in printed
    slim = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    final = metrics(out)["final"]
    assert sum(p.numel() for p in slim.parameters()) == final["slim_params"]
    assert slim(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    rows = benchmark_shrink.main(["--checkpoint", str(out / "checkpoints" / "epoch_1"), "--plain", "--batch-size",
                                  "2", "--repeats", "1", "--steps", "1", "--layouts", "nchw",
                                  "--json", str(tmp_path / "b.json")])
    assert rows[0]["model"] == "vit_tiny_patch16_224" and rows[0]["img_size"] == 32
    assert rows[0]["flops_ratio"] == pytest.approx(final["slim_dense_flops"] / final["base_dense_flops"], rel=1e-6)


def test_streamed_rows_per_rank_never_exceed_the_smallest_shard_share(tmp_path, monkeypatch):
    """Whole shards dealt to ranks (their number divides by the world size): every rank may get the smallest ones,
    so each rank reads at most that many rows and no rank waits for another in DDP."""
    import datasets.config

    from chase_timm.data import load_image_data

    # datasets sleeps 5 s after every parquet stream (arrow#45214: reader threads outliving the interpreter, so at
    # exit); this process goes on, and 0.1 s is what that issue found enough, so the six streams below take 0.6 s
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)
    write_parquet_dataset(tmp_path, {"train": 7, "validation": 2})
    write_parquet_dataset(tmp_path / "b", {"train": 3})
    (tmp_path / "data" / "train-00000-of-00001.parquet").rename(tmp_path / "data" / "train-00000-of-00002.parquet")
    (tmp_path / "b" / "data" / "train-00000-of-00001.parquet").rename(tmp_path / "data" / "train-00001-of-00002.parquet")

    def rows(world_size: int) -> list:
        """Rows each rank's stream yields, and the length it reports, for every rank."""
        ranks = [load_image_data(f"hf:{tmp_path}", streaming=True, rank=r, world_size=world_size).train
                 for r in range(world_size)]
        return [(len(train), sum(1 for _ in train)) for train in ranks]

    assert rows(1) == [(10, 10)]
    assert rows(2) == [(3, 3)] * 2  # two shards of 7 and 3 rows: the smaller shard, not the mean of 5
    assert rows(3) == [(3, 3)] * 3  # 2 shards over 3 ranks: every 3rd row, at least floor(10/3)


def test_chase_runs_the_steps_the_loop_runs_when_max_steps_cuts_an_epoch(tmp_path):
    """--epochs 7 --max-steps 61: the loop and the lr schedule run 61 steps, and so must Chase's schedule (a rate of
    61/7 steps an epoch floored back to 60 of them before)."""
    seen = {}
    wrap = chase_timm.Chase.__init__

    def spy_wrap(self, model, config, *args, **kwargs):
        seen["total_steps"] = config.total_steps
        wrap(self, model, config, *args, **kwargs)

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chase_timm.Chase, "__init__", spy_wrap)
        train_in_process(["--model", "resnet10t", "--img-size", "16", "--batch-size", "16", "--epochs", "7",
                          "--max-steps", "61", "--recal-batches", "1", "--output", str(out)])
    last = metrics(out)["epochs"][-1]
    assert seen["total_steps"] == last["step"] == last["chase_step"] == 61
    assert metrics(out)["steps"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the lr schedule ends there too


def test_grad_accum_keeps_its_old_name_in_flags_yaml_and_checkpoints(tmp_path):
    """--grad-accum-steps is timm's name; --grad-accum, a `grad_accum:` YAML key and checkpoints of older recipes
    (that key, none of the timm flags added since) keep working."""
    recipe = load_recipe()
    assert recipe.parse_args(["--grad-accum", "2"])[0].grad_accum_steps == 2
    (tmp_path / "old.yaml").write_text("grad_accum: 3\n")
    assert recipe.parse_args(["--config", str(tmp_path / "old.yaml")])[0].grad_accum_steps == 3
    saved = recipe.run_config(*recipe.parse_args(TINY))
    saved["grad_accum"] = saved.pop("grad_accum_steps")
    for key in ("momentum", "min_lr", "warmup_lr", "reprob", "remode", "recount", "clip_mode"):
        del saved[key]
    (tmp_path / "epoch_1").mkdir()
    (tmp_path / "epoch_1" / "run_config.yaml").write_text(yaml.safe_dump(saved))
    args, section = recipe.parse_args([*TINY, "--resume", str(tmp_path / "epoch_1")])
    recipe.check_resume(args, recipe.run_config(args, section))  # no refusal: the same run
    with pytest.raises(SystemExit):  # while a flag added since, set otherwise, is another run
        args, section = recipe.parse_args([*TINY, "--min-lr", "1e-4", "--resume", str(tmp_path / "epoch_1")])
        recipe.check_resume(args, recipe.run_config(args, section))
