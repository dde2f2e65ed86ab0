"""The FID callback: numbers through the real callback with a small deterministic feature
extractor (no Inception file needed), the reference-statistics cache, the Inception weights
check, a tiny IDDPM in a real Trainer, and 2-process DDP runs.

Also a script: ``python tests/test_fid.py OUT_DIR [MODE]`` is the DDP run of the last tests (``all``:
each mode in turn, in one launch, into OUT_DIR/MODE).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.image.fid import FrechetInceptionDistance

from iddpm_lightning.callbacks import FID
from iddpm_lightning.data import DigitsDataModule, to_model_range, to_uint8
from iddpm_lightning.diffusion import Sampler
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.evaluation.features import INCEPTION_FILE, INCEPTION_URL, to_rgb
from iddpm_lightning.module import IDDPM
from iddpm_lightning.rng import seeded_generator
from tests.conftest import REPO, TINY_UNET, as_trained  # absolute: this file also runs as the DDP script

THIS = Path(__file__).resolve()


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """What the callback feeds its feature extractor: samples in [-1, 1] as 3-channel uint8 images."""
    return to_rgb(to_uint8(x))


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

    def class_labels(self, indices):
        return None  # unconditional

    def sample(self, sampler=Sampler(), num_samples=None, labels=None, generator=None, **kw):
        self.calls.append((num_samples, sampler.steps, sampler.name, sampler.eta))
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
    fid = FID(num_samples=300, batch_size=64, sampler=Sampler("ddim", 7, eta=0.5), seed=3,
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
    assert fid.reference.num == 1547


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
    assert saved["num"] == 1497 and saved["mu"].shape == (16,) and saved["sigma"].shape == (16, 16)
    feats = TinyExtractor()(to_uint8_rgb(to_model_range(u8_of(digits().train_set))))
    torch.testing.assert_close(saved["features"], feats)  # kept for KID and precision/recall
    torch.testing.assert_close(saved["mu"], feats.double().mean(0))
    torch.testing.assert_close(saved["sigma"], torch.cov(feats.double().T))
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
    (lambda: dict(num_samples=1), "num_samples"),
    (lambda: dict(every_n_val_epochs=0), "every_n_val_epochs"),
    (lambda: dict(batch_size=0), "batch_size"),
    (lambda: dict(reference_split="test"), "reference_split"),
    (lambda: dict(sampler=Sampler(name="euler")), "sampler"),
    (lambda: dict(feature_extractor=torch.nn.Flatten()), "num_features"),
], ids=["num_samples", "every_n_val_epochs", "batch_size", "reference_split", "sampler", "feature_extractor"])
def test_bad_settings_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        FID(**{"feature_extractor": TinyExtractor(), **kw()})


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
    torch.testing.assert_close(fid.extractor.net.fc.weight, weights["fc.weight"])
    assert fid.extractor.name.endswith(INCEPTION_FILE)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        FID(inception_weights=str(path))


# ------------------------------------------------------------------ with training


def test_fid_during_training_every_second_validation_with_a_tiny_iddpm(tmp_path):
    torch.manual_seed(0)
    model = IDDPM(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=20)
    calls, sample = [], model.sample
    model.sample = lambda sampler, n, *a, **k: calls.append(n) or sample(sampler, n, *a, **k)
    fid = FID(num_samples=16, batch_size=10, sampler=Sampler(steps=5), every_n_val_epochs=2,
              feature_extractor=TinyExtractor(8))
    trainer = Trainer(accelerator="cpu", max_epochs=4, limit_train_batches=1, limit_val_batches=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[fid])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert calls == [10, 6, 10, 6]  # validations 2 and 4 only; not the sanity check
    assert math.isfinite(float(trainer.callback_metrics["val/fid"]))
    assert float(trainer.callback_metrics["val/fid"]) > 0
    assert fid.state_dict() == {"val_epochs": 4}
    assert len(list((tmp_path / "fid_stats").glob("fid_ref_*.pt"))) == 1


class Probe(Callback):
    """Records, when training starts (after every setup, before the first step), what FID holds."""

    def __init__(self, fid: FID, cache_dir: Path):
        self.fid, self.cache_dir, self.seen = fid, cache_dir, None

    def on_train_start(self, trainer, pl_module):
        self.seen = {"real_n": self.fid.reference.num,
                     "cache": sorted(p.name for p in self.cache_dir.glob("fid_ref_*.pt")),
                     "step": trainer.global_step}


def tiny_iddpm() -> IDDPM:
    torch.manual_seed(0)
    return as_trained(IDDPM(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=20))


def fit_trainer(root: Path, *callbacks, **kw) -> Trainer:
    return Trainer(**{"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                      "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                      "enable_model_summary": False, "default_root_dir": root, "callbacks": list(callbacks), **kw})


def test_reference_is_computed_and_cached_in_setup_before_the_first_training_step(tmp_path):
    """The first FID validation would be far away: the reference is there when training starts."""
    model = tiny_iddpm()
    calls, sample = [], model.sample
    model.sample = lambda sampler, n, *a, **k: calls.append(n) or sample(sampler, n, *a, **k)
    fid = FID(num_samples=16, batch_size=100, sampler=Sampler(steps=5), every_n_val_epochs=1000,
              feature_extractor=TinyExtractor())
    probe = Probe(fid, tmp_path / "fid_stats")
    dm = DigitsDataModule(batch_size=16)
    fit_trainer(tmp_path, fid, probe).fit(model, datamodule=dm)
    assert probe.seen["step"] == 0 and calls == []  # before training, and no FID evaluation happened
    assert probe.seen["real_n"] == len(dm.train_set) == 1497
    assert [name[:30] for name in probe.seen["cache"]] == ["fid_ref_DigitsDataModule_train"]
    saved = torch.load(tmp_path / "fid_stats" / probe.seen["cache"][0], weights_only=True)
    assert saved["num"] == 1497
    torch.testing.assert_close(saved["mu"], fid.reference.mu)
    assert not list((tmp_path / "fid_stats").glob("*.tmp*"))  # no temp file left behind


class DigitsWith(DigitsDataModule):
    """Digits whose reference split is replaced after setup (by ``make(split_set)``)."""

    def __init__(self, split: str, make, **kw):
        super().__init__(**kw)
        self.split, self.make = split, make

    def setup(self, stage=None):
        super().setup(stage)
        setattr(self, f"{self.split}_set", self.make(getattr(self, f"{self.split}_set")))


class Unreadable(torch.utils.data.Dataset):
    def __init__(self, inner, bad=lambda i: i == 5):
        self.inner, self.bad = inner, bad

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if self.bad(i):
            raise OSError(f"image {i}: truncated file\n(second line)")
        return self.inner[i]


@pytest.mark.parametrize("case, fid_kw, make, needles", [
    ("empty", dict(reference_split="val"), lambda d: torch.utils.data.Subset(d, []),
     ["reference_split='val' is empty", "data.val_size"]),
    ("unreadable", dict(), Unreadable, ["reference_split='train' cannot be read", "image 5: truncated file",
                                        "data.root"]),
    ("too small", dict(reference_split="val"), lambda d: torch.utils.data.Subset(d, [0, 1]),
     ["reference_split='val' has 2 image(s)", "fewer than the 4"]),
])
def test_bad_reference_split_fails_in_setup_before_training(tmp_path, case, fid_kw, make, needles):
    model = tiny_iddpm()
    before = [p.clone() for p in model.unet.parameters()]
    split = fid_kw.get("reference_split", "train")
    fid = FID(num_samples=16, sampler=Sampler(steps=5), feature_extractor=TinyExtractor(), **fid_kw)
    probe = Probe(fid, tmp_path / "fid_stats")
    with pytest.raises(ConfigError) as err:
        fit_trainer(tmp_path, fid, probe).fit(model, datamodule=DigitsWith(split, make, batch_size=16))
    msg = str(err.value)
    assert all(n in msg for n in needles), msg
    assert "\n" not in msg and msg.count(". ") == 0  # one sentence
    assert probe.seen is None  # training never started
    assert all(torch.equal(a, b) for a, b in zip(before, model.unet.parameters()))
    assert not list(tmp_path.rglob("fid_ref_*"))


def test_unwritable_cache_dir_fails_in_setup_and_the_default_folder_only_warns(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    fid = FID(num_samples=16, sampler=Sampler(steps=5), feature_extractor=TinyExtractor(),
              cache_dir=str(blocker / "stats"))
    with pytest.raises(ConfigError, match=r"FID cache_dir=.*a_file/stats.*is not a writable folder") as err:
        fit_trainer(tmp_path, fid).fit(tiny_iddpm(), datamodule=DigitsDataModule(batch_size=16))
    assert "\n" not in str(err.value)
    # The default folder (run directory here) unwritable: a warning, and the statistics still computed.
    fid = FID(num_samples=16, feature_extractor=TinyExtractor())
    dm = digits()
    with pytest.warns(UserWarning, match="cannot write the reference statistics cache"):
        validate(StubModel(), dm, fid, blocker)
    assert fid.reference.num == 1497


def test_no_data_module_fails_in_setup(tmp_path):
    loader = torch.utils.data.DataLoader(digits().train_set, batch_size=16)
    with pytest.raises(ConfigError, match="FID reference_split='train' needs a data module.*no data module"):
        fid = FID(sampler=Sampler(steps=5), feature_extractor=TinyExtractor())
        fit_trainer(tmp_path, fid).fit(tiny_iddpm(), train_dataloaders=loader)


# ---------------------------------------------------------------------------- DDP


def run_ddp_script(out_dir: Path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, str(THIS), str(out_dir), mode], cwd=out_dir, env=env,
                          capture_output=True, text=True, timeout=300)


DDP_MODES = ("labels", "ok", "broken")  # "broken" fails every rank: last


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The three DDP runs in one launch of the two processes (``all``); each mode writes into its folder
    and, when it ends without an error on that rank, ``done{rank}``."""
    out_dir = tmp_path_factory.mktemp("fid_ddp")
    return out_dir, run_ddp_script(out_dir, "all")


