"""Export to a diffusers DDPMPipeline: the folder loads, holds our EMA UNet and schedule, and
its DDPMScheduler steps like our sampler (up to float32), with the differences pinned down."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from iddpm_lightning.checkpointing import read_checkpoint
from iddpm_lightning.cli import main as cli_main
from iddpm_lightning.diffusion import GaussianDiffusion, Sampler, get_named_beta_schedule
from iddpm_lightning.diffusion.schedules import space_timesteps
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.export import ddpm_scheduler_config, export_to_diffusers
from iddpm_lightning.module import IDDPM
from iddpm_lightning.unet import UNetConfig

from .conftest import TINY_UNET

T = 100
TINY_MODEL = dict(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=T)


def tiny_model(**overrides) -> IDDPM:
    torch.manual_seed(0)
    model = IDDPM(**{**TINY_MODEL, **overrides})
    with torch.no_grad():  # trained weights that differ from their EMA, so the export's choice shows
        for p in model.unet.parameters():
            p.add_(0.01)
    return model


def save_checkpoint(model: IDDPM, path):
    """A checkpoint as Lightning writes its essentials: the module's state and hyperparameters."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = tiny_model()
    ckpt = save_checkpoint(model, tmp / "tiny.ckpt")
    return model, ckpt, export_to_diffusers(ckpt, tmp / "pipe")


def load_pipeline(path) -> DDPMPipeline:
    pipe = DDPMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------ round trip


