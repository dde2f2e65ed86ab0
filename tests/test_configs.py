"""Every shipped config starts: one fast_dev_run step through the real CLI, on local data
the test generates (the GPU configs at their full UNet size, with a batch of 2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, TINY, run_cli, write_tiny_cifar

pytestmark = pytest.mark.slow

SMOKE = ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.batch_size=2", "--data.num_workers=0", "--data.pin_memory=false", "--data.persistent_workers=false"]


# A variant is a delta composed onto its recipe with a second --config.
CONFIGS = {"cifar10_hybrid": ["cifar10_hybrid"], "cifar10_vlb": ["cifar10_hybrid", "cifar10_vlb"]}


def configs(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(REPO / "configs" / f"{name}.yaml"))]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cifar10_configs_start(tmp_path, name, inception_weights):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / inception_weights.name).symlink_to(inception_weights)  # the path the config names
    write_tiny_cifar(tmp_path / "cifar", n_train=10, n_test=8)
    run_cli("fit", *configs(*CONFIGS[name]), f"--run_dir={tmp_path / 'run'}", *SMOKE,
            f"--data.root={tmp_path / 'cifar'}", "--data.val_size=4", cwd=tmp_path, timeout=600)


def test_imagenet64_config_starts(tmp_path, inception_weights):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / inception_weights.name).symlink_to(inception_weights)
    rng = np.random.default_rng(0)
    for split, n in [("train", 8), ("val", 3)]:
        for i in range(n):
            path = tmp_path / "imagenet64" / split / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(80, 72, 3), dtype=np.uint8)).save(path)
    run_cli("fit", "--config", str(REPO / "configs" / "imagenet64_hybrid.yaml"), f"--run_dir={tmp_path / 'run'}",
            *SMOKE, f"--data.root={tmp_path / 'imagenet64' / 'train'}",
            f"--data.test_root={tmp_path / 'imagenet64' / 'val'}", "--data.val_size=2", cwd=tmp_path, timeout=600)


def test_digits_vlb_trains_with_the_importance_sampler(tmp_path):
    run = tmp_path / "run"
    run_cli("fit", *configs("digits", "digits_vlb"), f"--run_dir={run}", *TINY,
            "--trainer.max_steps=3", cwd=tmp_path)
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ImportanceSampler"))
    assert ckpt["hyper_parameters"]["loss_type"] == "vlb"
    assert int(state["loss_counts"].sum()) == 3 * 16  # every loss of the 3 steps is in the history


def test_fid_without_inception_weights_stops_before_training(tmp_path, run_main):
    write_tiny_cifar(tmp_path / "cifar", n_train=10, n_test=8)
    code, err = run_main(["fit", "--config", str(REPO / "configs" / "cifar10_hybrid.yaml"),
                          f"--run_dir={tmp_path / 'run'}", *SMOKE, f"--data.root={tmp_path / 'cifar'}",
                          "--data.val_size=4"], tmp_path)
    assert code == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