def ended_cleanly(folder: Path) -> bool:
    return all((folder / f"done{r}").exists() for r in (0, 1))


@pytest.mark.slow
def test_ddp_shares_the_reference_pass_and_sums_rank_zero_reference_and_all_ranks_samples(ddp_run, tmp_path):
    root, proc = ddp_run
    out = root / "ok"
    assert ended_cleanly(out), proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    first, cached = r0["first"], r0["cached"]
    assert first["fid"] == r1["first"]["fid"]
    assert first["calls"] == [64, 64, 23] and r1["first"]["calls"] == [64, 64, 22]  # 301 samples in all
    # The reference pass was shared in setup: rank r read the images r, r + 2, ... and nothing else.
    assert first["reads"] == 749 and r1["first"]["reads"] == 748
    assert first["real"]["num"] == 1497 and r1["first"]["real"] is None  # the reference lives on rank 0 only
    files = list((out / "run" / "fid_stats").glob("*.pt"))
    assert len(files) == 1 and not list((out / "run" / "fid_stats").glob("*.tmp*"))

    # ... and it equals the single-process reference (to float64 rounding), as does the cache.
    one = FID(num_samples=301, batch_size=64, feature_extractor=TinyExtractor())
    validate(StubModel(), digits(), one, tmp_path / "one")
    saved = torch.load(files[0], weights_only=True)
    single = torch.load(next((tmp_path / "one" / "fid_stats").glob("*.pt")), weights_only=True)
    differ = {"datamodule", "extractor"}  # the script's classes live in __main__
    assert {k: v for k, v in json.loads(saved["key"]).items() if k not in differ} == \
        {k: v for k, v in json.loads(single["key"]).items() if k not in differ}
    for name in ("mu", "sigma", "features"):
        reference = getattr(one.reference, name)
        torch.testing.assert_close(first["real"][name], reference, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(saved[name], reference, rtol=1e-6, atol=1e-7)

    fake = []
    for rank, sizes in [(0, first["calls"]), (1, r1["first"]["calls"])]:
        g = seeded_generator(torch.device("cpu"), 0, rank, 7)
        fake += [noise(n, g) for n in sizes]
    expected = direct_fid(u8_of(digits().train_set), to_uint8_rgb(torch.cat(fake))[:, :1], TinyExtractor())
    assert float(first["fid"]) == pytest.approx(expected, rel=1e-5)

    # A second run finds the cache: rank 0 loads it, no rank reads an image, the same FID.
    assert cached["reads"] == 0 and r1["cached"]["reads"] == 0
    assert cached["real"]["num"] == 1497 and r1["cached"]["real"] is None
    assert float(cached["fid"]) == pytest.approx(float(first["fid"]), rel=1e-9)


@pytest.mark.slow
def test_ddp_class_conditional_samples_are_balanced_over_every_class_by_their_global_index(ddp_run):
    """12 samples of a 10-class model on 2 ranks in batches of 3: sample i has class i % 10, so the
    scored set holds every class (0 and 1 twice), however the ranks and batches cut it."""
    root, proc = ddp_run
    out = root / "labels"
    assert ended_cleanly(out), proc.stderr[-4000:]
    per_rank = {r: torch.load(out / f"labels{r}.pt", weights_only=True) for r in (0, 1)}
    for r, batches in per_rank.items():  # rank r draws the samples r, r + 2, ..., in batches of 3
        assert [b.tolist() for b in batches] == [[(r + 2 * j) % 10 for j in range(k, k + 3)] for k in (0, 3)]
    labels = torch.cat([torch.cat(b) for b in per_rank.values()])
    assert torch.bincount(labels, minlength=10).tolist() == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]


