"""Shrinking during training: the physically shrunk model computes what the masked model computes.

Equivalence runs (``recipes/shrink_equivalence.py``, shared with ``recipes/optimizer_table.py``) train a shrinking
run and an independently built masking twin from the same init in float64, and compare losses at every step,
removed channels, masks, weights, every optimizer state tensor, eval outputs, the slim export and an EMA at
``TOLERANCE = 1e-9`` relative: correct runs agree to ~1e-12, and a 1e-6 slip in one state tensor is caught.
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator, debug_launcher
from accelerate.utils import DistributedDataParallelKwargs, gather

from chase_timm import Chase, ChaseConfig
from chase_timm.metrics import TrainingFlops
from chase_timm.shrink import rebuild_ddp
from chase_timm.slim import apply_width_plan
from helpers import batch, tiny_model
from recipe_helpers import TINY, folder_top1, free_port, fresh_accelerate, launch, metrics
import zoo_coverage
from shrink_equivalence import (BATCH, SCHEDULE, STEPS, TOLERANCE, build, compare, float64, loss_step,
                                optimizer_state)

SGD = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate's singletons outlive a test; a forked rank would inherit another test's single-process state."""
    with fresh_accelerate():
        yield


def _setup(name: str, make_optimizer=SGD, **overrides):
    model = tiny_model(name)
    optimizer = make_optimizer(model.parameters())
    config = ChaseConfig(**{**SCHEDULE, "shrink": "events", **overrides})
    return model, optimizer, Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))


def _run(model, optimizer, chase, steps: range) -> None:
    for step in steps:
        loss_step(model, optimizer, chase, step)


def _assert_exact(result) -> None:
    """Every shrink left the run equal to its masking twin, and masking zeroed the state behind every mask."""
    assert result.refused is None and result.error is None, (result.refused, result.error)
    assert result.removed and result.removed == result.twin_removed
    assert result.masks_equal
    assert result.worst()[1] <= TOLERANCE, (result.worst(), result.diffs, result.loss_diff)
    assert result.unmasked_state == [], result.unmasked_state[:5]


def _kinds(chase: Chase, groups) -> set:
    """What kind of channels the named groups carry (a concat slice, grouped/depthwise conv, SE, MLP, residual)."""
    kinds = set()
    for group in (g for g in chase.channels.groups if g.name in groups):
        kinds |= {"residual"} if group.residual else set()
        for piece in group.slices:
            module = chase.module.get_submodule(piece.tensor.rsplit(".", 1)[0])
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                kinds.add("depthwise" if module.groups == module.in_channels else "grouped")
            if isinstance(module, nn.Conv2d) and piece.role != "producer" and module.in_channels > group.width:
                kinds.add("concat")  # the group's channels are a part of a concatenated input
            if piece.role == "producer" and ".se." in piece.tensor:
                kinds.add("se")
            if piece.role == "producer" and ".mlp." in piece.tensor:  # Linear, or a 1x1 conv (ConvNeXt conv_mlp)
                kinds.add("mlp")
    return kinds


# fewer blocks for the float64 twins (a block's kinds of channel are all there, at a fraction of the parameters)
TWIN_SMALLER = {"vit_tiny_patch16_224": {"depth": 2}, "convnext_atto": {"depths": (1, 1, 1, 1)},
                "densenet121": {"block_config": (2, 2, 2, 2)}}  # every layer's input still a concatenation


@pytest.mark.parametrize("name, opt, overrides, kinds", [
    ("resnet10t", "adamw", {"prune_skip": True}, {"residual"}),
    ("mobilenetv3_small_050", "adamw", {"umm_fanin": "alive"}, {"depthwise", "se"}),
    # batch 16: at 8, the streams' BatchNorms over 1x1 last maps grow rounding to ~5e-9 (1e-12 at 16)
    ("densenet121", "sgd", {"prune_skip": True, "batch_size": 16}, {"concat"}),
    ("regnetx_002", "sgd", {}, {"grouped"}),
    ("convnext_atto", "adamw", {"scope": "layerwise"}, {"mlp"}),      # layer scale; ERK on shrunk shapes
    ("vit_tiny_patch16_224", "adamw", {}, {"mlp"}),                   # token MLP hidden widths (fc1 -> fc2)
    # EfficientNet family; batch 16: at 8, BatchNorm over its 1x1 last maps grows rounding ~10x per step
    ("tinynet_e", "sgd", {"prune_skip": True, "batch_size": 16}, {"residual", "depthwise"}),
])
def test_shrinking_run_equals_its_masking_twin(name, opt, overrides, kinds, monkeypatch):
    if name in TWIN_SMALLER:
        monkeypatch.setitem(zoo_coverage.SMALLER, name, TWIN_SMALLER[name])
    with float64():
        result = compare(name, opt, **overrides)
    _assert_exact(result)
    assert result.shrinks == 4  # every channel event shrank (shrink="events")
    assert result.widths[-1] < 0.9 * result.widths[0]
    chase = result.run[2]
    assert chase.stats()["nnz"] == chase.budget  # d of the original model
    # the case really removed channels of the kind it is named for (a check with nothing to check fails)
    assert kinds <= _kinds(result.twin_run[2], result.removed), (kinds, _kinds(result.twin_run[2], result.removed))


