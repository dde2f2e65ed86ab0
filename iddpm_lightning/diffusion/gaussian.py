"""GaussianDiffusion: the forward process, the learned reverse process, its losses,
exact bits/dim and the reverse steps of Improved DDPM (Nichol & Dhariwal 2021); the sampling
loops over these steps are ``samplers.py``'s.

(Over 300 lines on purpose: the paper's mathematics in one class, read top to bottom in the
order of its sections, as the paper's own ``gaussian_diffusion.py``; every method states the
equation it implements.)

Notation (0-based index t, the paper's step t + 1; see schedules.py):
    α_t = 1 − β_t,   ᾱ_t = Π_{s≤t} α_s,   ᾱ_{-1} = 1
    q(x_t | x_0)          = N(√ᾱ_t x_0, (1 − ᾱ_t) I)                 (§2.1)
    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),  β̃_t = β_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t)
    μ̃_t = β_t √ᾱ_{t-1} / (1 − ᾱ_t) · x_0 + (1 − ᾱ_{t-1}) √α_t / (1 − ᾱ_t) · x_t
    p_θ(x_{t-1} | x_t)    = N(μ_θ, Σ_θ), μ_θ = μ̃_t(x̂_0, x_t), x̂_0 = (x_t − √(1−ᾱ_t) ε_θ) / √ᾱ_t
    learned range (eq. 15): Σ_θ = exp(v log β_t + (1 − v) log β̃_t), v = (model output + 1) / 2

A model is any callable ``model(x_t, t) -> [B, 2C, H, W]`` (learned range: ε then v) or
``[B, C, H, W]`` (fixed variances), called with the ORIGINAL timestep indices (a respaced
diffusion maps its own indices through ``timestep_map``). Tables are float64 buffers;
each lookup indexes first and then casts to the data's dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .likelihood import discretized_gaussian_log_likelihood, normal_kl
from .schedules import space_timesteps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MODEL_VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("simple", "hybrid", "vlb")
LN2 = math.log(2.0)
# Model inputs per forward pass when evaluating bits/dim: 256 timesteps of one image (or 16 of
# 16) per call, enough to keep a GPU or a CPU busy where one image per call leaves it idle.
BPD_MAX_BATCH = 256


def log_strata(num_timesteps: int, num_strata: int) -> list[int]:
    """Bounds 0 = b_0 < b_1 < ... < b_K = T of K strata [b_k, b_{k+1}) of [0, T), with
    b_k = round(T^(k/K)) (pushed up by one where rounding would repeat a bound)."""
    bounds = [0]
    for k in range(1, num_strata):
        bounds.append(max(round(num_timesteps ** (k / num_strata)), bounds[-1] + 1))
    return bounds + [num_timesteps]


def inference(fn):
    """Run ``fn`` under ``torch.inference_mode`` (no autograd bookkeeping at all) and return
    clones made outside it: ordinary tensors, which callers may change in place or use with
    autograd (inference tensors refuse both)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return {k: v.clone() for k, v in out.items()} if isinstance(out, dict) else out.clone()

    return wrapper


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.flatten(1).mean(dim=1)


