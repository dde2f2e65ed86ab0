"""The FID callback: numbers through the real callback with a small deterministic feature
extractor (no Inception file needed), the reference-statistics cache, the Inception weights
check, a tiny IDDPM in a real Trainer, and a 2-process DDP run.

Also a script: ``python tests/test_fid.py OUT_DIR`` is the DDP run the last test launches.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torchmetrics.image.fid import FrechetInceptionDistance

from iddpm_lightning.callbacks.fid import FID, INCEPTION_FILE, INCEPTION_URL, to_uint8_rgb
from iddpm_lightning.data import DigitsDataModule, to_model_range
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.module import IDDPM, seeded_generator

THIS = Path(__file__).resolve()


class TinyExtractor(torch.nn.Module):
    """A fixed random projection of 8x8-pooled pixels through tanh: deterministic, uint8 in."""

    def __init__(self, num_features: int = 16, seed: int = 0):
        super().__init__()
        self.num_features = num_features
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 64, num_features, generator=g) / 8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3, (x.dtype, x.shape)
        x = F.adaptive_avg_pool2d(x.float() / 127.5 - 1, 8)
        return torch.tanh(x.flatten(1) @ self.proj)


class StubModel(LightningModule):
    """``sample()`` either replays the given uint8 images in order or draws uniform noise from the
    generator it is given; records the calls."""

    def __init__(self, replay: torch.Tensor | None = None):
        super().__init__()
        self.replay, self.cursor, self.calls = replay, 0, []

    def sample(self, num_samples, sample_steps=None, sampler="ddpm", eta=0.0, generator=None, **kw):
        self.calls.append((num_samples, sample_steps, sampler, eta))
        if self.replay is not None:
            u8 = self.replay[self.cursor : self.cursor + num_samples]
            self.cursor += num_samples
            return to_model_range(u8)
        return noise(num_samples, generator)

    def validation_step(self, batch, batch_idx):
        pass


def noise(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1


def digits(batch_size: int = 16) -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup("validate")
    return dm


def u8_of(dataset) -> torch.Tensor:
    """The uint8 images of a digits split, as stored."""
    return dataset.images


def validate(model, dm, fid: FID, root: Path, devices: int = 1) -> float:
    trainer = Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, default_root_dir=root, callbacks=[fid])
    trainer.validate(model, datamodule=dm)
    return float(trainer.callback_metrics["val/fid"])


def direct_fid(real_u8: torch.Tensor, fake_u8: torch.Tensor, extractor: torch.nn.Module) -> float:
    """torchmetrics' FID on the same images, fed directly (the other route)."""
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(real_u8.expand(-1, 3, -1, -1), real=True)
    metric.update(fake_u8.expand(-1, 3, -1, -1), real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------ numbers


def test_to_uint8_rgb_inverts_the_data_scaling_exactly():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    out = to_uint8_rgb(to_model_range(u8))
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 16, 16)
    assert all(torch.equal(out[:, c : c + 1], u8) for c in range(3))
    assert to_uint8_rgb(torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5]).view(1, 1, 1, 5))[0, 0, 0].tolist() == \
        [0, 0, 128, 255, 255]  # clamped; 127.5 rounds to even


def test_fid_of_the_reference_set_against_itself_is_zero_and_against_noise_large(tmp_path):
    dm = digits()
    train = u8_of(dm.train_set)
    n = len(train)  # 1497: three sampling batches of 500, 500, 497
    model = StubModel(replay=train)
    same = validate(model, dm, FID(num_samples=n, batch_size=500, feature_extractor=TinyExtractor()), tmp_path / "a")
    assert [c[0] for c in model.calls] == [500, 500, 497]
    assert abs(same) < 1e-3
    far = validate(StubModel(), dm, FID(num_samples=n, batch_size=500, feature_extractor=TinyExtractor()),
                   tmp_path / "b")
    assert far > 3.0  # digits against uniform noise (about 6 with this extractor)
    # Another sample of digits (the validation split) is much closer than noise, but not at zero.
    val = u8_of(dm.val_set)
    near = validate(StubModel(replay=val), dm, FID(num_samples=len(val), feature_extractor=TinyExtractor()),
                    tmp_path / "c")
    assert 1e-3 < near < far / 10


