"""Bad input: one sentence naming the setting and the fix, a non-zero exit within seconds,
and nothing already written (checkpoints, logs) touched. Each case runs the real CLI."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, TINY, run_cli, write_tiny_cifar

pytestmark = pytest.mark.slow

DIGITS = str(REPO / "configs" / "digits.yaml")
CIFAR = str(REPO / "configs" / "cifar10_hybrid.yaml")
IMAGENET = str(REPO / "configs" / "imagenet64_hybrid.yaml")


class Payload:
    """Unpickling this would create a file: the attack a malicious checkpoint carries."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A finished tiny digits run, a corrupt and a malicious checkpoint, and bad data."""
    ws = tmp_path_factory.mktemp("errors")
    run_cli("fit", "--config", DIGITS, f"--run_dir={ws / 'run'}", *TINY, "--trainer.max_steps=2", cwd=ws)
    good = ws / "run" / "checkpoints" / "last.ckpt"
    (ws / "truncated.ckpt").write_bytes(good.read_bytes()[:5000])
    with open(ws / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Payload(ws / "pwned")}, f)
    (ws / "empty_folder").mkdir()
    (ws / "bad_images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(ws / "bad_images" / "ok.png")
    (ws / "bad_images" / "broken.png").write_bytes(b"\x89PNG not really")
    write_tiny_cifar(ws / "cifar", n_train=10, n_test=8)
    return ws


def snapshot(ws):
    return {p: p.stat().st_mtime_ns for p in (ws / "run").rglob("*") if p.is_file()}


def untouched(before: dict, after: dict) -> bool:
    """Every file that existed is unchanged, and no checkpoint appeared. (Lightning opens the
    logger, an empty TensorBoard file, before the data module's setup can fail.)"""
    return all(after.get(p) == t for p, t in before.items()) and not [
        p for p in after.keys() - before.keys() if p.suffix == ".ckpt"]


IMAGE_FOLDER = [IMAGENET, "--trainer.callbacks=[]", "--data.val_root=null", "--data.val_size=1",
                "--data.num_workers=0", "--data.persistent_workers=false"]

CASES = {
    "missing dataset": (["fit", "--config", CIFAR, "--trainer.callbacks=[]", "--data.root=nowhere"],
                        "data.root"),
    "empty image folder": (["fit", "--config", *IMAGE_FOLDER, "--data.root={ws}/empty_folder"], "no images"),
    "unreadable image": (["fit", "--config", *IMAGE_FOLDER, "--data.root={ws}/bad_images", "--data.batch_size=1",
                          "--data.image_size=16", "--model.block_out_channels=[32]", "--model.layers_per_block=1",
                          "--model.attention_resolutions=[]"], "broken.png"),
    "image size": (["fit", "--config", *IMAGE_FOLDER, "--data.root={ws}/bad_images", "--data.image_size=20"],
                   "cannot be down-sampled"),
    "checkpoint of another model": (["test", "--config", CIFAR, "--trainer.callbacks=[]", "--data.root={ws}/cifar",
                                     "--data.val_size=4", "--ckpt_path={ws}/run/checkpoints/last.ckpt"],
                                    "in_channels=1 (here 3)"),
    "truncated checkpoint": (["test", "--config", DIGITS, "--ckpt_path={ws}/truncated.ckpt"], "truncated.ckpt"),
    "missing checkpoint": (["test", "--config", DIGITS, "--ckpt_path={ws}/nothing.ckpt"], "does not exist"),
    "unknown schedule": (["fit", "--config", DIGITS, "--model.noise_schedule=cosin"], "cosine, linear"),
    "unknown loss": (["fit", "--config", DIGITS, "--model.loss_type=kl"], "simple, hybrid, vlb"),
    "unknown variance": (["fit", "--config", DIGITS, "--model.model_var_type=learned"],
                         "learned_range, fixed_small, fixed_large"),
    "T < 1": (["fit", "--config", DIGITS, "--model.timesteps=0"], "timesteps must be an integer >= 1"),
    "respacing": (["predict", "--config", DIGITS, "--ckpt_path={ws}/run/checkpoints/last.ckpt",
                   "--sampling.sample_steps=500"], "cannot keep 500"),
    "batch larger than data": (["fit", "--config", DIGITS, "--data.batch_size=5000", "--run_dir={ws}/run",
                                "--ckpt_path=last"], "data.batch_size"),
    "config key typo": (["fit", "--config", DIGITS, "--model.ema_rate=0.9"], "ema_rate"),
    "test without checkpoint": (["test", "--config", DIGITS], "--ckpt_path"),
    "malicious checkpoint": (["test", "--config", DIGITS, "--ckpt_path={ws}/evil.ckpt"], "evil.ckpt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_touches_nothing(workspace, case):
    args, needle = CASES[case]
    args = [a.replace("{ws}", str(workspace)) for a in args]
    if "--run_dir" not in " ".join(args):
        args.append(f"--run_dir={workspace / ('run' if args[0] != 'fit' else 'fresh')}")
    before = snapshot(workspace)
    start = time.monotonic()
    proc = run_cli(*args, cwd=workspace, check=False)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert untouched(before, snapshot(workspace))  # checkpoints, config and logs
    assert not list((workspace / "fresh").rglob("*.ckpt"))
    assert not (workspace / "pwned").exists()  # the payload never ran
