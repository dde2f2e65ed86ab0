"""Exact bits/dim: the project's ``calc_bpd_loop`` vs a straightforward loop over t.

Both evaluate the same thing, L_T + Σ_t L_t with x̂_0 clipped, on the same images with the
same weights and the same ε (one seeded generator, t = T-1 first):

* plain loop: one model call per t for the given images (what the paper's evaluation
  script does, at its default of one image per batch).
* max_batch=B: ``calc_bpd_loop(model, x, max_batch=B)``, the project's loop made to take one
  timestep per call, as the paper's.
* iddpm_lightning: ``calc_bpd_loop(model, x)`` as the README calls it: by default 256 inputs
  per call, so several timesteps of the same images share one model call.
* + channels_last / + compile: the same with those model options.

At 1 and at 16 images. The totals must agree to 1e-4 bits/dim.

    python benchmarks/bpd_eval.py [--config configs/digits.yaml] [--rounds 3] [--compile]
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import alternate, build_model, images, report, timed
from iddpm_lightning.diffusion import BPD_MAX_BATCH


@torch.no_grad()
def plain_bpd_loop(model, x_start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Total bits/dim [B], one model call per t."""
    d, unet = model.diffusion, model.eval_unet
    B, total = x_start.shape[0], d.prior_bpd(x_start)
    for t in range(d.num_timesteps - 1, -1, -1):
        t_b = torch.full((B,), t, device=x_start.device, dtype=torch.long)
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device)
        x_t = d.q_sample(x_start, t_b, noise)
        vb, _ = d.vb_terms_bpd(unet(x_t, t_b).sample, x_start, x_t, t_b, clip_denoised=True)
        total = total + vb
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time model.compile: true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)

    variants = {"iddpm_lightning": {}, "+ channels_last": {"channels_last": True}}
    if args.compile:
        variants["+ compile"] = {"compile": True}
    base = build_model(args.config).to(device).eval()
    models = {"plain loop": base, "max_batch=B": base}
    for name, options in variants.items():
        models[name] = build_model(args.config, **options).to(device).eval()
        models[name].load_state_dict(base.state_dict())

    def run(name: str, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        model = models[name]
        g = torch.Generator(device).manual_seed(0)
        if name == "plain loop":
            return timed(lambda: plain_bpd_loop(model, x, g), device)
        fn = model.model_fn(model.eval_unet)
        kwargs = {"max_batch": len(x)} if name == "max_batch=B" else {}  # else the default, as the README calls it
        return timed(lambda: model.diffusion.calc_bpd_loop(fn, x, generator=g, **kwargs)["total_bpd"], device)

    times, totals = {}, {}
    for n in args.images:
        x = images(base, n, device)
        for name in models:  # warm-up (and compilation) at the timed shapes
            run(name, x)
        methods = {f"{name} @ {n}": (lambda name=name: record(name)) for name in models}

        def record(name: str, x=x, n=n) -> float:
            dt, total = run(name, x)
            totals[f"{name} @ {n}"] = total.double().mean().item()
            return dt

        times.update(alternate(methods, args.rounds, warmup=0))

    diffs = {k: abs(v - totals[f"plain loop @ {k.rsplit('@ ', 1)[1]}"]) for k, v in totals.items()}
    hp = base.hparams
    config = {"config": args.config, "timesteps": hp.timesteps, "image": [hp.in_channels, hp.image_size, hp.image_size],
              "max_batch_default": BPD_MAX_BATCH, "images": args.images, "rounds": args.rounds,
              "parameters": sum(p.numel() for p in base.unet.parameters()), "device": str(device)}
    print(f"T = {hp.timesteps}, {config['parameters'] / 1e6:.1f}M-parameter UNet, "
          f"images {hp.in_channels}x{hp.image_size}x{hp.image_size}, calc_bpd_loop's default max_batch {BPD_MAX_BATCH}")
    for n in args.images:
        rows = {k: v for k, v in times.items() if k.endswith(f"@ {n}")}
        report(f"bpd_eval_{n}", config, rows, f"plain loop @ {n}",
               {"mean_total_bpd": {k: totals[k] for k in rows}, "abs_diff_vs_plain": {k: diffs[k] for k in rows}},
               args.out and args.out.replace(".json", f"_{n}.json"), unit="s")
    if max(diffs.values()) >= 1e-4:
        sys.exit(f"results differ from the plain loop by {max(diffs.values()):.2e} bits/dim")


if __name__ == "__main__":
    main()