@pytest.mark.parametrize("opt", ["sgd", "adamw", "lookahead_adamw"])
def test_optimizers_from_timm_shrink_exactly_with_an_ema(opt, resnet18_one_block_per_stage):
    """What docs/optimizers.md's rows check (recipes/optimizer_table.py, there on the full resnet18), on one block
    per stage, with create_optimizer_v2's weight-decay groups."""
    with float64():
        result = compare("resnet18", opt, ema=True)
    _assert_exact(result)
    assert result.shrinks == 4 and {"ema", "state exp_avg" if "adam" in opt else "state momentum_buffer"} <= set(
        result.diffs)
    assert len(result.run[1].param_groups) == 2  # weight decay and no weight decay


@pytest.mark.parametrize("opt", ["lamb", "lars"])
def test_removed_channels_whose_input_is_not_zero_do_not_count_in_tensor_norms(opt, monkeypatch):
    """A removed MLP channel after a sigmoid (as after MetaFormer's StarReLU) still feeds fc2 sigmoid(0) = 0.5, so the
    masking run's fc2 columns got gradients that the shrunk fc2 lacks, and Lamb's trust ratio and LARS's per-tensor
    norm counted them (4.7e-1 and 5.5e-4 apart before): Chase zeroes them before every optimizer step."""
    monkeypatch.setitem(zoo_coverage.SMALLER, "vit_tiny_patch16_224", {"depth": 1, "act_layer": "sigmoid"})
    with float64():
        result = compare("vit_tiny_patch16_224", opt)
    _assert_exact(result)
    assert result.shrinks == 4 and result.removed["blocks.0.mlp.fc1"]


@pytest.mark.parametrize("opt", ["cadamw", "muon"])
def test_optimizers_whose_update_depends_on_the_tensor_size_are_refused_when_shrinking(opt):
    """Cautious and Muon updates depend on the whole tensor: shrinking would silently train another model."""
    with pytest.raises(ValueError, match="shrink") as err:
        build("resnet18", opt, shrink="events")
    assert "\n" not in str(err.value)
    build("resnet18", opt, shrink="off")  # masking only is fine


def test_shrink_end_masks_until_the_last_channel_event_then_shrinks_once():
    with float64():
        result = compare("resnet10t", "sgd", shrink="end")
    _assert_exact(result)
    widths, end = result.widths, SCHEDULE["channel_end_step"]  # widths[t] is the width after step t
    assert len(set(widths[:end])) == 1 and widths[end] < widths[0] and len(set(widths[end:])) == 1


def test_a_channels_last_model_stays_channels_last_through_every_shrink():
    with float64():
        result = compare("resnet10t", "sgd", channels_last=True)
    _assert_exact(result)
    assert result.shrinks == 4
    model, optimizer, _ = result.run
    state = optimizer_state(optimizer)
    for name, param in model.named_parameters():
        tensors = {"weight": param, "momentum": state[param]["momentum_buffer"]}
        for kind, tensor in tensors.items():
            assert tensor.dim() != 4 or tensor.is_contiguous(memory_format=torch.channels_last), (name, kind)


