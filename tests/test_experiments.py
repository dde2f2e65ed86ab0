"""The reproduction suite: its statistics, the gradient-norm callback it reads, and ``--quick``
end to end (every claim gets numbers and a verdict; the report's numbers are its JSON's; a rerun
trains nothing and a run whose end was lost resumes)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from iddpm_lightning.callbacks import GradNorm
from iddpm_lightning.experiments import plan
from iddpm_lightning.experiments.claims import NOT, PARTLY, REPRODUCED, mean_se, verdict
from iddpm_lightning.experiments.measure import Measurements, checkpoint_path, window_noise


def test_grad_norm_logs_the_global_two_norm_of_every_gradient():
    logged = {}

    class Module(torch.nn.Module):  # what the callback reads: named_parameters() with .grad, and log()
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
            self.frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)

        def log(self, name, value, **kw):
            logged[name] = float(value)

    module = Module()
    module.a.grad, module.b.grad = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([0.0, 4.0])
    optimizer = SimpleNamespace(param_groups=[{"params": [module.a, module.frozen]}, {"params": [module.b]}])
    GradNorm().on_before_optimizer_step(None, module, optimizer)
    assert logged == {"train/grad_norm": pytest.approx(math.sqrt(1 + 4 + 4 + 16))}


def test_mean_se_window_noise_and_verdicts_are_their_closed_forms():
    assert mean_se([1.0, 3.0]) == {"mean": 2.0, "se": pytest.approx(1.0), "n": 2}  # std √2, / √2
    assert mean_se([5.0]) == {"mean": 5.0, "se": None, "n": 1}
    assert mean_se([None, float("nan")])["mean"] is None
    w = window_noise([1.0, 3.0, 1.0, 3.0])
    assert w["mean"] == 2.0 and w["std"] == pytest.approx(math.sqrt(4 / 3)) and w["cv"] == pytest.approx(w["std"] / 2)
    assert w["diff_std"] == pytest.approx(math.sqrt(16 / 3) / math.sqrt(2))  # diffs 2, -2, 2: variance 16/3
    assert window_noise([4.0, 5.0, 6.0, 7.0])["diff_std"] == 0.0  # a trend alone is no noise
    assert [verdict(f) for f in ([True, True], [True, False], [False, False])] == [REPRODUCED, PARTLY, NOT]


def fake_fit(stop_at: int, calls: list):
    """A stand-in for ``cli.main(["fit", ...])`` that trains to ``stop_at`` steps and exits 0, as a fit
    stopped by Ctrl-C does (its graceful stop saves last.ckpt at that step): its checkpoints only."""

    def main(args):
        folder = next(a.split("=", 1)[1] for a in args if a.startswith("--run_dir="))
        checkpoints = plan.Path(folder) / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": 2}, checkpoints / "step=2.ckpt")
        torch.save({"global_step": stop_at}, checkpoints / "last.ckpt")
        calls.append(args)
        raise SystemExit(0)

    return main


def test_a_run_stopped_early_with_exit_status_0_is_not_finished_and_no_measurement_reads_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plan, "main", fake_fit(stop_at=3, calls=calls))
    run = plan.runs_of(plan.QUICK)[0]
    with pytest.raises(RuntimeError, match=r"stopped at step 3 of 6 .*rerun the command to resume it"):
        plan.train(run, plan.QUICK, tmp_path)
    folder = plan.run_dir(run, plan.QUICK, tmp_path)
    assert not (folder / "done.json").exists() and not plan.finished(folder, plan.QUICK)
    (folder / "done.json").write_text("{}")  # even with a done.json (an older version wrote one): not finished
    assert not plan.finished(folder, plan.QUICK)
    assert checkpoint_path(folder, 2) == folder / "checkpoints" / "step=2.ckpt"
    assert checkpoint_path(folder, 3) == folder / "checkpoints" / "last.ckpt"  # its step, read from the file
    for step in (4, 6):  # not the step-3 last.ckpt in their place
        with pytest.raises(RuntimeError, match=f"no checkpoint of step {step}"):
            checkpoint_path(folder, step)
    monkeypatch.setattr(plan, "main", fake_fit(stop_at=6, calls=calls))  # the rerun resumes and finishes
    assert plan.train(run, plan.QUICK, tmp_path) == (folder, None)
    assert "--ckpt_path=last" in calls[-1] and plan.finished(folder, plan.QUICK)
    assert json.loads((folder / "done.json").read_text())["code"] == plan.code_version()


def test_other_code_trains_and_measures_anew_unless_reuse_which_the_report_names(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plan, "main", fake_fit(stop_at=6, calls=calls))
    run = plan.runs_of(plan.QUICK)[0]
    monkeypatch.setattr(plan, "code_version", lambda: "aaaaaaaaaa")
    old, _ = plan.train(run, plan.QUICK, tmp_path)
    assert old.name.endswith("-aaaaaaaaaa") and len(calls) == 1
    Measurements(old).get("quality", lambda: {"fd": 1.0}, "aaaaaaaaaa")
    monkeypatch.setattr(plan, "code_version", lambda: "bbbbbbbbbb")  # the package changed
    assert plan.train(run, plan.QUICK, tmp_path, reuse=True) == (old, "aaaaaaaaaa") and len(calls) == 1
    assert Measurements(old).get("quality", lambda: {"fd": 2.0}, "bbbbbbbbbb", reuse=True)["fd"] == 1.0
    assert Measurements(old).get("quality", lambda: {"fd": 2.0}, "bbbbbbbbbb")["fd"] == 2.0  # measured again
    new, reused = plan.train(run, plan.QUICK, tmp_path)
    assert new.name.endswith("-bbbbbbbbbb") and reused is None and len(calls) == 2 and old.is_dir()

    from iddpm_lightning.experiments.report import _reuse_lines

    lines = _reuse_lines({"code": "bbbbbbbbbb", "runs": {"hybrid-s0": {"reused_from_code": "aaaaaaaaaa"}},
                          "reused_measurements": ["hybrid-s0: quality (code aaaaaaaaaa)"]})
    assert "this code is bbbbbbbbbb" in lines[0] and "run hybrid-s0: trained by code aaaaaaaaaa" in lines[1]


@pytest.mark.slow
def test_the_quick_suite_measures_every_claim_and_a_rerun_only_reads_the_cache(tmp_path, capsys):
    from iddpm_lightning.experiments.__main__ import run

    out, runs_dir = tmp_path / "docs" / "reproduction", tmp_path / "runs"
    result = run(out, runs_dir, quick=True, cache_dir=tmp_path / "cache")
    claims = {c["id"]: c for c in result["claims"]}
    assert sorted(claims) == [1, 2, 3, 4]
    for c in claims.values():
        assert c["verdict"] in (REPRODUCED, PARTLY, NOT) and c["findings"] and c["paper"] and c["wall_s"] > 0
        assert all(isinstance(ok, bool) for ok in c["findings"].values())
        assert c["verdict"] == verdict(list(c["findings"].values()))
        assert c["verdict"] == REPRODUCED or c["reason"]
    finite = [claims[1]["cells"][f"{label} @ 5"]["fd_digits"]["mean"] for label in claims[1]["variants"]]
    finite += [claims[2]["bpd"][s]["mean"] for s in ("cosine", "linear")]
    finite += [claims[2]["skip"][s]["0.25"]["ratio"]["mean"] for s in ("cosine", "linear")]
    finite += [claims[3]["bpd"][label][str(n)]["mean"] for label in claims[3]["recipes"] for n in (2, 4, 6)]
    finite += [claims[4]["noise"][label][tag]["std"]["mean"] for label in claims[4]["noise"]
               for tag in ("train/loss", "train/grad_norm")]
    assert all(v is not None and math.isfinite(v) and v >= 0 for v in finite), finite

    md = (tmp_path / "docs" / "reproduction.md").read_text()
    saved = json.loads((out / "reproduction.json").read_text())
    for c in saved["claims"]:
        assert f"| {c['id']}. {c['title']} | **{c['verdict']}** |" in md
    for schedule, stat in saved["claims"][1]["bpd"].items():
        assert f"| {schedule} | {stat['mean']:.3f}" in md  # the table shows the JSON's numbers
    assert all((out / f"claim{i}.png").stat().st_size > 1000 for i in (1, 2, 3, 4))

    # A run whose end was lost (killed after its last checkpoint) resumes; its cached measurement,
    # removed, is measured again to the same value; nothing else is trained or measured again.
    folder = runs_dir / next(p.name for p in runs_dir.iterdir() if p.name.startswith("hybrid-s0"))
    (folder / "done.json").unlink()
    values = json.loads((folder / "measurements.json").read_text())
    key = next(k for k in values if k.startswith("quality/ddpm/5/"))
    kept = values.pop(key)
    (folder / "measurements.json").write_text(json.dumps(values))
    others = [p for p in runs_dir.glob("*/checkpoints/*.ckpt") if p.parent.parent != folder]
    stamps = {p: p.stat().st_mtime_ns for p in others}
    capsys.readouterr()
    again = run(out, runs_dir, quick=True, cache_dir=tmp_path / "cache")
    printed = capsys.readouterr().out
    assert "hybrid-s0: resuming" in printed and "steps in" not in printed and (folder / "done.json").is_file()
    remeasured = json.loads((folder / "measurements.json").read_text())[key]
    assert {k: v for k, v in remeasured.items() if k != "wall_s"} == {k: v for k, v in kept.items() if k != "wall_s"}
    assert {p: p.stat().st_mtime_ns for p in others} == stamps
    assert [c["verdict"] for c in again["claims"]] == [c["verdict"] for c in result["claims"]]
