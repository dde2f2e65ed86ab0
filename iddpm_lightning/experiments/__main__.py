"""``python -m iddpm_lightning.experiments run --out docs/reproduction [--quick]``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ..evaluation.features import default_cache_dir
from .claims import CLAIMS, REPRODUCED, Suite
from .measure import Digits, Measurements
from .plan import FULL, QUICK, code_version, runs_of, train
from .report import write


def run(out: Path, runs_dir: Path, quick: bool = False, cache_dir: Path | None = None, reuse: bool = False) -> dict:
    """Train what is missing, measure, judge every claim and write the report; return its dict.
    ``reuse``: take runs and measurements of other code versions where this one has none."""
    start = time.perf_counter()
    scale = QUICK if quick else FULL
    runs = runs_of(scale)
    print(f"{len(runs)} runs of {scale.lengths[-1]} steps ({scale.name} suite, code {code_version()}) in {runs_dir}",
          flush=True)
    trained = {r: train(r, scale, runs_dir, reuse=reuse) for r in runs}
    folders = {r: folder for r, (folder, _) in trained.items()}
    train_wall = {r: _done(folders[r]) for r in runs}
    suite = Suite(scale, Digits(cache_dir), folders, code_version(), reuse)
    claims = []
    for claim in CLAIMS:
        suite.reads = {}
        c = claim(suite)
        used = {r for r, _ in suite.reads}
        c["runs"] = sorted(r.label for r in used)
        c["wall_s"] = round(sum(suite.reads.values()) + sum(train_wall[r] for r in used), 1)
        if c["verdict"] != REPRODUCED:
            c["reason"] = c.pop("caveat")
        else:
            c.pop("caveat")
        claims.append(c)
        print(f"claim {c['id']}: {c['verdict']}", flush=True)
    measured = sum(v["wall_s"] for f in folders.values() for v in Measurements(f).values.values())
    result = {
        "command": " ".join(["python -m iddpm_lightning.experiments run", f"--out {out}",
                             *(["--quick"] if quick else []), *(["--reuse"] if reuse else [])]),
        "machine": _machine(),
        "date": date.today().isoformat(), "scale": scale.__dict__,
        "code": code_version(),
        "runs": {r.label: {"folder": str(folders[r]), "train_wall_s": train_wall[r],
                           **({"reused_from_code": trained[r][1]} if trained[r][1] else {})} for r in runs},
        "reused_measurements": sorted({f"{r.label}: {key} (code {code})" for (r, key), code in suite.reused.items()}),
        "train_wall_s": round(sum(train_wall.values()), 1),
        "wall_s": round(sum(train_wall.values()) + measured, 1),
        "this_invocation_s": round(time.perf_counter() - start, 1),
        "claims": claims,
    }
    path = write(result, out)
    print(f"wrote {path} ({result['wall_s'] / 60:.1f} min of training and measurement in all)")
    return result


def _machine() -> str:
    """e.g. ``2 CPU cores (AMD EPYC 7B13), torch 2.14.1 with 2 threads``."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__} with {torch.get_num_threads()} threads"


def _done(folder: Path) -> float:
    return json.loads((folder / "done.json").read_text())["wall_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iddpm_lightning.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train what is missing, measure, write the report")
    p.add_argument("--out", type=Path, default=Path("docs/reproduction"),
                   help="writes OUT.md, OUT/reproduction.json and OUT/claim*.png")
    p.add_argument("--runs_dir", type=Path, default=None,
                   help="where the runs and their cached measurements live (default runs/experiments, "
                        "runs/experiments_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the same suite on a tiny model, in a minute or two")
    p.add_argument("--cache_dir", type=Path, default=default_cache_dir(), help="the digits classifier's cache")
    p.add_argument("--reuse", action="store_true",
                   help="use runs and measurements made by other versions of the code where this version has none "
                        "(the report names them) instead of training and measuring again")
    args = parser.parse_args(argv)
    runs_dir = args.runs_dir or Path("runs/experiments_quick" if args.quick else "runs/experiments")
    try:
        run(args.out, runs_dir, args.quick, args.cache_dir, args.reuse)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
