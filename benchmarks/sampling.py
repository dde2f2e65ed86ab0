"""100-step respaced ancestral sampling: the project's sampler vs diffusers' DDPMPipeline.

Same UNet, same weights, same batch, 100 model calls each:

* iddpm_lightning: ``IDDPM.sample(Sampler(steps=100), n)`` (learned-range variance,
  respaced as the paper does: ``space_timesteps(T, "100")``).
* + compile: the same with the model option ``compile: true``.
* diffusers: ``DDPMPipeline`` with ``DDPMScheduler(beta_schedule="squaredcos_cap_v2",
  variance_type="learned_range")`` and ``num_inference_steps=100`` (its own "leading"
  spacing of the 100 steps).

The samplers' own work (all but the UNet) is also timed on its own, with a stand-in model.
Both return images in [0, 1] as numpy arrays (the pipeline's ``output_type="np"``). Ours runs
under ``torch.inference_mode``, the pipeline under ``torch.no_grad``.

    python benchmarks/sampling.py [--config configs/digits.yaml] [--batch-size 64] [--rounds 5] [--compile]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from common import alternate, build_model, report, timed
from iddpm_lightning.diffusion import Sampler


def sampler_overhead(model, scheduler: DDPMScheduler, n: int, steps: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per step of each sampler's own work (everything but the UNet): both
    loops run with a stand-in model that returns a fixed output."""
    hp = model.hparams
    shape = (n, hp.in_channels, hp.image_size, hp.image_size)
    output = 0.5 * torch.randn(n, model.unet.config.out_channels, hp.image_size, hp.image_size, device=device)
    diffusion, sampler = model.diffusion, Sampler(steps=steps)

    def ours() -> float:
        g = torch.Generator(device).manual_seed(0)
        return timed(lambda: sampler.sample(diffusion, lambda x, t: output, shape, generator=g, device=device),
                     device)[0]

    @torch.no_grad()
    def theirs_loop(g):  # DDPMPipeline.__call__'s loop
        scheduler.set_timesteps(steps)
        x = torch.randn(shape, generator=g, device=device)
        for t in scheduler.timesteps:
            x = scheduler.step(output, t, x, generator=g).prev_sample
        return x

    def theirs() -> float:
        g = torch.Generator(device).manual_seed(0)
        return timed(lambda: theirs_loop(g), device)[0]

    times = alternate({"iddpm_lightning": ours, "diffusers": theirs}, rounds=20)
    return {k: statistics.median(v) * 1e3 / steps for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time model.compile: true")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = build_model(args.config).to(device).eval()
    T = model.hparams.timesteps
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                              variance_type="learned_range", clip_sample=True, prediction_type="epsilon")
    pipe = DDPMPipeline(unet=model.ema_unet, scheduler=scheduler).to(device)
    pipe.set_progress_bar_config(disable=True)

    def ours(model) -> float:
        g = torch.Generator(device).manual_seed(0)

        def run():
            x = model.sample(Sampler(steps=args.steps), args.batch_size, generator=g)  # (N, C, H, W) in [-1, 1]
            return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

        return timed(run, device)[0]

    def theirs() -> float:
        g = torch.Generator(device).manual_seed(0)
        return timed(lambda: pipe(batch_size=args.batch_size, generator=g, num_inference_steps=args.steps,
                                  output_type="np").images, device)[0]

    methods = {"diffusers DDPMPipeline": theirs, "iddpm_lightning": lambda: ours(model)}
    if args.compile:
        compiled = build_model(args.config, compile=True).to(device).eval()
        compiled.load_state_dict(model.state_dict())
        methods["+ compile"] = lambda: ours(compiled)
    times = alternate(methods, args.rounds)
    overhead = sampler_overhead(model, scheduler, args.batch_size, args.steps, device)
    hp = model.hparams
    config = {"config": args.config, "batch_size": args.batch_size, "steps": args.steps, "timesteps": T,
              "image": [hp.in_channels, hp.image_size, hp.image_size], "rounds": args.rounds, "device": str(device),
              "parameters": sum(p.numel() for p in model.ema_unet.parameters())}
    print(f"{config['parameters'] / 1e6:.1f}M-parameter UNet, {args.batch_size} images of "
          f"{hp.in_channels}x{hp.image_size}x{hp.image_size}, {args.steps} of T = {T} steps, {device}")
    print(f"the samplers alone, with a stand-in model (ms per step, median of 20): ours {overhead['iddpm_lightning']:.3f}, "
          f"diffusers' scheduler {overhead['diffusers']:.3f}")
    report("sampling", config, times, "diffusers DDPMPipeline", {"sampler_overhead_ms_per_step": overhead}, args.out)


if __name__ == "__main__":
    main()
