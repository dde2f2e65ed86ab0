"""What the experiments train and measure: the runs (configs as deltas of configs/digits.yaml),
the scale of the full and the quick suite, and the training itself, cached and resumable.

A run is ``fit --config configs/digits.yaml --config experiments/base.yaml [--config delta ...]
--seed_everything S``. Its folder is named by a hash of those files' contents and the
arguments, so a changed config trains anew, an unchanged one is never trained twice, and a run
killed half-way resumes from its ``last.ckpt`` (``--ckpt_path last``) when the command is rerun.
The fit runs in this process (``cli.main``), as ``python -m iddpm_lightning fit`` would.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import main

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "configs" / "digits.yaml"
EXPERIMENTS = REPO / "experiments"


@dataclass(frozen=True)
class Run:
    """One training run: ``name`` (its recipe), the config deltas after the base, the seed."""

    name: str
    deltas: tuple[str, ...]
    seed: int

    @property
    def label(self) -> str:
        return f"{self.name}-s{self.seed}"


# The recipes, as deltas of configs/digits.yaml + experiments/base.yaml.
RECIPES = {
    "hybrid": (),                                   # the paper's: cosine, learned Σ, L_hybrid
    "simple": ("experiments/simple.yaml",),         # L_simple, fixed Σ (Ho et al.)
    "linear": ("experiments/linear.yaml",),         # L_hybrid with the linear schedule
    "vlb": ("configs/digits_vlb.yaml",),            # L_vlb, importance-sampled t
    "vlb_uniform": ("experiments/vlb_uniform.yaml",),  # L_vlb, uniform t
}


@dataclass(frozen=True)
class Scale:
    """How large the suite is. ``lengths``: the checkpoints (steps) claim 3 reads, the last one
    the end of training, which every other claim reads. ``step_counts``: sampling budgets;
    ``full_steps``: T, the budget drawn with ``full_seeds`` only, as it costs T/100 times the
    100-step one. ``num_samples``: images per sample-quality cell (the same in every cell,
    because the Fréchet distance's bias depends on it)."""

    name: str
    seeds: tuple[int, ...]
    lengths: tuple[int, ...]
    step_counts: tuple[int, ...]
    full_steps: int
    full_seeds: tuple[int, ...]
    num_samples: int
    skip_fractions: tuple[float, ...]  # claim 2: the share of the reverse process skipped
    skip_steps: int                     # claim 2: the budget of the skipping chains
    bpd_strata: int                     # test bits/dim: 2 x this many model calls per test image
    bpd_images: int                     # of the 150 test digits
    extra_configs: tuple[str, ...] = ()
    sample_batch: int = 500
    curve_window: int = field(default=200)  # claim 4: the last this many steps


FULL = Scale("full", seeds=(0, 1), lengths=(250, 500, 1000), step_counts=(10, 25, 50, 100), full_steps=1000,
             full_seeds=(0,), num_samples=200, skip_fractions=(0.1, 0.25), skip_steps=50, bpd_strata=25,
             bpd_images=150)
QUICK = Scale("quick", seeds=(0,), lengths=(2, 4, 6), step_counts=(5, 10), full_steps=50, full_seeds=(0,),
              num_samples=8, skip_fractions=(0.1, 0.25), skip_steps=10, bpd_strata=4, bpd_images=8,
              extra_configs=("experiments/quick.yaml",), sample_batch=64, curve_window=4)


def runs_of(scale: Scale) -> list[Run]:
    return [Run(name, deltas, seed) for name, deltas in RECIPES.items() for seed in scale.seeds]


def fit_args(run: Run, scale: Scale) -> list[str]:
    """The ``fit`` command line of ``run`` (without its run_dir)."""
    configs = [DIGITS, EXPERIMENTS / "base.yaml", *(REPO / c for c in run.deltas), *(REPO / c for c in scale.extra_configs)]
    return ["fit", *(a for c in configs for a in ("--config", str(c))), f"--seed_everything={run.seed}",
            f"--trainer.max_steps={scale.lengths[-1]}"]


def run_dir(run: Run, scale: Scale, runs_dir: Path) -> Path:
    """``runs_dir/{name}-s{seed}-{hash}``: the hash covers the arguments and every config file's text."""
    args = fit_args(run, scale)
    texts = [Path(a).read_text() for a in args if a.endswith(".yaml")]
    digest = hashlib.sha256(json.dumps([[a.replace(str(REPO), "") for a in args], texts]).encode()).hexdigest()[:10]
    return runs_dir / f"{run.label}-{digest}"


def train(run: Run, scale: Scale, runs_dir: Path, log=print) -> Path:
    """Train ``run`` unless its folder already holds the finished run; resume a killed one.
    Writes ``done.json`` (steps, wall seconds over all attempts) when training has finished."""
    folder = run_dir(run, scale, runs_dir)
    done = folder / "done.json"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    args = [*fit_args(run, scale), f"--run_dir={folder}"]
    attempts = folder / "attempts.json"
    spent = json.loads(attempts.read_text())["wall_s"] if attempts.is_file() else 0.0
    if (folder / "checkpoints" / "last.ckpt").is_file():
        args.append("--ckpt_path=last")
        log(f"  {run.label}: resuming {folder}")
    else:
        log(f"  {run.label}: training {scale.lengths[-1]} steps in {folder}")
    start = time.perf_counter()
    try:
        main(args)  # in-process: the fit command itself, without a new interpreter's start-up
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"training {run.label} stopped with exit status {e.code}; rerun to resume it") from None
    finally:
        spent += time.perf_counter() - start
        attempts.write_text(json.dumps({"wall_s": spent}))
    done.write_text(json.dumps({"steps": scale.lengths[-1], "wall_s": round(spent, 1)}))
    return folder
