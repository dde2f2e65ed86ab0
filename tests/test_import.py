"""The paper's checkpoints through every command: ``import`` the official-code fixtures
(tests/data/improved_diffusion), then ``test`` (exact and stratified bits/dim), ``predict`` (every
sampler), ``evaluate``, ``export`` (back to the official layout, and to diffusers where it can) and
``fit`` from the imported weights (fine-tuning, resumed); and every bad input to ``import`` is one
sentence with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from iddpm_lightning.diffusion import SAMPLERS
from iddpm_lightning.module import IDDPM
from iddpm_lightning.official import RELEASED_FLAGS

from .test_official import DATA, fixture, max_rel

CLASSES = {"cifar10_like": 0, "class_cond": 10}
CHANNELS = {"cifar10_like": 3, "class_cond": 1}


def images(folder: Path, name: str, n: int = 12) -> Path:
    """n random 16x16 PNGs (greyscale for class_cond, in class folders 0..9)."""
    g = np.random.default_rng(0)
    for i in range(n):
        sub = folder / (str(i % CLASSES[name]) if CLASSES[name] else "")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = g.integers(0, 256, (16, 16, 3) if CHANNELS[name] == 3 else (16, 16), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i}.png")
    return folder


def config(tmp: Path, name: str) -> Path:
    """A config for the imported model: image-folder data of its shape, no extra callbacks."""
    cfg = {"seed_everything": 0, "run_dir": str(tmp / "run"),
           "data": {"class_path": "iddpm_lightning.data.ImageFolderDataModule",
                    "init_args": {"root": str(images(tmp / "images", name)), "image_size": 16, "val_size": 4,
                                  "test_size": 4, "batch_size": 4, "channels": CHANNELS[name],
                                  "class_cond": bool(CLASSES[name])}},
           "checkpoint": {"every_n_train_steps": 2},
           "trainer": {"max_steps": 2, "val_check_interval": 2, "check_val_every_n_epoch": None,
                       "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                       "callbacks": []}}
    path = tmp / "imported.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def import_fixture(name: str, tmp: Path, run_main) -> tuple[str, Path, Path]:
    """(fixture name, config, checkpoint) of an official-code fixture imported by the real command."""
    run_main(["import", str(DATA / name / "model.pt"), "--flags", fixture(name)[3], "--out", str(tmp / "imported.ckpt")],
             cwd=tmp, ok=True)
    return name, config(tmp, name), tmp / "imported.ckpt"


@pytest.fixture(params=list(CLASSES))
def imported(request, tmp_path, run_main):
    """Each official-code fixture, imported."""
    return import_fixture(request.param, tmp_path, run_main)


def test_test_gives_exact_bits_per_dim_and_a_stratified_estimate_that_agrees(imported, tmp_path, run_main):
    name, cfg, ckpt = imported
    run_main(["test", "--config", str(cfg), f"--ckpt_path={ckpt}"], cwd=tmp_path, ok=True)
    exact = json.loads((tmp_path / "run" / "test" / "bpd.json").read_text())
    assert exact["num_images"] == 4
    assert exact["bpd"] == pytest.approx(exact["prior_bpd"] + exact["decoder_bpd"] + exact["kl_bpd"], rel=1e-6)  # float32 terms
    run_main(["test", "--config", str(cfg), f"--ckpt_path={ckpt}", "--model.test_strata=20"], cwd=tmp_path, ok=True)
    strata = json.loads((tmp_path / "run" / "test" / "bpd.json").read_text())
    assert strata["estimate"].startswith("stratified, 20 strata") and strata["bpd_se"] > 0
    assert abs(strata["bpd"] - exact["bpd"]) < 4 * strata["bpd_se"] + 1e-3, (strata, exact)


def test_predict_draws_with_every_sampler_and_balanced_classes(imported, tmp_path, run_main):
    name, cfg, ckpt = imported
    for sampler in SAMPLERS:
        out = tmp_path / sampler
        run_main(["predict", "--config", str(cfg), f"--ckpt_path={ckpt}", "--sampling.num_samples=5",
                  f"--sampling.sampler.name={sampler}", "--sampling.sampler.steps=4", f"--sampling.out_dir={out}"],
                 cwd=tmp_path, ok=True)
        npz = np.load(out / f"samples_5x16x16x{CHANNELS[name]}.npz")
        assert npz["arr_0"].dtype == np.uint8 and len(np.unique(npz["arr_0"])) > 2
        if CLASSES[name]:
            assert npz["arr_1"].tolist() == [0, 1, 2, 3, 4]  # sample i has class i mod 10


def test_evaluate_scores_the_imported_model_s_samples(tmp_path, run_main, inception_weights):
    _, cfg, ckpt = import_fixture("cifar10_like", tmp_path, run_main)
    run_main(["predict", "--config", str(cfg), f"--ckpt_path={ckpt}", "--sampling.num_samples=6",
              "--sampling.sampler.name=ddim", "--sampling.sampler.steps=5", f"--sampling.out_dir={tmp_path / 'p'}"],
             cwd=tmp_path, ok=True)
    run_main(["evaluate", "--samples", str(tmp_path / "p" / "samples_6x16x16x3.npz"), "--reference", str(cfg),
              "--split", "val", "--inception_weights", str(inception_weights), "--batch_size", "6"],
             cwd=tmp_path, ok=True)
    result = json.loads((tmp_path / "p" / "samples_6x16x16x3_inception_val.json").read_text())
    assert result["num_samples"] == 6 and result["reference"]["num_images"] == 4
    assert np.isfinite(result["metrics"]["fid"])


def test_export_gives_back_the_official_files_and_refuses_diffusers_for_rescaled_steps(imported, tmp_path, run_main):
    name, _, ckpt = imported
    flags, _, state, _ = fixture(name)
    run_main(["export", f"--ckpt_path={ckpt}", "--format", "official", "--out", str(tmp_path / "official")],
             cwd=tmp_path, ok=True)
    back = torch.load(tmp_path / "official" / "model.pt", weights_only=True)
    assert list(back) == list(state) and all(torch.equal(back[k], v.float()) for k, v in state.items())
    written = json.loads((tmp_path / "official" / "flags.json").read_text())
    assert written["UNetModel"] == flags["UNetModel"]
    assert {k: written["official_flags"][k] for k in flags["official_flags"]} == flags["official_flags"]
    code, err = run_main(["export", f"--ckpt_path={ckpt}", "--out", str(tmp_path / "diffusers")], cwd=tmp_path)
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "rescale_timesteps" in line and "--format official" in line, err
    assert not (tmp_path / "diffusers").exists()


def test_a_template_model_goes_to_the_official_layout_and_back_unchanged(tiny_run, tmp_path, run_main):
    """project -> official -> project: the exported files, imported with the flags they came with,
    give the same UNet, so the same outputs."""
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    run_main(["export", f"--ckpt_path={ckpt}", "--format", "official", "--out", str(tmp_path / "o")], cwd=tmp_path,
             ok=True)
    written = json.loads((tmp_path / "o" / "flags.json").read_text())
    u = written["UNetModel"]
    line = f"{written['flags_line']} --channel_mult {','.join(map(str, u['channel_mult']))} --in_channels {u['in_channels']}"
    run_main(["import", str(tmp_path / "o" / "model.pt"), "--flags", line, "--out", str(tmp_path / "again.ckpt")],
             cwd=tmp_path, ok=True)
    before = IDDPM.load_from_checkpoint(ckpt, map_location="cpu").eval()
    after = IDDPM.load_from_checkpoint(tmp_path / "again.ckpt", map_location="cpu").eval()
    assert before.ema_unet.state_dict().keys() == after.unet.state_dict().keys()
    assert all(torch.equal(v, after.unet.state_dict()[k]) for k, v in before.ema_unet.state_dict().items())
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 50, 99])
    with torch.no_grad():
        assert torch.equal(before.model_fn(before.ema_unet)(x, t), after.model_fn(after.ema_unet)(x, t))


def test_a_rescaled_model_with_1000_steps_exports_to_diffusers_with_the_same_outputs(tmp_path, run_main):
    """t·1000/T is t itself at T = 1000: then diffusers' UNet2DModel, which embeds t as it is, is the model."""
    from diffusers import DDPMPipeline

    _, ref, _, line = fixture("cifar10_like")
    run_main(["import", str(DATA / "cifar10_like" / "model.pt"), "--flags", f"{line} --diffusion_steps 1000", "--out",
              str(tmp_path / "t1000.ckpt")], cwd=tmp_path, ok=True)
    run_main(["export", f"--ckpt_path={tmp_path / 't1000.ckpt'}", "--out", str(tmp_path / "pipe")], cwd=tmp_path,
             ok=True)
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    model = IDDPM.load_from_checkpoint(tmp_path / "t1000.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        ours = model.model_fn(model.ema_unet)(ref["x"], ref["t"])
        theirs = pipe.unet(ref["x"], ref["t"]).sample
    assert max_rel(theirs, ours) <= 1e-6


def test_fit_starts_from_the_imported_weights_with_a_fresh_optimizer_and_resumes(imported, tmp_path, run_main):
    name, cfg, ckpt = imported
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    run_main(["fit", "--config", str(cfg), f"--ckpt_path={ckpt}"], cwd=tmp_path, ok=True)
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2 and first["optimizer_states"][0]["state"]  # its own optimizer, 2 steps old
    assert first["hyper_parameters"]["rescale_timesteps"] is True
    # the EMA (decay 0.9999) moved by 1e-4 of two steps: still the imported weights, not a fresh init
    drift = max((first["state_dict"][k] - v).abs().max().item() for k, v in start.items() if k.startswith("ema_unet."))
    assert drift < 1e-3
    code, err = run_main(["fit", "--config", str(cfg), f"--ckpt_path={ckpt}"], cwd=tmp_path)  # not over the run
    assert code == 2 and "already holds a run" in err and "--ckpt_path last" in err
    run_main(["fit", "--config", str(cfg), "--ckpt_path=last", "--trainer.max_steps=3"], cwd=tmp_path, ok=True)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("case, args, needle", [
    ("missing file", ["nowhere.pt", "--flags", "--image_size 32"], "does not exist"),
    ("not a UNet state_dict", ["{tiny}", "--flags", "--image_size 32"], "'state_dict' entry"),
    ("flags that contradict the tensors", ["{model}", "--flags", "{line} --num_res_blocks 3"], "--num_res_blocks 3"),
    ("an option the template does not model", ["{model}", "--flags", "{line} --predict_xstart True"], "predict_xstart"),
    ("the super-resolution model", ["{model}", "--flags", "--large_size 256 --small_size 64"], "super-resolution"),
    ("an unknown flag", ["{model}", "--flags", "{line} --num_chanels 64"], "--num_chanels"),
    ("no flags for a file not named as a released one", ["{model}"], "--flags is missing"),
    ("a released file's name on other tensors", ["{released}"], "--num_channels 128"),
])
def test_a_bad_import_is_one_sentence_and_writes_nothing(case, args, needle, tiny_run, tmp_path, run_main):
    _, _, _, line = fixture("cifar10_like")
    shutil.copy(DATA / "cifar10_like" / "model.pt", tmp_path / "cifar10_uncond_50M_500K.pt")
    subs = {"{tiny}": str(tiny_run / "checkpoints" / "last.ckpt"), "{model}": str(DATA / "cifar10_like" / "model.pt"),
            "{line}": line, "{released}": str(tmp_path / "cifar10_uncond_50M_500K.pt")}
    argv = ["import"]
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    code, err = run_main([*argv, "--out", str(tmp_path / "out.ckpt")], cwd=tmp_path)
    (error,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and needle in error, err
    assert not list(tmp_path.glob("out.ckpt*"))


def test_a_released_file_under_its_own_name_needs_no_flags(tmp_path, run_main, monkeypatch):
    """Without --flags, the flags of the released model the file is named after (here the fixture,
    registered under a released-like name), printed, and the same checkpoint as with them."""
    line = fixture("cifar10_like")[3]
    monkeypatch.setitem(RELEASED_FLAGS, "cifar10_like_release", line)
    shutil.copy(DATA / "cifar10_like" / "model.pt", tmp_path / "cifar10_like_release.pt")
    _, out = run_main(["import", str(tmp_path / "cifar10_like_release.pt"), "--out", str(tmp_path / "a.ckpt")],
                      cwd=tmp_path, ok=True)
    assert f"The flags of the released cifar10_like_release (improved-diffusion's README): {line}" in out
    run_main(["import", str(tmp_path / "cifar10_like_release.pt"), "--flags", line, "--out", str(tmp_path / "b.ckpt")],
             cwd=tmp_path, ok=True)
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.ckpt", "b.ckpt"))
    assert a["hyper_parameters"] == b["hyper_parameters"] and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