class GaussianDiffusion(nn.Module):
    """The diffusion process of a β schedule, with the model's reverse process on top.

    Args:
        betas: β_t for t = 0..T-1 (float64 array, from ``get_named_beta_schedule``).
        model_var_type: ``"learned_range"`` (eq. 15), ``"fixed_small"`` (β̃_t) or
            ``"fixed_large"`` (β_t, with β̃_1 at t = 0 so that the decoder stays sharp).
        loss_type: ``"hybrid"`` (eq. 16, λ = 0.001), ``"vlb"`` or ``"simple"``.
        timestep_map: original index of each step; identity unless respaced.
    """

    def __init__(
        self,
        betas: np.ndarray | torch.Tensor,
        model_var_type: str = "learned_range",
        loss_type: str = "hybrid",
        timestep_map: torch.Tensor | None = None,
    ):
        super().__init__()
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(
                f"unknown model_var_type {model_var_type!r}; valid names are {', '.join(MODEL_VAR_TYPES)}"
            )
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid names are {', '.join(LOSS_TYPES)}")
        betas = np.asarray(betas.cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array with every value in (0, 1]")
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.num_timesteps = T = len(betas)

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃_0 = 0, so its log is clipped to log β̃_1 (the paper's code does the same).
        # With T = 1 there is no β̃_1: β_0 stands in.
        beta_tilde_1 = posterior_variance[1] if T > 1 else betas[0]
        tables = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.append(beta_tilde_1, posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            "fixed_large_variance": np.append(beta_tilde_1, betas[1:]),
            "fixed_large_log_variance": np.log(np.append(beta_tilde_1, betas[1:])),
        }
        # Derived from betas, so not saved in checkpoints (persistent=False).
        for name, table in tables.items():
            self.register_buffer(name, torch.from_numpy(table), persistent=False)
        if timestep_map is None:
            timestep_map = torch.arange(T)
        self.register_buffer("timestep_map", torch.as_tensor(timestep_map, dtype=torch.long), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """Tables follow the module's device but never its dtype: ``module.to(torch.bfloat16)``
        (which a 16-bit ``trainer.precision`` applies to the whole LightningModule) would
        collapse ᾱ_t to a few distinct values. ``_extract`` casts after indexing instead."""
        for name, table in self._buffers.items():
            if table is not None:
                self._buffers[name] = table.to(device=fn(table[:0]).device)
        return self

    # ------------------------------------------------------------------ helpers

    def _extract(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] as x's dtype, shaped [B, 1, 1, 1] to broadcast against x [B, C, H, W]."""
        return table[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def _call_model(self, model: Model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output at ORIGINAL timesteps, in x's dtype (float32 under autocast too)."""
        return model(x_t, self.timestep_map[t]).to(x_t.dtype)

    def respace(self, steps: str | int | Sequence[int]) -> "GaussianDiffusion":
        """A diffusion over some of the original steps (the paper's ``SpacedDiffusion``): a respacing
        (``100``, ``"10,15,25"``, ``"ddim50"``: the steps ``space_timesteps`` keeps) or the kept steps
        themselves (distinct, any order).

        Its β come from ᾱ at the kept steps k_0 < k_1 < ..., β'_i = 1 − ᾱ_{k_i} / ᾱ_{k_{i-1}}, so its ᾱ
        equals the original ᾱ at every kept step; its model calls use the original indices. Its
        reverse process starts from N(0, I) at the last kept step, so keeping only steps below some
        t' < T skips the first T − t' steps of the original reverse process (the paper's Fig. 3).
        """
        if isinstance(steps, (str, int)):
            steps = space_timesteps(self.num_timesteps, steps)
        kept = sorted(set(int(k) for k in steps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"the kept steps must be steps of 0..{self.num_timesteps - 1}, got {list(steps)}")
        alphas_cumprod = self.alphas_cumprod.cpu().numpy()[kept]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        return GaussianDiffusion(
            betas, self.model_var_type, self.loss_type, timestep_map=self.timestep_map.cpu()[kept]
        ).to(self.betas.device)

    # ------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean √ᾱ_t x_0, variance 1 − ᾱ_t and its log, of q(x_t | x_0); [B, C, H, W] each."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = 1.0 - self._extract(self.alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, ε ~ N(0, I): a draw of q(x_t | x_0). [B, C, H, W]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """μ̃_t(x_t, x_0), β̃_t and log β̃_t (clipped at t = 0) of q(x_{t-1} | x_t, x_0).

        Returns three [B, C, H, W] tensors.
        """
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance_clipped = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance_clipped

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = x_t / √ᾱ_t − √(1/ᾱ_t − 1) ε."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """ε = (x_t / √ᾱ_t − x̂_0) / √(1/ᾱ_t − 1), the inverse of ``predict_xstart_from_eps``."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # ------------------------------------------------------------ reverse process

    def p_mean_variance(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True) -> dict:
        """μ_θ(x_t, t), Σ_θ, log Σ_θ and x̂_0 of p_θ(x_{t-1} | x_t). See ``p_from_output``."""
        return self.p_from_output(self._call_model(model, x_t, t), x_t, t, clip_denoised)

    def p_from_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict:
        """p_θ(x_{t-1} | x_t) from a model output [B, 2C or C, H, W].

        x̂_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε_θ, clipped to [−1, 1] if ``clip_denoised``;
        μ_θ = μ̃_t(x̂_0, x_t) (the same as eq. 11 of Ho et al. when unclipped).
        Variance: learned range log Σ = frac·log β_t + (1 − frac)·log β̃_t, frac = (v + 1)/2,
        unclamped (eq. 15); fixed_small β̃_t; fixed_large β_t (β̃_1 at t = 0).
        Returns mean, variance, log_variance, pred_xstart, all [B, C, H, W].
        """
        if self.model_var_type == "learned_range":
            eps, v = model_output.chunk(2, dim=1)  # (B, C, H, W) each
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(self.log_betas, t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            if self.model_var_type == "fixed_large":
                variance_table, log_variance_table = self.fixed_large_variance, self.fixed_large_log_variance
            else:
                variance_table, log_variance_table = self.posterior_variance, self.posterior_log_variance_clipped
            variance = self._extract(variance_table, t, x_t).expand_as(x_t)
            log_variance = self._extract(log_variance_table, t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------- losses

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, dict]:
        """L_t in bits per dimension, [B], and p_θ's terms (see ``p_from_output``).

        t ≥ 1: L_{t} = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)), mean over C·H·W, / ln 2.
        t = 0: L_0 = −log p_θ(x_0 | x_1), the discretized Gaussian decoder (bits, mean over
        C·H·W) — a negative log-likelihood, so positive.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LN2
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        ) / LN2
        return torch.where(t == 0, decoder_nll, kl), out

    def training_losses(
        self, model: Model, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample training terms at timesteps t [B] for x_0 [B, C, H, W].

        - ``mse``  = mean over C·H·W of (ε − ε_θ(x_t, t))², the L_simple of eq. 14.
        - ``vb``   = L_t in bits/dim (``vb_terms_bpd``, x̂_0 unclipped).
        - ``loss`` = ``mse`` (simple) | ``mse + T/1000 · vb`` (hybrid, eq. 16: T·L_t is the
          one-sample estimate of L_vlb = Σ_t L_t, so λ = 0.001 weighs it by T/1000)
          | ``T · vb`` (vlb).
        In ``hybrid`` (and ``simple``) the vb term sees a detached ε_θ, so L_vlb trains only
        the variance (§3.1); in ``vlb`` the mean and the variance both learn from it.
        Returns a dict of [B] tensors.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = self._call_model(model, x_t, t)  # (B, 2C or C, H, W)
        eps = model_output[:, : x_start.shape[1]]
        mse = mean_flat((noise - eps) ** 2)

        if self.loss_type == "vlb":
            vb_output = model_output
        elif self.loss_type == "hybrid" and self.model_var_type == "learned_range":
            vb_output = torch.cat([eps.detach(), model_output[:, x_start.shape[1]:]], dim=1)
        else:
            vb_output = model_output.detach()
        vb, _ = self.vb_terms_bpd(vb_output, x_start, x_t, t, clip_denoised=False)

        T = self.num_timesteps
        if self.loss_type == "simple":
            loss = mse
        elif self.loss_type == "hybrid":
            loss = mse + vb * (T / 1000.0)
        else:
            loss = vb * T
        return {"loss": loss, "mse": mse, "vb": vb}

    # --------------------------------------------------------------- likelihood

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits per dim, [B]. No parameters: ~0 for a
        good schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LN2

    def _vb_chunks(self, model: Model, x_start: torch.Tensor, draws, max_batch: int, clip_denoised: bool):
        """L_t for a sequence of draws (t [B], ε [B, C, H, W]) of the same images, evaluated
        k = max(1, max_batch // B) draws per model call: the k·B inputs are t-major (input
        j·B + b is image b at the j-th draw), so a class-conditional model repeats its B labels
        k times. Batching changes no random number: the draws are made in the caller's order.
        Yields, per draw: its t [B] and ε, then vb_t [B], x̂_0 and x_t [B, C, H, W]."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be a number of model inputs >= 1, got {max_batch}")
        B = x_start.shape[0]
        k = max(1, max_batch // B)
        x0_k = x_start.repeat(k, *([1] * (x_start.dim() - 1)))  # (kB, C, H, W), once for all chunks
        draws = iter(draws)
        while chunk := [d for _, d in zip(range(k), draws)]:
            t = torch.cat([d[0] for d in chunk])  # (kB,)
            noise = torch.cat([d[1] for d in chunk])  # (kB, C, H, W)
            x0 = x0_k[: len(t)]
            x_t = self.q_sample(x0, t, noise)
            vb_t, out = self.vb_terms_bpd(self._call_model(model, x_t, t), x0, x_t, t, clip_denoised)
            for j, (t_j, noise_j) in enumerate(chunk):
                rows = slice(j * B, (j + 1) * B)
                yield t_j, noise_j, vb_t[rows], out["pred_xstart"][rows], x_t[rows]

    @inference
    def calc_bpd_loop(
        self, model: Model, x_start: torch.Tensor, clip_denoised: bool = True,
        generator: torch.Generator | None = None, progress: bool = False, max_batch: int = BPD_MAX_BATCH,
    ) -> dict[str, torch.Tensor]:
        """Exact variational bound of x_0 [B, C, H, W] in bits per dim: L_T + Σ_t L_t.

        Each t draws a fresh ε (from ``generator`` if given, in the order t = T-1, ..., 0
        like the paper's code) and evaluates L_t with x̂_0 clipped to [−1, 1] as the
        paper's evaluation does. ``max_batch`` (default ``BPD_MAX_BATCH`` = 256): model inputs
        per forward pass; k = max(1, max_batch // B) timesteps of the same images share one
        call (see ``_vb_chunks``), ⌈T / k⌉ calls in all, and ``max_batch=B`` is the paper's
        one call per timestep. The numbers do not depend on it beyond float rounding (the
        same ε in the same order); on few images it is what makes the loop fast, since one
        image per call leaves the hardware idle. Lower it if memory is short.

        Returns (column t of every [B, T] array is timestep t — ascending, whereas the
        paper's code stacks its columns from T-1 down to 0):
            total_bpd [B]   Σ_t vb[:, t] + prior_bpd
            prior_bpd [B]   L_T
            vb [B, T]       L_t (t = 0: the decoder −log p(x_0 | x_1))
            xstart_mse [B, T]  mean over dims of (x̂_0 − x_0)²
            mse [B, T]      mean over dims of (ε(x̂_0) − ε)², ε(x̂_0) implied by the clipped x̂_0
        """
        B, T, device = x_start.shape[0], self.num_timesteps, x_start.device
        timesteps = range(T - 1, -1, -1)
        draws = ((torch.full((B,), t, device=device, dtype=torch.long),
                  torch.randn(x_start.shape, generator=generator, device=device, dtype=x_start.dtype))
                 for t in timesteps)
        vb, xstart_mse, mse = (x_start.new_zeros(B, T) for _ in range(3))
        results = self._vb_chunks(model, x_start, draws, max_batch, clip_denoised)
        for t, (t_batch, noise, vb_t, pred_xstart, x_t) in tqdm(zip(timesteps, results), total=T, desc="bits/dim",
                                                                 disable=not progress, leave=False):
            vb[:, t] = vb_t
            xstart_mse[:, t] = mean_flat((pred_xstart - x_start) ** 2)
            mse[:, t] = mean_flat((self.predict_eps_from_xstart(x_t, t_batch, pred_xstart) - noise) ** 2)
        prior_bpd = self.prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }

    @inference
    def stratified_bpd(
        self, model: Model, x_start: torch.Tensor, num_strata: int, clip_denoised: bool = True,
        generator: torch.Generator | None = None, max_batch: int = BPD_MAX_BATCH,
    ) -> dict[str, torch.Tensor]:
        """Unbiased stratified estimate of ``calc_bpd_loop``'s total bits/dim, L_T + Σ_t L_t,
        with 2K model calls instead of T, and an unbiased estimate of its own variance.

        [0, T) is cut into K = ``num_strata`` contiguous strata S_k of sizes s_k whose bounds
        are spaced geometrically (``log_strata``): t = 0 and the first steps, where L_t is
        largest and changes fastest, get strata of their own, so the estimate's variance is
        tens of times smaller than with equal strata at the same cost. In every stratum
        each image draws TWO independent t_a, t_b uniformly from S_k (from ``generator``,
        with a fresh ε for each, as in ``calc_bpd_loop``), and L_t is the same term the exact
        loop evaluates (``vb_terms_bpd``, x̂_0 clipped if ``clip_denoised``). With
        X = s_k · L_t, E[X] = Σ_{t∈S_k} E_ε[L_t], so

            total_bpd = L_T + Σ_k (X_a + X_b) / 2                      (unbiased)
            Var(total_bpd | x_0) = Σ_k σ_k² / 2,  σ_k² = Var(X) within stratum k
            variance  = Σ_k (X_a − X_b)² / 4                           (unbiased for it)

        The second draw per stratum exists only so that this variance can be estimated
        (one draw per stratum would leave σ_k² unidentifiable). With K = T every stratum
        is one t, and X_a, X_b differ only in ε. Model calls: ⌈2K / k⌉, k = max(1,
        ``max_batch`` // B) draws of the same images per call (as in ``calc_bpd_loop``, same
        default); ``max_batch=B`` makes the 2K calls of one draw each.

        Returns total_bpd [B], variance [B] (of total_bpd, given x_0), prior_bpd [B].
        """
        T = self.num_timesteps
        if not 1 <= num_strata <= T:
            raise ValueError(f"num_strata must be between 1 and the number of timesteps T = {T}, got {num_strata}")
        B, device = x_start.shape[0], x_start.device
        bounds = log_strata(T, num_strata)
        starts, sizes = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        sizes_per_draw = [size for size in sizes for _ in range(2)]  # (stratum, draw) order

        def draws():
            for start, size in zip(starts, sizes):
                for _ in range(2):
                    t = start + torch.randint(0, size, (B,), generator=generator, device=device)
                    yield t, torch.randn(x_start.shape, generator=generator, device=device, dtype=x_start.dtype)

        x = [size * vb_t for size, (_, _, vb_t, _, _) in
             zip(sizes_per_draw, self._vb_chunks(model, x_start, draws(), max_batch, clip_denoised))]
        x_a, x_b = torch.stack(x[0::2]), torch.stack(x[1::2])  # (K, B) each
        total, variance = ((x_a + x_b) / 2).sum(dim=0), ((x_a - x_b) ** 2 / 4).sum(dim=0)
        prior_bpd = self.prior_bpd(x_start)
        return {"total_bpd": total + prior_bpd, "variance": variance, "prior_bpd": prior_bpd}

    # ----------------------------------------------------------------- samplers

    def p_sample(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_{t-1} = μ_θ + exp(½ log Σ_θ) z, z ~ N(0, I), and no noise at t = 0."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True, eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12), with ε re-derived from the clipped x̂_0:

            σ = η √((1 − ᾱ_{t-1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t-1})
            x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1} − σ²) ε + σ z   (z only for t > 0)
        """
        out = self.p_mean_variance(model, x_t, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}
