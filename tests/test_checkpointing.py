"""Durable atomic checkpoint writes, whatever CheckpointIO the trainer's plugins chose."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from iddpm_lightning.checkpointing import SAVED_AT, DurableCheckpointIO

from .conftest import REPO, TINY


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_save_is_written_synced_renamed_and_its_folder_synced(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(a), str(b))), real_replace(a, b)))
    path = tmp_path / "last.ckpt"
    DurableCheckpointIO(TorchCheckpointIO()).save_checkpoint({"step": torch.tensor(1)}, path)
    tmp = str(path) + ".tmp"
    assert calls == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]
    assert load(path)["step"] == 1


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, failure):
    io, path = DurableCheckpointIO(TorchCheckpointIO()), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def killed_midway(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else f as handle:
            handle.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    def killed_after_the_temporary_write(a, b):
        raise KeyboardInterrupt

    if failure == "write":
        monkeypatch.setattr(torch, "save", killed_midway)
    else:
        monkeypatch.setattr(os, "replace", killed_after_the_temporary_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load(path)["step"] == 1  # the good checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_the_cli_makes_every_save_durable_whatever_the_plugins(tmp_path):
    from iddpm_lightning.cli import IDDPMCLI

    args = ["--config", str(REPO / "configs" / "digits.yaml"), *TINY, f"--run_dir={tmp_path / 'run'}",
            "--trainer.plugins=lightning.fabric.plugins.environments.LightningEnvironment"]
    cli = IDDPMCLI(args=args, run=False)
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, DurableCheckpointIO) and isinstance(io.inner, TorchCheckpointIO)
    env = cli.trainer._accelerator_connector.cluster_environment
    assert type(env).__name__ == "LightningEnvironment"  # the plugin was applied too


def test_an_asynchronous_checkpoint_io_writes_durably_in_its_thread(tmp_path):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from iddpm_lightning.cli import IDDPMCLI

    args = ["--config", str(REPO / "configs" / "digits.yaml"), *TINY, f"--run_dir={tmp_path / 'run'}",
            "--trainer.plugins=lightning.pytorch.plugins.io.AsyncCheckpointIO"]
    io = IDDPMCLI(args=args, run=False).trainer.strategy.checkpoint_io
    assert isinstance(io, AsyncCheckpointIO) and isinstance(io.checkpoint_io, DurableCheckpointIO)
    io.save_checkpoint({"step": torch.tensor(3)}, tmp_path / "last.ckpt")
    io.teardown()  # waits for the thread
    assert load(tmp_path / "last.ckpt")["step"] == 3 and not (tmp_path / "last.ckpt.tmp").exists()


def save(folder, name, step, at=None):
    """A checkpoint of ``step`` stamped as saved at ``at`` (ns) as DurableCheckpointIO stamps every save."""
    torch.save({"global_step": step, **({SAVED_AT: at} if at is not None else {})}, folder / name)


def test_ckpt_path_last_is_the_newest_whole_save(tmp_path):
    """last.ckpt, unless a kill between the two files of one save left a newer step file, or
    last.ckpt itself is unreadable (written by something else than this template)."""
    from iddpm_lightning.cli import latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, "step=6.ckpt", 6, at=1)
    save(tmp_path, "step=9.ckpt", 9, at=2)
    save(tmp_path, "last.ckpt", 9, at=3)
    (tmp_path / "step=12.ckpt.tmp").write_bytes(b"an interrupted write")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    save(tmp_path, "step=12.ckpt", 12, at=4)
    assert latest_checkpoint(tmp_path) == tmp_path / "step=12.ckpt"
    (tmp_path / "last.ckpt").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path) == tmp_path / "step=12.ckpt"


def test_ckpt_path_last_after_a_rollback_is_the_current_branch_not_the_highest_step(tmp_path):
    """The run saved step=10000..20000, then was resumed from step=10000.ckpt by path: the new
    branch's saves at the same steps got ModelCheckpoint's version suffix, and last.ckpt is at
    15000. The abandoned branch's step=20000.ckpt has the highest step but is not the run."""
    from iddpm_lightning.cli import latest_checkpoint

    at = iter(range(1, 100))
    for step in range(10000, 20001, 2000):
        save(tmp_path, f"step={step}.ckpt", step, at=next(at))
    save(tmp_path, "last.ckpt", 20000, at=next(at))
    save(tmp_path, "step=12000-v1.ckpt", 12000, at=next(at))  # the rollback's branch
    save(tmp_path, "step=14000-v1.ckpt", 14000, at=next(at))
    save(tmp_path, "last.ckpt", 15000, at=next(at))
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    save(tmp_path, "step=16000-v1.ckpt", 16000, at=next(at))  # killed before last.ckpt's write of this save
    assert latest_checkpoint(tmp_path) == tmp_path / "step=16000-v1.ckpt"


def test_checkpoints_of_an_older_version_without_a_stamp_are_ordered_by_modification_time(tmp_path):
    from iddpm_lightning.cli import latest_checkpoint

    for i, (name, step) in enumerate([("step=20.ckpt", 20), ("last.ckpt", 15)]):
        save(tmp_path, name, step)
        os.utime(tmp_path / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"


def test_every_save_is_stamped_with_its_time(tmp_path):
    import time

    before = time.time_ns()
    DurableCheckpointIO(TorchCheckpointIO()).save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
    assert before <= load(tmp_path / "a.ckpt")[SAVED_AT] <= time.time_ns()
