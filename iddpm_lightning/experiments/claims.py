"""The paper's four claims, each measured on the runs of ``plan.py`` and given a verdict by a
rule stated next to it. Numbers are means over the training seeds ± their standard error
(std / √n; none with one seed); a comparison "holds" only if it holds for every seed, since
two seeds give a standard error too rough to test against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..diffusion import Sampler
from .measure import Checkpoint, Digits, Measurements, checkpoint_path, curves, window_noise
from .plan import EXPERIMENTS, Run, Scale

REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not at this scale"
METRICS = ("fd_digits", "precision", "recall", "confidence")


def mean_se(values) -> dict:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "se": None, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def verdict(findings: list[bool]) -> str:
    return REPRODUCED if all(findings) else PARTLY if any(findings) else NOT


def lower_for_every_seed(a: list[float], b: list[float]) -> bool:
    """a < b seed by seed (the lists are in seed order)."""
    return all(x < y for x, y in zip(a, b))


def judged(id: int, title: str, paper: str, rule: str, findings: dict[str, bool], caveat: str, **numbers) -> dict:
    """A claim's result: the paper's statement, the findings with the verdict their ``rule`` gives,
    the caveat shown when the verdict is not "reproduced", and the numbers behind them."""
    return {"id": id, "title": title, "paper": paper, "rule": rule, "findings": findings,
            "verdict": verdict(list(findings.values())), "caveat": caveat, **numbers}


@dataclass
class Suite:
    """The trained runs and the measurements on them (cached per run)."""

    scale: Scale
    digits: Digits
    folders: dict[Run, Path]
    code: str  # the version of the code measuring (plan.code_version)
    reuse: bool = False  # keep measurements made by other code (--reuse)
    reads: dict = field(default_factory=dict)  # (run, key) -> wall seconds of the measurements read
    reused: dict = field(default_factory=dict)  # (run, key) -> the other code version that measured it
    _loaded: tuple = field(default=(None, None))

    def runs(self, name: str) -> list[Run]:
        return [r for r in self.folders if r.name == name]

    def checkpoint(self, run: Run, step: int) -> Checkpoint:
        path = checkpoint_path(self.folders[run], step)
        if self._loaded[0] != path:  # one model in memory at a time
            self._loaded = (path, Checkpoint(path))
        return self._loaded[1]

    def quality(self, run: Run, sampler: Sampler, variance: str | None = None, skip: float = 0.0) -> dict:
        """Sample quality of ``run``'s final model: ``num_samples`` images, noise keyed by the run's seed."""
        s = self.scale
        steps = s.full_steps if sampler.steps is None else sampler.steps
        key = f"quality/{sampler.name}/{steps}/{variance or 'own'}/skip{skip:g}/n{s.num_samples}/step{s.lengths[-1]}"
        return self._get(run, key, lambda: self.digits.quality(
            self.checkpoint(run, s.lengths[-1]).draw(sampler, s.num_samples, 10_000 + run.seed, s.sample_batch,
                                                     variance, skip)))

    def test_bpd(self, run: Run, step: int) -> dict:
        s = self.scale
        key = f"test_bpd/strata{s.bpd_strata}/images{s.bpd_images}/step{step}"
        return self._get(run, key, lambda: self.checkpoint(run, step).test_bpd(
            self.digits.test[: s.bpd_images], s.bpd_strata, 20_000 + run.seed))

    def _get(self, run: Run, key: str, measure) -> dict:
        value = Measurements(self.folders[run]).get(key, measure, self.code, self.reuse)
        self.reads[(run, key)] = value["wall_s"]
        if value.get("code") != self.code:
            self.reused[(run, key)] = value.get("code")
        return value

    def curves(self, run: Run) -> dict:
        self.reads.setdefault((run, "curves"), 0.0)
        return curves(self.folders[run])

    def across(self, name: str, measure) -> dict:
        """``measure(run)`` for every seed of recipe ``name``: mean ± se and the per-seed values."""
        values = [measure(run) for run in self.runs(name)]
        return {**mean_se(values), "seeds": values}


def _stat(suite: Suite, name: str, metric: str, *args, **kwargs) -> dict:
    return suite.across(name, lambda r: suite.quality(r, *args, **kwargs)[metric])


def claim_sampling_steps(suite: Suite) -> dict:
    """Claim 1 (§4, Fig. 8): with learned Σ, few respaced ancestral steps keep sample quality. The
    samplers compared are ``experiments/samplers.yaml``'s."""
    s = suite.scale
    budgets = [*s.step_counts, s.full_steps]
    variants = yaml.safe_load((EXPERIMENTS / "samplers.yaml").read_text())  # label: recipe, sampler, variance, full
    cells = {}
    for label, v in variants.items():
        for steps in budgets:
            if steps == s.full_steps and not v.get("full"):
                continue  # the solvers are for few steps
            settings = {**v["sampler"], "steps": None if steps == s.full_steps else v["sampler"]["steps"].format(n=steps)}
            runs = [r for r in suite.runs(v["recipe"]) if steps != s.full_steps or r.seed in s.full_seeds]
            quality = [suite.quality(r, Sampler(**settings), v.get("variance")) for r in runs]
            cells[(label, steps)] = {m: {**mean_se([q[m] for q in quality]), "seeds": [q[m] for q in quality]}
                                     for m in METRICS}
    hybrid, small, large = list(variants)[:3]
    few = s.step_counts[:2]

    def fd(label, steps):
        return cells[(label, steps)]["fd_digits"]["seeds"]

    wins = all(lower_for_every_seed(fd(hybrid, steps), [min(a, b) for a, b in zip(fd(small, steps), fd(large, steps))])
               for steps in few)
    near = s.step_counts[-1]
    keeps = all(h <= 1.25 * f for h, f in zip(fd(hybrid, near), fd(hybrid, s.full_steps)))
    findings = {f"at {few[0]} and {few[1]} steps L_hybrid's FD is below both fixed variances' (every seed)": wins,
                f"L_hybrid at {near} steps is within 25 % of its own FD at {s.full_steps} steps (seeds {list(s.full_seeds)})": keeps}
    return judged(
        1, "Learned variances keep sample quality with few sampling steps",
        "§4 and Fig. 8: with the learned Σ of L_hybrid, 50-100 respaced ancestral steps give nearly the FID "
        "of the full 4,000 (an order of magnitude fewer forward passes, \"a negligible difference in sample "
        "quality\"); L_simple with Σ = β̃ degrades badly with few steps and Σ = β less so.",
        "reproduced if both findings hold, partly if one does", findings,
        "The paper's Fig. 8 is for converged CIFAR-10 and ImageNet models and 50,000 samples; these are "
        f"{s.lengths[-1]}-step models scored on {s.num_samples} samples, whose FD moves by several tenths "
        "between draws.",
        budgets=budgets, variants=list(variants), cells={f"{label} @ {steps}": v for (label, steps), v in cells.items()},
    )