def test_callback_agrees_with_torchmetrics_fed_directly(tmp_path):
    dm = digits()
    fid = FID(num_samples=300, batch_size=64, sample_steps=7, sampler="ddim", eta=0.5, seed=3,
              feature_extractor=TinyExtractor(24, seed=1))
    model = StubModel()
    value = validate(model, dm, fid, tmp_path)
    assert [c[0] for c in model.calls] == [64, 64, 64, 64, 44]
    assert all(c[1:] == (7, "ddim", 0.5) for c in model.calls)
    g = seeded_generator(torch.device("cpu"), 3, 0, 7)  # the callback's fixed noise on rank 0
    fake = torch.cat([noise(n, g) for n in [64, 64, 64, 64, 44]])
    expected = direct_fid(u8_of(dm.train_set), to_uint8_rgb(fake)[:, :1], TinyExtractor(24, seed=1))
    assert value == pytest.approx(expected, rel=1e-5)
    # The noise is fixed: a second evaluation (metric reset, reference kept) gives the same number.
    assert validate(StubModel(), dm, fid, tmp_path) == pytest.approx(value, rel=1e-6)


def test_new_data_gets_new_reference_statistics(tmp_path):
    fid = FID(num_samples=1547, batch_size=1547, feature_extractor=TinyExtractor())
    validate(StubModel(), digits(), fid, tmp_path)  # reference: the 1,497 training digits
    other = digits_with(val_size=100, split_seed=1)  # 1,547 other training digits
    assert abs(validate(StubModel(replay=u8_of(other.train_set)), other, fid, tmp_path)) < 1e-3
    assert int(fid.metric.real_features_num_samples) == 1547


# -------------------------------------------------------------------------- cache


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner, self.reads = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_reference_statistics_are_cached_on_disk_and_reused(tmp_path):
    values, reads = [], []
    for _ in range(2):
        dm = digits()
        dm.train_set = CountingDataset(dm.train_set)
        values.append(validate(StubModel(), dm, FID(num_samples=200, feature_extractor=TinyExtractor()), tmp_path))
        reads.append(dm.train_set.reads)
    assert reads == [1497, 0]  # the second run never touched the training images
    assert values[1] == values[0]
    files = list((tmp_path / "fid_stats").glob("*.pt"))  # digits has no root: the run directory
    assert [f.name[:30] for f in files] == ["fid_ref_DigitsDataModule_train"]
    saved = torch.load(files[0], weights_only=True)
    assert int(saved["real_features_num_samples"]) == 1497
    assert saved["real_features_sum"].shape == (16,) and saved["real_features_cov_sum"].shape == (16, 16)
    feats = TinyExtractor()(to_uint8_rgb(to_model_range(u8_of(digits().train_set)))).double()
    torch.testing.assert_close(saved["real_features_sum"], feats.sum(0))
    torch.testing.assert_close(saved["real_features_cov_sum"], feats.T @ feats)
    assert json.loads(saved["key"])["split"] == "train"


def test_cache_file_is_keyed_by_split_extractor_and_data(tmp_path):
    class Run:  # what reference_cache_file reads from the trainer
        def __init__(self, dm, root=tmp_path):
            self.datamodule, self.default_root_dir = dm, str(root)

    dm = digits()
    path = lambda run=Run(dm), **kw: FID(**{"feature_extractor": TinyExtractor(), **kw}).reference_cache_file(run)
    base = path()
    assert base.parent == tmp_path / "fid_stats"
    assert path() == base  # same data, split and extractor: same file
    assert path(feature_extractor=TinyExtractor(seed=5)) == base  # the key is the class and num_features
    others = [path(reference_split="val"), path(feature_extractor=TinyExtractor(32)),
              path(Run(digits_with(val_size=100)))]
    assert len({base, *others}) == 4
    assert path(cache_dir=str(tmp_path / "elsewhere")).parent == tmp_path / "elsewhere"
    assert path(Run(dm, tmp_path / "other_run")).name == base.name


def test_cache_lives_next_to_data_with_a_root_and_image_folders_are_keyed_by_their_files(tmp_path):
    import numpy as np
    from PIL import Image

    from iddpm_lightning.data import CIFAR10DataModule, ImageFolderDataModule
    from tests.conftest import write_tiny_cifar

    class Run:
        def __init__(self, dm):
            self.datamodule, self.default_root_dir = dm, str(tmp_path / "run")

    write_tiny_cifar(tmp_path / "cifar", n_train=10, n_test=8)
    cifar = CIFAR10DataModule(root=str(tmp_path / "cifar"), val_size=4, batch_size=2)
    cifar.setup("validate")
    fid = FID(feature_extractor=TinyExtractor())
    assert fid.reference_cache_file(Run(cifar)).parent == tmp_path / "cifar" / "fid_stats"

    rng = np.random.default_rng(0)
    folders = []
    for name in ["a", "b"]:  # same count and size, other files
        for i in range(4):
            path = tmp_path / name / f"{name}{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(path)
        dm = ImageFolderDataModule(root=str(tmp_path / name), image_size=8, val_size=1, batch_size=1)
        dm.setup("validate")
        folders.append(fid.reference_cache_file(Run(dm)))
    assert folders[0] != folders[1]


