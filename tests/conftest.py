"""Shared helpers: a tiny model configuration and a subprocess runner for the real CLI."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (before torch loads libgomp): on a machine whose
# cores other processes share, spinning threads made each tiny UNet call 27x slower (1.05 s
# against 0.038 s measured on these 2 cores under load); subprocesses inherit it. A value the
# caller set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm_lightning.unet import UNetConfig

REPO = Path(__file__).resolve().parents[1]

# A UNet and chain small enough for a CPU test to train and evaluate in seconds.
TINY_UNET = UNetConfig(block_out_channels=[32], layers_per_block=1, attention_resolutions=[], attention_head_dim=8)
TINY = [
    "--model.unet.block_out_channels=[32]",
    "--model.unet.layers_per_block=1",
    "--model.unet.attention_resolutions=[]",
    "--model.unet.attention_head_dim=8",
    "--model.timesteps=100",
    "--data.batch_size=16",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=1",
    "--trainer.val_check_interval=2",
]

# digits.yaml's callbacks with a fraction of its samples, for runs whose point is not them (their
# states, streams and collectives run as they do; nothing they draw touches training):
# ``--trainer.callbacks={json.dumps(CHEAP_CALLBACKS)}`` replaces the config's list.
CHEAP_CALLBACKS = [
    {"class_path": "iddpm_lightning.callbacks.SampleGrid", "init_args": {"num_samples": 4, "sampler": {"steps": 5}}},
    {"class_path": "iddpm_lightning.callbacks.BitsPerDim", "init_args": {"num_images": 16}},
    {"class_path": "iddpm_lightning.callbacks.FID",
     "init_args": {"features": "digits", "num_samples": 16, "sampler": {"name": "dpm_solver", "steps": 5}}},
]


def cheap_callbacks(*extra: str) -> str:
    """The command-line argument that sets the callbacks to CHEAP_CALLBACKS and the classes ``extra``."""
    return f"--trainer.callbacks={json.dumps(CHEAP_CALLBACKS + [{'class_path': c} for c in extra])}"


def as_trained(model, seed: int = 0):
    """``model`` (an IDDPM) with random weights in the layers the paper zero-initialises, EMA
    included: an untrained UNet outputs exactly 0, under which two routes to a number agree
    trivially; a test comparing them needs outputs that depend on the inputs."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(seed)
    for m in model.unet.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.reset_parameters()
        elif isinstance(m, Attention):
            m.to_out[0].reset_parameters()
    model.unet.conv_out.reset_parameters()
    model.ema_unet.load_state_dict(model.unet.state_dict())
    return model


def run_cli(*args: str, cwd: Path, timeout: float = 300, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m iddpm_lightning ARGS`` in ``cwd`` (environment ``env``, default ours) and
    return the finished process."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, "-m", "iddpm_lightning", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def run_main(capsys, monkeypatch):
    """``run_main(args, cwd)``: the CLI's ``main(args)`` in-process (the command's code path without
    a new interpreter's start-up). Returns the exit status and stderr; ``run_main(..., ok=True)`` runs
    a command that succeeds (``main`` returns) and returns ``(0, stdout + stderr)``."""
    import logging

    from iddpm_lightning.cli import main

    def run(args, cwd: Path, ok: bool = False) -> tuple[int, str]:
        monkeypatch.chdir(cwd)
        for handler in logging.getLogger("lightning").handlers + logging.getLogger("lightning.pytorch").handlers:
            if isinstance(handler, logging.StreamHandler):  # bound to an earlier test's captured stream
                monkeypatch.setattr(handler, "stream", sys.stderr)
        capsys.readouterr()
        if ok:
            main(list(args))
            out = capsys.readouterr()
            return 0, out.out + out.err
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        return exit_.value.code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The run directory of a tiny digits model trained 2 steps by the real ``fit`` command (a
    subprocess: the CLI smoke test), once per session and shared by the CLI, predict, export and
    error tests. Read it; a test that writes into a run copies it first (``shutil.copytree``). The
    command's output is beside it: ``fit.stdout`` and ``fit.stderr``."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    proc = run_cli("fit", "--config", str(REPO / "configs" / "digits.yaml"), f"--run_dir={cwd / 'run'}", *TINY,
                   "--trainer.max_steps=2", cwd=cwd)
    (cwd / "fit.stdout").write_text(proc.stdout)
    (cwd / "fit.stderr").write_text(proc.stderr)
    return cwd / "run"


@pytest.fixture
def digits_config() -> str:
    return str(REPO / "configs" / "digits.yaml")


def write_tiny_cifar(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """A tiny CIFAR-10 in torchvision's pickle layout (root/cifar-10-batches-py/): the train
    images spread over data_batch_1..5, then test_batch. Returns the rows (R, G, B planes of
    3072 uint8 each; train first) and the labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = np.random.default_rng(seed).integers(0, 256, size=(n_train + n_test, 3072), dtype=np.uint8)
    labels = [i % 10 for i in range(n_train + n_test)]

    def dump(name, rows):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data[rows], "labels": labels[rows]}, f)

    per_batch = n_train // 5
    for b in range(5):
        dump(f"data_batch_{b + 1}", slice(per_batch * b, per_batch * (b + 1)))
    dump("test_batch", slice(n_train, None))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return data, labels


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A file in the format of torch-fidelity's Inception weights, with random values: what
    the FID callback loads, built here because tests have no network."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from iddpm_lightning.evaluation.features import INCEPTION_FILE

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    try:
        weights = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(weights, path)
    return path