def claim_cosine_schedule(suite: Suite) -> dict:
    """Claim 2 (§3.2, Table 2, Fig. 3): the cosine schedule beats the linear one at low resolution."""
    s = suite.scale
    last = s.lengths[-1]
    out = {"bpd": {}, "fd": {}, "skip": {}}
    for name, schedule in (("hybrid", "cosine"), ("linear", "linear")):
        out["bpd"][schedule] = suite.across(name, lambda r: suite.test_bpd(r, last)["bpd"])
        out["fd"][schedule] = _stat(suite, name, "fd_digits", Sampler(steps=s.step_counts[-1]))
        base = [suite.quality(r, Sampler(steps=s.skip_steps))["fd_digits"] for r in suite.runs(name)]
        out["skip"][schedule] = {"0": {**mean_se(base), "seeds": base}}
        for f in s.skip_fractions:
            fds = [suite.quality(r, Sampler(steps=s.skip_steps), skip=f)["fd_digits"] for r in suite.runs(name)]
            ratios = [a / b for a, b in zip(fds, base)]
            out["skip"][schedule][f"{f:g}"] = {**mean_se(fds), "seeds": fds, "ratio": mean_se(ratios),
                                               "ratio_seeds": ratios}
    worst = f"{max(s.skip_fractions):g}"
    findings = {
        "the cosine schedule has the lower test bits/dim (every seed)":
            lower_for_every_seed(out["bpd"]["cosine"]["seeds"], out["bpd"]["linear"]["seeds"]),
        f"the cosine schedule has the lower FD at {s.step_counts[-1]} steps (every seed)":
            lower_for_every_seed(out["fd"]["cosine"]["seeds"], out["fd"]["linear"]["seeds"]),
        f"skipping the first {float(worst):.0%} of the reverse process costs the linear schedule less FD (as a ratio) "
        f"than the cosine one (every seed)":
            lower_for_every_seed(out["skip"]["linear"][worst]["ratio_seeds"], out["skip"]["cosine"][worst]["ratio_seeds"]),
    }
    return judged(
        2, "The cosine schedule beats the linear one at low resolution",
        "§3.2, Table 2 and Fig. 3: the linear schedule destroys information too fast at 64x64 and 32x32, "
        "so the end of its forward process is almost pure noise: skipping up to 20 % of its reverse process "
        "barely changes FID. The cosine schedule (eq. 17) uses those steps and improves log-likelihood and FID.",
        "reproduced if all three findings hold, partly if one or two do", findings,
        "ᾱ_t of either schedule does not depend on the image size, but what destroying information fast "
        "costs does: an 8x8 digit has 64 pixels to denoise where the paper's images have 3,072 or 12,288, "
        f"and these models trained {s.lengths[-1]} steps, not the paper's hundreds of thousands.",
        **out,
    )