def test_resume_after_a_shrink_with_lookahead_rebuilds_the_model_and_continues_bitwise(tmp_path,
                                                                                      resnet18_one_block_per_stage):
    """Lookahead keeps Adam's moments and its slow weights in its base optimizer: all of it is cut and resumed."""
    model, optimizer, chase = build("resnet18", "lookahead_adamw")
    _run(model, optimizer, chase, range(STEPS))

    first, first_opt, first_chase = build("resnet18", "lookahead_adamw")
    _run(first, first_opt, first_chase, range(7))  # three shrinks and Lookahead's first sync (k=6) so far
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict(), "chase": first_chase.state_dict()},
               tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["chase"]["shrunk"] and state["chase"]["masks"]["layer4.0.conv1.weight"].shape[0] < 512
    assert {"exp_avg", "lookahead_slow_buff"} <= set(state["optimizer"]["state"][0])

    plan_model = apply_width_plan(tiny_model("resnet18"), state["chase"]["width_plan"])  # the plan alone rebuilds it
    assert {k: v.shape for k, v in plan_model.state_dict().items()} == {k: v.shape for k, v in state["model"].items()}
    resumed, resumed_opt, resumed_chase = build("resnet18", "lookahead_adamw")  # base model: Chase shrinks it
    resumed_chase.load_state_dict(state["chase"])
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    _run(resumed, resumed_opt, resumed_chase, range(7, STEPS))  # a shrink, an update and the settling step

    assert resumed_chase.removed_channels() == chase.removed_channels()
    for name, mask in chase.masks.items():
        assert torch.equal(mask, resumed_chase.masks[name]), name
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    ours, theirs = optimizer_state(optimizer), optimizer_state(resumed_opt)
    for param, resumed_param in zip(model.parameters(), resumed.parameters()):
        for key, value in ours[param].items():
            assert torch.equal(value, theirs[resumed_param][key]), key


def test_ema_report_and_training_flops_follow_the_shrunk_model(resnet18_one_block_per_stage):
    """EMA values are compared in test_optimizers_from_timm_shrink_exactly_with_an_ema; here its export and reports."""
    with float64():
        model, optimizer, chase = build("resnet18")
        twin_model, twin_opt, twin = build("resnet18", shrink="off")
        ema = timm.utils.ModelEmaV3(model, decay=0.9)
        chase.register(ema)
        unregistered = timm.utils.ModelEmaV3(model, decay=0.9)  # stays at the dense widths
        flops, twin_flops = TrainingFlops(chase, (3, 32, 32)), TrainingFlops(twin, (3, 32, 32))
        for step in range(STEPS):
            for trio, counter in (((model, optimizer, chase), flops), ((twin_model, twin_opt, twin), twin_flops)):
                loss_step(*trio, step)
                counter.step(BATCH)
            ema.update(model)
    assert flops.summary() == pytest.approx(twin_flops.summary(), rel=TOLERANCE)
    # one block per stage: layer4's 512 cheap 1x1-px channels are internal and take much of S_c (0.83 here)
    assert flops.summary()["forward_slim_flops"] < 0.9 * flops.summary()["forward_dense_flops"]
    slim = chase.export(ema)
    assert {k: v.shape for k, v in slim.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"register the copy first \(chase.register\(ema\)\)"):
        chase.export(unregistered)
    rows = {r["group"]: r for r in chase.report()}
    removed = chase.removed_channels()
    assert removed and all(rows[g]["width_before"] - rows[g]["width_after"] == len(c) for g, c in removed.items())
    assert all(max(c) < rows[g]["width_before"] for g, c in removed.items())  # original numbering
    assert chase.stats()["channels_alive"] == sum(r["width_after"] for r in rows.values() if r["prunable"])


def test_unsliceable_optimizer_state_is_refused_before_anything_changes(resnet18_one_block_per_stage):
    model, optimizer, chase = _setup("resnet18", torch.optim.Adafactor, shrink="off")  # factored row/column state
    _run(model, optimizer, chase, range(2))  # one channel event: channels are masked, not yet removed
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    masks = {n: m.clone() for n, m in chase.masks.items()}
    with pytest.raises(ValueError, match=r"optimizer state 'row_var' of .* has shape .* use an optimizer whose state"):
        chase.shrink()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert all(torch.equal(m, chase.masks[n]) for n, m in masks.items()) and chase.channels.pending()
    # with shrink="events", Adafactor (factored state, RMS over the whole tensor) is refused before any work
    with pytest.raises(ValueError, match="shrink='off'"):
        _setup("resnet18", torch.optim.Adafactor)


def test_a_wrapper_that_cannot_be_rebuilt_is_refused_up_front():
    model = tiny_model("resnet18")
    with pytest.raises(ValueError, match="Chase can shrink a plain model or one wrapped by DistributedDataParallel"):
        Chase(torch.compile(model), ChaseConfig(**SCHEDULE, shrink="end"))
    with pytest.raises(ValueError, match=r"ChaseConfig.shrink must be one of \['off', 'events', 'end'\]"):
        ChaseConfig(**SCHEDULE, shrink="yes")


