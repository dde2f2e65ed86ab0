"""Bad input: one sentence naming the setting and the fix, a non-zero exit within seconds,
and nothing already written (checkpoints, logs) touched. Each case runs the CLI's ``main()``
in-process (the command's code path; test_cli.py runs the real process once)."""

from __future__ import annotations

import os
import pickle
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, write_tiny_cifar

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
def workspace(tmp_path_factory, tiny_run):
    """A finished tiny digits run (a copy of the session's), a corrupt and a malicious checkpoint, and bad data."""
    ws = tmp_path_factory.mktemp("errors")
    shutil.copytree(tiny_run, ws / "run")
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


IMAGE_FOLDER = [IMAGENET, "--trainer.callbacks=[]", "--data.test_root=null", "--data.val_size=1",
                "--data.num_workers=0", "--data.persistent_workers=false"]

CASES = {
    "missing dataset": (["fit", "--config", CIFAR, "--trainer.callbacks=[]", "--data.root=nowhere"],
                        "data.root"),
    "empty image folder": (["fit", "--config", *IMAGE_FOLDER, "--data.root={ws}/empty_folder"], "no images"),
    "unreadable image": (["fit", "--config", *IMAGE_FOLDER, "--data.root={ws}/bad_images", "--data.batch_size=1",
                          "--data.image_size=16", "--model.unet.block_out_channels=[32]", "--model.unet.layers_per_block=1",
                          "--model.unet.attention_resolutions=[]", "--model.unet.attention_head_dim=32"], "broken.png"),
    "image size": (["fit", "--config", *IMAGE_FOLDER, "--data.root={ws}/bad_images", "--data.image_size=20"],
                   "cannot be down-sampled"),
    "checkpoint of another model": (["test", "--config", CIFAR, "--trainer.callbacks=[]", "--data.root={ws}/cifar",
                                     "--data.val_size=4", "--ckpt_path={ws}/run/checkpoints/last.ckpt"],
                                    "in_channels=1 (here 3)"),
    "batch larger than data": (["fit", "--config", DIGITS, "--data.batch_size=5000", "--run_dir={ws}/run",
                                "--ckpt_path=last"], "data.batch_size"),
}

# Refused while the CLI reads the checkpoint or builds the model from it, before any data is read:
# in-process through main(), as the parse-time cases below.
CHECKPOINT_CASES = {
    "truncated checkpoint": (["test", "--config", DIGITS, "--ckpt_path={ws}/truncated.ckpt"], "truncated.ckpt"),
    "missing checkpoint": (["test", "--config", DIGITS, "--ckpt_path={ws}/nothing.ckpt"], "does not exist"),
    "respacing": (["predict", "--config", DIGITS, "--ckpt_path={ws}/run/checkpoints/last.ckpt",
                   "--sampling.sampler.steps=500"], "cannot keep 500"),
    "dpm_solver with a respacing": (["predict", "--config", DIGITS, "--ckpt_path={ws}/run/checkpoints/last.ckpt",
                                     "--sampling.sampler.name=dpm_solver", "--sampling.sampler.steps=ddim50"],
                                    "sampler.steps='ddim50' is not a number of steps for sampler dpm_solver"),
    "test without checkpoint": (["test", "--config", DIGITS], "--ckpt_path"),
    "malicious checkpoint": (["test", "--config", DIGITS, "--ckpt_path={ws}/evil.ckpt"], "evil.ckpt"),
}