def digits_with(**kw) -> DigitsDataModule:
    dm = DigitsDataModule(**kw)
    dm.setup("validate")
    return dm


# ---------------------------------------------------------------- configuration


def test_missing_inception_weights_fail_at_construction_naming_the_file(tmp_path):
    missing = tmp_path / "data" / INCEPTION_FILE
    with pytest.raises(ConfigError) as err:
        FID(inception_weights=str(missing))
    msg = str(err.value)
    assert INCEPTION_FILE in msg and str(missing) in msg and INCEPTION_URL in msg
    assert msg.count(". ") == 0 and "\n" not in msg  # one sentence
    with pytest.raises(ConfigError, match=INCEPTION_FILE):
        FID()  # neither weights nor a feature extractor: nothing is downloaded


@pytest.mark.parametrize("kw, match", [
    (dict(num_samples=1), "num_samples"),
    (dict(every_n_val_epochs=0), "every_n_val_epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(reference_split="test"), "reference_split"),
    (dict(sampler="euler"), "sampler"),
    (dict(feature_extractor=torch.nn.Flatten()), "num_features"),
])
def test_bad_settings_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        FID(**{"feature_extractor": TinyExtractor(), **kw})


def test_local_inception_weights_load_with_no_network(tmp_path, monkeypatch):
    """A weights file in torch-fidelity's format (random values here) is read from the path alone."""
    import socket

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:  # build an Inception with random weights to write the file
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        weights = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path = tmp_path / INCEPTION_FILE
    torch.save(weights, path)

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    fid = FID(inception_weights=str(path))
    torch.testing.assert_close(fid.metric.inception.fc.weight, weights["fc.weight"])
    assert fid.extractor_id.endswith(INCEPTION_FILE)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        FID(inception_weights=str(path))


# ------------------------------------------------------------------ with training


def test_fid_during_training_every_second_validation_with_a_tiny_iddpm(tmp_path):
    torch.manual_seed(0)
    model = IDDPM(image_size=8, in_channels=1, block_out_channels=[32], layers_per_block=1,
                  attention_resolutions=[], attention_head_dim=8, timesteps=20)
    calls, sample = [], model.sample
    model.sample = lambda n, *a, **k: calls.append(n) or sample(n, *a, **k)
    fid = FID(num_samples=16, batch_size=10, sample_steps=5, every_n_val_epochs=2, feature_extractor=TinyExtractor(8))
    trainer = Trainer(accelerator="cpu", max_epochs=4, limit_train_batches=1, limit_val_batches=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[fid])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert calls == [10, 6, 10, 6]  # validations 2 and 4 only; not the sanity check
    assert math.isfinite(float(trainer.callback_metrics["val/fid"]))
    assert float(trainer.callback_metrics["val/fid"]) > 0
    assert fid.state_dict() == {"val_epochs": 4}
    assert len(list((tmp_path / "fid_stats").glob("fid_ref_*.pt"))) == 1


# ---------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_sums_rank_zero_reference_and_all_ranks_samples(tmp_path):
    proc = subprocess.run([sys.executable, str(THIS), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["fid"] == r1["fid"]
    assert r0["calls"] == [64, 64, 23] and r1["calls"] == [64, 64, 22]  # 301 samples in all
    assert int(r0["real_n"]) == 1497 and int(r1["real_n"]) == 0  # the reference lives on rank 0 only
    assert len(list((tmp_path / "run" / "fid_stats").glob("*.pt"))) == 1
    fake = []
    for rank, sizes in [(0, r0["calls"]), (1, r1["calls"])]:
        g = seeded_generator(torch.device("cpu"), 0, rank, 7)
        fake += [noise(n, g) for n in sizes]
    expected = direct_fid(u8_of(digits().train_set), to_uint8_rgb(torch.cat(fake))[:, :1], TinyExtractor())
    assert float(r0["fid"]) == pytest.approx(expected, rel=1e-5)


def _ddp_main(out_dir: Path) -> None:
    model = StubModel()
    fid = FID(num_samples=301, batch_size=64, feature_extractor=TinyExtractor())
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, default_root_dir=out_dir / "run",
                      callbacks=[fid])
    trainer.validate(model, datamodule=DigitsDataModule(batch_size=16))
    torch.save({"fid": trainer.callback_metrics["val/fid"].cpu(), "calls": [c[0] for c in model.calls],
                "real_n": fid.metric.real_features_num_samples.cpu()}, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))
