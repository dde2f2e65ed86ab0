"""Every shipped config starts: it parses, builds its data module (on local data the test generates)
and callbacks, and trains one fast_dev_run step through the CLI's ``main()`` in-process, with a
tiny UNet swapped in on the command line; the paper configs' full UNets have the paper's size
(built on the meta device: shapes only, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from iddpm_lightning.unet import UNetConfig, build_unet

from .conftest import REPO, TINY, write_tiny_cifar

SMOKE = ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.batch_size=2", "--data.num_workers=0", "--data.pin_memory=false", "--data.persistent_workers=false"]
# The config's UNet swapped for a tiny one (conftest.TINY's widths) of two levels, with attention at the
# second (each test names its resolution); the configs' own UNets: test_the_paper_configs_unets_...
TINY_UNET_ARGS = ["--model.unet.block_out_channels=[32,32]", "--model.unet.layers_per_block=1",
                  "--model.unet.attention_head_dim=8"]


# A variant is a delta composed onto its recipe with a second --config.
CONFIGS = {"cifar10_hybrid": ["cifar10_hybrid"], "cifar10_vlb": ["cifar10_hybrid", "cifar10_vlb"]}


def configs(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(REPO / "configs" / f"{name}.yaml"))]


@pytest.fixture
def started(monkeypatch) -> list:
    """The CLI objects of every ``fit`` that ran to its end (a fast_dev_run leaves no checkpoint)."""
    from iddpm_lightning.cli import IDDPMCLI

    clis, after_fit = [], IDDPMCLI.after_fit
    monkeypatch.setattr(IDDPMCLI, "after_fit", lambda self: clis.append(self) or after_fit(self))
    return clis


def check_started(cli, data: str, callbacks: list[str], loss_type: str = "hybrid") -> None:
    """The config's data module and callbacks were built, and one training step ran."""
    assert type(cli.datamodule).__name__ == data
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert [n for n in names if n in ("SampleGrid", "BitsPerDim", "FID", "ImportanceSampling")] == callbacks
    assert cli.model.hparams.loss_type == loss_type
    assert cli.trainer.global_step == 1 and cli.trainer.fast_dev_run


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cifar10_configs_start(tmp_path, name, inception_weights, run_main, started):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / inception_weights.name).symlink_to(inception_weights)  # the path the config names
    write_tiny_cifar(tmp_path / "cifar", n_train=10, n_test=8)
    run_main(["fit", *configs(*CONFIGS[name]), f"--run_dir={tmp_path / 'run'}", *SMOKE, *TINY_UNET_ARGS,
              "--model.unet.attention_resolutions=[16]", f"--data.root={tmp_path / 'cifar'}", "--data.val_size=4"],
             cwd=tmp_path, ok=True)
    vlb = name == "cifar10_vlb"
    (cli,) = started
    check_started(cli, "CIFAR10DataModule", ["SampleGrid", "BitsPerDim", "FID"] + ["ImportanceSampling"] * vlb,
                  "vlb" if vlb else "hybrid")


def test_imagenet64_config_starts(tmp_path, inception_weights, run_main, started):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / inception_weights.name).symlink_to(inception_weights)
    rng = np.random.default_rng(0)
    for split, n in [("train", 8), ("val", 3)]:
        for i in range(n):
            path = tmp_path / "imagenet64" / split / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(80, 72, 3), dtype=np.uint8)).save(path)
    run_main(["fit", "--config", str(REPO / "configs" / "imagenet64_hybrid.yaml"), f"--run_dir={tmp_path / 'run'}",
              *SMOKE, *TINY_UNET_ARGS, "--model.unet.attention_resolutions=[32]",
              f"--data.root={tmp_path / 'imagenet64' / 'train'}", f"--data.test_root={tmp_path / 'imagenet64' / 'val'}",
              "--data.val_size=2"], cwd=tmp_path, ok=True)
    (cli,) = started
    check_started(cli, "ImageFolderDataModule", ["SampleGrid", "BitsPerDim", "FID"])


# Parameters of the configs' UNets (learned range: 2C outputs), as the paper's code builds them:
# CIFAR-10 52.5M, ImageNet 64x64 121M, and the digits' 3.0M (README). A variant keeps its recipe's UNet.
PAPER_UNETS = {"digits": (8, 1, 3_007_682), "digits_vlb": (8, 1, 3_007_682), "cifar10_hybrid": (32, 3, 52_546_438),
               "cifar10_vlb": (32, 3, 52_546_438), "imagenet64_hybrid": (64, 3, 121_063_942)}
RECIPES = {"digits_vlb": ["digits", "digits_vlb"], **CONFIGS}


def merged(*names: str) -> dict:
    """The configs composed as ``--config A --config B`` composes them (B's keys over A's)."""
    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    out: dict = {}
    for name in names:
        out = merge(out, yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text()))
    return out


@pytest.mark.parametrize("name", list(PAPER_UNETS))
def test_the_paper_configs_unets_have_the_papers_parameter_count(name):
    size, channels, expected = PAPER_UNETS[name]
    cfg = merged(*RECIPES.get(name, [name]))
    assert cfg["data"]["init_args"].get("image_size", size) == size
    with torch.device("meta"):  # the shapes only: no memory, no initialisation
        unet = build_unet(UNetConfig(**cfg["model"]["unet"]), size, channels, 2 * channels)
    assert sum(p.numel() for p in unet.parameters()) == expected


def test_digits_vlb_trains_with_the_importance_sampler(tmp_path, run_main):
    run = tmp_path / "run"
    run_main(["fit", *configs("digits", "digits_vlb"), f"--run_dir={run}", *TINY, "--trainer.max_steps=3"],
             cwd=tmp_path, ok=True)
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
