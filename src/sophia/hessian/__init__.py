"""Diagonal Hessian estimators: Gauss-Newton-Bartlett and Hutchinson."""

from sophia.hessian.gnb import (
    SampledLoss,
    bernoulli_sampled_loss,
    categorical_sampled_loss,
    gaussian_sampled_loss,
    gnb_refresh,
    sample_categorical,
    sample_categorical_from_uniform,
)
from sophia.hessian.hutchinson import hutchinson, hutchinson_from_grads
from sophia.hessian.probes import gaussian_like, probes_like, rademacher_like

__all__ = [
    "SampledLoss",
    "bernoulli_sampled_loss",
    "categorical_sampled_loss",
    "gaussian_like",
    "gaussian_sampled_loss",
    "gnb_refresh",
    "hutchinson",
    "hutchinson_from_grads",
    "probes_like",
    "rademacher_like",
    "sample_categorical",
    "sample_categorical_from_uniform",
]
