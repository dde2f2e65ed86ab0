"""The paper's mathematics in pure PyTorch (no Lightning): schedules, the Gaussian
diffusion process with its losses and exact bits/dim, the likelihoods, the distributions of the
training timesteps, and the image samplers."""

from .gaussian import BPD_MAX_BATCH, LOSS_TYPES, MODEL_VAR_TYPES, GaussianDiffusion, mean_flat
from .likelihood import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .samplers import SAMPLERS, Sampler
from .schedules import SCHEDULES, get_named_beta_schedule, space_timesteps
from .timesteps import LossSecondMoment, TimestepDistribution, UniformTimesteps

__all__ = [
    "BPD_MAX_BATCH",
    "GaussianDiffusion",
    "LOSS_TYPES",
    "LossSecondMoment",
    "MODEL_VAR_TYPES",
    "SAMPLERS",
    "SCHEDULES",
    "Sampler",
    "TimestepDistribution",
    "UniformTimesteps",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
