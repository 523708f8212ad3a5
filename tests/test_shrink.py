"""Shrinking during training: the physically shrunk model computes what the masked model computes."""
import copy
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, debug_launcher
from accelerate.utils import DistributedDataParallelKwargs, gather

from chase_timm import Chase, ChaseConfig
from chase_timm.metrics import TrainingFlops
from chase_timm.shrink import rebuild_ddp
from chase_timm.slim import apply_width_plan
from helpers import batch, tiny_model
from recipe_helpers import TINY, folder_top1, free_port, fresh_accelerate, launch, metrics

STEPS = 10
SCHEDULE = dict(total_steps=STEPS, update_interval=3, channel_interval=2, channel_offset=0, channel_end_step=8,
                channel_sparsity=0.5, min_channel_ratio=0.5)
SGD = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
ADAMW = lambda params: torch.optim.AdamW(params, lr=1e-3)


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


def _loss_step(model, optimizer, chase, step: int) -> float:
    model.train()
    x, y = batch(step)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    chase.step()
    optimizer.zero_grad()
    return loss.item()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max())))


@pytest.fixture
def float64():
    """Equivalence in float64: in float32 the masked and sliced sums round differently, which can flip a prune or
    regrow choice between weights whose magnitudes tie to 1e-7; in float64 every decision must be identical."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name, make_optimizer, overrides", [
    ("resnet18", SGD, {}),
    ("resnet18", ADAMW, {"prune_skip": True}),                    # residual stream
    ("mobilenetv3_small_050", ADAMW, {"umm_fanin": "alive"}),     # depthwise + SE
    ("densenet121", SGD, {}),                                     # concatenation
    ("convnext_atto", ADAMW, {"scope": "layerwise"}),             # MLP widths, layer scale; ERK on shrunk shapes
    ("vit_tiny_patch16_224", ADAMW, {}),                          # token MLP hidden widths (fc1 -> fc2)
    ("tinynet_e", SGD, {"prune_skip": True}),                     # EfficientNet family: depthwise + SE, residual stream
])
def test_shrinking_run_matches_masking_run_after_every_shrink(name, make_optimizer, overrides):
    model, optimizer, chase = _setup(name, make_optimizer, **overrides)
    params_before = sum(p.numel() for p in model.parameters())
    shrinks, step = 0, 0
    while step < STEPS:
        if not chase.config.is_channel_step(step + 1):
            _loss_step(model, optimizer, chase, step)
            step += 1
            continue
        # a masking twin of the state before this channel event (weights, optimizer state, masks, generator)
        twin_model, twin_opt, twin = copy.deepcopy((model, optimizer, chase))
        twin.config = dataclasses.replace(chase.config, shrink="off")
        _assert_same_step(model, optimizer, chase, twin_model, twin_opt, twin, step)
        shrinks += 1
        assert chase.removed_channels() == twin.removed_channels() and not chase.channels.pending()
        _assert_same_outputs(model, twin_model)
        # the step after the shrink (sliced optimizer state; t=3 and t=7 are prune/regrow updates) agrees too
        _assert_same_step(model, optimizer, chase, twin_model, twin_opt, twin, step + 1)
        _assert_is_slim_of(model, chase, twin)
        step += 2
    assert shrinks == 4  # every channel event shrank (shrink="events")
    assert sum(p.numel() for p in model.parameters()) < 0.9 * params_before
    assert chase.stats()["nnz"] == chase.budget  # d of the original model


def _assert_same_outputs(model, other) -> None:
    model.eval(), other.eval()
    x = batch(100)[0]
    with torch.no_grad():
        assert _close(model(x), other(x))


def _assert_same_step(model, optimizer, chase, twin_model, twin_opt, twin, step: int) -> None:
    loss, twin_loss = _loss_step(model, optimizer, chase, step), _loss_step(twin_model, twin_opt, twin, step)
    assert abs(loss - twin_loss) <= 1e-4 * max(1.0, abs(twin_loss)), (step, loss, twin_loss)
    assert chase.stats()["nnz"] == twin.stats()["nnz"]


def _assert_is_slim_of(model, chase, twin) -> None:
    """The shrunk training model equals the masked twin's slim export: tensors, masks and eval outputs."""
    slim = twin.export()
    ours = dict(model.state_dict())
    for key, value in slim.state_dict().items():
        assert ours[key].shape == value.shape, key
        assert not value.is_floating_point() or _close(ours[key], value), key
    twin_masks = twin.export(_masks_as_model(twin))
    for name, mask in chase.masks.items():
        assert torch.equal(mask, twin_masks.get_parameter(name)), name
    _assert_same_outputs(model, slim)