# Refused while the command line is parsed or the trainer is built, before any data or model:
# run in-process through the CLI's main() (the same code path, without a new interpreter's startup).
PARSE_CASES = {
    "unknown schedule": (["fit", "--config", DIGITS, "--model.noise_schedule=cosin"],
                         "model.noise_schedule: Expected a typing.Literal['cosine', 'linear']. Got value: cosin"),
    "unknown loss": (["fit", "--config", DIGITS, "--model.loss_type=kl"], "model.loss_type: Expected"),
    "unknown variance": (["fit", "--config", DIGITS, "--model.model_var_type=learned"],
                         "'learned_range', 'fixed_small', 'fixed_large'"),
    "T < 1": (["fit", "--config", DIGITS, "--model.timesteps=0"], "model.timesteps: Not of type PositiveInt"),
    # point 11 of issue 12: every setting group refuses a bad value before anything is built
    "negative learning rate": (["fit", "--config", DIGITS, "--model.lr=-1e-4"], "model.lr: Not of type PositiveFloat"),
    "dropout above 1": (["fit", "--config", DIGITS, "--model.unet.dropout=1.5"], "model.unet.dropout: Not of type"),
    "EMA decay of 1": (["fit", "--config", DIGITS, "--model.ema_decay=1.0"], "model.ema_decay: Not of type"),
    "zero-width level": (["fit", "--config", DIGITS, "--model.unet.block_out_channels=[64,0]"],
                         "model.unet.block_out_channels: Not of type PositiveInt"),
    "zero batch": (["fit", "--config", DIGITS, "--data.batch_size=0"], "data.batch_size (of DigitsDataModule)"),
    "attention at no level": (["fit", "--config", DIGITS, "--model.unet.attention_resolutions=[3]"],
                              "model.unet.attention_resolutions [3] names [3]"),
    "heads wider than the channels": (["fit", "--config", DIGITS, "--model.unet.attention_head_dim=256"],
                                      "model.unet.attention_head_dim=256"),
    "negative seed": (["fit", "--config", DIGITS, "--seed_everything=-1"], "seed_everything=-1"),
    "negative workers": (["fit", "--config", DIGITS, "--data.num_workers=-2"], "data.num_workers"),
    "negative split seed": (["fit", "--config", DIGITS, "--data.split_seed=-1"], "data.split_seed"),
    "negative checkpoint interval": (["fit", "--config", DIGITS, "--checkpoint.every_n_train_steps=-1"],
                                     "every_n_train_steps=-1"),
    "keep count below -1": (["fit", "--config", DIGITS, "--checkpoint.save_top_k=-2"], "save_top_k=-2"),
    "no accumulation": (["fit", "--config", DIGITS, "--trainer.accumulate_grad_batches=0"],
                        "trainer.accumulate_grad_batches=0"),
    "16-bit weights": (["fit", "--config", DIGITS, "--trainer.precision=bf16-true"], "trainer.precision=bf16-true"),
    "run_dir is a file": (["fit", "--config", DIGITS, "--run_dir={ws}/truncated.ckpt"], "run_dir="),
    "config key typo": (["fit", "--config", DIGITS, "--model.ema_rate=0.9"], "ema_rate"),
    "unknown model key": (["fit", "--config", DIGITS, "--model.learning_rate=1e-3"], "learning_rate"),
    "timesteps not a number": (["fit", "--config", DIGITS, "--model.timesteps=many"], "model.timesteps"),
    "removed data key": (["fit", "--config", DIGITS, "--data.val_root=x"], "data (of DigitsDataModule): Option 'val_root'"),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_a_bad_setting_is_refused_in_one_line_before_anything_is_built(workspace, case, run_main):
    args, needle = PARSE_CASES[case]
    args = [a.replace("{ws}", str(workspace)) for a in args]
    if "--run_dir" not in " ".join(args):
        args.append(f"--run_dir={workspace / 'fresh'}")
    before = snapshot(workspace)
    start = time.monotonic()
    code, err = run_main(args, cwd=workspace)
    assert code == 2
    assert time.monotonic() - start < 30
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err[-3000:]
    assert "Traceback" not in err and "usage:" not in err
    assert untouched(before, snapshot(workspace)) and not (workspace / "fresh").exists()


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_bad_checkpoint_or_sampling_setting_is_one_line_and_touches_nothing(workspace, case, run_main):
    args, needle = CHECKPOINT_CASES[case]
    args = [a.replace("{ws}", str(workspace)) for a in args] + [f"--run_dir={workspace / 'run'}"]
    before = snapshot(workspace)
    code, err = run_main(args, cwd=workspace)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert untouched(before, snapshot(workspace)) and not (workspace / "run" / "predict").exists()
    assert not (workspace / "pwned").exists()  # the payload never ran


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_touches_nothing(workspace, case, run_main):
    args, needle = CASES[case]
    args = [a.replace("{ws}", str(workspace)) for a in args]
    if "--run_dir" not in " ".join(args):
        args.append(f"--run_dir={workspace / ('run' if args[0] != 'fit' else 'fresh')}")
    before = snapshot(workspace)
    start = time.monotonic()
    code, err = run_main(args, cwd=workspace)
    assert code != 0
    assert time.monotonic() - start < 60
    assert needle in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert untouched(before, snapshot(workspace))  # checkpoints, config and logs
    assert not list((workspace / "fresh").rglob("*.ckpt"))
    assert not (workspace / "pwned").exists()  # the payload never ran