def test_round_trip_holds_the_ema_unet_and_the_training_schedule(exported):
    model, ckpt, out = exported
    assert read_checkpoint(ckpt)["hyper_parameters"]["timesteps"] == T  # weights_only accepts it
    assert (out / "model_index.json").is_file()
    pipe = load_pipeline(out)

    ours, theirs = model.ema_unet.state_dict(), pipe.unet.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    raw = model.unet.state_dict()
    assert not all(torch.equal(theirs[k], raw[k]) for k in raw)  # the EMA, not the trained weights

    cfg = pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.variance_type) == (T, "squaredcos_cap_v2", "learned_range")
    assert (cfg.clip_sample, cfg.clip_sample_range, cfg.prediction_type) == (True, 1.0, "epsilon")
    # diffusers evaluates the same cosine formula in float64 and casts: bit-equal float32 betas.
    assert torch.equal(pipe.scheduler.betas, model.diffusion.betas.float())
    # Its cumprod runs in float32: measured max |Δᾱ| = 1.02e-7 at T = 100 (3.6e-7 at T = 4000).
    diff = (pipe.scheduler.alphas_cumprod.double() - model.diffusion.alphas_cumprod).abs().max().item()
    assert 1e-9 < diff < 2e-7

    images = pipe(batch_size=2, num_inference_steps=5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.01


def test_the_pipeline_samples_what_our_sampler_samples(exported):
    """Same UNet, same generator: x_T and every z are the same draws, so whole chains agree."""
    model, _, out = exported
    pipe = load_pipeline(out)
    for k in (5, T):
        ours = model.sample(Sampler(steps=None if k == T else k), 2, generator=torch.Generator().manual_seed(1))
        theirs = pipe(batch_size=2, num_inference_steps=k, output_type="pt",
                      generator=torch.Generator().manual_seed(1)).images  # (B, C, H, W) in [0, 1]
        assert pipe.scheduler.timesteps.tolist() == space_timesteps(T, k)[::-1]
        diff = (theirs - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item()
        # Measured 4.8e-7 (5 steps) and 2.6e-6 (100 steps): float32 schedule differences only.
        assert diff < 5e-6, (k, diff)
        assert (ours.clamp(-1, 1) / 2 + 0.5).std() > 0.01


def test_linear_schedule_exports_our_scaled_betas_not_diffusers_linear(tmp_path):
    model = tiny_model(noise_schedule="linear", model_var_type="fixed_large", loss_type="simple")
    out = export_to_diffusers(save_checkpoint(model, tmp_path / "lin.ckpt"), tmp_path / "pipe")
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.variance_type == "fixed_large"
    ours = torch.from_numpy(get_named_beta_schedule("linear", T))
    assert torch.equal(scheduler.betas, ours.float())  # trained_betas survive the JSON round trip
    assert scheduler.betas[-1].item() == pytest.approx(0.02 * 1000 / T)  # 0.2: scaled by 1000/T
    unscaled = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    assert unscaled.betas[-1].item() == pytest.approx(0.02)  # diffusers' own "linear" would be wrong here
    diff = (scheduler.alphas_cumprod.double() - torch.cumprod(1 - ours, 0)).abs().max().item()
    assert diff < 1e-7  # measured 7.1e-8


# ------------------------------------------------------------------ one reverse step


def step_both(diffusion, scheduler, i, x_t, model_output, seed=7):
    """Our p_sample at (respaced) index i and diffusers' step at the original timestep."""
    t_orig = int(diffusion.timestep_map[i])
    ours = diffusion.p_sample(lambda x, t: model_output, x_t, torch.full((x_t.shape[0],), i),
                              generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    theirs = scheduler.step(model_output, t_orig, x_t, generator=g)
    return ours, theirs, g


@pytest.mark.parametrize("schedule,var_type", [("cosine", "learned_range"), ("linear", "learned_range"),
                                               ("cosine", "fixed_small"), ("cosine", "fixed_large")])
@pytest.mark.parametrize("respacing", [None, "10", "10,15"])
def test_one_reverse_step_agrees(schedule, var_type, respacing):
    diffusion = GaussianDiffusion(get_named_beta_schedule(schedule, T), var_type, "hybrid")
    scheduler = DDPMScheduler(**ddpm_scheduler_config(T, schedule, var_type))
    if respacing is not None:
        diffusion = diffusion.respace(respacing)
        scheduler.set_timesteps(timesteps=diffusion.timestep_map.tolist()[::-1])  # custom timesteps
    n = diffusion.num_timesteps
    gen = torch.Generator().manual_seed(0)
    channels = 2 if var_type == "learned_range" else 1
    for i in sorted({0, 1, 2, n // 2, n - 1}):
        x_t = torch.randn(2, 1, 8, 8, generator=gen)
        output = torch.randn(2, channels, 8, 8, generator=gen)  # a fixed "model" output: UNet out of the loop
        ours, theirs, g = step_both(diffusion, scheduler, i, x_t, output)
        # Differences come from diffusers' float32 tables, mostly β_t re-derived as 1 − ᾱ_t/ᾱ_{t-1}
        # in float32 (relative error up to 2.2e-5 at small t). Measured max over these cases:
        # sample 1.25e-5 (linear, learned_range, t = 2), x̂_0 1.2e-6.
        assert (ours["sample"] - theirs.prev_sample).abs().max().item() < 2e-5, i
        assert (ours["pred_xstart"] - theirs.pred_original_sample).abs().max().item() < 2e-6, i
        if i > 0:  # the step noise is the step's only randomness, and it is large next to these tolerances
            assert (ours["sample"] - diffusion.p_mean_variance(lambda x, t: output, x_t,
                                                               torch.full((2,), i))["mean"]).abs().max() > 1e-3


def test_diffusers_draws_the_step_noise_as_torch_randn_of_the_image_shape_on_cpu():
    diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", T), "learned_range", "hybrid")
    scheduler = DDPMScheduler(**ddpm_scheduler_config(T, "cosine", "learned_range"))
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    output = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    i = 40
    _, theirs, g = step_both(diffusion, scheduler, i, x_t, output, seed=5)
    out = diffusion.p_mean_variance(lambda x, t: output, x_t, torch.full((2,), i))
    fresh = torch.Generator().manual_seed(5)
    z = torch.randn(x_t.shape, generator=fresh)  # one draw of the image's shape (not of the 2C output)
    expected = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
    assert (theirs.prev_sample - expected).abs().max().item() < 2e-5
    # ... and nothing else: the generators are in the same state afterwards.
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=fresh))


def test_at_t0_the_log_variances_differ_but_neither_sampler_adds_noise():
    diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", T), "learned_range", "hybrid")
    scheduler = DDPMScheduler(**ddpm_scheduler_config(T, "cosine", "learned_range"))
    v = torch.full((1, 1, 4, 4), 0.2)
    frac = 0.6
    x_t = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    output = torch.cat([torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)), v], dim=1)
    beta_0, beta_tilde_1 = diffusion.betas[0].item(), diffusion.posterior_variance[1].item()

    ours = diffusion.p_from_output(output, x_t, torch.tensor([0]))["log_variance"]
    theirs = scheduler._get_variance(0, predicted_variance=v)  # what step would use for learned_range
    # Ours: log β̃_0 is clipped to log β̃_1 (the paper). diffusers: log(clamp(β̃_0 = 0, 1e-20)).
    assert ours.flatten()[0].item() == pytest.approx(frac * math.log(beta_0) + (1 - frac) * math.log(beta_tilde_1),
                                                     rel=1e-6)
    assert theirs.flatten()[0].item() == pytest.approx(frac * math.log(beta_0) + (1 - frac) * math.log(1e-20),
                                                       rel=1e-5)
    assert (ours - theirs).min().item() > 10  # measured −7.55 vs −22.84: σ² e^15.3 times smaller in diffusers
    # fixed_large at t = 0: ours β̃_1, diffusers β_0.
    assert diffusion.fixed_large_variance[0].item() == pytest.approx(beta_tilde_1)
    # (β_0 re-derived as 1 − ᾱ_0 in float32: measured relative error 1.4e-5.)
    assert scheduler._get_variance(0, variance_type="fixed_large").item() == pytest.approx(beta_0, rel=1e-4)

    # Neither adds noise at t = 0: the sample is the posterior mean whatever the generator.
    mean = diffusion.p_from_output(output, x_t, torch.tensor([0]))["mean"]
    samples = []
    for seed in (1, 2):
        ours_step, theirs_step, _ = step_both(diffusion, scheduler, 0, x_t, output, seed=seed)
        assert torch.equal(ours_step["sample"], mean)
        samples.append(theirs_step.prev_sample)
    assert torch.equal(samples[0], samples[1])
    assert (samples[0] - mean).abs().max().item() < 2e-6  # measured 3.0e-7


def test_linspace_spacing_keeps_our_respaced_steps():
    """The export sets timestep_spacing="linspace": num_inference_steps=k keeps our sample_steps=k."""
    def kept(num_train, k, **cfg):
        s = DDPMScheduler(num_train_timesteps=num_train, **cfg)
        s.set_timesteps(k)
        return s.timesteps.tolist()[::-1]

    for num_train, counts in [(100, (5, 10, 20, 25, 50, 100)), (1000, (10, 50, 100, 250, 1000)),
                              (4000, (25, 50, 100, 250, 1000, 4000))]:
        for k in counts:
            assert kept(num_train, k, timestep_spacing="linspace") == space_timesteps(num_train, k), (num_train, k)
    # Where a step falls exactly on a half-integer, our accumulated stride rounds the other way.
    ours, theirs = space_timesteps(100, 15), kept(100, 15, timestep_spacing="linspace")
    assert [(a, b) for a, b in zip(ours, theirs) if a != b] == [(49, 50)]
    # diffusers' default "leading" spacing would never start at T - 1 (x_T treated as x_80).
    assert kept(100, 5) == [0, 20, 40, 60, 80]


# ------------------------------------------------------------------------ refusals


def test_refusals_and_overwrite(exported, tmp_path):
    model, ckpt, _ = exported
    conditional = save_checkpoint(tiny_model(class_cond=True, num_classes=3), tmp_path / "cond.ckpt")
    with pytest.raises(ConfigError, match=r"class_cond: true.*DDPMPipeline"):
        export_to_diffusers(conditional, tmp_path / "cond")
    assert not (tmp_path / "cond").exists()
    # 4 heads over widths 32 and 64: 8 and 16 channels per head, which no diffusers config holds
    uneven = save_checkpoint(tiny_model(unet=UNetConfig([32, 64], 1, [8, 4])), tmp_path / "uneven.ckpt")
    with pytest.raises(ConfigError, match=r"\[32, 64\] channels wide with 4 heads each"):
        export_to_diffusers(uneven, tmp_path / "uneven")
    assert not (tmp_path / "uneven").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        export_to_diffusers(tmp_path / "missing.ckpt", tmp_path / "x")

    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_to_diffusers(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # overwrite replaces the pipeline's own entries only; --raw_weights exports the trained UNet.
    export_to_diffusers(ckpt, out, use_ema=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    unet = load_pipeline(out).unet.state_dict()
    raw = model.unet.state_dict()
    assert all(torch.equal(unet[k], raw[k]) for k in raw)
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]  # no temporary folders left


def test_cli_main_reports_a_config_error_as_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ckpt_path") and "missing.ckpt" in err[0]


def test_export_command(exported, tmp_path, run_main):
    """``python -m iddpm_lightning export`` through the CLI's ``main()`` in-process."""
    model, ckpt, _ = exported
    out = tmp_path / "pipe"
    _, printed = run_main(["export", "--ckpt_path", str(ckpt), "--out", str(out)], cwd=tmp_path, ok=True)
    assert (out / "model_index.json").is_file()
    assert str(out.resolve()) in printed and "DDPMPipeline.from_pretrained" in printed
    unet = load_pipeline(out).unet.state_dict()
    ema = model.ema_unet.state_dict()
    assert all(torch.equal(unet[k], ema[k]) for k in ema)

    conditional = save_checkpoint(tiny_model(class_cond=True, num_classes=3), tmp_path / "cond.ckpt")
    for bad_ckpt, needle in [(tmp_path / "missing.ckpt", "does not exist"), (conditional, "class_cond")]:
        code, err = run_main(["export", "--ckpt_path", str(bad_ckpt), "--out", str(tmp_path / "bad")], cwd=tmp_path)
        assert code == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], err[-3000:]
        assert "Traceback" not in err
        assert not (tmp_path / "bad").exists()
