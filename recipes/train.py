#!/usr/bin/env python
"""Train any timm model with Chase and publish a physically smaller dense network.

    accelerate launch recipes/train.py --model resnet50                 # embedded digits, a few minutes on CPU
    python recipes/train.py --model resnet18 --epochs 3                 # plain python works too
    accelerate launch recipes/train.py --config recipes/configs/resnet50_imagenet.yaml --data imagefolder:/data/in1k

Reads top to bottom like Accelerate's examples: parse -> build (data, model, optimizer) -> prepare -> attach
Chase -> train loop -> evaluate the masked model -> export, check and evaluate the slim model -> save.
Flags are timm's train.py names (train_flags.py), except that ``--batch-size`` is the global batch (split across
processes), so steps and schedules do not depend on how many processes run it. The output folder is itself the
slim model (``timm.create_model("local-dir:<output>", pretrained=True)``), with metrics.json, run_config.yaml,
training.png and checkpoints/ beside it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import chase_timm
from chase_timm.data import DataSpecError, load_image_data, set_transform
from chase_timm.metrics import count_flops
from chase_timm.slim import recalibrate_batchnorm
from chase_timm.training import (ExportMismatchError, check_export, check_slim_accuracy, clip_gradients,
                                 count_params, create_timm_model, distillation_task, evaluate, load_checkpoint,
                                 load_initial_weights, mask_digest, plot_training, reinitialised_classifier,
                                 size_summary, speed_summary, summary_table, tracker_config, weight_digest)
from train_flags import (DENSE_TEACHER, RUN_FILE, card_start, check_output, check_resume, fail, model_img_size,
                         parse_args, run_config, start_line)

STATE_FILE = "chase_timm_state.pt"  # Chase, loop state, training FLOPs, EMA: loaded with weights_only=True


# ----------------------------------------------------------------------------------------------- loop state
@dataclass
class TrainState:
    """Loop position and history; saved with every checkpoint."""
    epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    epochs: List[dict] = field(default_factory=list)
    steps: List[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__init__(**state)


def save_checkpoint(accelerator: Accelerator, folder: Path, run: Dict[str, Any], states: Dict[str, Any]) -> None:
    """accelerate.save_state (model, optimizer, RNG), our own states as plain tensors and numbers (Accelerate would
    pickle registered objects and unpickle them on load), then the run's settings (last: without them a
    checkpoint is incomplete)."""
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        torch.save({name: obj.state_dict() for name, obj in states.items()}, folder / STATE_FILE)
        (folder / RUN_FILE).write_text(yaml.safe_dump(run, sort_keys=False))
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> None:
    args, chase_section = parse_args(argv, description=__doc__.split("\n\n")[0])
    run = run_config(args, chase_section)
    check_output(args, run)
    if args.resume:
        check_resume(args, run)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum_steps, mixed_precision=args.mixed_precision,
        log_with=args.log_with, project_dir=args.output,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=args.seed))
    set_seed(args.seed)
    out = Path(args.output)

    # ---- build: data, model, optimizer, loss
    try:
        data = load_image_data(args.data, data_dir=args.data_dir, train_split=args.train_split,
                               val_split=args.val_split, val_fraction=args.val_fraction, streaming=args.streaming,
                               seed=args.seed, rank=accelerator.process_index, world_size=accelerator.num_processes)
    except (DataSpecError, ImportError) as e:
        fail(str(e))
    num_classes = args.num_classes or data.num_classes or fail(
        f"cannot infer the number of classes of --data {args.data!r}; pass --num-classes")
    per_process = args.batch_size // accelerator.num_processes
    if args.batch_size % accelerator.num_processes or (args.mixup or args.cutmix) and per_process % 2:
        fail(f"--batch-size {args.batch_size} must split evenly over {accelerator.num_processes} process(es)"
             + (" into even per-process batches (mixup/cutmix pair images)" if args.mixup or args.cutmix else ""))
    if args.batch_size > data.train_size:
        fail(f"--batch-size {args.batch_size} is larger than the {data.train_size} training images of "
             f"--data {args.data}; lower --batch-size")
    steps_per_epoch = math.ceil(data.train_size // args.batch_size / args.grad_accum_steps)  # syncs at the end too
    total_steps = min(math.floor(args.epochs * steps_per_epoch), args.max_steps or math.inf)
    if chase_section.get("density") == 1.0:  # the dense baseline: nothing to regrow above density 1
        chase_section.setdefault("soft_bound", 0.0)
    try:  # a --max-steps cap compresses every schedule, so the run keeps its shape; Chase runs the loop's steps
        config = chase_timm.ChaseConfig.from_epochs(epochs=args.epochs, steps_per_epoch=total_steps / args.epochs,
                                                    total_steps=total_steps, **{"seed": args.seed, **chase_section})
    except (TypeError, ValueError) as e:
        fail(f"bad Chase setting: {e}")

    digits = args.data == "digits"
    img_size = model_img_size(args.img_size, args.data)  # None: the model's pretrained_cfg size
    try:
        model = create_timm_model(args.model, img_size, pretrained=args.pretrained, num_classes=num_classes,
                                  drop_rate=args.drop, drop_path_rate=args.drop_path)  # None: the model's own
        reinitialised = (load_initial_weights(model, args.initial_checkpoint) if args.initial_checkpoint else
                         reinitialised_classifier(model, num_classes) if args.pretrained else [])
    except (RuntimeError, ValueError, OSError, TypeError) as e:  # download refused, wrong file, --drop-path unknown
        fail(f"could not build {args.model} with its starting weights: {str(e).splitlines()[0]}")
    base_model, started_from = card_start(args, model.pretrained_cfg)  # a Hub id, or a sentence for the card
    if args.kd_model_name == DENSE_TEACHER and reinitialised:
        fail(f"--kd-model-name {DENSE_TEACHER}: the starting model's classifier was re-initialised ({reinitialised}), "
             f"so it cannot teach these {num_classes} classes; fine-tune it dense first or pass --kd-model-name none")
    teacher = copy.deepcopy(model) if args.kd_model_name == DENSE_TEACHER else args.kd_model_name  # before Chase
    if args.pretrained or args.initial_checkpoint:
        accelerator.print(start_line(args, config, reinitialised, num_classes, base_model))
    data_config = resolve_data_config({"input_size": (3, img_size, img_size) if img_size else None,
                                       "crop_pct": args.crop_pct or (1.0 if digits else None)}, model=model)
    input_size = data_config["input_size"]
    aug = dict(scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.0) if digits else {}  # a mirrored digit is another glyph
    set_transform(data.train, create_transform(**data_config, is_training=True, color_jitter=None, **aug,
                                               auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode,
                                               re_count=args.recount))
    set_transform(data.val, create_transform(**data_config, is_training=False))
    streaming = isinstance(data.train, torch.utils.data.IterableDataset)
    train_loader = DataLoader(data.train, batch_size=per_process if streaming else args.batch_size,
                              shuffle=not streaming, drop_last=True, num_workers=args.workers)
    val_loader = DataLoader(data.val, batch_size=args.batch_size, num_workers=args.workers)
    calib_loader = DataLoader(data.train, batch_size=per_process, shuffle=not streaming, num_workers=args.workers,
                              generator=torch.Generator().manual_seed(args.seed))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # shrinking keeps the layout
    initial_params = count_params(model)
    if args.layer_decay and not hasattr(model, "group_matcher"):
        fail(f"--layer-decay needs a timm model with layer groups (group_matcher); {args.model} has none")
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(args))  # opt, lr, weight_decay, momentum, eps, ...
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=num_classes) if args.mixup or args.cutmix else None
    criterion = (SoftTargetCrossEntropy() if mixup else
                 LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss())

    # ---- prepare (a streamed train split is already sharded per process), then attach Chase
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    train_loader = train_loader if streaming else accelerator.prepare(train_loader)
    scheduler, _ = create_scheduler_v2(  # in optimizer steps ("epochs" of one update), so --max-steps compresses it
        optimizer, sched=args.sched, num_epochs=total_steps, step_on_epochs=False, updates_per_epoch=1,
        warmup_epochs=round(args.warmup_epochs * total_steps / args.epochs),
        decay_milestones=[round(e * total_steps / args.epochs) for e in args.decay_milestones],
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr)
    try:
        chase = chase_timm.Chase(model, config, optimizer=optimizer,
                                 example_inputs=torch.zeros(1, *input_size, device=accelerator.device))
    except ValueError as e:  # a compiled model or a refused optimizer cannot shrink; say the recipe's own switches
        hints = {"torch.compile": " In this recipe: --shrink off (masking only), or launch with --dynamo_backend no.",
                 "shrink='off'": " In this recipe: --shrink off (masking only)."}
        fail(str(e) + next((hint for key, hint in hints.items() if key in str(e)), ""))
    if config.mask_init == "magnitude" and config.ramp_steps == 0 and args.recal_batches and not args.resume:
        set_seed(args.seed)  # one-shot masks: BN statistics of the masked weights, the same batches on every rank
        recalibrate_batchnorm(accelerator.unwrap_model(model), calib_loader, num_batches=args.recal_batches)
    try:  # timm's logit distillation around the prepared student; the frozen teacher is not Chase's nor the optimizer's
        task = distillation_task(model, teacher, criterion, num_classes, input_size, accelerator.device,
                                 temperature=args.kd_temperature, task_loss_weight=args.task_loss_weight,
                                 distill_loss_weight=args.distill_loss_weight) if teacher else None
    except (RuntimeError, ValueError, OSError) as e:
        fail(f"--kd-model-name {args.kd_model_name}: {str(e).splitlines()[0]}")
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.model_ema_decay) if args.model_ema else None
    if ema is not None:
        chase.register(ema)  # shrinks along with the model
    train_flops = chase_timm.metrics.TrainingFlops(chase, input_size=input_size)  # the paper's training FLOPs
    state = TrainState()
    states = {"chase": chase, "loop": state, "train_flops": train_flops, **({"ema": ema} if ema else {})}
    if args.resume:  # Chase's state first (it shrinks model, optimizer and EMA to the checkpoint), then Accelerate's
        saved = torch.load(Path(args.resume) / STATE_FILE, weights_only=True)
        load_checkpoint(chase, saved, states, lambda: accelerator.load_state(args.resume))
        accelerator.print(f"resumed from {args.resume}: epoch {state.epoch}, step {state.step}")
    elif accelerator.is_main_process and args.overwrite and out.is_dir():
        shutil.rmtree(out)  # check_output made sure it holds a previous run of this recipe
    accelerator.wait_for_everyone()
    scheduler.step_update(state.step)
    if args.log_with:
        accelerator.init_trackers("chase_timm", config=tracker_config(vars(args), config))
    last_epoch = math.ceil(total_steps / steps_per_epoch)
    accelerator.print(f"{args.model} on {data.description}: {data.train_size} train / {len(data.val)} val images, "
                      f"{num_classes} classes, {accelerator.num_processes} process(es), {total_steps} optimizer steps "
                      f"({steps_per_epoch:g}/epoch), input {input_size}")

    # ---- train
    log_every = max(1, total_steps // 500)
    shrinks, width, step_times = [], count_params(model), []
    while state.step < total_steps:
        model.train()
        getattr(train_loader, "set_epoch", getattr(data.train, "set_epoch", lambda e: None))(state.epoch)
        started, loss_sum, batches = time.time(), 0.0, 0
        bar = tqdm(total=min(math.ceil(steps_per_epoch), total_steps - state.step),
                   desc=f"epoch {state.epoch + 1}/{last_epoch}", disable=not accelerator.is_local_main_process,
                   leave=False)
        step_started = time.perf_counter()  # step times leave out evaluation and checkpoints
        for x, y in train_loader:
            if streaming:
                x, y = x.to(accelerator.device), y.to(accelerator.device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mixup:
                x, y = mixup(x, y)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = task(x, y)["loss"] if task else criterion(model(x), y)
                accelerator.backward(loss)
                if args.clip_grad and accelerator.sync_gradients:
                    chase.mask_gradients()  # removed channels still in the model must not count in the norm
                    clip_gradients(accelerator, model.parameters(), args.clip_grad, args.clip_mode)
                optimizer.step()
                chase.step()  # counts only synchronised, not-skipped steps, like the loop below
                train_flops.step(x.shape[0] * accelerator.num_processes)
                optimizer.zero_grad()
            loss_sum, batches = loss_sum + loss.item(), batches + 1
            if not accelerator.sync_gradients:
                continue
            if accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, so no step for lr or Chase
                state.skipped_steps += 1
                continue
            state.step += 1
            step_times.append(time.perf_counter() - step_started)
            step_started = time.perf_counter()
            if config.is_channel_step(state.step) and count_params(model) != width:  # Chase shrank the model
                before = sum(step_times) / len(step_times)
                shrinks.append({"step": state.step, "params_before": width, "params_after": count_params(model),
                                "mean_step_s_before": before})
                accelerator.print(f"shrunk at step {state.step}: {width:,} -> {shrinks[-1]['params_after']:,} "
                                  f"parameters; mean step time since the last shrink {before:.3f} s")
                width, step_times = shrinks[-1]["params_after"], []
            scheduler.step_update(state.step)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=state.step)  # after chase.step(), which masks it
            if state.step % log_every == 0 or state.step == total_steps:
                stats = chase.stats()
                state.steps.append({"step": state.step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                                    "density": stats["density"], "channel_sparsity": stats["channel_sparsity"]})
                bar.set_postfix(loss=f"{loss.item():.3f}", d=f"{stats['density']:.3f}",
                                s_c=f"{stats['channel_sparsity']:.2f}")
            bar.update()
            if state.step >= total_steps:
                break
        bar.close()
        state.epoch += 1
        stats = chase.stats()
        record = {"epoch": state.epoch, "step": state.step, "chase_step": stats["step"],
                  "train_loss": accelerator.reduce(torch.tensor(loss_sum / max(batches, 1), device=accelerator.device),
                                                   "mean").item(),
                  "val_top1": evaluate(model, val_loader, accelerator), "lr": optimizer.param_groups[0]["lr"],
                  "density": stats["density"], "channel_sparsity": stats["channel_sparsity"],
                  "seconds": time.time() - started}
        if ema is not None:
            record["ema_val_top1"] = evaluate(ema.module, val_loader, accelerator)
        state.epochs.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=state.step)
        accelerator.print(f"epoch {state.epoch:>3}/{last_epoch}  step {state.step:>6}  "
                          f"loss {record['train_loss']:.4f}  "
                          f"val top-1 {record['val_top1']:5.1f}%  density {record['density']:.3f}  "
                          f"channel sparsity {record['channel_sparsity']:.3f}  ({record['seconds']:.1f} s)")
        if state.step >= total_steps or args.checkpoint_every and state.epoch % args.checkpoint_every == 0:
            save_checkpoint(accelerator, out / "checkpoints" / f"epoch_{state.epoch}", run, states)

    # ---- export the slim model (of the EMA copy with --model-ema), check it equals the masked one, recalibrate BN
    masked = ema.module if ema is not None else accelerator.unwrap_model(model)
    slim = chase.export(ema.module if ema is not None else None).to(accelerator.device).eval()
    final = {"masked_top1": evaluate(masked, val_loader, accelerator), "ema": ema is not None,
             "export_max_abs_diff": check_export(masked, slim, next(iter(val_loader))[0]),
             "slim_top1_before_recal": evaluate(slim, val_loader, accelerator), "skipped_steps": state.skipped_steps,
             **train_flops.summary(),
             "rank_mask_digests": accelerator.gather(
                 torch.tensor([mask_digest(chase)], device=accelerator.device)).tolist(),
             "rank_weight_digests": accelerator.gather(  # DDP kept every rank's (shrunk) weights identical
                 torch.tensor([weight_digest(accelerator.unwrap_model(model))], device=accelerator.device)).tolist()}
    if args.recal_batches:
        set_seed(args.seed)  # the same augmented batches on every rank
        recalibrate_batchnorm(slim, calib_loader, num_batches=args.recal_batches)
    final["slim_top1"] = evaluate(slim, val_loader, accelerator)
    try:
        check_slim_accuracy(final["masked_top1"], final["slim_top1_before_recal"],
                            final["slim_top1"] if args.recal_batches else None, len(data.val))
    except ExportMismatchError as e:
        fail(str(e))
    for name, m in (("base", masked), ("slim", slim)):
        final.update({f"{name}_{k}": v for k, v in size_summary(m, input_size, chase if m is masked else None).items()})
    shrunk = count_params(model) < initial_params
    if shrunk:
        final["mean_step_s_after_last_shrink"] = sum(step_times) / max(len(step_times), 1)
    accelerator.end_training()

    # ---- save (main process): the slim model folder, metrics, plot; publish
    if accelerator.is_main_process:
        dense = masked
        if shrunk:  # the training model was shrunk: sizes and speed of the dense widths it started at
            dense = create_timm_model(args.model, img_size, num_classes=num_classes).to(
                accelerator.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
            final.update(base_params=count_params(dense), base_dense_flops=count_flops(dense, input_size))
        final.update(speed_summary(dense, slim, input_size, batch_size=per_process))
        report = chase.report()
        slim = slim.cpu()
        chase_timm.save_pretrained(slim, out, chase_config=config, data_config=data_config, metrics=final,
                                   dataset=data.description, recipe=run, repo_id=args.push_to_hub, overwrite=True,
                                   base_model=base_model, started_from=started_from)
        (out / RUN_FILE).write_text(yaml.safe_dump(run, sort_keys=False))
        (out / "metrics.json").write_text(json.dumps(
            {"model": args.model, "data": args.data, "final": final, "epochs": state.epochs, "steps": state.steps,
             "shrinks": shrinks, "channel_groups": report}, indent=2))
        plot_training(out / "training.png", state.steps, state.epochs, config, report,
                      title=f"Chase on {args.model} ({data.description})")
        print("\n" + summary_table(final))
        print(f"\nslim model:  {out}  (timm.create_model('local-dir:{out}', pretrained=True))\n"
              f"metrics:     {out / 'metrics.json'}\nplot:        {out / 'training.png'}\n"
              f"checkpoint:  {out / 'checkpoints' / f'epoch_{state.epoch}'}  (--resume)")
        if args.log_with == "tensorboard" or args.log_with == "all":
            print(f"tensorboard: tensorboard --logdir {out}")
        if args.push_to_hub:
            try:
                print(f"published:   {chase_timm.push_to_hub(out, args.push_to_hub)}")
            except RuntimeError as e:  # network, token, server: all above is saved; the message says how to retry
                fail(str(e))


if __name__ == "__main__":
    main()
