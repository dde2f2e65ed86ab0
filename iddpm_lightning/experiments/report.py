"""``docs/reproduction.md``, its JSON and its figures, from the claims' numbers. Every number in
the Markdown is read from the same dict that is written as the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pm(stat: dict | None, digits: int = 2) -> str:
    """``mean ± se`` (or the mean alone with one seed, or n/a)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    mean = f"{stat['mean']:.{digits}f}"
    return mean if stat.get("se") is None else f"{mean} ± {stat['se']:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _claim1(c: dict, scale: dict) -> tuple[list[str], plt.Figure]:
    seeds = ", ".join(map(str, scale["full_seeds"]))
    lines = [f"Digit-feature FD (lower is better) of {scale['num_samples']} samples, by respaced sampling steps "
             f"(the {scale['full_steps']}-step column: seed {seeds} only, as it costs "
             f"{scale['full_steps'] // scale['step_counts'][-1]}x the {scale['step_counts'][-1]}-step one):", ""]
    rows = [[label, *(pm(c["cells"].get(f"{label} @ {b}", {}).get("fd_digits")) for b in c["budgets"])]
            for label in c["variants"]]
    lines += _table(["model, sampler", *(f"{b} steps" for b in c["budgets"])], rows)
    lines += ["", f"Precision / recall / classifier confidence at {c['budgets'][0]} and {c['budgets'][-2]} steps:", ""]
    rows = []
    for label in c["variants"]:
        row = [label]
        for b in (c["budgets"][0], c["budgets"][-2]):
            cell = c["cells"].get(f"{label} @ {b}")
            row.append("n/a" if cell is None else " / ".join(pm(cell[m]) for m in ("precision", "recall", "confidence")))
        rows.append(row)
    lines += _table(["model, sampler", f"{c['budgets'][0]} steps", f"{c['budgets'][-2]} steps"], rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in c["variants"]:
        pts = [(b, c["cells"][f"{label} @ {b}"]["fd_digits"]) for b in c["budgets"] if f"{label} @ {b}" in c["cells"]]
        ax.errorbar([b for b, _ in pts], [s["mean"] for _, s in pts], yerr=[s["se"] or 0 for _, s in pts],
                    marker="o", capsize=3, label=label)
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="digit-feature FD", title="Claim 1")
    ax.legend(fontsize=7)
    return lines, fig


