"""Chase's training-time overhead, measured side by side in one run.

Times plain dense training steps and Chase-wrapped steps of the same model on the same batches
(interleaved, medians), then one prune/regrow update and one channel-pruning event, and prints ratios:

    python recipes/benchmark_overhead.py                      # resnet50, 64 px, batch 32, CPU
    python recipes/benchmark_overhead.py --model resnet18 --steps 5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import timm
import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import chase_timm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed ordinary steps per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def timed(fn: Callable[[], None]) -> float:
    """Wall time of ``fn`` in seconds (torch.utils.benchmark's clock synchronises the accelerator)."""
    start = benchmark.timer()
    fn()
    return benchmark.timer() - start


def jump_to(chase: chase_timm.Chase, step: int) -> None:
    """Continue as if ``step`` optimizer steps had run, so the next ``chase.step()`` is step + 1's."""
    chase.load_state_dict({**chase.state_dict(), "step": step})


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, num_classes=100).to(device)
    sparse = copy.deepcopy(dense)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)
    sparse_opt = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    example = x[:1]

    config = chase_timm.ChaseConfig(total_steps=100_000, update_interval=1000, channel_interval=1000,
                                    channel_sparsity=0.4)
    start = time.perf_counter()
    chase = chase_timm.Chase(sparse, config, optimizer=sparse_opt, example_inputs=example)
    setup = time.perf_counter() - start

    def train_step(model, opt, after: Callable[[], None] = lambda: None) -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        after()
        opt.zero_grad()

    for _ in range(2):  # warm-up both, and one channel event so channel masks are live in the timed steps
        train_step(dense, dense_opt)
        train_step(sparse, sparse_opt, chase.step)
    jump_to(chase, config.channel_interval - config.channel_offset - 1)
    channel_event = timed(lambda: train_step(sparse, sparse_opt, chase.step))

    dense_times, chase_times = [], []
    for _ in range(args.steps):
        dense_times.append(timed(lambda: train_step(dense, dense_opt)))
        chase_times.append(timed(lambda: train_step(sparse, sparse_opt, chase.step)))
    jump_to(chase, config.update_interval - 1)
    update_step = timed(lambda: train_step(sparse, sparse_opt, chase.step))

    dense_med, chase_med = statistics.median(dense_times), statistics.median(chase_times)
    stats = chase.stats()
    print(f"model {args.model}, {args.img_size}px, batch {args.batch_size}, device {device}, "
          f"threads {torch.get_num_threads()}, {args.steps} interleaved steps each")
    print(f"Chase setup (ERK masks + channel-group discovery): {setup:.2f} s "
          f"({len(chase.channels.prunable)} prunable groups, {chase.channels.total} channels)")
    print(f"ordinary step: chase/dense time ratio = {chase_med / dense_med:.3f}   (target <= 1.05)")
    print(f"one prune/regrow update costs {(update_step - chase_med) / dense_med:.2f} ordinary steps   (target <= 2)")
    print(f"one channel-pruning event costs {(channel_event - chase_med) / dense_med:.2f} ordinary steps   (target <= 2)")
    print(f"density after update {stats['density']:.4f}, channel sparsity {stats['channel_sparsity']:.3f}")


if __name__ == "__main__":
    main()
