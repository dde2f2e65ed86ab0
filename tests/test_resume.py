"""Reliability: a run stopped anywhere — by max_steps, SIGTERM, Ctrl-C or SIGKILL, mid-epoch
or at an epoch's last batch, in any epoch, with or without loader workers, with gradient
accumulation — and resumed with --ckpt_path last ends exactly where an uninterrupted run
does, having trained on exactly the same batches.

Runs that are signalled or killed are real processes (started as a scheduler starts a job step);
every other run (the uninterrupted references, the runs stopped by max_steps, the resumes) goes
through the CLI's ``main()`` in this process, which saves a Python start-up per run."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from iddpm_lightning.cli import main

from .conftest import REPO, TINY, cheap_callbacks
from .recorder import read_batches

pytestmark = pytest.mark.slow

# digits_vlb (ImportanceSampling history in the checkpoint, dropout 0.1), 697 training images (of
# the 1,797, 500 held out for validation and 600 for test) in batches of 128: 5 batches an epoch. A
# validation every 10 batches exercises its streams too; the config's callbacks draw fewer samples.
ARGS = ["--config", str(REPO / "configs" / "digits.yaml"), "--config", str(REPO / "configs" / "digits_vlb.yaml"),
        *TINY, "--data.batch_size=128", "--data.val_size=500", "--data.test_size=600",
        "--trainer.val_check_interval=10", cheap_callbacks("iddpm_lightning.callbacks.ImportanceSampling"),
        "--trainer.callbacks+=tests.recorder.RecordBatches"]
STEPS = 18  # epochs 0..3
# Every run computes with the same number of threads, in this process or in its own.
THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "OMP_NUM_THREADS": str(THREADS)}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_abs_diff(a, b) -> float:
    """Largest difference between two nested structures of tensors (which must match in shape)."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([max_abs_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max([max_abs_diff(x, y) for x, y in zip(a, b)] or [0.0])
    assert a == b
    return 0.0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def fit(run_dir, *extra, cwd) -> str:
    """``fit`` through the CLI's ``main()`` in this process; returns what it printed and logged."""
    args = ["fit", *ARGS, f"--run_dir={run_dir}", *extra]
    out, records, logger = io.StringIO(), _Records(), logging.getLogger("lightning.pytorch")
    threads, here = torch.get_num_threads(), os.getcwd()
    logger.addHandler(records)
    torch.set_num_threads(THREADS)
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(args)
    except SystemExit as e:
        raise AssertionError(f"fit exited with {e.code}:\n{out.getvalue()[-3000:]}") from None
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        logger.removeHandler(records)
    return out.getvalue() + "\n".join(records.lines)


