"""Runs part of a Chase training run in its own process, for the exact-resume test.

python resume_worker.py full CKPT OUT       -> train all steps, saving a checkpoint after the first half to CKPT on
                                               the way and the final state to OUT
python resume_worker.py second CKPT OUT     -> load the checkpoint (weights_only=True), train the rest
"""
import sys

import torch

from chase_timm import Chase, ChaseConfig
from helpers import tiny_model, train

TOTAL, HALF = 16, 8
SIZE = 16  # training images (discovery traces at 32 px)
CONFIG = dict(total_steps=TOTAL, update_interval=3, phase_b_start_step=10, channel_sparsity=0.3,
              channel_interval=2, channel_end_step=12)


def build():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = tiny_model("resnet18", layers=(1, 1, 1, 1))  # one block per stage: the same kinds, 2.5x faster
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    chase = Chase(model, ChaseConfig(**CONFIG), optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    return model, optimizer, chase


def final_state(model, chase) -> dict:
    return {"model": model.state_dict(), "masks": chase.state_dict()["masks"], "alive": chase.state_dict()["alive"],
            "step": chase.step_count}


def main(mode: str, *paths: str) -> None:
    model, optimizer, chase = build()
    if mode == "full":
        def checkpoint(step: int) -> None:  # after the first half's last chase.step(), as a training loop saves
            if step == HALF - 1:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "chase": chase.state_dict()}, paths[0])

        train(model, optimizer, chase, TOTAL, size=SIZE, after_step=checkpoint)
        torch.save(final_state(model, chase), paths[1])
    else:
        checkpoint = torch.load(paths[0], weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        chase.load_state_dict(checkpoint["chase"])
        train(model, optimizer, chase, TOTAL - HALF, size=SIZE, first_step=HALF)
        torch.save(final_state(model, chase), paths[1])


if __name__ == "__main__":
    main(*sys.argv[1:])