@pytest.mark.slow
def test_ddp_a_rank_that_cannot_read_its_shard_fails_every_rank_in_setup(ddp_run):
    """Only rank 1's images (the odd indices) are unreadable: both ranks stop with rank 1's sentence
    in setup, and neither is left waiting in a collective."""
    root, proc = ddp_run
    out = root / "broken"
    assert proc.returncode != 0 and not any((out / f"done{r}").exists() for r in (0, 1))
    errors = {r: (out / f"error{r}.txt").read_text() for r in (0, 1) if (out / f"error{r}.txt").exists()}
    assert 1 in errors, proc.stderr[-4000:]
    for msg in errors.values():
        assert "reference_split='train' cannot be read" in msg and "image 1: truncated file" in msg
    assert not list(out.rglob("fid_ref_*.pt"))


class CountingDigits(DigitsDataModule):
    """Digits whose training split counts its reads."""

    def setup(self, stage=None):
        super().setup(stage)
        if not isinstance(self.train_set, CountingDataset):
            self.train_set = CountingDataset(self.train_set)


def _ddp_trainer(out_dir: Path, fid: FID) -> Trainer:
    return Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=1, default_root_dir=out_dir / "run",
                   callbacks=[fid])


class SamplingOnly(IDDPM):
    """An IDDPM whose validation runs only the callbacks: its UNet is called by sampling alone."""

    def validation_step(self, batch, batch_idx):
        pass


