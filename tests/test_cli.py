"""The command line end to end: ``fit``, resume and ``test`` through the CLI's ``main()`` in-process
on the session's tiny run (trained by the real ``fit`` command: conftest's ``tiny_run``), and the
real processes where a process is the point (`slow`: the exit of the command itself, DDP)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import pytest
import torch

from .conftest import REPO, TINY, cheap_callbacks, run_cli


def global_step(ckpt) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def test_fit_resume_test(tiny_run, tmp_path, digits_config, run_main, caplog):
    """``fit`` is the session's tiny run (the real command, 2 steps); a refused rerun, the resume and
    ``test`` run through ``main()`` in-process on a copy of it."""
    fit_out = (tiny_run.parent / "fit.stdout").read_text()
    fit_err = (tiny_run.parent / "fit.stderr").read_text()
    assert f"Run directory: {tiny_run}" in fit_out
    assert "Global batch: 16 images per optimizer step = data.batch_size 16 x 1 device(s)" in fit_out + fit_err
    assert global_step(tiny_run / "checkpoints" / "last.ckpt") == 2
    # one "last" checkpoint, not a versioned last-v1.ckpt next to it
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (tiny_run / "config.yaml").exists() and list(tiny_run.glob("events.out.tfevents.*"))

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = ["--config", digits_config, f"--run_dir={run}", *TINY]
    last = run / "checkpoints" / "last.ckpt"

    # A new run into the same directory would overwrite it: refused, nothing touched.
    before = last.stat().st_mtime_ns
    code, err = run_main(["fit", *args, "--trainer.max_steps=2"], cwd=tmp_path)
    assert code == 2 and "--ckpt_path last" in err
    assert last.stat().st_mtime_ns == before

    # Resume continues the same run: global step, optimizer and EMA counter carry on.
    # A --model.* override is not applied on resume, and says so by name (runtime settings apply silently).
    caplog.set_level("INFO")
    _, resumed = run_main(["fit", *args, "--trainer.max_steps=4", "--ckpt_path=last", "--model.lr=0.5",
                           "--model.bpd_batch_size=7", "--seed_everything=7"], cwd=tmp_path, ok=True)
    resumed += caplog.text
    assert "continues the run with the checkpoint's seed_everything=0; the configured 7 is NOT used" in resumed
    assert "Restoring states from the checkpoint" in resumed
    assert "these configured values are NOT used: model.lr=0.5 (the checkpoint's: 0.0002)" in resumed
    assert "bpd_batch_size=7" not in resumed
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and int(ckpt["state_dict"]["ema_updates"]) == 4
    assert ckpt["hyper_parameters"]["lr"] == 2e-4 and ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 2e-4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]

    _, test = run_main(["test", *args, f"--ckpt_path={last}", "--trainer.limit_test_batches=2"], cwd=tmp_path, ok=True)
    assert "Test bits/dim" in test
    res = json.loads((run / "test" / "bpd.json").read_text())
    assert res["num_images"] == 32
    assert all(math.isfinite(v) and v > 0 for v in res.values())
    assert res["prior_bpd"] + res["decoder_bpd"] + res["kl_bpd"] == pytest.approx(res["bpd"], rel=1e-5)
    curve = np.load(run / "test" / "vb_curve.npz")
    assert curve["vb"].shape == (100,)
    assert curve["vb"].sum() + res["prior_bpd"] == pytest.approx(res["bpd"], rel=1e-5)
    assert curve["vb"][0] == pytest.approx(res["decoder_bpd"], rel=1e-5)
    assert (run / "test" / "vb_curve.png").stat().st_size > 0


def test_print_config_round_trips(tmp_path, digits_config, capsys, monkeypatch):
    from iddpm_lightning.cli import main

    def print_config(config: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", config, "--print_config"])
        assert not exit_.value.code
        return capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    first = print_config(digits_config)
    assert "block_out_channels" in first and "DigitsDataModule" in first and "run_dir: runs/digits" in first
    (tmp_path / "printed.yaml").write_text(first)
    second = print_config("printed.yaml")
    assert first == second


@pytest.mark.slow
def test_a_bad_argument_fails_the_real_command_before_training(tmp_path, digits_config):
    """The command's own process (every other bad setting is checked in-process, test_errors.py)."""
    proc = run_cli("fit", "--config", digits_config, f"--run_dir={tmp_path / 'run'}", "--model.noise_schedule=cosin",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "cosin" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ddp_fit_and_test_on_two_cpu_processes(tmp_path, digits_config):
    """Lightning's DDP (gloo) through the CLI: training with the resumable loader and the
    importance sampler (and the config's callbacks, drawing fewer samples), then an exact test
    where each image counts once across ranks."""
    run = tmp_path / "run"
    vlb = [digits_config, "--config", str(REPO / "configs" / "digits_vlb.yaml")]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    run_cli("fit", "--config", *vlb, f"--run_dir={run}", *TINY, *ddp, "--trainer.max_steps=3",
            cheap_callbacks("iddpm_lightning.callbacks.ImportanceSampling"), cwd=tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ImportanceSampler"))
    assert ckpt["global_step"] == 3 and int(state["loss_counts"].sum()) == 3 * 2 * 16  # both ranks' losses
    run_cli("test", "--config", *vlb, f"--run_dir={run}", *TINY, *ddp, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "--data.test_size=37", "--data.batch_size=8", cwd=tmp_path)
    res = json.loads((run / "test" / "bpd.json").read_text())
    assert res["num_images"] == 37  # 19 + 18: no image padded in twice
    assert res["prior_bpd"] + res["decoder_bpd"] + res["kl_bpd"] == pytest.approx(res["bpd"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate, poisoned, good_steps", [(1, 3, 2), (2, 5, 2)])
def test_ddp_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_message(tmp_path, digits_config, accumulate,
                                                                              poisoned, good_steps):
    """Only rank 1's loss turns NaN (with accumulation: in the first micro-batch of step 3).
    Both processes stop at once, before any rank applies the step, with the same sentence;
    the checkpoint on disk is the last good step, with finite weights."""
    run = tmp_path / "run"
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.monotonic()
    proc = run_cli("fit", "--config", digits_config, f"--run_dir={run}", *TINY, *ddp, "--trainer.max_steps=10",
                   f"--trainer.accumulate_grad_batches={accumulate}", "--checkpoint.every_n_train_steps=1",
                   cheap_callbacks(),
                   "--trainer.callbacks+=tests.faults.NaNOnRank", f"--trainer.callbacks.batch={poisoned}",
                   cwd=tmp_path, env=env, check=False, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - start < 120  # no collective timeout (gloo's default is 30 minutes)
    sentence = (f"error: the training loss is not finite in optimizer step {good_steps + 1} (rank 1, micro-batch 1 "
                f"of {accumulate}); no rank applied it, so the weights and the last checkpoint are those of step "
                f"{good_steps}.")
    assert proc.stderr.count(sentence) == 2, proc.stderr[-3000:]  # rank 0 and rank 1, word for word
    assert "Traceback" not in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == good_steps
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
