"""The paper's mathematics in pure PyTorch (no Lightning): schedules, the Gaussian
diffusion process with its losses, exact bits/dim and samplers, and the likelihoods."""

from .gaussian import BPD_MAX_BATCH, LOSS_TYPES, MODEL_VAR_TYPES, GaussianDiffusion, mean_flat
from .likelihood import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .schedules import SCHEDULES, get_named_beta_schedule, space_timesteps

__all__ = [
    "BPD_MAX_BATCH",
    "GaussianDiffusion",
    "LOSS_TYPES",
    "MODEL_VAR_TYPES",
    "SCHEDULES",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
