"""What the experiments train and measure: the runs (configs as deltas of configs/digits.yaml),
the scale of the full and the quick suite, and the training itself, cached and resumable.

A run is ``fit --config configs/digits.yaml --config experiments/base.yaml [--config delta ...]
--seed_everything S``. Its folder is named by a hash of those files' contents and the
arguments, and by the code that trains and measures (``code_version``: this package's version
and source, and the versions of torch, Lightning and diffusers), so a changed config or code
trains anew, an unchanged one is never trained twice, and a run killed half-way resumes from its
``last.ckpt`` (``--ckpt_path last``) when the command is rerun. A run is finished only when its
checkpoint holds the target step: a fit stopped early (Ctrl-C, a signal) exits cleanly, but is
not finished. ``--reuse`` takes runs (and measurements) of other code instead, and the report
names them. The fit runs in this process (``cli.main``), as ``python -m iddpm_lightning fit`` would.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpointing import read_checkpoint
from ..cli import main

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "configs" / "digits.yaml"
EXPERIMENTS = REPO / "experiments"
PACKAGE = Path(__file__).resolve().parents[1]
# The suite's own files that decide no number (they judge and print what is measured).
NOT_MEASURING = ("experiments/__main__.py", "experiments/claims.py", "experiments/report.py")


@functools.cache
def code_version() -> str:
    """A 10-digit hash of what determines a run's numbers beyond its configs: every source file of
    the package (but the suite's judging and printing), its version, and the versions of torch,
    Lightning and diffusers."""
    digest = hashlib.sha256()
    for name in ("iddpm_lightning", "torch", "lightning", "diffusers"):
        digest.update(f"{name}={importlib.metadata.version(name)};".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative not in NOT_MEASURING:
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:10]


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


def config_digest(run: Run, scale: Scale) -> str:
    """A hash of the arguments and every config file's text."""
    args = fit_args(run, scale)
    texts = [Path(a).read_text() for a in args if a.endswith(".yaml")]
    return hashlib.sha256(json.dumps([[a.replace(str(REPO), "") for a in args], texts]).encode()).hexdigest()[:10]


def run_dir(run: Run, scale: Scale, runs_dir: Path, code: str | None = None) -> Path:
    """``runs_dir/{name}-s{seed}-{config hash}-{code version}``."""
    return runs_dir / f"{run.label}-{config_digest(run, scale)}-{code or code_version()}"


def trained_step(folder: Path) -> int | None:
    """The step of the run's last.ckpt (its metadata only), or None without one."""
    path = folder / "checkpoints" / "last.ckpt"
    return read_checkpoint(path, mmap=True).get("global_step") if path.is_file() else None


def finished(folder: Path, scale: Scale) -> bool:
    """Whether the run in ``folder`` trained to the end: done.json, and last.ckpt at the target step."""
    return (folder / "done.json").is_file() and trained_step(folder) == scale.lengths[-1]


def find(run: Run, scale: Scale, runs_dir: Path, reuse: bool = False) -> tuple[Path, str | None]:
    """The folder of ``run`` and, if it was trained by other code (``reuse``: the newest finished
    run of the same configs, when this code has none), that code's version."""
    folder = run_dir(run, scale, runs_dir)
    if reuse and not finished(folder, scale):
        others = [f for f in runs_dir.glob(f"{run.label}-{config_digest(run, scale)}-*") if finished(f, scale)]
        if others:
            newest = max(others, key=lambda f: (f / "done.json").stat().st_mtime_ns)
            return newest, newest.name.rsplit("-", 1)[1]
    return folder, None


def train(run: Run, scale: Scale, runs_dir: Path, log=print, reuse: bool = False) -> tuple[Path, str | None]:
    """Train ``run`` unless it is finished (see ``find``); resume a killed one. Writes ``done.json``
    (steps, wall seconds over all attempts, code version) once last.ckpt holds the target step;
    a fit that stopped before it is an error (rerun to resume). Returns ``find``'s pair."""
    folder, reused = find(run, scale, runs_dir, reuse)
    if finished(folder, scale):
        return folder, reused
    target = scale.lengths[-1]
    folder.mkdir(parents=True, exist_ok=True)
    args = [*fit_args(run, scale), f"--run_dir={folder}"]
    attempts = folder / "attempts.json"
    spent = json.loads(attempts.read_text())["wall_s"] if attempts.is_file() else 0.0
    if (folder / "checkpoints" / "last.ckpt").is_file():
        args.append("--ckpt_path=last")
        log(f"  {run.label}: resuming {folder}")
    else:
        log(f"  {run.label}: training {target} steps in {folder}")
    start = time.perf_counter()
    try:
        main(args)  # in-process: the fit command itself, without a new interpreter's start-up
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"training {run.label} stopped with exit status {e.code}; rerun to resume it") from None
    finally:
        spent += time.perf_counter() - start
        attempts.write_text(json.dumps({"wall_s": spent}))
    step = trained_step(folder)
    if step != target:  # a graceful stop (Ctrl-C, SIGTERM) exits cleanly, at an earlier step
        raise RuntimeError(f"training {run.label} stopped at step {step} of {target} ({folder}); rerun the command "
                           f"to resume it")
    (folder / "done.json").write_text(json.dumps({"steps": target, "wall_s": round(spent, 1), "code": code_version()}))
    return folder, None