@pytest.mark.usefixtures("float64")
def test_shrink_end_masks_until_the_last_channel_event_then_shrinks_once():
    model, optimizer, chase = _setup("resnet18", shrink="end")
    twin_model, twin_opt, twin = copy.deepcopy((model, optimizer, chase))
    twin.config = dataclasses.replace(chase.config, shrink="off")
    widths = []
    for step in range(STEPS):
        _assert_same_step(model, optimizer, chase, twin_model, twin_opt, twin, step)
        widths.append(sum(p.numel() for p in model.parameters()))
    end = chase.config.channel_end_step  # step count after the shrink; widths[t - 1] is the width after step t
    assert len(set(widths[:end - 1])) == 1 and widths[end - 1] < widths[0] and len(set(widths[end - 1:])) == 1
    assert twin.removed_channels() == chase.removed_channels()
    _assert_is_slim_of(model, chase, twin)


@pytest.mark.usefixtures("float64")
def test_a_channels_last_model_stays_channels_last_through_every_shrink():
    model = tiny_model("resnet18").to(memory_format=torch.channels_last)
    optimizer = SGD(model.parameters())
    chase = Chase(model, ChaseConfig(**SCHEDULE, shrink="events"), optimizer=optimizer,
                  example_inputs=torch.randn(1, 3, 32, 32))
    twin_model, twin_opt, twin = copy.deepcopy((model, optimizer, chase))
    twin.config = dataclasses.replace(chase.config, shrink="off")
    shrinks, width = 0, sum(p.numel() for p in model.parameters())
    for step in range(STEPS):
        x, y = batch(step)
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        loss.backward()
        optimizer.step()
        chase.step()  # shrinks at channel events, with the gradients still there
        if sum(p.numel() for p in model.parameters()) != width:
            shrinks, width = shrinks + 1, sum(p.numel() for p in model.parameters())
            for name, param in model.named_parameters():
                tensors = {"weight": param, "grad": param.grad, "momentum": optimizer.state[param]["momentum_buffer"]}
                for kind, tensor in tensors.items():
                    assert tensor.dim() != 4 or tensor.is_contiguous(memory_format=torch.channels_last), (name, kind)
        optimizer.zero_grad()
        twin_loss = _loss_step(twin_model, twin_opt, twin, step)
        assert abs(loss.item() - twin_loss) <= 1e-4 * max(1.0, abs(twin_loss)), (step, loss.item(), twin_loss)
    assert shrinks == 4 and chase.removed_channels() == twin.removed_channels()
    _assert_same_outputs(model, twin_model)
    _assert_is_slim_of(model, chase, twin)


def _masks_as_model(chase):
    """A copy of the masked model whose weights are its masks, so exporting it slices the masks."""
    holder = copy.deepcopy(chase.module)
    with torch.no_grad():
        for name, mask in chase.masks.items():
            holder.get_parameter(name).copy_(mask)
    return holder


def _run(model, optimizer, chase, steps: range) -> None:
    for step in steps:
        _loss_step(model, optimizer, chase, step)


