"""The speed options a user turns on in YAML change speed, not results: each is run next
to the plain path on the same weights and data. (bf16-mixed: tests/test_precision.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from iddpm_lightning.data import DigitsDataModule
from iddpm_lightning.module import IDDPM
from iddpm_lightning.rng import global_rng_seeded

from .conftest import TINY_UNET, as_trained

TINY = dict(image_size=8, in_channels=1, unet=TINY_UNET, timesteps=100)



def pair(**options) -> tuple[IDDPM, IDDPM]:
    """A plain model and one with ``options``, holding the same weights."""
    torch.manual_seed(0)
    plain = as_trained(IDDPM(**TINY))
    fast = IDDPM(**TINY, **options)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def loss_and_grads(model: IDDPM, x, t, noise) -> tuple[torch.Tensor, torch.Tensor]:
    model.unet.zero_grad(set_to_none=True)
    loss = model.diffusion.training_losses(model.model_fn(model.unet), x, t, noise)["loss"].mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.unet.parameters()])


def one_step_inputs(B=6):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    return x, torch.randint(0, 100, (B,), generator=g), torch.randn(B, 1, 8, 8, generator=g)


def check_same_training_and_sampling(plain: IDDPM, fast: IDDPM, grad_atol: float):
    inputs = one_step_inputs()
    loss_p, grad_p = loss_and_grads(plain, *inputs)
    loss_f, grad_f = loss_and_grads(fast, *inputs)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert grad_p.abs().max() > 0.1  # gradients to compare, not zeros
    torch.testing.assert_close(grad_f, grad_p, rtol=0, atol=grad_atol)
    # evaluation (sampling, bits/dim) goes through the EMA UNet in eval mode; compared on
    # one call, since a sampling chain amplifies float rounding by up to 1/√ᾱ_t ~ 1e5
    x, t, _ = inputs
    with torch.no_grad():
        outs = [m.model_fn(m.ema_unet.eval())(x, t) for m in (plain, fast)]  # (B, 2C, H, W)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_channels_last_trains_and_evaluates_like_the_default_layout():
    plain, fast = pair(channels_last=True)
    conv = fast.unet.down_blocks[0].resnets[0].conv1.weight  # (32, 32, 3, 3)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.ema_unet.down_blocks[0].resnets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    check_same_training_and_sampling(plain, fast, grad_atol=1e-5)


@pytest.mark.slow
def test_compiled_unet_trains_and_evaluates_like_eager():
    plain, fast = pair(compile=True)
    # compiled in place: the same state-dict keys, so checkpoints are interchangeable
    assert list(fast.state_dict()) == list(plain.state_dict())
    check_same_training_and_sampling(plain, fast, grad_atol=1e-5)
    # then an optimizer step and the EMA update (torch._foreach_lerp_ over the compiled
    # modules' parameters), and the EMA UNet evaluates alike again
    for model in (plain, fast):
        torch.optim.SGD(model.unet.parameters(), lr=0.1).step()
        model._ema_n = 0
        model.update_ema()
    start = torch.cat([p.flatten() for p in pair()[0].ema_unet.parameters()])
    moved = [torch.cat([p.flatten() for p in m.ema_unet.parameters()]) - start for m in (plain, fast)]
    assert moved[0].abs().max() > 1e-6  # (1 - 0.9999) of an SGD step
    torch.testing.assert_close(moved[1], moved[0], rtol=0, atol=2e-8)  # ulp of the weights ~7e-9
    x, t, _ = one_step_inputs()
    with torch.no_grad():
        outs = [m.model_fn(m.ema_unet.eval())(x, t) for m in (plain, fast)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_gradient_checkpointing_recomputes_every_residual_block_and_gives_the_same_loss_and_gradients():
    # with dropout, so the recomputation must replay the forward's masks; the backward runs after
    # the seeded context is left and more numbers were drawn, as in training
    torch.manual_seed(0)
    options = dict(TINY, unet=dataclasses.replace(TINY_UNET, dropout=0.3, layers_per_block=2))
    plain = as_trained(IDDPM(**options))
    saving = IDDPM(**options, gradient_checkpointing=True)
    saving.load_state_dict(plain.state_dict())
    assert not {"gradient_checkpointing"} & set(saving.hparams)  # how to run, not what the model is
    x, t, noise = one_step_inputs()
    results = []
    for model in (plain, saving):
        calls = []
        resnets = [m for m in model.unet.modules() if isinstance(m, ResnetBlock2D)]
        for block in resnets:  # counts every run of the block (checkpoint's recomputation skips module hooks)
            block.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(block.forward)
        model.unet.train().zero_grad(set_to_none=True)
        with global_rng_seeded(torch.device("cpu"), 0, 0, 5, 1):
            loss = model.diffusion.training_losses(model.model_fn(model.unet), x, t, noise)["loss"].mean()
        forward_calls = len(calls)
        torch.rand(1000)  # the global generator moves on before the backward
        loss.backward()
        assert forward_calls == len(resnets) == 7  # 2 down, 2 in the middle block, 3 up
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.unet.parameters()]),
                        len(calls) - forward_calls))
    (loss_p, grad_p, recomputed_p), (loss_c, grad_c, recomputed_c) = results
    # checkpointed, every residual block runs again in the backward but the middle block's first
    # (diffusers checkpoints the blocks' loops, and that one runs before its loop)
    assert recomputed_p == 0 and recomputed_c == 6
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=0)
    assert grad_p.abs().max() > 0.1
    torch.testing.assert_close(grad_c, grad_p, rtol=1e-5, atol=1e-6)
    # and dropout is on: another mask gives another loss
    with global_rng_seeded(torch.device("cpu"), 0, 0, 6, 1):
        other = plain.diffusion.training_losses(plain.model_fn(plain.unet), x, t, noise)["loss"].mean()
    assert (other - loss_p).abs() > 1e-4


def test_bpd_batch_size_changes_no_number_for_a_class_conditional_model():
    # k timesteps per call repeat the B labels k times: a wrong layout would change L_t
    torch.manual_seed(0)
    model = as_trained(IDDPM(**{**TINY, "timesteps": 20}, class_cond=True, num_classes=3)).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    labels = torch.tensor([0, 1, 2, 1])
    outs = [model.diffusion.calc_bpd_loop(model.model_fn(model.ema_unet, labels), x,
                                          generator=torch.Generator().manual_seed(4), max_batch=n) for n in (4, 28, 80)]
    for out in outs[1:]:
        torch.testing.assert_close(out["vb"], outs[0]["vb"], rtol=1e-5, atol=1e-6)
    # and the labels matter: other labels give other numbers
    other = model.diffusion.calc_bpd_loop(model.model_fn(model.ema_unet, labels.flip(0)), x,
                                          generator=torch.Generator().manual_seed(4), max_batch=28)
    assert (other["vb"] - outs[0]["vb"]).abs().max() > 1e-4


def test_loader_workers_and_persistent_workers_give_the_same_batches():
    def batches(**loader):
        dm = DigitsDataModule(batch_size=64, **loader)
        dm.setup("fit")
        return [torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in dm.train_dataloader()]

    main_process = batches()
    workers = batches(num_workers=2, persistent_workers=True)
    assert len(workers) == len(main_process) == (1797 - 300) // 64
    for a, b in zip(main_process, workers):
        assert torch.equal(a, b)
