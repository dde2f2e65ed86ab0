"""Time ONE update of the importance-sampling loss history, vectorized vs. the paper's loop.

The setting of the paper's large runs: T = 4000 timesteps, H = 10 losses kept per timestep,
and a gathered batch of 8 ranks x 128 = 1024 (t, loss) pairs per training step.

* vectorized: ``LossSecondMoment.update`` (torch, CPU), as the callback calls it
  with the all-gathered tensors.
* loop+item: what the paper's code does: ``update_with_local_losses`` turns the gathered
  tensors into Python numbers with one ``.item()`` per element (on a GPU each is a host
  sync), then ``update_with_all_losses`` loops over the pairs on numpy arrays (shift a full
  history left, else fill the next free slot). The headline ratio is against this.
* loop: the same loop fed with one ``.tolist()``: the loop in its most favourable form.

Both start every round from the same warmed-up state (half of the timesteps with a full
history, half partly filled), the two are timed in alternation, and the resulting histories
must be identical. Medians of the rounds are printed and written as JSON.

    python benchmarks/importance_update.py [--rounds 7] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import machine as common_machine
from iddpm_lightning.diffusion.timesteps import LossSecondMoment


def loop_update(history: np.ndarray, counts: np.ndarray, timesteps: list[int], losses: list[float]) -> None:
    """The paper's per-element update, in place."""
    H = history.shape[1]
    for t, loss in zip(timesteps, losses):
        if counts[t] == H:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1


def warm_state(T: int, H: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture: timesteps [0, T/2) full (and already shifted), the rest 0..H-1 entries."""
    target = np.where(np.arange(T) < T // 2, H + 3, rng.integers(0, H, size=T))
    t = np.repeat(np.arange(T), target)
    rng.shuffle(t)
    losses = rng.lognormal(mean=-2.0, sigma=2.0, size=len(t))
    r = LossSecondMoment(T, H)
    r.update(torch.from_numpy(t), torch.from_numpy(losses))
    hist, counts = np.zeros((T, H)), np.zeros(T, dtype=np.int64)
    loop_update(hist, counts, t.tolist(), losses.tolist())
    assert np.array_equal(r.loss_history.numpy(), hist) and np.array_equal(r.loss_counts.numpy(), counts)
    return r.loss_history.clone(), r.loss_counts.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timesteps", type=int, default=4000)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--per-rank", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "importance_update.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    T, H, N = args.timesteps, args.history, args.ranks * args.per_rank
    rng = np.random.default_rng(args.seed)
    history0, counts0 = warm_state(T, H, rng)
    # One step's gathered batch, rank-major, as the callback hands it to update().
    t = torch.from_numpy(rng.integers(0, T, size=N))
    losses = torch.from_numpy(rng.lognormal(mean=-2.0, sigma=2.0, size=N))
    n_full = int((counts0 == H).sum())

    resampler = LossSecondMoment(T, H)

    def run_vectorized() -> tuple[float, torch.Tensor, torch.Tensor]:
        resampler.load(history0.clone(), counts0.clone())
        start = time.perf_counter()
        resampler.update(t, losses)
        return time.perf_counter() - start, resampler.loss_history, resampler.loss_counts

    def run_loop(item: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
        hist, counts = history0.numpy().copy(), counts0.numpy().copy()
        start = time.perf_counter()
        if item:
            loop_update(hist, counts, [x.item() for x in t], [x.item() for x in losses])
        else:
            loop_update(hist, counts, t.tolist(), losses.tolist())
        return time.perf_counter() - start, hist, counts

    methods = {"vectorized": run_vectorized, "loop": run_loop, "loop+item": lambda: run_loop(item=True)}
    for run in methods.values():  # warm-up: first-call overheads, caches
        run()
    times = {k: [] for k in methods}
    identical = True
    for _ in range(args.rounds):
        results = {}
        for k, run in methods.items():
            dt, h, c = run()
            times[k].append(dt)
            results[k] = (np.asarray(h), np.asarray(c))
        h_v, c_v = results["vectorized"]
        identical &= all(np.array_equal(h_v, h) and np.array_equal(c_v, c) for h, c in results.values())

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["loop"] / med["vectorized"]
    ratio_item = med["loop+item"] / med["vectorized"]
    machine = common_machine()

    print(f"machine: {machine['cpu_count']} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), numpy {machine['numpy']}, {machine['platform']}, "
          f"load {machine['load_avg_1min']}")
    print(f"one update: T={T}, H={H}, batch {args.ranks} ranks x {args.per_rank} = {N} pairs, "
          f"{n_full}/{T} histories full, {len(set(t.tolist()))} distinct t, {args.rounds} rounds interleaved")
    print(f"{'method':<12}{'median':>12}{'min':>12}{'max':>12}{'vs vectorized':>15}")
    for k, v in times.items():
        print(f"{k:<12}{med[k] * 1e6:>10.1f}us{min(v) * 1e6:>10.1f}us{max(v) * 1e6:>10.1f}us"
              f"{med[k] / med['vectorized']:>14.2f}x")
    print(f"speed-up vs the paper's loop (loop+item / vectorized, medians): {ratio_item:.2f}x "
          f"(vs the loop fed by .tolist(): {ratio:.2f}x)   identical histories: {identical}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "importance_update",
        "config": {"timesteps": T, "history_per_term": H, "ranks": args.ranks, "per_rank": args.per_rank,
                   "pairs": N, "rounds": args.rounds, "seed": args.seed, "full_histories": n_full},
        "machine": machine,
        "seconds": times,
        "median_seconds": med,
        "speedup": ratio,
        "speedup_vs_loop_with_item": ratio_item,
        "identical": identical,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    if not identical:
        sys.exit("the vectorized and loop histories differ")


if __name__ == "__main__":
    main()