def test_resume_after_a_shrink_rebuilds_the_model_and_continues_bitwise(tmp_path):
    model, optimizer, chase = _setup("resnet18")
    _run(model, optimizer, chase, range(STEPS))

    first, first_opt, first_chase = _setup("resnet18")
    _run(first, first_opt, first_chase, range(5))  # two shrinks so far
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict(), "chase": first_chase.state_dict()},
               tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["chase"]["shrunk"] and state["chase"]["masks"]["layer4.1.conv1.weight"].shape[0] < 512

    plan_model = apply_width_plan(tiny_model("resnet18"), state["chase"]["width_plan"])  # the plan alone rebuilds it
    assert {k: v.shape for k, v in plan_model.state_dict().items()} == {k: v.shape for k, v in state["model"].items()}
    resumed, resumed_opt, resumed_chase = _setup("resnet18")  # the base model: Chase shrinks it to the checkpoint
    resumed_chase.load_state_dict(state["chase"])
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    _run(resumed, resumed_opt, resumed_chase, range(5, STEPS))

    assert resumed_chase.removed_channels() == chase.removed_channels()
    for name, mask in chase.masks.items():
        assert torch.equal(mask, resumed_chase.masks[name]), name
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.usefixtures("float64")
def test_ema_report_and_training_flops_follow_the_shrunk_model():
    model, optimizer, chase = _setup("resnet18")
    twin_model, twin_opt, twin = copy.deepcopy((model, optimizer, chase))
    twin.config = dataclasses.replace(chase.config, shrink="off")
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    chase.register(ema)
    unregistered = timm.utils.ModelEmaV3(model, decay=0.9)  # stays at the dense widths
    flops, twin_flops = TrainingFlops(chase, (3, 32, 32)), TrainingFlops(twin, (3, 32, 32))
    for step in range(STEPS):
        for trio, counter in (((model, optimizer, chase), flops), ((twin_model, twin_opt, twin), twin_flops)):
            _loss_step(*trio, step)
            counter.step(2)
        ema.update(model)
    assert flops.summary() == pytest.approx(twin_flops.summary(), rel=1e-9)
    assert flops.summary()["forward_slim_flops"] < 0.8 * flops.summary()["forward_dense_flops"]
    assert {k: v.shape for k, v in ema.module.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    slim = chase.export(ema)
    assert {k: v.shape for k, v in slim.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"register the copy first \(chase.register\(ema\)\)"):
        chase.export(unregistered)
    rows = {r["group"]: r for r in chase.report()}
    removed = chase.removed_channels()
    assert removed and all(rows[g]["width_before"] - rows[g]["width_after"] == len(c) for g, c in removed.items())
    assert all(max(c) < rows[g]["width_before"] for g, c in removed.items())  # original numbering
    assert chase.stats()["channels_alive"] == sum(r["width_after"] for r in rows.values() if r["prunable"])


def test_unsliceable_optimizer_state_is_refused_before_anything_changes():
    model, optimizer, chase = _setup("resnet18", torch.optim.Adafactor, shrink="off")  # factored row/column state
    _run(model, optimizer, chase, range(2))  # one channel event: channels are masked, not yet removed
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    masks = {n: m.clone() for n, m in chase.masks.items()}
    with pytest.raises(ValueError, match=r"optimizer state 'row_var' of .* has shape .* use an optimizer whose state"):
        chase.shrink()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert all(torch.equal(m, chase.masks[n]) for n, m in masks.items()) and chase.channels.pending()
    # with shrink="events" the same problem is a warning and training goes on by masking
    model, optimizer, chase = _setup("resnet18", torch.optim.Adafactor)
    with pytest.warns(UserWarning, match="Training continues with masking only"):
        _run(model, optimizer, chase, range(4))  # two channel events: warned once, then masked as usual
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert chase.stats()["channel_sparsity"] > 0.3 and not any(m.isnan().any() for m in model.parameters())


def test_a_wrapper_that_cannot_be_rebuilt_is_refused_up_front():
    model = tiny_model("resnet18")
    with pytest.raises(ValueError, match="Chase can shrink a plain model or one wrapped by DistributedDataParallel"):
        Chase(torch.compile(model), ChaseConfig(**SCHEDULE, shrink="end"))
    with pytest.raises(ValueError, match=r"ChaseConfig.shrink must be one of \['off', 'events', 'end'\]"):
        ChaseConfig(**SCHEDULE, shrink="yes")


def test_gradient_accumulation_and_bf16_autocast_keep_working_across_shrinks():
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


def test_shrinking_under_two_process_ddp_keeps_ranks_identical():
    debug_launcher(_shrink_on_two_ranks, num_processes=2)


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


def test_a_rank_that_did_not_shrink_is_an_error_not_a_hang():
    debug_launcher(_shrink_on_one_rank_only, num_processes=2)


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


def test_benchmark_script_times_a_trained_runs_final_widths(tiny_run, tmp_path):
    import benchmark_shrink

    rows = benchmark_shrink.main(["--models", "resnet18", "--slim", str(tiny_run[0]), "--img-size", "16",
                                  "--batch-size", "2", "--repeats", "1", "--steps", "1", "--layouts", "nchw",
                                  "--json", str(tmp_path / "b.json")])
    final = metrics(tiny_run[0])["final"]
    assert [row["widths"] for row in rows] == [str(tiny_run[0])]
    assert rows[0]["flops_ratio"] == pytest.approx(final["slim_dense_flops"] / final["base_dense_flops"], rel=1e-6)
    with pytest.raises(SystemExit, match="one --models name"):
        benchmark_shrink.main(["--models", "resnet18", "resnet34", "--slim", str(tiny_run[0])])


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