def assert_same_run(straight, resumed, steps=STEPS):
    """Same weights, EMA, optimizer and importance history, and the same batches in the same epochs."""
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == steps
    assert max_abs_diff(a["state_dict"], b["state_dict"]) <= 1e-6  # weights, EMA weights, EMA count
    assert max_abs_diff(a["optimizer_states"], b["optimizer_states"]) <= 1e-6
    (key,) = [k for k in a["callbacks"] if k.startswith("ImportanceSampler")]
    assert max_abs_diff(a["callbacks"][key], b["callbacks"][key]) <= 1e-6
    assert int(a["callbacks"][key]["loss_counts"].sum()) == 100 * 10  # T = 100 timesteps x 10 losses, all full
    seen_a, seen_b = read_batches(straight), read_batches(resumed)
    assert sorted(seen_b) == sorted(seen_a) and len(seen_a) >= steps
    assert [seen_b[i]["images"] for i in sorted(seen_a)] == [seen_a[i]["images"] for i in sorted(seen_a)]
    assert [seen_b[i]["epoch"] for i in sorted(seen_a)] == [seen_a[i]["epoch"] for i in sorted(seen_a)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run, without loader workers; it also keeps a checkpoint every 4 steps."""
    cwd = tmp_path_factory.mktemp("straight")
    fit(cwd / "run", f"--trainer.max_steps={STEPS}", "--checkpoint.every_n_train_steps=4", cwd=cwd)
    return cwd / "run"


@pytest.mark.parametrize("stop, before, after", [(13, 0, 2), (15, 2, 0)])  # epoch 2: 3rd batch | last batch
def test_resume_after_max_steps_in_a_later_epoch(straight, tmp_path, stop, before, after):
    """Loader workers change no batch (the straight run has none), also when their number
    changes at the resume."""
    run = tmp_path / "run"
    fit(run, f"--trainer.max_steps={stop}", f"--data.num_workers={before}", cwd=tmp_path)
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == stop
    fit(run, f"--trainer.max_steps={STEPS}", f"--data.num_workers={after}", "--ckpt_path=last", cwd=tmp_path)
    assert_same_run(straight, run)


def start(run, *extra, cwd, env=None):
    """A fit in its own process group (session), as a scheduler's job step: ``os.killpg`` signals it
    and every process it started, DataLoader workers included."""
    return subprocess.Popen([sys.executable, "-m", "iddpm_lightning", "fit", *ARGS, f"--run_dir={run}", *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**(env or ENV), "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def wait_for(path, proc, timeout=240, lines=0):
    """Until ``path`` exists (and holds at least ``lines`` lines), while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not path.exists() or (lines and path.read_text().count("\n") < lines):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_from_the_latest_periodic_checkpoint(straight, tmp_path, workers):
    run = tmp_path / "run"
    proc = start(run, f"--trainer.max_steps={STEPS}", "--checkpoint.every_n_train_steps=3",
                 f"--data.num_workers={workers}", cwd=tmp_path)
    wait_for(run / "checkpoints" / "step=12.ckpt", proc)  # epoch 2, 2nd batch
    proc.kill()
    proc.wait()
    # "last" is the latest whole save: last.ckpt, or a step file written just before a kill hit last.ckpt's write
    step_files = {int(p.stem[len("step="):]): p for p in (run / "checkpoints").glob("step=*.ckpt")}
    last_step = load(run / "checkpoints" / "last.ckpt")["global_step"]
    newest = max(last_step, *step_files)
    assert newest >= 12 and newest % 3 == 0
    expected = run / "checkpoints" / "last.ckpt" if last_step == newest else step_files[newest]
    out = fit(run, f"--trainer.max_steps={STEPS}", f"--data.num_workers={workers}", "--ckpt_path=last", cwd=tmp_path)
    assert f"Resuming from {expected}" in out
    assert_same_run(straight, run)


@pytest.fixture(scope="module")
def straight_accumulating(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight_acc")
    fit(cwd / "run", f"--trainer.max_steps={ACC_STEPS}", "--trainer.accumulate_grad_batches=3", cwd=cwd)
    return cwd / "run"


ACC_STEPS = 10  # 30 micro-batches: 6 epochs


def stop_by_signal(run, sig, cwd, *extra):
    """Start a run, send ``sig`` a few micro-batches in, and return its last.ckpt and output."""
    proc = start(run, *extra, "--checkpoint.every_n_train_steps=1000", cwd=cwd)
    wait_for(run / "batches.jsonl", proc, lines=4)  # micro-batch 4 started: inside an accumulation window
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else 0), out[-3000:]
    assert "at an optimizer-step boundary" in out and "resume with --ckpt_path last" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    return load(run / "checkpoints" / "last.ckpt"), out


def test_sigterm_during_accumulation_saves_a_whole_step_and_resumes_exactly(straight_accumulating, tmp_path):
    run = tmp_path / "run"
    acc = [f"--trainer.max_steps={ACC_STEPS}", "--trainer.accumulate_grad_batches=3"]
    ckpt, out = stop_by_signal(run, signal.SIGTERM, tmp_path, *acc)
    stopped = ckpt["global_step"]
    assert 1 <= stopped < ACC_STEPS, out[-3000:]
    assert int(ckpt["state_dict"]["ema_updates"]) == stopped
    # saved after the step's last micro-batch (3 a step, fewer at an epoch's end, where Lightning steps too)
    whole = sum(1 for r in read_batches(straight_accumulating).values() if r["step"] < stopped)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == whole
    fit(run, *acc, "--ckpt_path=last", cwd=tmp_path)
    assert_same_run(straight_accumulating, run, steps=ACC_STEPS)


def test_ctrl_c_stops_at_a_step_boundary_with_exit_status_0(tmp_path):
    # 5 micro-batches a step: one epoch of 5 batches, so each step is whole only after its 5th
    ckpt, _ = stop_by_signal(tmp_path / "run", signal.SIGINT, tmp_path, "--trainer.max_steps=100000",
                             "--trainer.accumulate_grad_batches=5")
    assert ckpt["global_step"] >= 1
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 5 * ckpt["global_step"]


def test_periodic_checkpoints_are_all_kept_and_named_by_step(straight):
    """The uninterrupted run's checkpoints (every 4 steps)."""
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=12.ckpt", "step=16.ckpt", "step=4.ckpt", "step=8.ckpt"]
    assert [load(straight / "checkpoints" / f"step={s}.ckpt")["global_step"] for s in (4, 8, 12, 16)] == [4, 8, 12, 16]
    assert load(straight / "checkpoints" / "last.ckpt")["global_step"] == STEPS  # the end of fit, between two saves


def stop_group(run, sig, cwd, *extra, env=None):
    """Start a run with 2 loader workers, signal its whole process group a few steps in (as SLURM
    and most schedulers do), and return its exit status, output and last.ckpt."""
    proc = start(run, f"--trainer.max_steps={STEPS}", "--checkpoint.every_n_train_steps=1000", "--data.num_workers=2",
                 *extra, cwd=cwd, env=env)
    wait_for(run / "batches.jsonl", proc, lines=3)  # a few steps in: batch 3 started
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert "killed by signal" not in out, out[-3000:]  # no DataLoader worker died of it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"], out[-3000:]
    ckpt = load(run / "checkpoints" / "last.ckpt")
    assert 1 <= ckpt["global_step"] < STEPS, out[-3000:]
    assert int(ckpt["state_dict"]["ema_updates"]) == ckpt["global_step"]  # saved at a step boundary
    return proc.returncode, out


@pytest.mark.parametrize("persistent", [False, True])
def test_sigterm_to_the_process_group_with_loader_workers_saves_a_step_and_resumes_exactly(straight, tmp_path,
                                                                                          persistent):
    run = tmp_path / "run"
    code, out = stop_group(run, signal.SIGTERM, tmp_path, f"--data.persistent_workers={persistent}")
    assert code == 128 + signal.SIGTERM and "resume with --ckpt_path last" in out, out[-3000:]
    fit(run, f"--trainer.max_steps={STEPS}", "--data.num_workers=2", "--ckpt_path=last", cwd=tmp_path)
    assert_same_run(straight, run)


def test_slurm_sigusr1_saves_last_requeues_the_job_and_the_rerun_resumes_exactly(straight, tmp_path, monkeypatch):
    """The README's sbatch recipe under a stand-in SLURM: srun's variables, a fake ``scontrol`` on
    the PATH, ``#SBATCH --signal=USR1@120`` delivered to the job step's process group. Lightning's own
    auto-requeue (an hpc_ckpt saved from inside its handler, mid-step) stays out of the way."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    slurm = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "iddpm",
             "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NNODES": "1"}
    run = tmp_path / "run"
    code, out = stop_group(run, signal.SIGUSR1, tmp_path, "--data.persistent_workers=true", env=slurm)
    assert code == 128 + signal.SIGUSR1 and "SLURM job is requeued" in out, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert not list(tmp_path.rglob("hpc_ckpt*"))
    for key, value in slurm.items():  # the requeued job: the same command, in this process
        monkeypatch.setenv(key, value)
    out = fit(run, f"--trainer.max_steps={STEPS}", "--data.num_workers=2", "--ckpt_path=last", cwd=tmp_path)
    assert f"Resuming from {run / 'checkpoints' / 'last.ckpt'}" in out
    assert_same_run(straight, run)
