"""Reliability: a resumed run ends exactly where an uninterrupted one does; a stop signal
leaves a checkpoint of a finished step; checkpoints are written atomically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from .conftest import REPO, TINY, run_cli

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("config", ["digits", "digits_vlb"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, config):
    # 93 batches of 16 per epoch: stopping at step 5 is in the middle of the first epoch.
    args = ["--config", str(REPO / "configs" / f"{config}.yaml"), *TINY, "--trainer.val_check_interval=3"]
    run_cli("fit", *args, f"--run_dir={tmp_path / 'straight'}", "--trainer.max_steps=10", cwd=tmp_path)
    run_cli("fit", *args, f"--run_dir={tmp_path / 'resumed'}", "--trainer.max_steps=5", cwd=tmp_path)
    run_cli("fit", *args, f"--run_dir={tmp_path / 'resumed'}", "--trainer.max_steps=10", "--ckpt_path=last",
            cwd=tmp_path)
    a, b = (load(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 10
    assert max_abs_diff(a["state_dict"], b["state_dict"]) <= 1e-6  # weights, EMA weights, EMA count
    assert max_abs_diff(a["optimizer_states"], b["optimizer_states"]) <= 1e-6
    sampler = [k for k in a["callbacks"] if k.startswith("ImportanceSampler")]
    assert bool(sampler) == (config == "digits_vlb")
    for k in sampler:
        assert max_abs_diff(a["callbacks"][k], b["callbacks"][k]) <= 1e-6
        assert int(a["callbacks"][k]["loss_counts"].sum()) == 10 * 16


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_leaves_a_checkpoint_of_a_finished_step_and_resumes(tmp_path, sig):
    run = tmp_path / "run"
    # a "./"-relative run_dir: Lightning must still recognise our last.ckpt as its own
    args = ["--config", str(REPO / "configs" / "digits.yaml"), "--run_dir=./run", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "iddpm_lightning", "fit", *args, "--trainer.max_steps=100000",
                             "--checkpoint.every_n_train_steps=1000"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not list(run.glob("events.out.tfevents.*")) or time.monotonic() < deadline - 110:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(3)  # a few steps in, mid-step most likely
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else 0), out[-3000:]
    assert "resume with --ckpt_path last" in out
    ckpt = load(run / "checkpoints" / "last.ckpt")
    stopped = ckpt["global_step"]
    assert stopped >= 1 and int(ckpt["state_dict"]["ema_updates"]) == stopped
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    run_cli("fit", *args, f"--trainer.max_steps={stopped + 2}", "--ckpt_path=last", cwd=tmp_path)
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == stopped + 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from iddpm_lightning.checkpointing import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def killed_midway(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else f as handle:
            handle.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load(path)["step"] == 1  # the good checkpoint is intact
    assert not path.with_name("last.ckpt.tmp").exists()