def _ddp_main(out_dir: Path, mode: str) -> None:
    if mode == "all":
        for each in DDP_MODES:
            (out_dir / each).mkdir(exist_ok=True)
            rank = _ddp_mode(out_dir / each, each)
            (out_dir / each / f"done{rank}").touch()
        return
    _ddp_mode(out_dir, mode)


def _ddp_mode(out_dir: Path, mode: str) -> int:
    """Run ``mode`` on this rank; returns the rank."""
    if mode == "labels":  # a class-conditional IDDPM: which classes the scored samples were drawn with
        model = as_trained(SamplingOnly(unet=TINY_UNET, image_size=8, in_channels=1, num_classes=10, class_cond=True,
                                        timesteps=20))
        seen = []
        model.ema_unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"].cpu()),
                                                 with_kwargs=True)
        fid = FID(num_samples=12, batch_size=3, sampler=Sampler(steps=1),  # 1 UNet call a batch
                  feature_extractor=TinyExtractor())
        trainer = _ddp_trainer(out_dir, fid)
        trainer.validate(model, datamodule=DigitsDataModule(batch_size=16))
        torch.save(seen, out_dir / f"labels{trainer.global_rank}.pt")
        return trainer.global_rank
    if mode == "broken":
        fid = FID(num_samples=301, batch_size=64, feature_extractor=TinyExtractor())
        trainer = _ddp_trainer(out_dir, fid)
        dm = DigitsWith("train", lambda d: Unreadable(d, bad=lambda i: i % 2 == 1), batch_size=16)
        try:
            trainer.validate(StubModel(), datamodule=dm)
        except ConfigError as err:
            (out_dir / f"error{trainer.global_rank}.txt").write_text(str(err))
            raise
        return trainer.global_rank
    results = {}
    for run in ("first", "cached"):
        model, dm = StubModel(), CountingDigits(batch_size=16)
        fid = FID(num_samples=301, batch_size=64, feature_extractor=TinyExtractor())
        trainer = _ddp_trainer(out_dir, fid)
        trainer.validate(model, datamodule=dm)
        results[run] = {"fid": trainer.callback_metrics["val/fid"].cpu(), "calls": [c[0] for c in model.calls],
                        "reads": dm.train_set.reads,
                        "real": None if fid.reference is None else
                        {k: getattr(fid.reference, k) for k in ("mu", "sigma", "features", "num")}}
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")
    return trainer.global_rank


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ok")