def _claim2(c: dict, scale: dict) -> tuple[list[str], plt.Figure]:
    fracs = ["0", *(f"{f:g}" for f in scale["skip_fractions"])]
    rows = [[schedule, pm(c["bpd"][schedule], 3), pm(c["fd"][schedule]),
             *(pm(c["skip"][schedule][f]) + ("" if f == "0" else f" (×{pm(c['skip'][schedule][f]['ratio'])})")
               for f in fracs)]
            for schedule in ("cosine", "linear")]
    lines = _table(["schedule", "test bits/dim", f"FD, {scale['step_counts'][-1]} steps",
                    *(f"FD, {scale['skip_steps']} steps, first {float(f):.0%} skipped" for f in fracs)], rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for schedule in ("cosine", "linear"):
        ys = [1.0, *(c["skip"][schedule][f]["ratio"]["mean"] for f in fracs[1:])]
        ax.plot([float(f) for f in fracs], ys, marker="o", label=schedule)
    ax.set(xlabel="share of the reverse process skipped", ylabel="FD / FD without skipping", title="Claim 2")
    ax.legend()
    return lines, fig


def _claim3(c: dict, scale: dict) -> tuple[list[str], plt.Figure]:
    lengths = [str(n) for n in scale["lengths"]]
    rows = [[label, *(pm(c["bpd"][label][n], 3) for n in lengths), pm(c["fd"][label])] for label in c["recipes"]]
    rows.append(["L_vlb (IS) − L_hybrid", *(pm(c["vlb_minus_hybrid_bpd"][n], 3) for n in lengths), ""])
    lines = _table(["loss", *(f"test bits/dim, {n} steps" for n in lengths),
                    f"FD, {scale['step_counts'][-1]} steps"], rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in c["recipes"]:
        ax.errorbar([int(n) for n in lengths], [c["bpd"][label][n]["mean"] for n in lengths],
                    yerr=[c["bpd"][label][n]["se"] or 0 for n in lengths], marker="o", capsize=3, label=label)
    ax.set(xlabel="training steps", ylabel="test bits/dim", title="Claim 3")
    ax.legend()
    return lines, fig


def _claim4(c: dict, scale: dict) -> tuple[list[str], plt.Figure]:
    tags = (("train/loss", "training loss"), ("train/grad_norm", "gradient norm"), ("val/bpd", "validation bits/dim"))
    rows = [[label, *(f"{pm(c['noise'][label][tag]['mean'], 3)} / {pm(c['noise'][label][tag]['std'], 3)}"
                      for tag, _ in tags)] for label in c["noise"]]
    lines = [f"Mean / standard deviation over the last {c['window']} training steps (the validation bits/dim: over "
             f"the evaluations in that window):", "",
             *_table(["loss", *(name for _, name in tags)], rows)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, series in c.pop("curves_seed0").items():  # plotted, not written to the JSON
        for ax, tag in zip(axes, ("train/loss", "train/grad_norm")):
            pts = series.get(tag, [])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.6, label=label)
    for ax, title in zip(axes, ("training loss", "gradient norm")):
        ax.set(yscale="log", xlabel="step", title=f"Claim 4: {title} (seed 0)")
    axes[0].legend(fontsize=7)
    return lines, fig


TABLES = {1: _claim1, 2: _claim2, 3: _claim3, 4: _claim4}


def write(result: dict, out: Path) -> Path:
    """Write ``{out}.md``, ``{out}/reproduction.json`` and ``{out}/claim{N}.png``; return the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    scale = result["scale"]
    md = [f"# Reproducing the paper at laptop scale ({scale['name']} suite)", "",
          f"`{result['command']}` on {result['machine']}, {result['date']}: {result['wall_s'] / 60:.1f} minutes "
          f"({result['train_wall_s'] / 60:.1f} of them training {len(result['runs'])} runs; a rerun reuses every "
          "cached run and measurement). Every number here is in "
          f"[`{out.name}/reproduction.json`]({out.name}/reproduction.json).", "",
          "Each run is `configs/digits.yaml` + `experiments/base.yaml` + its delta (see `experiments/`), trained for "
          f"{scale['lengths'][-1]} steps with seeds {', '.join(map(str, scale['seeds']))}. Numbers are the mean over "
          "seeds ± the standard error (std/√n); a finding holds only if it holds for every seed. Sample quality is "
          "measured with the offline digits classifier's features (`fd_digits`, not comparable with Inception FID) "
          f"against the 1,497 training digits, {scale['num_samples']} samples per cell, the same noise for every "
          f"model; test bits/dim is the unbiased stratified estimate (2 × {scale['bpd_strata']} model calls per image) "
          f"on {scale['bpd_images']} test digits (`test` computes the exact value).", "",
          *_reuse_lines(result),
          "| claim | verdict |", "|---|---|",
          *(f"| {c['id']}. {c['title']} | **{c['verdict']}** |" for c in result["claims"]), ""]
    for c in result["claims"]:
        lines, fig = TABLES[c["id"]](c, scale)
        figure = out / f"claim{c['id']}.png"
        fig.tight_layout()
        fig.savefig(figure, dpi=110)
        plt.close(fig)
        md += [f"## {c['id']}. {c['title']}", "", f"**The paper.** {c['paper']}", "", "**Here.**", "", *lines, "",
               f"![claim {c['id']}]({out.name}/{figure.name})", "",
               f"**Verdict: {c['verdict']}** ({c['rule']}; measured in {c['wall_s'] / 60:.1f} min of training and "
               "measurement):", "",
               *(f"- {'holds' if ok else 'does NOT hold'}: {finding}" for finding, ok in c["findings"].items()), ""]
        if c.get("reason"):
            md += [c["reason"], ""]
    (out / "reproduction.json").write_text(json.dumps(_finite(result), indent=1))
    path = out.with_suffix(".md")
    path.write_text("\n".join(md))
    return path


def _reuse_lines(result: dict) -> list[str]:
    """With ``--reuse``: which runs and measurements came from other versions of the code."""
    runs = {label: r["reused_from_code"] for label, r in result["runs"].items() if r.get("reused_from_code")}
    if not runs and not result["reused_measurements"]:
        return [f"Every run was trained and every number measured by this code (version {result['code']}).", ""]
    lines = [f"**Reused from other versions of the code (`--reuse`; this code is {result['code']}):**"]
    lines += [f"- run {label}: trained by code {code}" for label, code in runs.items()]
    lines += [f"- measurement {m}" for m in result["reused_measurements"]]
    return lines + [""]


def _finite(value):
    """``value`` with NaN as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