def test_gradient_accumulation_and_bf16_autocast_keep_working_across_shrinks(resnet18_one_block_per_stage):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision="bf16")
    model = tiny_model("resnet18")
    optimizer = SGD(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    chase = Chase(model, ChaseConfig(**SCHEDULE, shrink="events"), optimizer=optimizer,
                  example_inputs=torch.randn(1, 3, 32, 32))
    widths = set()
    for step in range(2 * STEPS):
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = F.cross_entropy(model(batch(step)[0]), batch(step)[1])
            accelerator.backward(loss)
            optimizer.step()
            chase.step()
            optimizer.zero_grad()
        widths.add(sum(p.numel() for p in model.parameters()))
    assert chase.step_count == STEPS and len(widths) == 5 and torch.isfinite(loss)  # dense + four shrinks
    assert chase.stats()["nnz"] == chase.budget


def _ddp_settings(model) -> dict:
    """The wrapper's buffer-sync and unused-parameter settings, under the attribute names this torch keeps."""
    sync = getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", None))  # torch >= / < 2.13
    return {"sync_buffers": sync, "find_unused_parameters": model.find_unused_parameters}


def _shrink_on_two_ranks() -> None:
    # settings a user passes through accelerate must survive every rebuild of the DDP wrapper
    ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=True)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp_kwargs])
    rank = accelerator.process_index
    torch.manual_seed(rank)  # different local init: prepare() broadcasts rank 0's weights
    model = tiny_model("resnet18")
    optimizer = SGD(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    wrapper, settings = model, _ddp_settings(model)
    assert settings == {"sync_buffers": False, "find_unused_parameters": True}
    chase = Chase(model, ChaseConfig(**SCHEDULE, shrink="events"), optimizer=optimizer,
                  example_inputs=torch.randn(1, 3, 32, 32))
    widths = []
    for step in range(STEPS):
        x, y = batch(2 * step + rank)  # each rank sees its own data
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        chase.step()
        optimizer.zero_grad()
        widths.append(sum(p.numel() for p in model.parameters()))
        if len(widths) > 1 and widths[-1] != widths[-2]:  # rebuilt: the user's settings hold, buffers stay per rank
            assert _ddp_settings(model) == settings, step
            running_mean = gather(model.module.bn1.running_mean[None])
            assert not torch.equal(running_mean[0], running_mean[1]), "a rebuild synchronised unsynced buffers"
    assert model is wrapper and len(set(widths)) >= 3  # shrank at least twice, same DDP object
    masks = torch.cat([m.flatten() for m in chase.masks.values()])
    weights = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
    for name, local in (("masks", masks), ("weights", weights)):
        both = gather(local[None])
        assert torch.equal(both[0], both[1]), f"{name} differ across ranks"
    assert chase.stats()["nnz"] == chase.budget


def _shrink_on_one_rank_only() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_model("resnet18"))
    optimizer = SGD(model.parameters())
    chase = Chase(model, ChaseConfig(**SCHEDULE), optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    for step in range(2):  # the first channel event (masking only)
        x, y = batch(step)
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        chase.step()
        optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="different parameter shapes after a shrink"):
        chase.shrink() if accelerator.process_index == 0 else rebuild_ddp(model)  # rank 1 rebuilds unshrunk


def _shrink_on_two_ranks_then_on_one() -> None:
    _shrink_on_two_ranks()
    _shrink_on_one_rank_only()  # a fresh model and DDP wrapper with default settings, in the same two processes


def test_shrinking_under_two_process_ddp_keeps_ranks_identical_and_a_rank_that_did_not_shrink_is_an_error(
        resnet18_one_block_per_stage):
    """One pair of forked processes (they inherit the smaller resnet18) for both: ranks stay identical through every
    rebuild, then a rank that did not shrink makes both raise instead of hanging."""
    debug_launcher(_shrink_on_two_ranks_then_on_one, num_processes=2)


RECIPE = [*TINY, "--checkpoint-every", "1"]  # resnet18, 16 px, digits, 3 epochs of 22 steps


def test_recipe_shrinks_by_default_and_reports_step_times(tiny_run):
    """SIGKILL + --resume from a shrunk checkpoint: tests/test_recipe.py (the same shared run)."""
    full_out, stdout = tiny_run
    assert stdout.count("shrunk at step") >= 2 and "mean step time since the last shrink" in stdout
    result = metrics(full_out)
    assert len(result["shrinks"]) >= 2 and all(s["params_after"] < s["params_before"] for s in result["shrinks"])
    final = result["final"]
    assert final["slim_params"] < 0.6 * final["base_params"] and final["masked_top1"] == final["slim_top1_before_recal"]
    assert final["mean_step_s_after_last_shrink"] > 0