def claim_vlb_vs_hybrid(suite: Suite) -> dict:
    """Claim 3 (Table 2): L_vlb (importance-sampled) gives the best bits/dim, L_hybrid better samples."""
    s = suite.scale
    recipes = {"hybrid": "L_hybrid", "vlb": "L_vlb, importance-sampled t", "vlb_uniform": "L_vlb, uniform t"}
    bpd = {label: {str(step): suite.across(name, lambda r, step=step: suite.test_bpd(r, step)["bpd"])
                   for step in s.lengths} for name, label in recipes.items()}
    fd = {label: _stat(suite, name, "fd_digits", Sampler(steps=s.step_counts[-1])) for name, label in recipes.items()}
    last = str(s.lengths[-1])
    h, v = recipes["hybrid"], recipes["vlb"]
    gaps = {step: [b - a for a, b in zip(bpd[h][step]["seeds"], bpd[v][step]["seeds"])] for step in bpd[h]}
    findings = {
        f"L_vlb (importance-sampled) has the lower test bits/dim after {last} steps (every seed)":
            all(g < 0 for g in gaps[last]),
        f"L_hybrid has the lower FD at {s.step_counts[-1]} steps (every seed)":
            lower_for_every_seed(fd[h]["seeds"], fd[v]["seeds"]),
    }
    return judged(
        3, "L_vlb gives the best bits/dim, L_hybrid the better samples",
        "Table 2 and §3.3: trained long enough (hundreds of thousands of steps), L_vlb with importance-sampled t "
        "reaches the best log-likelihood (2.94 bits/dim on CIFAR-10), while L_hybrid keeps the better FID.",
        "reproduced if both findings hold, partly if one does", findings,
        f"L_vlb's advantage in the paper comes after hundreds of thousands of steps; here every model trains "
        f"{s.lengths[-1]}, and the gap column shows how far L_vlb is from overtaking L_hybrid at each length.",
        recipes=list(recipes.values()), bpd=bpd, fd=fd,
        vlb_minus_hybrid_bpd={step: mean_se(g) for step, g in gaps.items()},
    )


def claim_importance_sampling(suite: Suite) -> dict:
    """Claim 4 (§3.3, Fig. 2): importance sampling makes L_vlb far less noisy."""
    s = suite.scale
    recipes = {"vlb": "L_vlb, importance-sampled t", "vlb_uniform": "L_vlb, uniform t", "hybrid": "L_hybrid"}
    noise, plotted = {}, {}
    for name, label in recipes.items():
        per_seed = []
        for run in suite.runs(name):
            c = suite.curves(run)
            start = s.lengths[-1] - s.curve_window
            window = {tag: [v for step, v in c.get(tag, []) if step >= start]
                      for tag in ("train/loss", "train/vb", "train/grad_norm", "val/bpd")}
            per_seed.append({tag: window_noise(values) for tag, values in window.items()})
            if run.seed == s.seeds[0]:
                plotted[label] = {tag: c.get(tag, []) for tag in ("train/loss", "train/grad_norm", "val/bpd")}
        noise[label] = {tag: {stat: mean_se([p[tag][stat] for p in per_seed]) for stat in ("mean", "std", "cv", "diff_std")}
                        | {"std_seeds": [p[tag]["std"] for p in per_seed]}
                        for tag in per_seed[0]}
    IS, U = recipes["vlb"], recipes["vlb_uniform"]

    def lower(tag):
        return lower_for_every_seed(noise[IS][tag]["std_seeds"], noise[U][tag]["std_seeds"])

    findings = {
        f"the training loss's standard deviation over the last {s.curve_window} steps is lower with importance "
        f"sampling (every seed)": lower("train/loss"),
        "so is the gradient norm's (every seed)": lower("train/grad_norm"),
    }
    return judged(
        4, "Importance sampling makes L_vlb far less noisy",
        "§3.3 and Fig. 2: L_vlb with uniformly drawn t has much more gradient noise than L_hybrid; sampling t "
        "with p_t ∝ √E[L_t²] (eq. 18) makes its learning curve far smoother, and it then reaches the best "
        "log-likelihood.",
        "reproduced if both findings hold, partly if one does", findings,
        "Importance sampling starts only once every t has 10 losses in its history (at least 10·T / batch steps); "
        "before that both L_vlb runs draw t uniformly, so the window must lie after it.",
        window=s.curve_window, noise=noise, curves_seed0=plotted,
    )


CLAIMS = (claim_sampling_steps, claim_cosine_schedule, claim_vlb_vs_hybrid, claim_importance_sampling)
