"""Sampling with `predict`: the paper's npz format, determinism, respaced learned variances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning.pytorch import Trainer

from iddpm_lightning.callbacks import SampleWriter
from iddpm_lightning.data import to_uint8
from iddpm_lightning.diffusion import GaussianDiffusion, Sampler, get_named_beta_schedule
from iddpm_lightning.module import IDDPM
from iddpm_lightning.rng import seeded_generator
from iddpm_lightning.sampling import Sampling

from .conftest import TINY, run_cli


def test_respaced_ancestral_steps_use_the_learned_variance_of_the_respaced_chain():
    full = GaussianDiffusion(get_named_beta_schedule("cosine", 4000), "learned_range", "hybrid")
    short = full.respace("100")
    x = torch.zeros(1, 1, 2, 2)
    v = 0.3  # frac = 0.65
    out = lambda x_t, t: torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
    i = 50
    orig = int(short.timestep_map[i])
    got = short.p_mean_variance(out, x, torch.tensor([i]))["log_variance"][0, 0, 0, 0]
    frac = (v + 1) / 2
    expected = frac * short.log_betas[i] + (1 - frac) * short.posterior_log_variance_clipped[i]
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    on_full = full.p_mean_variance(out, x, torch.tensor([orig]))["log_variance"][0, 0, 0, 0]
    # 100 of 4000 steps: each respaced step spans ~40 original ones, so its variance is far larger.
    assert got.item() > on_full.item() + 2.0


def test_predict_writes_deterministic_npz_and_grid(tiny_run, tmp_path, digits_config, run_main):
    """On the session's tiny checkpoint (read only): the module, predict's Sampling data and the writer
    in-process, then the same through the CLI's ``main()``."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    args = ["--config", digits_config, f"--run_dir={tmp_path / 'run'}", *TINY]
    ddim = dict(num_samples=6, batch_size=4, sampler=Sampler("ddim", "ddim10", eta=0.0))
    model = IDDPM.load_from_checkpoint(ckpt, map_location="cpu")
    dpm = dict(num_samples=4, sampler=Sampler("dpm_solver", 5, order=3))
    for out_dir, settings in (("a", ddim), ("c", dict(num_samples=4, sampler=Sampler(steps="10,15"))), ("d", dpm)):
        Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                callbacks=[SampleWriter(str(tmp_path / out_dir))]).predict(model, datamodule=Sampling(**settings))
    flags = ["--sampling.num_samples=6", "--sampling.batch_size=4", "--sampling.sampler.name=ddim",
             "--sampling.sampler.steps=ddim10", "--sampling.sampler.eta=0.0"]
    _, out = run_main(["predict", *args, f"--ckpt_path={ckpt}", *flags, f"--sampling.out_dir={tmp_path / 'b'}"],
                      cwd=tmp_path, ok=True)
    outs = [np.load(tmp_path / out_dir / "samples_6x8x8x1.npz") for out_dir in ("a", "b")]
    assert str(tmp_path / "b" / "samples_6x8x8x1.npz") in out
    assert all((tmp_path / out_dir / "samples.png").stat().st_size > 0 for out_dir in ("a", "b"))
    arr = outs[0]["arr_0"]
    assert arr.shape == (6, 8, 8, 1) and arr.dtype == np.uint8
    assert list(outs[0].keys()) == ["arr_0"]  # unconditional: no labels
    assert np.array_equal(arr, outs[1]["arr_0"])  # the same images by both routes
    assert arr.min() >= 0 and arr.max() <= 255 and len(np.unique(arr)) > 2

    # The ancestral sampler with another respacing runs too.
    assert np.load(tmp_path / "c" / "samples_4x8x8x1.npz")["arr_0"].shape == (4, 8, 8, 1)
    # DPM-Solver++ through predict: the module's sampler with predict's noise key (seed 0, index 0).
    g = seeded_generator(torch.device("cpu"), 0, 0)
    expected = to_uint8(model.sample(Sampler("dpm_solver", 5, order=3), 4, generator=g)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(tmp_path / "d" / "samples_4x8x8x1.npz")["arr_0"], expected)


@pytest.mark.slow
def test_predict_under_ddp_merges_every_ranks_share_in_index_order(tiny_run, tmp_path, digits_config):
    """Two DDP processes: each writes its share, rank 0 merges all of them in index order."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    args = ["--config", digits_config, f"--run_dir={tmp_path / 'run'}", *TINY]
    run_cli("predict", *args, f"--ckpt_path={ckpt}", "--sampling.num_samples=7", "--sampling.batch_size=2",
            "--sampling.sampler.steps=5", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=ddp", f"--sampling.out_dir={tmp_path / 'ddp'}", cwd=tmp_path)
    merged = np.load(tmp_path / "ddp" / "samples_7x8x8x1.npz")["arr_0"]
    assert merged.shape == (7, 8, 8, 1)
    parts = [torch.load(tmp_path / "ddp" / "parts" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(torch.cat([p["index"] for p in parts]).tolist()) == list(range(7))  # each index once
    for p in parts:
        for i, img in zip(p["index"].tolist(), p["image"]):
            assert np.array_equal(merged[i], img.numpy())