def test_two_process_recipe_run_shrinks_in_step_on_both_ranks_and_learns_like_one_process(tiny_run, tmp_path):
    """Real gloo DDP with the same global batch (64 = 2 x 32) as the 1-process run: the rebuilt wrapper keeps
    ranks bitwise identical through both shrinks, the slim folder is valid, and training learns the same."""
    out = tmp_path / "ddp"
    proc = launch([*RECIPE, "--output", str(out)], free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("shrunk at step") >= 2
    ddp, single = metrics(out), metrics(tiny_run[0])
    assert [s["step"] for s in ddp["shrinks"]] == [s["step"] for s in single["shrinks"]]  # same channel events
    final = ddp["final"]
    for key in ("rank_mask_digests", "rank_weight_digests"):
        assert len(final[key]) == 2 and final[key][0] == final[key][1], key
    assert final["slim_params"] == ddp["shrinks"][-1]["params_after"] < 0.6 * final["base_params"]
    assert folder_top1(out) == pytest.approx(final["slim_top1"], abs=1e-6)
    # Same seed, init, masks and global batches; what differs is each rank's BatchNorm statistics (32 images, not
    # 64) and the augmentation draws. Epoch losses run ~2.1 -> 1.1 and came within 0.1 of each other
    # (mean 0.05); a DDP fault (unaveraged or stale gradients, a corrupted rebuild) moves them far more.
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(ddp["epochs"], single["epochs"], strict=True)]
    assert sum(abs(a - b) for a, b in losses) / len(losses) < 0.15, losses
    assert losses[-1][0] < 0.7 * losses[0][0]  # and it learned: the loss fell by more than 30 %
    # 360 validation images: one standard error of a ~90 % accuracy is 1.6 points
    assert abs(final["slim_top1"] - single["final"]["slim_top1"]) < 5.0


def test_benchmark_script_times_a_trained_runs_final_widths(tiny_run, tmp_path, capsys):
    import benchmark_shrink

    rows = benchmark_shrink.main(["--models", "resnet18", "--slim", str(tiny_run[0]), "--img-size", "16",
                                  "--batch-size", "2", "--repeats", "1", "--steps", "1", "--layouts", "nchw",
                                  "--json", str(tmp_path / "b.json")])
    final = metrics(tiny_run[0])["final"]
    assert [row["widths"] for row in rows] == [str(tiny_run[0])]
    assert rows[0]["flops_ratio"] == pytest.approx(final["slim_dense_flops"] / final["base_dense_flops"], rel=1e-6)
    with pytest.raises(SystemExit, match="one --models name"):
        benchmark_shrink.main(["--models", "resnet18", "resnet34", "--slim", str(tiny_run[0])])
    with pytest.raises(SystemExit):  # argparse: both name the shrunk side
        benchmark_shrink.main(["--checkpoint", str(tiny_run[0]), "--slim", str(tiny_run[0])])
    assert "--checkpoint and --slim" in capsys.readouterr().err
    last = max((tiny_run[0] / "checkpoints").glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = benchmark_shrink.main(["--models", "resnet18", "--checkpoint", str(last), "--plain", "--opt", "adamw",
                                  "--img-size", "16", "--batch-size", "2", "--repeats", "1", "--steps", "1",
                                  "--layouts", "nchw", "--json", str(tmp_path / "c.json")])
    assert set(rows[0]["step_s"]) == {"dense", "shrunk", "slim"} and rows[0]["reference"] == "dense"
    assert rows[0]["flops_ratio"] == pytest.approx(final["slim_dense_flops"] / final["base_dense_flops"], rel=1e-6)


def test_benchmark_script_times_masked_and_shrunk_training_steps(tmp_path):
    import benchmark_shrink

    rows = benchmark_shrink.main(["--models", "resnet18", "--prune-skip", "--img-size", "16", "--batch-size", "2",
                                  "--repeats", "2", "--steps", "1", "--json", str(tmp_path / "b.json")])
    assert [row["layout"] for row in rows] == ["nchw", "channels_last"]
    for row in rows:
        assert row["flops_ratio"] < 0.8 and set(row["step_s"]) == {"masked", "shrunk"} and row["prune_skip"]
        memory = row["memory"]
        assert memory["shrunk"]["weights_grads_state_mib"] < 0.8 * memory["masked"]["weights_grads_state_mib"]
    assert (tmp_path / "b.json").exists()
