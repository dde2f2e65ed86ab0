"""The LightningModule on its own: derived shapes, per-rank randomness, EMA updates,
and the bad settings it refuses. Fast: tiny UNets, a few optimizer steps."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from iddpm_lightning.callbacks import NonFiniteGuard
from iddpm_lightning.diffusion import Sampler
from iddpm_lightning.errors import ConfigError, NonFiniteLossError
from iddpm_lightning.module import IDDPM
from iddpm_lightning.rng import seeded_generator
from iddpm_lightning.unet import UNetConfig

from .conftest import TINY_UNET, as_trained

TINY = dict(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=20)



def tiny(**kw) -> IDDPM:
    return as_trained(IDDPM(**{**TINY, **kw}))


def loader(n=32, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=batch_size)


def fit(model, steps, **trainer_kw):
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, **trainer_kw)
    trainer.fit(model, loader())
    return trainer


@pytest.mark.parametrize("var_type, channels", [("learned_range", 2), ("fixed_small", 1), ("fixed_large", 1)])
def test_out_channels_follow_variance_type(var_type, channels):
    loss = "hybrid" if var_type == "learned_range" else "simple"
    model = tiny(model_var_type=var_type, loss_type=loss)
    out = model.unet(torch.zeros(2, 1, 8, 8), torch.tensor([0, 5])).sample
    assert out.shape == (2, channels, 8, 8)


def test_bad_settings_are_one_clear_config_error():
    with pytest.raises(ConfigError, match="model.loss_type 'simple'"):
        tiny(loss_type="simple")
    with pytest.raises(ConfigError, match="unknown beta schedule 'cosin'.*cosine, linear"):
        tiny(noise_schedule="cosin")
    with pytest.raises(ConfigError, match="timesteps must be an integer >= 1"):
        tiny(timesteps=0)
    with pytest.raises(ConfigError, match="image size of 10 cannot be down-sampled"):
        IDDPM(**{**TINY, "image_size": 10, "unet": UNetConfig([32, 32, 32], 1, [], 8)})
    with pytest.raises(ConfigError, match="multiples of 32"):
        tiny(unet=UNetConfig([48], 1, [], 8))


def test_seeded_generator_is_keyed():
    draw = lambda *key: torch.randn(4, generator=seeded_generator(torch.device("cpu"), *key))
    assert torch.equal(draw(0, 0, 5, 1), draw(0, 0, 5, 1))
    assert not torch.equal(draw(0, 0, 5, 1), draw(0, 1, 5, 1))  # another rank
    assert not torch.equal(draw(0, 0, 5, 1), draw(0, 0, 6, 1))  # another step
    assert not torch.equal(draw(0, 0, 5, 1), draw(1, 0, 5, 1))  # another seed


def test_training_step_output_and_weighted_loss():
    outputs = []

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            outputs.append(out)

    fit(tiny(), steps=2, callbacks=[Recorder()])
    for out in outputs:
        assert set(out) == {"loss", "timesteps", "losses"}
        assert out["timesteps"].shape == (8,) and out["timesteps"].dtype == torch.long
        assert not out["losses"].requires_grad
        torch.testing.assert_close(out["loss"], out["losses"].mean())  # uniform sampler: every weight is 1
    assert not torch.equal(outputs[0]["timesteps"], outputs[1]["timesteps"])


def test_a_non_finite_loss_stops_before_the_weights_change(tmp_path):
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    x[20] = float("nan")  # in the third batch of 8
    loader = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=8)
    model = tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[ckpt, NonFiniteGuard()])  # as the CLI adds it
    with pytest.raises(NonFiniteLossError, match=r"not finite in optimizer step 3 \(rank 0, micro-batch 1 of 1\).*those of step 2.*model.lr"):
        trainer.fit(model, loader)
    assert trainer.global_step == 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_loss_in_any_micro_batch_stops_before_the_step(tmp_path):
    """With gradient accumulation every micro-batch's loss is checked, not only the last one's."""
    x = torch.rand(48, 1, 8, 8) * 2 - 1
    x[24] = float("nan")  # the first micro-batch (of 3) of the second optimizer step
    loader = DataLoader(TensorDataset(x, torch.zeros(48, dtype=torch.long)), batch_size=8)
    model = tiny()
    trainer = Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, enable_checkpointing=False, accumulate_grad_batches=3,
                      callbacks=[NonFiniteGuard()])
    before = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 1 and not before:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Snapshot())
    with pytest.raises(NonFiniteLossError, match=r"not finite in optimizer step 2 \(rank 0, micro-batch 1 of 3\)"):
        trainer.fit(model, loader)
    assert trainer.global_step == 1 and int(model.ema_updates) == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # neither the weights nor the EMA moved


def test_ema_follows_weights_once_per_optimizer_step_with_warmup():
    model = tiny(ema_decay=0.9, ema_warmup=True, lr=1e-2)
    init = [p.detach().clone() for p in model.unet.parameters()]
    # EMA by hand, fed the raw weights after every optimizer step (2 micro-batches each).
    expected = [p.clone() for p in init]
    snapshots = []

    orig_update = model.update_ema

    def spy_update():
        snapshots.append([p.detach().clone() for p in model.unet.parameters()])
        orig_update()

    model.update_ema = spy_update
    fit(model, steps=3, accumulate_grad_batches=2)
    assert len(snapshots) == 3 and int(model.ema_updates) == 3
    for n, params in enumerate(snapshots):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = [e + (1 - decay) * (p - e) for e, p in zip(expected, params)]
    for e, p in zip(expected, model.ema_unet.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    assert any((e - p).abs().max() > 1e-4 for e, p in zip(model.ema_unet.parameters(), model.unet.parameters()))


def test_sampling_uses_eval_weights_and_is_reproducible():
    model = tiny()
    with torch.no_grad():
        for p in model.ema_unet.parameters():
            p.mul_(0.5).add_(0.01)  # the output layer starts at zero (as the paper's): give it weights
    g = lambda: torch.Generator().manual_seed(3)
    ddpm, ddim = Sampler("ddpm", 5), Sampler("ddim", "ddim5")
    a = model.sample(ddpm, 3, generator=g())
    b = model.sample(ddpm, 3, generator=g())
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    # the module's route is the sampler's on the eval UNet: the same images
    torch.testing.assert_close(ddpm.sample(model.diffusion, model.model_fn(model.ema_unet), (3, 1, 8, 8),
                                           generator=g()), a, rtol=0, atol=0)  # no dropout: train mode is eval
    model.eval_with_ema = False  # a run-time setting: an attribute, not a hyperparameter
    c = model.sample(ddpm, 3, generator=g())
    assert not torch.equal(a, c)
    d = model.sample(ddim, 3, generator=g())
    assert d.shape == (3, 1, 8, 8) and torch.equal(d, model.sample(ddim, 3, generator=g()))
    assert model.unet.training and model.ema_unet.training  # sampling restored the train mode


def test_class_labels_cycle_over_the_indices_and_a_sample_uses_them_by_default():
    assert tiny().class_labels(torch.arange(5)) is None  # unconditional
    model = tiny(class_cond=True, num_classes=3)
    assert model.class_labels(torch.arange(7)).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert model.class_labels(torch.tensor([10, 11])).tolist() == [1, 2]  # by index over the whole draw
    ddim = Sampler("ddim", 5)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    default = model.sample(ddim, 4, generator=g())
    assert torch.equal(default, model.sample(ddim, 4, labels=torch.tensor([0, 1, 2, 0]), generator=g()))
    assert (model.sample(ddim, 4, labels=torch.tensor([2, 2, 2, 2]), generator=g()) - default).abs().max() > 1e-4
    # noise given instead of a count: as many images as noise rows, the same images as drawn
    noise = torch.randn(4, 1, 8, 8, generator=g())
    assert torch.equal(model.sample(ddim, noise=noise), default)


def test_python_callers_get_the_types_checks_in_one_sentence():
    """The same type hints jsonargparse checks at parse time, for a direct call."""
    cases = [(dict(lr=-1.0), "model.lr=-1.0 must be a number > 0; set it to a value > 0"),
             (dict(ema_decay=1.0), "model.ema_decay=1.0 must be a number in [0, 1)"),
             (dict(bpd_batch_size=0), "model.bpd_batch_size=0 must be an integer >= 1"),
             (dict(warmup_steps=-1), "model.warmup_steps=-1 must be an integer >= 0")]
    for kw, start in cases:
        with pytest.raises(ConfigError) as err:
            tiny(**kw)
        assert str(err.value).startswith(start), str(err.value)
    with pytest.raises(ConfigError, match=r"^model.unet.dropout=1.5 must be a number in \[0, 1\)"):
        UNetConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"^sampler.name='euler' is not one of 'ddpm', 'ddim'"):
        tiny().sample(Sampler("euler", 5), 1)


def test_runtime_settings_are_not_hyperparameters_and_a_dict_unet_rebuilds_the_model():
    model = tiny(bpd_batch_size=7, eval_with_ema=False, gradient_checkpointing=True)
    assert not {"eval_with_ema", "bpd_batch_size", "channels_last", "compile", "gradient_checkpointing"} & set(model.hparams)
    assert model.hparams.unet == {"block_out_channels": [32], "layers_per_block": 1, "attention_resolutions": [],
                                  "attention_head_dim": 8, "dropout": 0.0, "num_heads": 4,
                                  "mid_attention_norm": True, "use_scale_shift_norm": True,
                                  "num_heads_upsample": None}  # plain data, as a checkpoint holds it
    again = IDDPM(**model.hparams)  # what load_from_checkpoint and export do
    assert again.hparams == model.hparams and again.bpd_batch_size == 256 and not again.unet.is_gradient_checkpointing
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]


def test_a_training_step_leaves_the_global_generator_as_it_found_it():
    """Dropout is seeded from the step's key inside the step only: no process-wide reseed."""
    model = tiny(unet=UNetConfig([32], 1, [], 8, dropout=0.5))
    batch = next(iter(loader()))
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)  # training_step reads the rank and epoch through its trainer
    model.trainer = trainer
    model.log = lambda *args, **kwargs: None  # outside a loop there is nowhere to log
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = model.training_step(batch, 0)["loss"].detach()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # another global state: the same step draws the same dropout, t and ε
    assert torch.equal(model.training_step(batch, 0)["loss"].detach(), first)
    assert not torch.equal(model.training_step(batch, 1)["loss"].detach(), first)  # another batch
